"""The bad-input catalogue: hostile input across the CLI, configs, experiment files, data and the
output directory. Every case must end with a non-zero exit, exactly one line on stderr that names
the problem (no traceback without ``--debug``), and no half-written file a later step could take
for a result: no temporary file, no new final.json / report, no status.json that claims success.

Also a property test: random dotted overrides never end in an unhandled exception."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitlab.cli import main
from vitlab.config import MODEL_EXTRA, DataSection, RunConfig, TrainSection, load_config, validate
from vitlab.models import ModelConfig

PRESET = "fashion-mnist-quick"
# a run that trains in a few seconds on 2 CPU cores (synthetic bars, one tiny block, one epoch)
TINY = ["data.name=synthetic", "data.options={num_classes: 4, img_size: 16, n_train: 256, n_test: 96}",
        "data.hflip=false", "model.patch_size=4", "model.dim=32", "model.depth=1", "model.heads=2",
        "train.epochs=1", "train.batch_size=32", "train.precision=fp32", "train.threads=1"]


def _chmod_works() -> bool:
    """Whether permission bits bind this process (root, or anything with CAP_DAC_OVERRIDE, ignores
    them: there chmod cannot make a path unreadable or read-only)."""
    with tempfile.TemporaryDirectory() as d:
        locked = Path(d) / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            (locked / "probe").touch()
        except PermissionError:
            return True
        finally:
            locked.chmod(0o700)
        return False


CHMOD_WORKS = _chmod_works()

EXP = """
base: fashion-mnist-quick
overrides:
  data.name: synthetic
  data.options: {num_classes: 4, img_size: 16, n_train: 256, n_test: 96}
  model.patch_size: 4
  model.dim: 32
  model.depth: 1
  model.heads: 2
  train.epochs: 1
arms:
  none: {model.qk_pe: none}
  rope_axial: {model.qk_pe: rope_axial}
seeds: 1
baseline: none
"""


def train(*extra: str, out: str = "{tmp}/run") -> List[str]:
    return ["train", PRESET, *TINY, *extra, "--out", out, "--quiet"]


# ---------------------------------------------------------------------------------------------------
# what the cases write


class Ctx:
    """What a case's setup gets: its folder, monkeypatch, the trained run (built on first use)."""

    def __init__(self, tmp: Path, monkeypatch, request):
        self.tmp, self.monkeypatch, self._request = tmp, monkeypatch, request
        self.restore: List[Callable[[], None]] = []

    def run(self) -> Path:
        """A copy of a finished tiny run at tmp/run."""
        src = self._request.getfixturevalue("trained_run")
        shutil.copytree(src, self.tmp / "run")
        return self.tmp / "run"

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def png(path: Path, size=(16, 16), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def image_tree(root: Path, per_class=(6, 6)) -> Path:
    for c, n in enumerate(per_class):
        for i in range(n):
            png(root / f"class{c}" / f"{i}.png", seed=10 * c + i)
    return root


def volume_tree(root: Path, shape=(8, 8, 8)) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            np.save(root / f"class{c}" / f"{i}.npy", rng.random(shape).astype(np.float32))
    return root


IMAGEFOLDER = ["data.name=imagefolder", "data.options={img_size: 16}", "data.root={tmp}/images"]


def corrupt_image(ctx: Ctx) -> None:
    image_tree(ctx.tmp / "images")
    (ctx.tmp / "images" / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def empty_class(ctx: Ctx) -> None:
    image_tree(ctx.tmp / "images")
    (ctx.tmp / "images" / "class2").mkdir()


def unreadable_class(ctx: Ctx) -> None:  # every file of a class is garbage, even in skip mode
    image_tree(ctx.tmp / "images")
    for i in range(3):
        (ctx.tmp / "images" / "class2" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (ctx.tmp / "images" / "class2" / f"{i}.jpg").write_bytes(b"not a jpeg")


def mixed_sizes(ctx: Ctx) -> None:
    image_tree(ctx.tmp / "images")
    png(ctx.tmp / "images" / "class1" / "big.png", size=(20, 24))


def unreadable_root(ctx: Ctx) -> List[str]:
    """chmod 000 on the data folder; as root (which reads it anyway) a file where the folder should be."""
    if not CHMOD_WORKS:
        ctx.write("images", "a file, not a folder of class folders\n")
        return ["a file"]
    root = image_tree(ctx.tmp / "images")
    root.chmod(0)
    ctx.restore.append(lambda: root.chmod(0o755))
    return ["Permission denied"]


def corrupt_volume(ctx: Ctx) -> None:
    volume_tree(ctx.tmp / "vols")
    (ctx.tmp / "vols" / "class0" / "3.npy").write_bytes(b"\x93NUMPY garbage")


def float_npz(ctx: Ctx) -> None:
    rng = np.random.default_rng(0)
    np.savez(ctx.tmp / "data.npz", train_images=rng.random((20, 8, 8)).astype(np.float32),
             train_labels=np.arange(20) % 2, test_images=rng.random((6, 8, 8)).astype(np.float32),
             test_labels=np.arange(6) % 2)


def truncated_jpeg(ctx: Ctx) -> None:
    """A JPEG cut short after its headers: it passes a streamed folder's listing (Image.verify reads
    no pixels) and fails in the DataLoader worker that decodes it."""
    image_tree(ctx.tmp / "images")
    path = ctx.tmp / "images" / "class1" / "cut.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])


def cifar_batches(test_batch) -> Callable[[Ctx], None]:
    """CIFAR-10 python batches under {tmp}/cifar, whose test_batch pickles ``test_batch``."""
    def setup(ctx: Ctx) -> None:
        folder = ctx.tmp / "cifar" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        for name, content in [(f"data_batch_{i}", good) for i in range(1, 6)] + [("test_batch", test_batch)]:
            (folder / name).write_bytes(pickle.dumps(content))
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return setup


def npz_arrays(**arrays) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        np.savez(ctx.tmp / "data.npz", **arrays)
    return setup


def complex_volume(ctx: Ctx) -> None:
    volume_tree(ctx.tmp / "vols")
    np.save(ctx.tmp / "vols" / "class1" / "3.npy", np.ones((8, 8, 8), np.complex64))


def read_only_out(ctx: Ctx) -> None:
    """A read-only output folder: chmod 555 for a normal user; as root, the file system refuses
    (EROFS) every write under it, as a read-only mount would."""
    ro = ctx.tmp / "ro"
    ro.mkdir()
    if CHMOD_WORKS:
        ro.chmod(0o555)
        ctx.restore.append(lambda: ro.chmod(0o755))
        return
    deny_writes(ctx.monkeypatch, ro, errno.EROFS)


def deny_writes(monkeypatch, folder: Path, code: int) -> None:
    """Every write under ``folder`` fails with ``code``, at the system calls Python makes."""
    inside = lambda p: str(os.fspath(p)).startswith(str(folder))  # noqa: E731
    real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | getattr(os, "O_TMPFILE", 0)

    def fake_open(path, flags, *args, **kwargs):
        if inside(path) and flags & writing:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def fake_replace(src, dst, *args, **kwargs):
        if inside(dst):
            raise OSError(code, os.strerror(code), os.fspath(src), os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", fake_replace)


def disk_full_at_first_write(ctx: Ctx) -> None:
    """The disk is full: the data reach the page cache but fsync cannot put them on the device."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    ctx.monkeypatch.setattr(os, "fsync", full)


def disk_full_at_checkpoint(ctx: Ctx) -> None:
    """The small files fit, the first checkpoint does not: training has started, status.json says
    running, and the run must end as failed with its temporary checkpoint removed."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(src))
        return real_replace(src, dst, *args, **kwargs)
    ctx.monkeypatch.setattr(os, "replace", replace)


class _FillingFile:
    """A file on a disk with ``room`` bytes left: the write that does not fit fails with ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_full_while_writing_checkpoint(ctx: Ctx) -> None:
    """The disk fills up in the middle of torch.save (which reports it as a RuntimeError)."""
    real_mkstemp, real_fdopen, checkpoints = tempfile.mkstemp, os.fdopen, set()

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if ".pt." in os.path.basename(name):
            checkpoints.add(fd)
        return fd, name

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return _FillingFile(f, 4096) if fd in checkpoints else f
    ctx.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    ctx.monkeypatch.setattr(os, "fdopen", fdopen)


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the proof that a checkpoint would execute code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_exec_checkpoint(ctx: Ctx) -> None:
    run = ctx.run()
    good = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    torch.save({**good, "evil": Payload(str(ctx.tmp / "owned"))}, run / "checkpoints" / "best.pt")


def truncated_checkpoint(ctx: Ctx) -> None:
    run = ctx.run()
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "reason": "signal 15"}))


def no_checkpoint(ctx: Ctx) -> None:
    run = ctx.run()
    (run / "checkpoints" / "last.pt").unlink()
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "reason": "signal 15"}))


def interrupted_run(ctx: Ctx) -> None:
    """A run stopped by SIGTERM: a checkpoint to resume from, no final.json."""
    interrupted_run_files(ctx.run())


def foreign_checkpoint(name: str, content: Callable[[dict], object]) -> Callable[[Ctx], None]:
    """The run's checkpoint ``name`` replaced by ``content(its state)``: a file torch loads, not vitlab's."""
    def setup(ctx: Ctx) -> None:
        run = ctx.run()
        path = run / "checkpoints" / name
        torch.save(content(torch.load(path, weights_only=True)), path)
        if name == "last.pt":
            interrupted_run_files(run)
    return setup


def interrupted_run_files(run: Path) -> None:
    (run / "final.json").unlink()
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "reason": "signal 15"}))


def single_class(ctx: Ctx) -> None:
    image_tree(ctx.tmp / "images", per_class=(12,))


def broken_run_config(ctx: Ctx) -> None:
    run = ctx.run()
    (run / "checkpoints" / "last.pt").write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    text = (run / "config.yaml").read_text()
    assert "\n  epochs: 1\n" in text
    (run / "config.yaml").write_text(text.replace("\n  epochs: 1\n", "\n  epochs: -1\n"))
    interrupted_run_files(run)  # (a finished run is refused by --resume before its config is read)


def experiment(text: str):
    def setup(ctx: Ctx) -> None:
        ctx.write("exp.yaml", text)
    return setup


def files(**contents: str):
    def setup(ctx: Ctx) -> None:
        for name, text in contents.items():
            ctx.write(name.replace("__", "."), text)
    return setup


def nothing(ctx: Ctx) -> None:
    pass


# ---------------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Ctx], Optional[List[str]]]  # may return more words (they can depend on the machine)
    argv: Tuple[str, ...]  # "{tmp}" is the case's own folder
    words: Tuple[str, ...]  # the one-line message contains each


def case(id, setup, argv, *words):
    return pytest.param(Case(id, setup, tuple(argv), words), id=id)


CATALOGUE = [
    # --- the command line itself
    case("no-command", nothing, [], "required", "command"),
    case("unknown-command", nothing, ["trian"], "invalid choice", "'trian'"),
    case("unknown-option", nothing, ["train", PRESET, "--epochs", "3"], "unrecognized arguments", "--epochs"),
    case("override-without-equals", nothing, train("train.lr"), "'train.lr'", "section.key=value"),
    case("override-without-equals-after-options", nothing, [*train(), "train.lr"], "unrecognized arguments",
         "train.lr"),
    case("override-without-section", nothing, train("lr=3e-4"), "'lr=3e-4'", "section.key=value"),
    case("train-without-config", nothing, ["train"], "preset", "--resume"),
    case("train-empty-config-name", nothing, ["train", "", "--out", "{tmp}/run"], "preset", "--resume"),
    case("bench-unknown-shape", nothing, ["bench", "--shape", "huge"], "unknown shape 'huge'", "string-cifar"),
    case("bench-unknown-variant", nothing, ["bench", "--shape", "string-mnist", "--variants", "none,ropee"],
         "'ropee'", "rope_axial"),
    case("bench-variant-option-without-value", nothing,
         ["bench", "--shape", "string-mnist", "--variants", "string_cayley:sparsity"], "'sparsity'", "key=value"),
    # small enough that a bench that wrongly starts ends in seconds
    case("bench-zero-batch", nothing, ["bench", "--shape", "string-mnist", "--variants", "none", "--steps", "1",
                                       "--warmup", "0", "--batch", "0"], "batch", ">= 1"),
    case("bench-unknown-precision", nothing, ["bench", "--precision", "fp16"], "'fp16'", "bf16"),
    case("bench-save-not-json", nothing, ["bench", "--variants", "none", "--save", "{tmp}/bench.md"], "--save",
         ".json"),
    case("bench-table-path-is-a-folder", lambda ctx: (ctx.tmp / "b.md").mkdir(),
         ["bench", "--variants", "none", "--save", "{tmp}/b.json"], "{tmp}/b.md is a directory"),
    case("bench-save-into-a-file", files(**{"f": "x"}), ["bench", "--variants", "none", "--save", "{tmp}/f/b.json"],
         "{tmp}/f", "is a file"),
    # --- configs and overrides
    case("unknown-preset", nothing, ["train", "fashion-mnits", "--quiet"], "unknown preset 'fashion-mnits'",
         "fashion-mnist-quick"),
    case("unknown-key", nothing, train("train.lrr=1e-3"), "train.lrr", "train.lr,"),
    case("unknown-section", nothing, ["validate", PRESET, "optim.lr=1e-3"], "unknown key 'optim'", "train"),
    case("wrong-type", nothing, train("train.epochs=three"), "train.epochs", "'three'"),
    case("negative-epochs", nothing, train("train.epochs=-2"), "train.epochs", "-2"),
    case("nan-learning-rate", nothing, train("train.lr=.nan"), "train.lr", "finite"),
    case("infinite-warmup", nothing, train("train.warmup_epochs=.inf"), "train.warmup_epochs", "finite"),
    case("infinite-mlp-ratio", nothing, train("model.mlp_ratio=.inf"), "mlp_ratio", "finite"),
    case("volume-with-2d-augmentation", nothing, ["validate", "volume-3d-quick", "data.name=synthetic",
                                                  "data.options.img_size=[16,16,16]", "data.crop_pad=2"],
         "data.crop_pad", "3D volumes"),
    case("validate-empty-name", nothing, ["validate", ""], "give a preset or YAML file"),
    case("bench-negative-threads", nothing, ["bench", "--threads", "-1"], "--threads -1", ">= 1"),
    case("switch-not-a-bool", nothing, ["validate", "fashion-mnist-quick", "data.name=imagefolder",
                                        "data.options.stream=maybe"], "option stream='maybe'", "true or false"),
    case("huge-warmup", nothing, train("train.warmup_epochs=1e308"), "train.warmup_epochs", "less than or equal"),
    case("huge-mlp-ratio", nothing, ["validate", PRESET, "model.mlp_ratio=1e308"], "mlp_ratio", "hidden units"),
    case("val-fraction-above-one", nothing, train("data.val_fraction=1.5"), "data.val_fraction", "1.5"),
    case("options-not-a-mapping", nothing, ["validate", "fashion-mnist-quick", "data.options=5"], "data.options",
         "dictionary"),
    # TINY sets data.options.* keys: replacing the mapping after them is a conflict, as the other order is
    case("options-replaced-after-its-keys", nothing, train("data.options=5"), "'data.options=5' conflicts"),
    case("unknown-qk-pe", nothing, train("model.qk_pe=ropee"), "'ropee'", "rope_axial"),
    case("unknown-kernel", nothing, train("model.attn=flash"), "'flash'", "differential"),
    case("unknown-model-name", nothing, train("model.name=vitt"), "model.name='vitt'", "timm:"),
    case("unknown-timm-model", nothing, train("model.name=timm:resnet_nonexistent"), "'resnet_nonexistent'",
         "timm"),
    case("unknown-size", nothing, train("model.size=huge"), "unknown size 'huge'", "tiny"),
    case("image-not-divisible-by-patch", nothing, train("model.patch_size=5"), "not divisible", "patch_size=(5, 5)"),
    case("dim-not-divisible-by-heads", nothing, train("model.dim=30", "model.heads=4"), "dim=30", "heads=4"),
    case("head-dim-for-rope", nothing, train("model.qk_pe=rope_axial", "model.dim=40", "model.heads=4"),
         "head_dim=10", "rope_axial"),
    case("pe-option-unknown", nothing, train("model.qk_pe=rope_axial", "model.qk_pe_kwargs.thetaa=10"),
         "'thetaa'", "theta"),
    case("num-classes-disagree-with-data", nothing, train("model.num_classes=7"), "model.num_classes=7",
         "4 classes"),
    case("not-a-device", nothing, train("train.device=banana"), "'banana'", "cpu"),
    case("config-file-missing", nothing, ["train", "{tmp}/nope.yaml"], "not found", "{tmp}/nope.yaml"),
    case("config-file-invalid-yaml", files(bad__yaml="data: {name: [\n"), ["train", "{tmp}/bad.yaml"],
         "{tmp}/bad.yaml", "not valid YAML"),
    case("config-file-is-a-list", files(list__yaml="- train.lr: 1\n"), ["train", "{tmp}/list.yaml"],
         "{tmp}/list.yaml", "mapping"),
    case("config-base-unknown", files(child__yaml="base: fashion-mnits\ntrain: {epochs: 1}\n"),
         ["train", "{tmp}/child.yaml"], "unknown preset 'fashion-mnits'"),
    case("config-base-not-a-name", files(child__yaml="base: 3\ntrain: {epochs: 1}\n"), ["train", "{tmp}/child.yaml"],
         "config 3", "fashion-mnist-quick"),
    # --- data
    case("unknown-dataset", nothing, train("data.name=fashion_mnist"), "'fashion_mnist'", "fashion-mnist"),
    case("unknown-data-option", nothing, train("data.options.colour=1"), "'colour'", "n_train"),
    case("data-root-missing", nothing, train(*IMAGEFOLDER[:2], "data.root={tmp}/nowhere"), "not found",
         "{tmp}/nowhere"),
    case("data-root-unreadable", unreadable_root, train(*IMAGEFOLDER), "{tmp}/images"),
    case("corrupt-image-with-fail", corrupt_image, train(*IMAGEFOLDER, "data.on_bad_image=fail"),
         "{tmp}/images/class1/broken.png", "cannot read"),
    case("empty-class-folder", empty_class, train(*IMAGEFOLDER), "{tmp}/images/class2", "empty"),
    case("class-without-a-readable-image", unreadable_class, train(*IMAGEFOLDER), "{tmp}/images/class2",
         "no readable image"),
    case("images-of-different-sizes", mixed_sizes, train("data.name=imagefolder", "data.options={img_size: null}",
                                                         "data.root={tmp}/images"),
         "{tmp}/images/class1/big.png", "img_size"),
    case("bad-intensity-window", lambda ctx: image_tree(ctx.tmp / "images") and None,
         train(*IMAGEFOLDER, "data.options.intensity=[400, -1000]"), "intensity=[400, -1000]", "low < high"),
    case("corrupt-volume", corrupt_volume, train("data.name=volumes", "data.options={}", "data.root={tmp}/vols"),
         "{tmp}/vols/class0/3.npy", "cannot read"),
    case("npz-float-images", float_npz, train("data.name=npz", "data.options={}", "data.root={tmp}/data.npz"),
         "train_images", "uint8"),
    case("npz-not-an-archive", files(data__npz="hello"), train("data.name=npz", "data.options={}",
                                                               "data.root={tmp}/data.npz"),
         "{tmp}/data.npz", "not a .npz archive"),
    case("truncated-jpeg-in-a-streamed-folder", truncated_jpeg,
         train(*IMAGEFOLDER, "data.options.stream=true", "data.workers=1"), "cannot decode {tmp}/images/class1/cut.jpg",
         "image file is truncated", "check only file headers", "python -m vitlab.data.check_images {tmp}/images"),
    case("cifar-batch-not-a-dict", cifar_batches(5), train("data.name=cifar10", "data.options={}",
                                                           "data.root={tmp}/cifar"),
         "{tmp}/cifar/cifar-10-batches-py/test_batch", "not a CIFAR python batch", "not a dict"),
    case("cifar-pixel-above-255", cifar_batches({b"data": [[300] * 3072] * 2, b"labels": [0, 1]}),
         train("data.name=cifar10", "data.options={}", "data.root={tmp}/cifar"),
         "{tmp}/cifar/cifar-10-batches-py/test_batch", "0..255", "300"),
    case("npz-empty", npz_arrays(train_images=np.zeros((0, 8, 8), np.uint8), train_labels=np.zeros(0, np.int64)),
         train("data.name=npz", "data.options={}", "data.root={tmp}/data.npz"), "{tmp}/data.npz", "no training images"),
    case("volume-complex-valued", complex_volume, train("data.name=volumes", "data.options={}", "data.root={tmp}/vols"),
         "{tmp}/vols/class1/3.npy", "complex"),
    case("volume-for-2d-model", lambda ctx: volume_tree(ctx.tmp / "vols") and None,
         train("data.name=volumes", "data.options={}", "data.root={tmp}/vols", "model.img_size=[8, 8]"),
         "3D volumes", "2D model"),
    case("volume-for-2d-patches", nothing, train("data.options.img_size=[16, 16, 16]", "model.patch_size=[4, 4]"),
         "patch_size=(4, 4)", "(16, 16, 16)"),
    case("images-for-3d-pe", nothing, train("model.token_pe=learned3d"), "learned3d", "3D"),
    case("too-few-images-to-split", nothing, train("data.options.n_train=3"), "too little data", "validation"),
    case("single-class-folder", single_class, train(*IMAGEFOLDER), "{tmp}/images", "only class 'class0'",
         "at least 2"),
    case("accum-steps-beyond-the-data", nothing, train("train.accum_steps=1000"), "train.accum_steps=1000",
         "training split has"),
    case("rope-theta-zero", nothing, train("model.qk_pe=rope_axial", "model.qk_pe_kwargs.theta=0"), "theta", "> 1"),
    case("sincos-base-negative", nothing, train("model.token_pe=sincos", "model.token_pe_kwargs.base=-1"), "sincos base",
         "-1"),
    case("reflections-beyond-head-dim", nothing,
         train("model.qk_pe=string_reflection", "model.qk_pe_kwargs.reflections=100000000"), "reflections",
         "head_dim = 16"),
    case("min-lr-above-lr", nothing, train("train.min_lr=1"), "train.min_lr=1.0", "train.lr"),
    case("affine-scale-reversed", nothing, train("data.affine_scale=[2, 1]"), "data.affine_scale", "low <= high"),
    case("resolution-not-whole-patches", nothing, train("eval.resolutions=[16, 18]"), "eval.resolutions [18]",
         "patch height 4"),
    case("resolution-negative", nothing, train("eval.resolutions=[-16]"), "eval.resolutions", "-16"),
    case("seed-beyond-torch", nothing, train("train.seed=18446744073709551616"), "train.seed", "9223372036854775807"),
    case("device-meta", nothing, train("train.device=meta"), "train.device", "'meta'"),
    case("config-number-key", files(k__yaml="base: fashion-mnist-quick\n3: x\n"), ["train", "{tmp}/k.yaml"],
         "config key 3", "text"),
    case("config-nested-number-key", files(k__yaml="base: fashion-mnist-quick\nmodel: {qk_pe_kwargs: {1: 2}}\n"),
         ["validate", "{tmp}/k.yaml"], "model.qk_pe_kwargs.1", "text"),
    case("config-duplicate-key", files(k__yaml="base: fashion-mnist-quick\ntrain: {lr: 0.5}\ntrain: {epochs: 1}\n"),
         ["validate", "{tmp}/k.yaml"], "{tmp}/k.yaml", "'train' given twice"),
    case("config-base-is-itself", lambda ctx: ctx.write("k.yaml", f"base: {ctx.tmp}/k.yaml\n") and None, ["validate", "{tmp}/k.yaml"], "{tmp}/k.yaml",
         "leads back to itself"),
    case("config-not-utf8", lambda ctx: (ctx.tmp / "k.yaml").write_bytes(b"base: fashion-mnist-quick\n\xff: 1\n")
         and None, ["validate", "{tmp}/k.yaml"], "{tmp}/k.yaml", "UTF-8"),
    case("config-is-a-directory", nothing, ["validate", "{tmp}"], "{tmp}", "directory"),
    case("nan-loss-diverges", nothing, train("train.lr=1e30", "train.clip_grad=null", "train.warmup_epochs=0"),
         "diverged", "not finite"),
    # --- the output directory
    case("out-is-a-file", files(taken="x\n"), train(out="{tmp}/taken"), "{tmp}/taken", "is a file"),
    case("out-under-a-file", files(taken="x\n"), train(out="{tmp}/taken/run"), "{tmp}/taken", "not a directory"),
    case("out-read-only", read_only_out, train(out="{tmp}/ro/run"), "{tmp}/ro", "output directory"),
    case("out-full-at-first-write", disk_full_at_first_write, train(), "{tmp}/run", "full"),
    case("out-full-at-checkpoint-rename", disk_full_at_checkpoint, train(), "{tmp}/run/checkpoints", "full"),
    case("out-full-while-writing-checkpoint", disk_full_while_writing_checkpoint, train(),
         "{tmp}/run/checkpoints/best.pt", "full"),
    case("out-holds-a-finished-run", lambda ctx: ctx.run() and None, train(), "{tmp}/run", "finished run"),
    case("out-holds-an-interrupted-run", interrupted_run, train(), "{tmp}/run", "unfinished run (interrupted)",
         "--resume"),
    # --- resume and eval of run directories
    case("resume-not-a-run", files(notes__txt="hello\n"), ["train", "--resume", "{tmp}"], "{tmp}", "config.yaml"),
    case("resume-without-checkpoint", no_checkpoint, ["train", "--resume", "{tmp}/run", "--quiet"],
         "{tmp}/run", "last.pt"),
    case("resume-truncated-checkpoint", truncated_checkpoint, ["train", "--resume", "{tmp}/run", "--quiet"],
         "{tmp}/run/checkpoints/last.pt", "truncated or corrupt"),
    case("resume-edited-config", broken_run_config, ["train", "--resume", "{tmp}/run", "--quiet"],
         "train.epochs", "-1"),
    case("resume-with-a-config", interrupted_run, ["train", PRESET, "--resume", "{tmp}/run", "train.epochs=3"],
         "--resume {tmp}/run", "`train.epochs=3`"),
    case("resume-weights-only-checkpoint", foreign_checkpoint("last.pt", lambda s: {"model": s["model"]}),
         ["train", "--resume", "{tmp}/run", "--quiet"], "{tmp}/run/checkpoints/last.pt", "not a vitlab checkpoint",
         "'optimizer'"),
    case("resume-tensor-checkpoint", foreign_checkpoint("last.pt", lambda s: torch.zeros(2)),
         ["train", "--resume", "{tmp}/run", "--quiet"], "{tmp}/run/checkpoints/last.pt", "not a vitlab checkpoint"),
    case("eval-foreign-checkpoint", foreign_checkpoint("best.pt", lambda s: {"foo": 1}), ["eval", "{tmp}/run"],
         "{tmp}/run/checkpoints/best.pt", "'model'"),
    case("eval-other-class-count", lambda ctx: ctx.run() and None, ["eval", "{tmp}/run", "data.options.num_classes=7"],
         "weights do not fit the model built for this data (7 classes", "size mismatch for head"),
    case("eval-size-not-a-size", lambda ctx: ctx.run() and None, ["eval", "{tmp}/run", "model.img_size=16.5"],
         "model.img_size", "16.5"),
    case("eval-size-null", lambda ctx: ctx.run() and None, ["eval", "{tmp}/run", "model.img_size=null"],
         "model.img_size", "None"),
    case("bench-input-with-model-options", nothing, ["bench", "--input", PRESET, "--compile"], "--compile",
         "--input"),
    case("eval-not-a-run", nothing, ["eval", "{tmp}"], "{tmp}", "not a vitlab run directory"),
    case("eval-code-executing-checkpoint", code_exec_checkpoint, ["eval", "{tmp}/run"], "refusing to load",
         "execute code"),
    case("eval-forbidden-override", lambda ctx: ctx.run() and None, ["eval", "{tmp}/run", "train.lr=1"],
         "data.* and model.img_size only", "train"),
    case("eval-missing-checkpoint", lambda ctx: (ctx.run() / "checkpoints" / "last.pt").unlink(),
         ["eval", "{tmp}/run", "--checkpoint", "last"], "checkpoint not found", "{tmp}/run/checkpoints/last.pt"),
    case("eval-size-not-divisible", lambda ctx: ctx.run() and None, ["eval", "{tmp}/run", "model.img_size=18"],
         "not divisible", "18"),
    # --- experiment files and comparison directories
    case("compare-missing-file", nothing, ["compare", "{tmp}/nope.yaml", "--out", "{tmp}/cmp"], "{tmp}/nope.yaml"),
    case("compare-invalid-yaml", experiment("arms: {none: {model.qk_pe: none}\n"),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "{tmp}/exp.yaml", "not valid YAML"),
    case("compare-yaml-is-a-list", experiment("- none\n- rope_axial\n"),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "{tmp}/exp.yaml", "arms"),
    case("compare-unknown-key", experiment(EXP + "colour: red\n"), ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"],
         "'colour'", "seeds"),
    case("compare-zero-seeds", experiment(EXP.replace("seeds: 1", "seeds: 0")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "seeds", "0"),
    case("compare-unknown-arm-key", experiment(EXP.replace("{model.qk_pe: rope_axial}", "{model.qk_pee: rope_axial}")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "rope_axial", "model.qk_pee"),
    case("compare-arm-unknown-value", experiment(EXP.replace("{model.qk_pe: rope_axial}", "{model.qk_pe: ropee}")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "rope_axial", "'ropee'"),
    case("compare-non-dotted-key", experiment(EXP.replace("  train.epochs: 1", "  epochs: 1")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "'epochs'", "dotted"),
    case("compare-baseline-not-an-arm", experiment(EXP.replace("baseline: none", "baseline: rope")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "baseline 'rope'", "rope_axial"),
    case("compare-out-is-a-file", files(exp__yaml=EXP, taken="x\n"),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/taken"], "{tmp}/taken", "is a file"),
    case("report-not-a-comparison", files(notes__txt="hello\n"), ["report", "{tmp}"], "{tmp}", "experiment.json"),
    case("compare-baseline-a-list", experiment(EXP.replace("baseline: none", "baseline: [1]")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "baseline [1]", "rope_axial"),
    case("compare-description-a-list", experiment(EXP + "description: [1]\n"),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "description", "[1]"),
    case("compare-arm-sets-the-split", experiment(EXP.replace("{model.qk_pe: rope_axial}",
                                                              "{model.qk_pe: rope_axial, data.limit: 100}")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "data.limit", "split"),
    case("compare-arm-patch-does-not-fit-the-data",
         experiment(EXP.replace("{model.qk_pe: rope_axial}", "{model.qk_pe: rope_axial, model.patch_size: 5}")),
         ["compare", "{tmp}/exp.yaml", "--out", "{tmp}/cmp"], "rope_axial", "img_size=(16, 16)", "patch_size=(5, 5)"),
    case("compare-unknown-study", nothing, ["compare", "string-cifarr", "--out", "{tmp}/cmp"], "'string-cifarr'",
         "string-cifar-quick"),
    case("report-corrupt-manifest", files(experiment__json="{runs: "), ["report", "{tmp}"], "experiment.json",
         "not valid JSON"),
    case("report-wrong-manifest", files(experiment__json='{"runs": 3}'), ["report", "{tmp}"], "experiment.json",
         "not a vitlab experiment manifest"),
    case("report-manifest-bad-correction",
         files(experiment__json='{"runs": [], "baseline": "none", "correction": ["holm"]}'), ["report", "{tmp}"],
         "experiment.json", "correction ['holm']", "fdr_bh"),
    case("report-manifest-bad-metric", files(experiment__json='{"runs": [], "baseline": "none", "metric": {}}'),
         ["report", "{tmp}"], "experiment.json", "metric {}", "auroc_macro"),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", PRESET, *TINY, "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    return out


def call(argv: List[str]) -> Tuple[int, str, str]:
    """``vitlab ARGV`` in this process: (exit status, stdout, stderr). An exception escaping main()
    is what a user would see as a traceback: it fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        except BaseException as exc:  # noqa: BLE001
            pytest.fail(f"vitlab {' '.join(argv)}: unhandled {type(exc).__name__}: {exc}\nstderr: {err.getvalue()}")
    return code, out.getvalue(), err.getvalue()


def statuses(root: Path) -> dict:
    found = {}
    for p in root.rglob("status.json"):
        try:
            found[p] = json.loads(p.read_text()).get("status")
        except ValueError:
            found[p] = "unreadable"
    return found


RESULTS = ("final.json", "report.md", "report.html")


@pytest.mark.parametrize("c", CATALOGUE)
def test_bad_input(c: Case, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) lands here, never in the checkout
    ctx = Ctx(tmp_path, monkeypatch, request)
    words = [w.replace("{tmp}", str(tmp_path)) for w in c.words] + list(c.setup(ctx) or [])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in c.argv]
    before_results = {p for name in RESULTS for p in tmp_path.rglob(name)}
    before_status = statuses(tmp_path)
    try:
        code, _, err = call(argv)
    finally:
        monkeypatch.undo()  # the real os.* again before looking at the files
        for undo in ctx.restore:
            undo()
    assert code not in (0, None), f"exit status {code}; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert err.startswith("vitlab: error: "), err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    # nothing half-written, nothing that looks like a result
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    new_results = {p for name in RESULTS for p in tmp_path.rglob(name)} - before_results
    assert new_results == set(), new_results
    for path, state in statuses(tmp_path).items():
        if before_status.get(path) != state:
            assert state in ("failed", "diverged"), f"{path} says {state!r} after: {err}"
    assert not (tmp_path / "owned").exists(), "the checkpoint's code was executed"


def test_catalogue_is_long_and_has_unique_ids():
    ids = [p.values[0].id for p in CATALOGUE]
    assert len(ids) >= 35 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("fill", [disk_full_at_checkpoint, disk_full_while_writing_checkpoint])
def test_failed_run_status_says_failed_with_the_reason(fill, tmp_path, monkeypatch):
    """A run stopped by a full disk after training started: status.json says failed and why."""
    ctx = Ctx(tmp_path, monkeypatch, None)
    fill(ctx)
    code, _, err = call([a.replace("{tmp}", str(tmp_path)) for a in train()])
    monkeypatch.undo()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert code == 2 and status["status"] == "failed" and "full" in status["reason"], (status, err)
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def test_debug_shows_the_traceback(tmp_path):
    """--debug re-raises: in process the exception itself, from the command a traceback; without
    it the same input is one line and exit status 2."""
    with pytest.raises(ValueError, match="unknown preset 'fashion-mnits'"):
        main(["--debug", "validate", "fashion-mnits"])
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "vitlab", "validate", "fashion-mnits"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    loud = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr
    assert "ValueError: unknown preset 'fashion-mnits'" in loud.stderr


# ---------------------------------------------------------------------------------------------------
# property: random overrides are accepted or rejected with a ValueError, never anything else


def _keys(section: str, model) -> List[str]:
    return [f"{section}.{k}" for k in model.model_fields]


REAL_KEYS = (_keys("data", DataSection) + _keys("train", TrainSection) + _keys("model", ModelConfig)
             + [f"model.{k}" for k in MODEL_EXTRA]
             + (_keys("eval", RunConfig.model_fields["eval"].annotation) if "eval" in RunConfig.model_fields else [])
             + ["data.options.n_train", "data.options.img_size", "model.qk_pe_kwargs.theta",
                "model.qk_pe_kwargs.sparsity", "model.token_pe_kwargs.pe_dropout", "model.attn_kwargs.kernel_size"])
JUNK_KEYS = st.one_of(
    st.sampled_from(["lr", "model", "train.", ".lr", "train..lr", "data.options", "model.qk_pe.theta", "foo.bar",
                     "model.dim.x", "train.lr.x", "eval", "=", "data.root.x"]),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(["data", "model", "train", "eval", "x"]),
              st.text("abcdefghijklmnopqrstuvwxyz_.", min_size=0, max_size=8)),
)
NAMES = ["none", "rope_axial", "rope_mixed", "pope", "string_cayley", "learned", "learned3d", "sincos", "standard",
         "differential", "synthetic", "fashion-mnist", "timm:resnet18", "tiny", "volume", "cls", "mean", "auto",
         "bf16", "fp32", "linear", "skip", "fail", "randaugment"]
# ints stay small enough that checking a model config never allocates much memory
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, 1, 2, 4, 16, 2**40, -2**40]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.5]),
    st.sampled_from(NAMES), st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.sampled_from(["a", "theta", "n_train"]),
                                                                             SCALARS, max_size=2))


def _render(value) -> str:
    """A value as the text after ``=``: YAML flow style, or raw text as a user might type it."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={_render(v)}", st.one_of(st.sampled_from(REAL_KEYS), JUNK_KEYS),
                               VALUES), min_size=1, max_size=4)


def _same(a: RunConfig, b: RunConfig) -> bool:
    """Equal configs (as JSON text: a NaN inside model/data options equals itself there)."""
    return json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)


HOSTILE = ["null", "[]", "{a: 1}", "true", "-1", ".nan", ".inf", "abc", "[a, b]", "1099511627776"]


def test_every_key_with_every_hostile_value():
    """The deterministic floor under the random search: each real key alone with each hostile
    value, next to the PEs and kernel that read free-form options (the bugs the search found:
    patch_size=null, size=[], mlp_ratio=inf, kernel_size=inf, a 2**40-wide model)."""
    crashes = []
    for context in ([], ["model.attn=suppression", "model.qk_pe=string_cayley", "model.token_pe=learned"]):
        for key in REAL_KEYS:
            for value in HOSTILE:
                overrides = [*context, f"{key}={value}"]
                try:
                    load_config(PRESET, overrides)
                except ValueError:
                    pass
                except Exception as err:  # noqa: BLE001
                    crashes.append(f"{overrides}: {type(err).__name__}: {err}"[:300])
    assert crashes == [], "\n".join(crashes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_random_overrides_never_crash_load_config(overrides):
    try:
        cfg = load_config(PRESET, overrides)
    except ValueError as err:
        assert str(err).strip(), "an empty error message"
        return
    # what a run directory's config.yaml holds must load again (vitlab train --resume reads it)
    assert _same(validate(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))), cfg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_random_overrides_never_crash_validate_command(overrides):
    code, out, err = call(["validate", PRESET, *overrides])
    if code == 0:
        assert _same(validate(yaml.safe_load(out)), load_config(PRESET, overrides))
        return
    assert code == 2, (code, err)
    # (a traceback's header, not the word: an override may well be data.name=Traceback)
    assert err.count("\n") == 1 and err.startswith("vitlab: error: ") and "Traceback (most recent" not in err, err
