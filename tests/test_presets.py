"""Every shipped run preset trains end to end with its own model and recipe (augmentations, repeated
augmentation, accumulation, precision, streaming) on data written in its real format: IDX files,
CIFAR pickle batches, JPEG/PNG folders; Debian's Fashion-MNIST and mricron-data where the preset
reads them. One short epoch each, on a few dozen images: this checks that the presets run, not
what they reach. The full presets' models must have the reference studies' shapes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_data import write_cifar, write_mnist
from vitlab.cli import main
from vitlab.config import PRESET_DIR

PRESETS = sorted(p.stem for p in Path(PRESET_DIR).glob("*.yaml"))

#: the reference studies' shapes (the study table of the design), for the full presets
STUDY_SHAPES = {
    "mnist-string": dict(patch_size=[7, 7], dim=128, depth=4, heads=4),
    "cifar10-string": dict(patch_size=[4, 4], dim=192, depth=4, heads=4),
    "cifar10-minivit": dict(patch_size=[4, 4], dim=96, depth=9, heads=12, mlp_ratio=2.0, num_cls=2, token_pe="sincos"),
    "imagenet100-clearvit": dict(img_size=[224, 224], patch_size=[16, 16], dim=192, depth=12, heads=3, mlp_ratio=4.0),
    "brain-mri-pope": dict(img_size=[224, 224], patch_size=[16, 16], dim=512, depth=6, patch_proj="linear", pool="mean",
                           qk_pe="pope"),
    "volume-3d": dict(token_pe="learned3d", grad_checkpointing=True),
}


def _folder(root: Path, parts: dict, size=(40, 48), mode="RGB", suffix=".JPEG") -> Path:
    """An ImageFolder tree: {part folder ('' for none): images per class}, 4 classes, class-coded corner."""
    rng = np.random.default_rng(0)
    for part, n in parts.items():
        for c in range(4):
            d = root / part / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                img[:6, :6] = 60 * c
                Image.fromarray(img).convert(mode).save(d / f"{i}{suffix}")
    return root


def _data(preset: str, tmp: Path) -> list:
    """The overrides that point ``preset`` at small data in its real format."""
    family = preset.removesuffix("-quick")
    if family == "fashion-mnist":
        return ["data.limit=400"]  # Debian's dataset-fashion-mnist
    if family == "mnist-string":
        write_mnist(tmp / "mnist", n_train=80, n_test=20)
        return [f"data.root={tmp / 'mnist'}"]
    if family in ("cifar10-string", "cifar10-minivit"):
        write_cifar(tmp / "cifar-10-batches-py", per_batch=16)
        return [f"data.root={tmp / 'cifar-10-batches-py'}"]
    if family == "imagenet100-clearvit":  # one tree, split 80/10/10 by vitlab; streamed by a worker
        return [f"data.root={_folder(tmp / 'imagenet', {'': 20})}", "data.workers=1"]
    if family == "brain-mri-pope":  # Training/ + Testing/ (pooled by the preset), grey PNGs read as 3 channels
        return [f"data.root={_folder(tmp / 'mri', {'Training': 12, 'Testing': 4}, (56, 56), 'L', '.png')}"]
    if family == "volume-3d":  # Debian's mricron-data
        return ["data.options.per_class=6"]
    raise AssertionError(f"no test data for preset {preset}: add it here")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_data_in_its_real_format(preset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", preset, *_data(preset, tmp_path), "train.epochs=1", "train.warmup_epochs=0.5",
            "train.batch_size=8", "train.eval_batch_size=32", "eval.resolution_images=8", "eval.attention_images=2",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["status"] == "finished" and final["epochs"] == 1 and 0 <= final["acc1"] <= 1
    assert (out / "predictions.npz").is_file() and final["test_size"] > 0
    shape = STUDY_SHAPES.get(preset, {})
    assert {k: final["model"][k] for k in shape} == shape
    if preset.startswith("brain-mri-pope"):  # the study's stratified 80/10/10 of Training/ + Testing/ pooled
        split = json.loads((out / "split.json").read_text())
        assert split["scheme"] == "80/10/10 (pooled: train + official test)"
        n = 4 * (12 + 4)
        assert sum(len(split[k]) for k in ("train", "val", "test")) == n and final["test_size"] == len(split["test"])
        assert all(abs(len(split[k]) - f * n) <= 1 for k, f in (("train", 0.8), ("val", 0.1), ("test", 0.1)))
        if preset.endswith("-quick"):  # vitlab eval rebuilds the pooled split and checks it against split.json
            capsys.readouterr()
            assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
            res = json.loads(capsys.readouterr().out)
            assert res["test_size"] == len(split["test"]) and res["acc1"] == final["acc1"]


def _quick_studies():
    from vitlab.compare.experiment import studies

    names = studies()
    # `default` is left out: its arms are the plain PEs test_catalogue trains, and each of its runs
    # evaluates Fashion-MNIST's whole 10,000-image test set (scripts/main.sh runs the study itself)
    return sorted(n for n in names if n.endswith("-quick") or (f"{n}-quick" not in names and n != "default"))


@pytest.mark.parametrize("study", _quick_studies())
def test_every_arm_of_every_laptop_scale_study_trains(study, tmp_path):
    """Each arm of each shipped study at laptop scale (one seed, the first grid point) trains one
    epoch on data in its preset's real format: timm backbones, PoPE in DeiT, heads changed for the
    differential kernel, STRING's sparsity sweep, 3D PEs."""
    from vitlab.compare import load_experiment
    from vitlab.train.loop import train_run

    exp = load_experiment(study, seeds=1)
    shrink = ["train.epochs=1", "train.batch_size=8", "train.eval_batch_size=32", "eval.resolution_images=4",
              "eval.attention_images=0", "train.warmup_epochs=0.5"]
    specs = exp.runs(_data(exp.base, tmp_path) + shrink)
    first = {}
    for spec in specs:
        first.setdefault(spec.arm, spec)
    assert set(first) == set(exp.arms)
    for arm, spec in first.items():
        final = train_run(spec.config, tmp_path / "runs" / spec.name, progress=False)
        assert final["status"] == "finished" and 0 <= final["acc1"] <= 1, arm
