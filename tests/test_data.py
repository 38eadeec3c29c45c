"""The data layer: every source read from real-format files written here, find_root, splits."""
from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.data import (DATASETS, ArrayDataset, DataBundle, find_root, load_dataset, make_splits,
                         split_from_json, split_to_json, stratified_split)
from vitlab.data.idx import FASHION_CLASSES, read_idx
from vitlab.data.locate import PLACES

FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
MRICRON_SYSTEM = Path("/usr/share/mricron/templates")


@pytest.fixture(autouse=True)
def _no_user_data(tmp_path, monkeypatch):
    """No test sees the user's $VITLAB_DATA or cache."""
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# --- writers for real file formats ---------------------------------------------------------------------------

def write_idx(path: Path, arr: np.ndarray) -> Path:
    """An IDX file: 0x0000, type 0x08 (ubyte), rank, big-endian int32 dims, then the bytes; gzipped for .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_mnist(folder: Path, n_train=30, n_test=10, gz_train=True, gz_test=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for stem, arr in arrays.items():
        gz = gz_train if stem.startswith("train") else gz_test
        write_idx(folder / (stem + (".gz" if gz else "")), arr)
    return arrays


def write_cifar(folder: Path, hundred=False, per_batch=6):
    """Python-pickle CIFAR batches (bytes keys, as the originals); pixel rows are R, G, B planes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n, offset):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + offset) % (100 if hundred else 10) for i in range(n)]
        if hundred:
            return {b"data": data, b"fine_labels": labels, b"coarse_labels": [x // 5 for x in labels]}
        return {b"data": data, b"labels": labels}

    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    batches = {}
    for i, name in enumerate(names + ["test_batch" if not hundred else "test"]):
        batches[name] = batch(per_batch * (5 if hundred and name == "train" else 1), i)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    meta = ({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
             b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]} if hundred
            else {b"label_names": [f"c{i}".encode() for i in range(10)]})
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return batches


def save_image(path: Path, arr: np.ndarray):
    """uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA, uint16 (H, W) -> I;16; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --- MNIST / Fashion-MNIST ------------------------------------------------------------------------------------

def test_idx_gz_and_raw_files_load_exactly(tmp_path):
    arrays = write_mnist(tmp_path / "m", gz_train=True, gz_test=False)  # gz train, raw test
    bundle = load_dataset("mnist", str(tmp_path / "m"))
    assert bundle.train.images.shape == (30, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert bundle.test.images.shape == (10, 1, 28, 28)
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert torch.equal(bundle.test.labels, torch.arange(10) % 10) and bundle.test.labels.dtype == torch.int64
    assert bundle.train.classes == [str(i) for i in range(10)] and bundle.source == str(tmp_path / "m")


def test_idx_torchvision_layout_and_class_names(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz_train=False, gz_test=True)
    bundle = load_dataset("fashion-mnist", str(tmp_path))
    assert bundle.source == str(tmp_path / "FashionMNIST" / "raw")
    assert bundle.train.classes == FASHION_CLASSES and bundle.train.classes[9] == "Ankle boot"
    assert len(bundle.train) == 30 and len(bundle.test) == 10


def test_idx_bad_files_raise_naming_the_file(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 5, 6)))
    assert read_idx(good).shape == (4, 5, 6)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated.*size mismatch"):
        read_idx(truncated)
    wrong_magic = tmp_path / "wrong_magic"
    wrong_magic.write_bytes(b"\x12\x34" + good.read_bytes()[2:])
    with pytest.raises(ValueError, match="wrong_magic.*not an IDX"):
        read_idx(wrong_magic)
    wrong_type = tmp_path / "wrong_type"
    wrong_type.write_bytes(b"\x00\x00\x0d" + good.read_bytes()[3:])
    with pytest.raises(ValueError, match="wrong_type.*0x0d"):
        read_idx(wrong_type)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(good.read_bytes())[:-20])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(cut_gz)
    # through load_dataset: the broken file is named
    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-images-idx3-ubyte").write_bytes(truncated.read_bytes())
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path / "m"))


def _bad_deflate(data: bytes, at: int) -> bytes:
    """``data`` with the deflate block header at byte ``at`` made a reserved block type (BTYPE 11):
    zlib then fails with "invalid block type" (not a CRC error, which gzip reports as OSError)."""
    out = bytearray(data)
    out[at] = 0x07
    return bytes(out)


def test_damaged_compressed_files_are_one_line_errors_naming_the_file(tmp_path):
    """A damaged deflate stream (zlib.error) in a .gz IDX file, a .nii.gz volume or a compressed .npz,
    and a damaged .npy header (tokenize.TokenError), were tracebacks."""
    import io
    import zipfile

    import nibabel as nib

    raw = write_idx(tmp_path / "raw", np.zeros((4, 5, 6))).read_bytes()
    (tmp_path / "bad.gz").write_bytes(_bad_deflate(gzip.compress(raw), 10))  # gzip's header: 10 bytes
    nifti = tmp_path / "nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(nifti.with_suffix(".nii")))
    for cls in "ab":
        (tmp_path / "v" / cls).mkdir(parents=True)
        np.save(tmp_path / "v" / cls / "0.npy", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "v" / "a" / "1.nii.gz").write_bytes(
        _bad_deflate(gzip.compress(nifti.with_suffix(".nii").read_bytes()), 10))
    np.savez_compressed(tmp_path / "c.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.arange(4))
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        info = z.getinfo("train_images.npy")
    data = (tmp_path / "c.npz").read_bytes()
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")  # past the local header
    (tmp_path / "c.npz").write_bytes(_bad_deflate(data, start))
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 8, 8), np.uint8))
    member = buf.getvalue().replace(b"}", b" ", 1)  # the header dict left open
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as z:
        z.writestr("train_images.npy", member)
        buf = io.BytesIO()
        np.save(buf, np.arange(4))
        z.writestr("train_labels.npy", buf.getvalue())
    for call, name in ((lambda: read_idx(tmp_path / "bad.gz"), "bad.gz"),
                       (lambda: load_dataset("volumes", str(tmp_path / "v")), "1.nii.gz"),
                       (lambda: load_dataset("npz", str(tmp_path / "c.npz")), "c.npz"),
                       (lambda: load_dataset("npz", str(tmp_path / "h.npz")), "h.npz")):
        with pytest.raises(ValueError) as err:
            call()
        assert name in str(err.value) and "cannot read" in str(err.value) and "\n" not in str(err.value)


def test_idx_header_with_negative_dimensions_is_named_corrupt(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 5, 6))).read_bytes()
    bad = good[:4] + struct.pack(">3i", -4, -5, 6) + good[16:]
    (tmp_path / "neg").write_bytes(bad)
    with pytest.raises(ValueError, match=r"neg: IDX header gives negative dimension\(s\) \(-4, -5, 6\)"):
        read_idx(tmp_path / "neg")
    huge = good[:4] + struct.pack(">3i", 2**31 - 1, 2**31 - 1, 2**31 - 1) + good[16:]  # int64 product overflows
    (tmp_path / "huge").write_bytes(huge)
    with pytest.raises(ValueError, match="huge: IDX size mismatch"):
        read_idx(tmp_path / "huge")


@pytest.mark.skipif(not FASHION_SYSTEM.is_dir(), reason="needs Debian's dataset-fashion-mnist "
                    "(/usr/share/datasets/fashion-mnist); CI installs it")
def test_real_fashion_mnist_from_the_system_copy():
    full = load_dataset("fashion-mnist")  # found without a root: the system copy
    assert full.source == str(FASHION_SYSTEM)
    assert full.train.images.shape == (60000, 1, 28, 28) and full.test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(full.train.labels), torch.full((10,), 6000))
    small = load_dataset("fashion-mnist", limit=2000, seed=3)
    assert small.train.images.shape == (2000, 1, 28, 28) and len(small.test) == 10000
    assert (torch.bincount(small.train.labels, minlength=10) - 200).abs().max() <= 1
    assert small.train.images.float().std() > 10  # real pictures, not blanks


# --- CIFAR ----------------------------------------------------------------------------------------------------

def test_cifar10_pickle_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    bundle = load_dataset("cifar10", str(tmp_path))  # torchvision's layout: the parent folder
    assert bundle.train.images.shape == (30, 3, 32, 32) and bundle.test.images.shape == (6, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    assert torch.equal(bundle.train.images[0, 1], torch.from_numpy(first[1024:2048].reshape(32, 32)))  # G plane
    assert bundle.train.labels[:6].tolist() == batches["data_batch_1"][b"labels"]
    assert bundle.train.classes == [f"c{i}" for i in range(10)]


def test_cifar100_fine_and_coarse_labels(tmp_path):
    batches = write_cifar(tmp_path / "cifar-100-python", hundred=True)
    fine = load_dataset("cifar100", str(tmp_path / "cifar-100-python"))
    assert fine.train.images.shape == (30, 3, 32, 32) and len(fine.train.classes) == 100
    assert fine.train.labels.tolist() == batches["train"][b"fine_labels"]
    coarse = load_dataset("cifar100", str(tmp_path), labels="coarse")
    assert coarse.train.labels.tolist() == batches["train"][b"coarse_labels"] and len(coarse.train.classes) == 20
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cifar-100-python/test"):
        load_dataset("cifar100", str(tmp_path))



@pytest.mark.parametrize("content,words", [
    (5, ["not a CIFAR python batch", "int", "not a dict"]),  # was a TypeError ("argument of type 'int' ...")
    ([1, 2], ["not a CIFAR python batch", "list"]),
    ({b"data": [[300] * 3072, [0] * 3072], b"labels": [0, 1]}, ["pixel values", "0..255", "300"]),  # OverflowError
    ({b"data": np.full((2, 3072), 256, np.int64), b"labels": [0, 1]}, ["0..255", "256"]),  # would wrap to 0
    ({b"data": np.full((2, 3072), -1, np.int16), b"labels": [0, 1]}, ["0..255", "-1"]),
    ({b"data": np.full((2, 3072), 0.5), b"labels": [0, 1]}, ["integers 0..255", "0.5"]),
    ({b"data": [["a"] * 3072] * 2, b"labels": [0, 1]}, ["pixel data is <U1", "uint8"]),
    # labels: a cast to int64 truncated 0.7 to 0; one out of range was not traced to its file
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.7, 1.7]}, ["labels must be integers 0..9", "float64"]),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, ["labels must be integers 0..9", "[0, 10]"]),
])
def test_cifar_bad_batch_is_a_one_line_error_naming_the_file(tmp_path, content, words):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "cifar-10-batches-py/test_batch" in msg, msg
    assert all(w in msg for w in words), msg


def test_cifar_integer_pixels_in_range_load_as_uint8(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    test = batches["test_batch"]
    as_lists = {b"data": test[b"data"].astype(np.int64).tolist(), b"labels": test[b"labels"]}  # a re-pickled copy
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(as_lists, f)
    bundle = load_dataset("cifar10", str(tmp_path))
    assert torch.equal(bundle.test.images, torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)))

# --- imagefolder ----------------------------------------------------------------------------------------------

def make_tree(root: Path):
    """Three classes: grey/RGB/RGBA/16-bit images of mixed sizes and formats, plus two bad files."""
    save_image(root / "cat" / "grey.png", np.full((20, 30), 100, np.uint8))
    save_image(root / "cat" / "rgb.jpg", np.full((40, 40, 3), (200, 50, 20), np.uint8))
    save_image(root / "dog" / "rgba.png", np.dstack([np.full((16, 8), v, np.uint8) for v in (10, 20, 30, 0)]))
    save_image(root / "dog" / "wide16.png", (np.arange(64 * 8, dtype=np.uint16) * 100).reshape(8, 64))
    save_image(root / "emu" / "palette.gif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    (root / "emu" / "notes.txt").write_text("not an image")
    png = (root / "cat" / "grey.png").read_bytes()
    (root / "emu" / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "emu" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored, not counted


def test_imagefolder_decodes_every_mode_and_skips_bad_files_with_one_warning(tmp_path):
    make_tree(tmp_path / "tree")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = load_dataset("imagefolder", str(tmp_path / "tree"), img_size=12)
    ours = [w for w in caught if "imagefolder" in str(w.message)]
    assert len(ours) == 1 and "skipped 2 file(s)" in str(ours[0].message)
    assert bundle.test is None and bundle.train.classes == ["cat", "dog", "emu"]
    images, labels = bundle.train.images, bundle.train.labels
    assert images.shape == (5, 3, 12, 12) and labels.tolist() == [0, 0, 1, 1, 2]
    assert (images[0] == 100).all()  # grey replicated into R, G, B (bilinear keeps a constant)
    assert (images[1, 0].float().mean() - 200).abs() < 4 and (images[1, 2].float().mean() - 20).abs() < 4  # JPEG
    assert images[2, :, 0, 0].tolist() == [10, 20, 30]  # RGBA: alpha dropped
    assert images[3].min() <= 5 and images[3].max() >= 250  # 16-bit scaled to the full uint8 range, not clipped

    with pytest.warns(UserWarning, match="skipped 2"):
        grey = load_dataset("imagefolder", str(tmp_path / "tree"), img_size=(6, 10), channels=1)
    assert grey.train.images.shape == (5, 1, 6, 10) and (grey.train.images[0] == 100).all()


def test_imagefolder_fail_mode_names_the_bad_file(tmp_path):
    make_tree(tmp_path / "tree")
    with pytest.raises(ValueError, match=r"emu/cut\.png"):
        load_dataset("imagefolder", str(tmp_path / "tree"), img_size=12, on_bad_image="fail")


def test_imagefolder_empty_class_folder_raises_naming_it(tmp_path):
    save_image(tmp_path / "tree" / "a" / "x.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "tree" / "b").mkdir()
    with pytest.raises(ValueError, match=r"tree/b is empty"):
        load_dataset("imagefolder", str(tmp_path / "tree"), img_size=8)
    (tmp_path / "tree" / "b" / "junk.png").write_bytes(b"junk")  # only unreadable files: empty after skipping
    with pytest.raises(ValueError, match=r"tree/b holds no readable image \(1 file"):
        load_dataset("imagefolder", str(tmp_path / "tree"), img_size=8)


@pytest.mark.parametrize("train,test", [("Training", "Testing"), ("train", "test"), ("train", "val")])
def test_imagefolder_split_layout(tmp_path, train, test):
    root = tmp_path / "mri"
    for split, n in ((train, 3), (test, 2)):
        for cls in ("glioma", "notumor"):
            for i in range(n):
                save_image(root / split / cls / f"{i}.jpg", np.full((30 + i, 25), 60 * i, np.uint8))
    bundle = load_dataset("imagefolder", str(root), img_size=16, channels=1)
    assert bundle.train.images.shape == (6, 1, 16, 16) and bundle.test.images.shape == (4, 1, 16, 16)
    assert bundle.train.classes == bundle.test.classes == ["glioma", "notumor"]
    save_image(root / test / "pituitary" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"only in test: \['pituitary'\]"):
        load_dataset("imagefolder", str(root), img_size=16)



def test_imagenet_train_val_layout_val_is_the_test_set(tmp_path):
    """ImageNet's train/ + val/: val/ is the held-out test set (what ImageNet papers report), read
    like train/ + test/ (it used to be dropped silently: no test set at all). With train/, val/ and
    test/ all there, test/ is the test set and a warning says val/ is not read."""
    root = tmp_path / "imagenet"
    for part, n in (("train", 4), ("val", 2)):
        for c in ("n01", "n02"):
            for i in range(n):
                save_image(root / part / c / f"{i}.JPEG", np.full((12, 10, 3), 50 * i + (100 if part == "val" else 0),
                                                                   np.uint8))
    for stream in (False, True):
        bundle = load_dataset("imagefolder", str(root), img_size=8, stream=stream)
        assert len(bundle.train) == 8 and len(bundle.test) == 4, stream
        assert bundle.train.classes == bundle.test.classes == ["n01", "n02"]
        assert bundle.test.labels.tolist() == [0, 0, 1, 1]
    vols = tmp_path / "vols"  # the volumes source shares the layouts
    for part in ("train", "val"):
        for c in ("a", "b"):
            (vols / part / c).mkdir(parents=True)
            np.save(vols / part / c / "0.npy", np.random.default_rng(0).random((4, 4, 4)))
    assert len(load_dataset("volumes", str(vols)).test) == 2
    for c in ("n01", "n02"):
        save_image(root / "test" / c / "0.png", np.zeros((12, 10, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"val/, which is not read"):
        bundle = load_dataset("imagefolder", str(root), img_size=8)
    assert len(bundle.test) == 2
    only_train = tmp_path / "only"
    save_image(only_train / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    save_image(only_train / "train" / "b" / "0.png", np.zeros((4, 4), np.uint8))
    bundle = load_dataset("imagefolder", str(only_train), img_size=4)
    assert bundle.test is None and bundle.train.classes == ["a", "b"]

def test_imagefolder_native_size_must_agree(tmp_path):
    save_image(tmp_path / "t" / "a" / "0.png", np.zeros((8, 8), np.uint8))
    save_image(tmp_path / "t" / "a" / "1.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="img_size"):
        load_dataset("imagefolder", str(tmp_path / "t"), img_size=None)


# --- npz ------------------------------------------------------------------------------------------------------

def test_npz_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (12, 28, 28, 3), dtype=np.uint8),
              "train_labels": (np.arange(12) % 3)[:, None],  # (N, 1) as MedMNIST stores them
              "val_images": rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8),
              "val_labels": np.array([[0], [1], [2]]),
              "test_images": rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8), "test_labels": np.arange(6) % 3}
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "bloodmnist.npz", **arrays)
    bundle = load_dataset("npz", str(tmp_path / "d"))  # a folder holding exactly one .npz
    assert bundle.train.images.shape == (15, 3, 28, 28) and bundle.test.images.shape == (6, 3, 28, 28)
    assert torch.equal(bundle.train.images[12], torch.from_numpy(arrays["val_images"][0]).permute(2, 0, 1))
    assert bundle.train.labels[12:].tolist() == [0, 1, 2] and bundle.train.classes == ["0", "1", "2"]
    assert bundle.source.endswith("bloodmnist.npz")

    np.savez(tmp_path / "d" / "grey.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.arange(4))
    with pytest.raises(ValueError, match="2 .npz files"):
        load_dataset("npz", str(tmp_path / "d"))
    grey = load_dataset("npz", str(tmp_path / "d"), file="grey.npz", classes=["a", "b", "c", "d"])
    assert grey.train.images.shape == (4, 1, 8, 8) and grey.test is None and grey.train.classes[3] == "d"
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.ones((4, 5)))
    with pytest.raises(ValueError, match="multi-label"):
        load_dataset("npz", str(tmp_path / "multi.npz"))



def test_npz_without_training_images_is_an_error_naming_the_file(tmp_path):
    np.savez(tmp_path / "empty.npz", train_images=np.zeros((0, 8, 8), np.uint8), train_labels=np.zeros(0, np.int64))
    with pytest.raises(ValueError) as err:  # was "max() arg is an empty sequence", no file named
        load_dataset("npz", str(tmp_path / "empty.npz"))
    assert "empty.npz" in str(err.value) and "no training images" in str(err.value)
    np.savez(tmp_path / "complex.npz", train_images=np.ones((2, 8, 8), np.complex64), train_labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"complex\.npz: train_images is complex64; expected uint8"):
        load_dataset("npz", str(tmp_path / "complex.npz"))

def test_to_unit_minmax_percentile_and_window():
    from vitlab.data.intensity import to_unit

    ramp = np.arange(1000, dtype=np.float64)
    assert to_unit(ramp, "minmax")[[0, 500, 999]].tolist() == [0.0, 500 / 999, 1.0]
    assert (to_unit(np.full(5, 7.0), "percentile") == 0).all() and (to_unit(np.full(5, 7.0), "auto") == 0).all()
    hot = np.append(ramp, 1e6)  # one hot pixel: min-max squeezes the rest below 1/1000
    assert to_unit(hot, "minmax")[999] < 1e-3
    pct = to_unit(hot, "percentile")  # 0.5th..99.5th percentile, clipped: the ramp keeps the range
    assert pct[0] == 0 and pct[-1] == 1 and abs(pct[500] - 0.5) < 0.01 and pct.min() >= 0 and pct.max() <= 1
    hu = np.array([-2000, -1000, -300, 400, 3000], dtype=np.float32)  # a CT window in Hounsfield units
    out = to_unit(hu, (-1000.0, 400.0))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    # non-finite values count as the lowest finite one, far from 0 too (as 0 they stretched the range)
    offset = np.array([np.nan, 1000.0, 1050.0, np.inf, 1100.0, -np.inf], dtype=np.float32)
    assert to_unit(offset, "minmax").tolist() == [0.0, 0.0, 0.5, 0.0, 1.0, 0.0]
    assert to_unit(np.full(3, np.nan), "minmax").tolist() == [0.0, 0.0, 0.0]


def test_imagefolder_intensity_window_keeps_absolute_intensities(tmp_path):
    """Two classes of 12-bit images told apart only by brightness: per-image min-max (the default for
    16-bit files) erases the difference, a fixed window keeps it, streamed or in memory alike."""
    rng = np.random.default_rng(0)
    for cls, base in (("dim", 1000), ("bright", 3000)):
        for i in range(4):
            save_image(tmp_path / "t" / cls / f"{i}.png", (base + rng.integers(0, 500, (12, 12))).astype(np.uint16))
    root = str(tmp_path / "t")
    auto = load_dataset("imagefolder", root, img_size=None, channels=1).train
    means = [auto.images[auto.labels == c].float().mean().item() for c in (0, 1)]
    assert abs(means[0] - means[1]) < 10  # both stretched to 0..255
    window = load_dataset("imagefolder", root, img_size=None, channels=1, intensity=[0, 4095]).train
    means = [window.images[window.labels == c].float().mean().item() for c in (0, 1)]  # classes: bright, dim
    assert abs(means[0] - 3250 / 4095 * 255) < 3 and abs(means[1] - 1250 / 4095 * 255) < 3
    streamed = load_dataset("imagefolder", root, img_size=12, channels=1, intensity=[0, 4095], stream=True).train
    assert torch.equal(torch.stack([streamed[i][0] for i in range(len(streamed))]), window.images)


def test_imagefolder_intensity_applies_to_8_bit_images_when_asked(tmp_path):
    save_image(tmp_path / "t" / "a" / "grey.png", np.array([[0, 100, 200]], np.uint8))
    save_image(tmp_path / "t" / "b" / "rgb.png", np.array([[[50, 100, 150]] * 3], np.uint8))
    root = str(tmp_path / "t")
    auto = load_dataset("imagefolder", root, img_size=None, channels=3).train.images
    assert auto[0, :, 0].tolist() == [[0, 100, 200]] * 3 and auto[1, :, 0, 0].tolist() == [50, 100, 150]  # as is
    win = load_dataset("imagefolder", root, img_size=None, channels=3, intensity=[0, 127]).train.images
    assert win[0, 0, 0].tolist() == [0, 201, 255] and win[1, :, 0, 0].tolist() == [100, 201, 255]
    mm = load_dataset("imagefolder", root, img_size=None, channels=1, intensity="minmax").train.images
    assert mm[0, 0, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("source", ["imagefolder", "volumes"])
@pytest.mark.parametrize("value", ["median", [400, -1000], [5, 5], [0, 1, 2], ["a", 1], [0, float("inf")], True, 3])
def test_bad_intensity_is_a_one_line_error(tmp_path, source, value):
    with pytest.raises(ValueError) as err:
        load_dataset(source, str(tmp_path), intensity=value)
    msg = str(err.value)
    assert "\n" not in msg and f"{source} option intensity=" in msg and "'percentile'" in msg and "[low, high]" in msg


# --- volumes --------------------------------------------------------------------------------------------------

def test_volumes_npy_scaled_and_resized(tmp_path):
    root = tmp_path / "vols"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    ramp = np.arange(6 * 8 * 4, dtype=np.float32).reshape(6, 8, 4) - 50.0
    np.save(root / "a" / "0.npy", ramp)  # (H, W, D)
    np.save(root / "a" / "1.npy", np.full((6, 8, 4), 7.0))  # constant: all zeros
    np.save(root / "b" / "0.npy", ramp[None] * 3)  # (C, H, W, D)
    bundle = load_dataset("volumes", str(root))
    assert bundle.train.images.shape == (3, 1, 6, 8, 4) and bundle.train.labels.tolist() == [0, 0, 1]
    assert bundle.train.images[0].min() == 0 and bundle.train.images[0].max() == 255
    assert (bundle.train.images[1] == 0).all()
    resized = load_dataset("volumes", str(root), size=(4, 4, 8))
    assert resized.train.images.shape == (3, 1, 4, 4, 8)
    np.save(root / "b" / "1.npy", np.zeros((5, 5, 5)))
    with pytest.raises(ValueError, match="size="):
        load_dataset("volumes", str(root))
    (root / "b" / "2.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"b/2\.npy"):
        load_dataset("volumes", str(root), size=(4, 4, 4))


def test_volumes_intensity_window_in_hounsfield_units(tmp_path):
    root = tmp_path / "ct"
    hu = np.array([-2000, -1000, -300, 400, 3000, 400], np.float32).reshape(1, 2, 3)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        np.save(root / cls / "0.npy", hu)
        np.save(root / cls / "1.npy", hu + (1000 if cls == "b" else 0))
    window = load_dataset("volumes", str(root), intensity=[-1000, 400]).train
    assert window.images[0].flatten().tolist() == [0, 0, 128, 255, 255, 255]  # 127.5 rounds to even
    assert window.images[3].flatten().tolist() == [0, 182, 255, 255, 255, 255]  # b/1.npy, +1000 HU: brighter
    minmax = load_dataset("volumes", str(root)).train  # per volume: the shift is gone
    assert torch.equal(minmax.images[2], minmax.images[3])
    hot = hu.copy()
    hot[0, 0, 0] = -1e6  # one outlier voxel
    np.save(root / "a" / "0.npy", hot)
    assert load_dataset("volumes", str(root), intensity="minmax").train.images[0].flatten()[1:].min() >= 250


def test_volumes_nifti_reads_like_npy(tmp_path):
    nib = pytest.importorskip("nibabel", reason="NIfTI needs nibabel")
    root = tmp_path / "nii"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    vol = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "x" / "v.nii.gz"))
    nib.save(nib.Nifti1Image(vol[..., None], np.eye(4)), str(root / "y" / "v.nii"))  # (H, W, D, C=1)
    np.save(root / "y" / "w.npy", vol)
    bundle = load_dataset("volumes", str(root))
    assert bundle.train.images.shape == (3, 1, 5, 6, 7) and bundle.train.labels.tolist() == [0, 1, 1]
    assert torch.equal(bundle.train.images[0], bundle.train.images[1])
    assert torch.equal(bundle.train.images[0], bundle.train.images[2])


def test_volumes_nifti_channel_count_must_agree(tmp_path):
    nib = pytest.importorskip("nibabel", reason="NIfTI needs nibabel")
    root = tmp_path / "nii"
    (root / "x").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), np.eye(4)),
             str(root / "x" / "one.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((5, 6, 7, 2), np.float32), np.eye(4)), str(root / "x" / "two.nii"))
    with pytest.raises(ValueError, match=r"two\.nii is \(2, 4, 4, 4\)"):
        load_dataset("volumes", str(root), size=(4, 4, 4))
    (root / "x" / "two.nii").unlink()
    bundle = load_dataset("volumes", str(root))
    assert bundle.train.images.shape == (1, 1, 5, 6, 7) and bundle.train.images.max() == 255



@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_volumes_non_finite_voxels_count_as_the_lowest_finite_value(tmp_path, bad):
    """A NaN or infinite voxel counts as the volume's lowest finite value: +inf stretched min-max
    scaling so far that the rest of the volume collapsed to one grey level, and 0 did nearly as much
    to data far from 0 (an offset MRI: 1,000..1,063 kept 24 of 256 levels)."""
    ramp = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4) + 1000
    poisoned = ramp.copy()
    poisoned[0, 0, 0] = bad
    lowest = ramp.copy()
    lowest[0, 0, 0] = ramp.flat[1]  # the lowest of the finite voxels that remain
    for cls, vol in (("a", poisoned), ("b", lowest)):
        (tmp_path / "v" / cls).mkdir(parents=True)
        np.save(tmp_path / "v" / cls / "0.npy", vol)
    images = load_dataset("volumes", str(tmp_path / "v")).train.images
    assert torch.equal(images[0], images[1]) and torch.unique(images[0]).numel() == 63
    assert images[0].min() == 0 and images[0].max() == 255


def test_volumes_complex_values_are_refused_naming_the_file(tmp_path):
    nib = pytest.importorskip("nibabel", reason="NIfTI needs nibabel")
    (tmp_path / "v" / "a").mkdir(parents=True)
    (tmp_path / "v" / "b").mkdir()
    np.save(tmp_path / "v" / "a" / "0.npy", np.ones((4, 4, 4), np.float32))
    np.save(tmp_path / "v" / "b" / "k.npy", np.ones((4, 4, 4), np.complex64) * (1 + 2j))
    with pytest.raises(ValueError, match=r"b/k\.npy holds complex values"):  # was: imaginary part dropped
        load_dataset("volumes", str(tmp_path / "v"))
    (tmp_path / "v" / "b" / "k.npy").unlink()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), str(tmp_path / "v" / "b" / "k.nii"))
    with pytest.raises(ValueError, match=r"b/k\.nii holds complex values"):
        load_dataset("volumes", str(tmp_path / "v"))


def test_volumes_nifti_reoriented_to_closest_canonical(tmp_path):
    """The same anatomy stored with different affines (mirrored x, axes permuted, LPS) loads as the
    same RAS+ array; it used to load as stored, mirrored or transposed."""
    nib = pytest.importorskip("nibabel", reason="NIfTI needs nibabel")
    from vitlab.data.volumes import read_volume

    ras = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)  # axes: +x (R), +y (A), +z (S)
    root = tmp_path / "v"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    nib.save(nib.Nifti1Image(ras, np.eye(4)), str(root / "a" / "ras.nii.gz"))
    nib.save(nib.Nifti1Image(ras[::-1].copy(), np.diag([-1.0, 1, 1, 1])), str(root / "a" / "las.nii.gz"))
    lps = ras[::-1, ::-1].copy()
    nib.save(nib.Nifti1Image(lps, np.diag([-1.0, -1, 1, 1])), str(root / "b" / "lps.nii"))
    swapped = np.ascontiguousarray(ras.transpose(2, 0, 1))  # stored (S, R, A): voxel axis 0 runs along z
    perm = np.zeros((4, 4))
    perm[2, 0] = perm[0, 1] = perm[1, 2] = perm[3, 3] = 1
    nib.save(nib.Nifti1Image(swapped, perm), str(root / "b" / "sra.nii.gz"))
    four = np.stack([ras, 2 * ras], -1)[::-1].copy()  # (H, W, D, C), mirrored x
    nib.save(nib.Nifti1Image(four, np.diag([-1.0, 1, 1, 1])), str(root / "b" / "four.nii.gz"))
    for name in ("a/ras.nii.gz", "a/las.nii.gz", "b/lps.nii", "b/sra.nii.gz"):
        assert np.array_equal(read_volume(root / name)[0], ras), name
    assert np.array_equal(read_volume(root / "b" / "four.nii.gz")[1], 2 * ras)
    (root / "b" / "four.nii.gz").unlink()
    images = load_dataset("volumes", str(root)).train.images
    assert all(torch.equal(images[0], images[i]) for i in range(1, 4))
    assert np.array_equal(read_volume(root / "a" / "ras.nii.gz")[0], ras)  # RAS+ files are read as stored

@pytest.mark.skipif(not (MRICRON_SYSTEM / "aal.nii.gz").is_file(),
                    reason="needs Debian's mricron-data (/usr/share/mricron/templates)")
def test_mricron_brain_patches():
    pytest.importorskip("nibabel")
    from vitlab.data.volumes import aal_group, read_aal_names

    names = read_aal_names(MRICRON_SYSTEM / "aal.nii.txt")
    assert len(names) == 116 and aal_group(names[1]) == "frontal" and aal_group(names[91]) == "cerebellum"
    assert {aal_group(n) for n in names.values()} == {"frontal", "parietal", "temporal", "occipital", "limbic",
                                                       "subcortical", "cerebellum"}
    a = load_dataset("mricron-brain", per_class=20, patch=(8, 8, 8), seed=1)
    assert a.train.images.shape == (140, 1, 8, 8, 8) and a.test is None
    assert torch.equal(torch.bincount(a.train.labels), torch.full((7,), 20))
    assert a.train.images.float().mean() > 20  # centred in the brain, not on background
    b = load_dataset("mricron-brain", per_class=20, patch=(8, 8, 8), seed=1)
    c = load_dataset("mricron-brain", per_class=20, patch=(8, 8, 8), seed=2)
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)


# --- synthetic ------------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_balanced():
    a, b = load_dataset("synthetic", seed=5), load_dataset("synthetic", seed=5)
    c = load_dataset("synthetic", seed=6)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (512, 1, 16, 16) and a.test.images.shape == (128, 1, 16, 16)
    assert torch.equal(torch.bincount(a.train.labels), torch.full((4,), 128))
    vol = load_dataset("synthetic", img_size=(8, 12, 10), channels=2, num_classes=3, n_train=30, n_test=0)
    assert vol.train.images.shape == (30, 2, 8, 12, 10) and vol.test is None and vol.train.images.dtype == torch.uint8


def test_synthetic_is_learnable_by_a_small_vit():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and immune to a busy machine
    try:
        _train_small_vit_on_synthetic()
    finally:
        torch.set_num_threads(threads)


def _train_small_vit_on_synthetic():
    bundle = load_dataset("synthetic", seed=0)
    x, y = bundle.train.images.float() / 255, bundle.train.labels
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=1, num_classes=4, dim=32, depth=1, heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(6):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(bundle.test.images.float() / 255).argmax(1) == bundle.test.labels).float().mean()
    assert acc > 0.7  # chance is 0.25


# --- find_root ------------------------------------------------------------------------------------------------

def test_find_root_error_lists_every_place_looked(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        find_root("mnist", None)
    msg = str(err.value)
    assert "\n" not in msg and "$VITLAB_DATA (unset)" in msg and str(tmp_path / "xdg-cache" / "vitlab" / "mnist") in msg
    assert "data.options.download=true" in msg and "torchvision.datasets.MNIST" in msg
    assert str(FASHION_SYSTEM) in PLACES["fashion-mnist"].system
    # the system copy may be installed here: point the entry at a stand-in to see every place listed
    monkeypatch.setitem(PLACES, "fashion-mnist", dataclasses.replace(PLACES["fashion-mnist"],
                                                                     system=(str(tmp_path / "usr-share"),)))
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        find_root("fashion-mnist", None)
    msg = str(err.value)
    places = [tmp_path / "data" / "fashion-mnist", tmp_path / "data",
              tmp_path / "xdg-cache" / "vitlab" / "fashion-mnist", tmp_path / "usr-share"]
    positions = [msg.index(str(p) + (";" if p != places[-1] else ".")) for p in places]
    assert positions == sorted(positions)  # listed in search order
    assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError) as err:  # an explicit root lists only itself
        find_root("fashion-mnist", str(tmp_path / "mine"))
    assert f"looked in: {tmp_path / 'mine'}; {tmp_path / 'mine' / 'fashion-mnist'}." in str(err.value)


def test_find_root_search_order(tmp_path, monkeypatch):
    write_mnist(tmp_path / "xdg-cache" / "vitlab" / "mnist")
    assert find_root("mnist", None) == tmp_path / "xdg-cache" / "vitlab" / "mnist"  # the cache
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "data"))
    write_mnist(tmp_path / "data" / "MNIST" / "raw")  # torchvision layout directly under $VITLAB_DATA
    assert find_root("mnist", None) == tmp_path / "data" / "MNIST" / "raw"
    write_mnist(tmp_path / "data" / "mnist")  # $VITLAB_DATA/<name> comes first
    assert find_root("mnist", None) == tmp_path / "data" / "mnist"
    write_mnist(tmp_path / "mine")
    assert find_root("mnist", str(tmp_path / "mine")) == tmp_path / "mine"
    with pytest.raises(FileNotFoundError, match="empty"):  # an explicit root never falls back to another copy
        find_root("mnist", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="valid:"):
        find_root("synthetic", None)
    # generic trees never take $VITLAB_DATA itself (it would pass for an image tree of dataset folders)
    with pytest.raises(FileNotFoundError, match="imagefolder"):
        find_root("imagefolder", None)
    (tmp_path / "data" / "imagefolder").mkdir()
    assert find_root("imagefolder", None) == tmp_path / "data" / "imagefolder"


def test_load_dataset_never_downloads_implicitly(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10"):
        load_dataset("cifar10", str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


# --- registry, options, limit ---------------------------------------------------------------------------------

def test_registry_names_docs_and_option_errors():
    assert set(DATASETS.names()) >= {"mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "npz",
                                     "volumes", "synthetic", "mricron-brain"}
    assert all(DATASETS.doc(n) and "\n" not in DATASETS.doc(n) for n in DATASETS)
    assert all(n in PLACES for n in DATASETS if n != "synthetic")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['imgsize'\].*img_size"):
        load_dataset("synthetic", imgsize=8)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; valid: mnist"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("synthetic", limit=0)


def test_limit_is_stratified_seeded_and_leaves_test_alone():
    full = load_dataset("synthetic", seed=0, n_train=400)
    a = load_dataset("synthetic", seed=0, n_train=400, limit=101)
    b = load_dataset("synthetic", seed=0, n_train=400, limit=101)
    assert len(a.train) == 101 and torch.equal(a.train.images, b.train.images)
    assert (torch.bincount(a.train.labels, minlength=4).float() - 101 / 4).abs().max() <= 1
    assert torch.equal(a.test.images, full.test.images)
    assert len(load_dataset("synthetic", n_train=40, limit=1000).train) == 40


def test_array_dataset_checks_and_subset():
    ds = ArrayDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1, 0]), ["a", "b"], "x")
    sub = ds.subset(torch.tensor([3, 1]))
    assert sub.labels.tolist() == [0, 1] and len(sub) == 2 and sub.classes == ["a", "b"]
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), ["a"], "x")
    with pytest.raises(ValueError, match="2 classes"):
        ArrayDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"], "x")


# --- splits ---------------------------------------------------------------------------------------------------

def test_stratified_split_properties():
    labels = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 37, 8, 3, 51]))[torch.randperm(199)]
    fractions = (0.8, 0.1, 0.1)
    parts = stratified_split(labels, fractions, seed=0)
    allidx = torch.cat(parts)
    assert len(allidx) == 199 and torch.equal(torch.sort(allidx).values, torch.arange(199))  # disjoint, covering
    assert all(torch.equal(p, torch.sort(p).values) and p.dtype == torch.int64 for p in parts)
    for c in range(5):
        n_c = int((labels == c).sum())
        for part, f in zip(parts, fractions):
            assert abs(int((labels[part] == c).sum()) - n_c * f) <= 1  # proportions within one per class
    for part, f in zip(parts, fractions):
        assert abs(len(part) - 199 * f) <= 1
    again = stratified_split(labels, fractions, seed=0)
    other = stratified_split(labels, fractions, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(parts, again))
    assert not all(torch.equal(p, q) for p, q in zip(parts, other))


def test_stratified_split_two_parts_exact_and_bad_fractions():
    labels = torch.arange(1000) % 7
    for k in (1, 7, 333, 999):
        first, rest = stratified_split(labels, (k / 1000, 1 - k / 1000), seed=4)
        assert len(first) == k and len(rest) == 1000 - k
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.4), seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        stratified_split(labels, (1.2, -0.2), seed=0)


def test_make_splits_official_test_and_80_10_10_roundtrip_json():
    with_test = load_dataset("synthetic", n_train=200, n_test=40)
    split = make_splits(with_test, val_fraction=0.1, seed=3)
    assert split["scheme"] == "official-test" and split["test"] is None and split["seed"] == 3
    assert len(split["val"]) == 20 and len(split["train"]) == 180
    assert torch.equal(torch.bincount(with_test.train.labels[split["val"]]), torch.full((4,), 5))

    pool = DataBundle(with_test.train, None, "synthetic")
    split = make_splits(pool, seed=3)
    assert split["scheme"] == "80/10/10" and [len(split[k]) for k in ("train", "val", "test")] == [160, 20, 20]
    assert not set(split["train"].tolist()) & set(split["test"].tolist())
    text = json.dumps(split_to_json(split))
    back = split_from_json(json.loads(text))
    assert back["scheme"] == "80/10/10" and back["seed"] == 3
    assert all(torch.equal(back[k], split[k]) and back[k].dtype == torch.int64 for k in ("train", "val", "test"))
    assert split_from_json(json.loads(json.dumps(split_to_json(make_splits(with_test)))))["test"] is None
    with pytest.raises(ValueError, match="lacks key"):
        split_from_json({"train": []})



@pytest.mark.parametrize("stream", [False, True])
def test_pooled_split_of_a_training_testing_tree(tmp_path, stream):
    """data.split=pooled (load_dataset(pool_test=True)): Kaggle's Training/ + Testing/ pooled and
    split stratified 80/10/10, as the PoPE study did; ``limit`` applies to the pooled images."""
    root = tmp_path / "mri"
    for part, n in (("Training", 16), ("Testing", 4)):
        for c in ("glioma", "meningioma", "notumor", "pituitary"):
            for i in range(n):
                save_image(root / part / c / f"{i}.png", np.full((8, 8), 10 * i + (5 if part == "Testing" else 0),
                                                                 np.uint8))
    official = load_dataset("imagefolder", str(root), img_size=8, channels=1, stream=stream)
    pooled = load_dataset("imagefolder", str(root), img_size=8, channels=1, stream=stream, pool_test=True)
    assert pooled.test is None and pooled.pooled and len(pooled.train) == 80
    assert torch.equal(pooled.train.labels, torch.cat([official.train.labels, official.test.labels]))
    split = make_splits(pooled, val_fraction=0.1, test_fraction=0.1, seed=0, check_leakage=False)
    assert split["scheme"] == "80/10/10 (pooled: train + official test)"
    assert [len(split[k]) for k in ("train", "val", "test")] == [64, 8, 8]
    for k in ("val", "test"):  # stratified: 2 of each class
        assert torch.bincount(pooled.train.labels[split[k]]).tolist() == [2, 2, 2, 2]
    assert make_splits(official, check_leakage=False)["scheme"] == "official-test"
    small = load_dataset("imagefolder", str(root), img_size=8, channels=1, stream=stream, pool_test=True, limit=40)
    assert len(small.train) == 40 and small.test is None
    assert (small.train.labels.bincount() == 10).all()
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        make_splits(pooled, val_fraction=0.5, test_fraction=0.5, check_leakage=False)


def test_split_keys_in_the_config_and_the_pope_presets():
    from vitlab.config import DataSection, load_config

    assert (DataSection().split, DataSection().test_fraction) == ("official", 0.1)
    for preset in ("brain-mri-pope", "brain-mri-pope-quick"):  # DESIGN: the study's stratified 80/10/10
        d = load_config(preset).data
        assert (d.split, d.val_fraction, d.test_fraction) == ("pooled", 0.1, 0.1), preset
    with pytest.raises(ValueError, match="data.split"):
        load_config("brain-mri-pope", ["data.split=merged"])
    with pytest.raises(ValueError, match="data.test_fraction"):
        load_config("brain-mri-pope", ["data.test_fraction=1.5"])

def test_imagefolder_stream_checks_files_and_decodes_on_demand(tmp_path):
    import numpy as np
    from PIL import Image

    from vitlab.data import load_dataset
    from vitlab.data.base import FileDataset

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i + (100 if cls == "b" else 0), np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1"):
        bundle = load_dataset("imagefolder", str(tmp_path), img_size=8, channels=1, stream=True)
    train = bundle.train
    assert isinstance(train, FileDataset) and len(train) == 6 and train.item_shape == (1, 8, 8)
    img, label = train[3]
    assert img.dtype == torch.uint8 and img.shape == (1, 8, 8) and int(label) == 1
    sub = train.subset(torch.tensor([0, 5]))
    assert len(sub) == 2 and sub.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("imagefolder", str(tmp_path), img_size=8, channels=1, stream=True, on_bad_image="fail")
    with pytest.raises(ValueError, match="stream=true needs img_size"):
        load_dataset("imagefolder", str(tmp_path), img_size=None, stream=True)


def test_declared_item_size_is_what_the_source_loads(tmp_path):
    """A source's ``size`` hook lets validate check the patch against the data without reading it:
    it must agree with the items the source then loads, for every source that declares one."""
    write_mnist(tmp_path / "mnist")
    write_cifar(tmp_path / "cifar10")
    write_cifar(tmp_path / "cifar100", hundred=True)
    for c in range(2):
        for i in range(2):
            save_image(tmp_path / "tree" / f"c{c}" / f"{i}.png", np.full((20, 30), 40 * i + c, np.uint8))
            (tmp_path / "vols" / f"c{c}").mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / "vols" / f"c{c}" / f"{i}.npy", np.random.default_rng(i).random((6, 8, 4)))
    cases = [("mnist", "mnist", {}), ("fashion-mnist", "mnist", {}), ("cifar10", "cifar10", {}),
             ("cifar100", "cifar100", {}), ("synthetic", None, {"img_size": [12, 20]}),
             ("synthetic", None, {"img_size": [8, 8, 4], "n_train": 8, "n_test": 0}),
             ("imagefolder", "tree", {"img_size": [16, 24]}), ("imagefolder", "tree", {"img_size": 16, "resize": 20}),
             ("imagefolder", "tree", {"img_size": [16, 24], "stream": True}),
             ("volumes", "vols", {"size": [4, 4, 8]})]
    for name, folder, options in cases:
        declared = DATASETS.item_size(name, options)
        bundle = load_dataset(name, str(tmp_path / folder) if folder else None, **options)
        assert declared == tuple(bundle.train.item_shape[1:]), (name, options)
    # where only the files can tell, the hook says so
    assert DATASETS.item_size("imagefolder", {"img_size": None}) is None
    assert DATASETS.item_size("volumes", {}) is None
    assert DATASETS.item_size("npz", {}) is None
