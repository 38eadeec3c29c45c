"""ImageNet-100-style input: class subsets (a list or an ImageNet-100 list file), resize + centre crop
at load (in the decoding workers when streamed), and `vitlab bench --input`'s throughput report, on a
small ImageFolder of JPEGs written here."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.bench import format_input_table, run_input_bench
from vitlab.cli import main
from vitlab.data import load_dataset
from vitlab.data.base import FileDataset


@pytest.fixture
def tree(tmp_path):
    """3 classes x 10 JPEGs of 64x48 (W x H): grey 128 inside a 2-pixel white frame, class-coded corner."""
    root = tmp_path / "imagenet"
    for c in range(3):
        (root / f"n0{c}").mkdir(parents=True)
        for i in range(10):
            img = np.full((48, 64, 3), 128, np.uint8)
            img[:2], img[-2:], img[:, :2], img[:, -2:] = 255, 255, 255, 255
            img[4:8, 4:8] = 40 * c + i
            Image.fromarray(img).save(root / f"n0{c}" / f"{i}.JPEG", quality=95)
    return root


def test_class_subset_from_a_list_and_from_a_list_file(tree, tmp_path):
    bundle = load_dataset("imagefolder", str(tree), img_size=16, classes=["n02", "n00"])
    assert bundle.train.classes == ["n00", "n02"] and len(bundle.train) == 20  # folder-name order
    assert bundle.train.labels.tolist() == [0] * 10 + [1] * 10
    listing = tmp_path / "imagenet100.txt"
    listing.write_text("# the usual list: one class per line, words after the id ignored\nn01 goldfish\n\nn02\n")
    streamed = load_dataset("imagefolder", str(tree), img_size=16, classes=str(listing), stream=True)
    assert isinstance(streamed.train, FileDataset) and streamed.train.classes == ["n01", "n02"]
    assert len(streamed.train) == 20 and all("n00" not in str(p) for p in streamed.train.paths)


@pytest.mark.parametrize("classes,words", [
    (["n00", "n07"], ["'n07' is not a class folder", "valid: n00, n01, n02"]),
    (["n00", "n00"], ["'n00' more than once"]),
    ("missing-list.txt", ["'missing-list.txt': no such file"]),
])
def test_bad_class_subsets_are_one_line_errors(tree, classes, words):
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", str(tree), img_size=16, classes=classes)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("stream", [False, True])
def test_resize_shorter_side_then_centre_crop(tree, stream):
    # 64x48 -> shorter side 40 (53x40) -> centre 32 (H) x 24 (W): the frame is cropped away
    bundle = load_dataset("imagefolder", str(tree), img_size=(32, 24), resize=40, stream=stream)
    train = bundle.train
    assert train.item_shape == (3, 32, 24)
    images = torch.stack([train[i][0] for i in range(len(train))]) if stream else train.images
    assert images.shape == (30, 3, 32, 24)
    assert (images.int() - 128).abs().max() <= 12  # grey only (JPEG noise): no frame, no corner mark
    squeezed = load_dataset("imagefolder", str(tree), img_size=(32, 24)).train.images  # the old squeeze keeps both
    assert squeezed.shape == (30, 3, 32, 24) and squeezed.max() > 200
    with pytest.raises(ValueError, match="resize=20; expected an int >= the largest side"):
        load_dataset("imagefolder", str(tree), img_size=(32, 24), resize=20)


def test_input_bench_reports_throughput_per_worker_count(tree):
    overrides = [f"data.root={tree}", "data.options.img_size=[32,24]", "data.options.resize=40",
                 "data.options.classes=[n00,n01]", "train.device=cpu"]
    result = run_input_bench("imagenet100-clearvit-quick", overrides, workers=[0, 2], batches=3, warmup=1, batch=4)
    assert result["streamed"] and result["train_images"] == 20 and result["classes"] == 2
    assert result["item_shape"] == [3, 32, 24]
    assert [r["workers"] for r in result["rows"]] == [0, 2]
    for row in result["rows"]:
        assert row["images"] == 12 and row["img_s"] > 0 and row["first_batch_s"] > 0
    # 2 workers deliver their first 2 batches together: the warm-up takes both; 3 timed batches are
    # fewer than 4 per worker, so that rate is marked as overstated
    assert [(r["warmup"], r["short_window"]) for r in result["rows"]] == [(1, False), (2, True)]
    table = format_input_table(result)
    assert "| 2 | 12 |" in table and " * |" in table and "fewer than 4 timed batches per worker" in table
    with pytest.raises(ValueError, match="fewer than the 1 \\+ 9 asked for"):
        run_input_bench("imagenet100-clearvit-quick", overrides, workers=[0], batches=9, warmup=1, batch=4)


def test_input_bench_cli(tree, capsys):
    argv = ["bench", "--input", "imagenet100-clearvit-quick", f"data.root={tree}", "data.options.img_size=24",
            "data.options.resize=24", "train.device=cpu", "--workers", "1", "--steps", "2", "--warmup", "1",
            "--batch", "5", "--quiet"]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"][0]["workers"] == 1 and result["rows"][0]["images"] == 10 and result["rows"][0]["img_s"] > 0
    assert main(argv) == 0
    assert "| workers | images |" in capsys.readouterr().out
    assert main(["bench", "data.root=x"]) == 2
    assert "need --input" in capsys.readouterr().err



@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_jpeg_in_a_streamed_folder_is_one_line_naming_it(tree, workers, capsys):
    """A truncated JPEG passes a streamed folder's listing (Image.verify reads no pixels) and fails
    when a worker decodes it: one line naming the file and what to do, not the worker's 20-line
    traceback; ``python -m vitlab.data.check_images`` lists it."""
    from vitlab.data import check_images
    from vitlab.data.imagefolder import UnreadableImageError
    from vitlab.train.feed import make_feed

    bad = tree / "n01" / "3.JPEG"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) * 2 // 3])  # headers whole, scan data cut short
    ds = load_dataset("imagefolder", str(tree), img_size=16, stream=True).train  # on_bad_image=skip: listed anyway
    assert bad in ds.paths
    with pytest.raises(UnreadableImageError) as err:
        for _ in make_feed(ds, torch.device("cpu"), workers=workers).batches(torch.arange(len(ds)), 8):
            pass
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg and "Traceback" not in msg, msg
    assert msg.startswith(f"imagefolder: cannot decode {bad} (OSError: image file is truncated"), msg
    assert "check only file headers" in msg and "delete or replace it" in msg, msg
    assert f"python -m vitlab.data.check_images {tree}`" in msg, msg
    assert (err.value.worker_traceback is not None) == (workers > 0)
    assert check_images.main([str(tree)]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{bad}: OSError: image file is truncated"), out.out
    assert "1 file(s)" in out.err
    bad.unlink()
    assert check_images.main([str(tree), "--workers", "2"]) == 0

SPAWNED_FEED = """
import multiprocessing, sys, torch
from vitlab.data import load_dataset
from vitlab.train.feed import make_feed

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[2], force=True)
    ds = load_dataset("imagefolder", sys.argv[1], img_size=16, resize=20, stream=True).train
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    got = torch.cat([x for x, _ in make_feed(ds, torch.device("cpu"), workers=2).batches(order, 8)])
    want = torch.stack([ds[i][0] for i in order.tolist()])
    print(multiprocessing.get_start_method(), tuple(got.shape), bool(torch.equal(got, want)))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_streamed_batches_under_spawn_and_forkserver_workers(tree, tmp_path, method):
    """macOS starts DataLoader workers with spawn, and Linux's Python from 3.14 with forkserver: there the
    dataset, its decoder and the worker seeding are pickled into fresh processes, not inherited, so a
    lambda or a parent-only global among them would break streamed training on those machines."""
    script = tmp_path / "feed.py"
    script.write_text(SPAWNED_FEED)
    r = subprocess.run([sys.executable, str(script), str(tree), method], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [method, "(30,", "3,", "16,", "16)", "True"], r.stdout


def test_class_list_file_saved_with_a_byte_order_mark(tree, tmp_path):
    listing = tmp_path / "notepad.txt"
    listing.write_text("n01\r\nn02\r\n", encoding="utf-8-sig")  # what Windows Notepad writes
    bundle = load_dataset("imagefolder", str(tree), img_size=16, classes=str(listing))
    assert bundle.train.classes == ["n01", "n02"]  # was: '\ufeffn01' is not a class folder


def test_symlinked_sub_folders_are_followed_once_and_broken_links_reported(tree, tmp_path):
    """As torchvision's ImageFolder, images in a symlinked folder inside a class folder count (rglob
    skipped them silently); a link back up the tree is entered once; a broken link is a bad file."""
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 7, np.uint8)).save(extra / f"x{i}.JPEG")
    (tree / "n01" / "more").symlink_to(extra, target_is_directory=True)
    (tree / "n01" / "loop").symlink_to(tree / "n01", target_is_directory=True)
    (tree / "n02" / "gone.JPEG").symlink_to(tmp_path / "missing.JPEG")
    with pytest.warns(UserWarning, match=r"skipped 1 file.*gone\.JPEG"):
        bundle = load_dataset("imagefolder", str(tree), img_size=16)
    assert torch.bincount(bundle.train.labels).tolist() == [10, 13, 10]
    from torchvision.datasets import ImageFolder
    (tree / "n01" / "loop").unlink()  # (torchvision would follow it round until the path is too long)
    (tree / "n02" / "gone.JPEG").unlink()
    assert [t for _, t in ImageFolder(str(tree)).samples].count(1) == 13


@pytest.mark.parametrize("stream", ["false", "true"])
def test_eval_finds_the_runs_data_from_any_folder_and_refuses_other_images(tree, tmp_path, monkeypatch, stream):
    """config.yaml records data.root and the class list as absolute paths: given relative, an eval
    or --resume started in another folder found no data, or other data of that name. And an official
    test set (here ImageNet's val/) is fingerprinted in split.json: a copy whose val images changed
    classes is refused, where its indices alone (none: it is not carved) could not tell."""
    import shutil

    work = tmp_path / "work"
    for part in ("train", "val"):
        shutil.copytree(tree, work / "data" / part)
    (work / "list.txt").write_text("n00\nn01\n")
    monkeypatch.chdir(work)
    small = ["data.name=imagefolder", "data.root=data", "data.options.classes=list.txt", "data.options.img_size=16",
             "model.patch_size=8", "model.dim=16", "model.depth=1", "model.heads=2", "train.epochs=1",
             "train.batch_size=6", f"data.options.stream={stream}", "data.workers=0"]
    assert main(["train", "fashion-mnist-quick", *small, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"root: {work / 'data'}" in saved and f"classes: {work / 'list.txt'}" in saved
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(tmp_path / "run")]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(work / "data", copy)
    assert main(["eval", str(tmp_path / "run"), f"data.root={copy}"]) == 0  # another copy of the same files
    for a, b in (("n00", "tmp"), ("n01", "n00"), ("tmp", "n01")):  # two val classes swap their images
        (copy / "val" / a).rename(copy / "val" / b)
    assert main(["eval", str(tmp_path / "run"), f"data.root={copy}"]) == 2
