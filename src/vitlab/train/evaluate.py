"""``vitlab eval``: re-evaluate a finished run's checkpoint on another split or image size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from .. import rundir
from ..data.base import int_sizes
from ..data.splits import check_split
from ..config import deep_merge, parse_overrides, read_yaml, validate
from ..eval.metrics import classification_metrics
from .augment import BatchAugment
from .build import build_model
from .feed import make_feed
from .loop import autocast_for, pick_device, predict, resolve_precision


def eval_run(run_dir: str, overrides: Optional[List[str]] = None, *, checkpoint: str = "best",
             img_size=None, device: str = "auto") -> dict:
    """Metrics of ``run_dir``'s checkpoint. ``overrides`` may change ``data.*`` (another source or
    split) and ``model.img_size`` (evaluate at another resolution: inputs are resized, the model
    reads the new grid — relative PEs use new coordinates, learned tables are resized)."""
    from ..data import load_dataset, make_splits

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: no config.yaml (not a vitlab run directory)")
    dev = pick_device(device, what="--device")
    raw = read_yaml(str(run / "config.yaml"))
    extra = parse_overrides(overrides or [])
    bad = sorted(set(extra) - {"data", "model"}) + sorted(set(extra.get("model", {})) - {"img_size"})
    if bad:
        raise ValueError(f"vitlab eval can override data.* and model.img_size only; got {bad}")
    asked = "img_size" in extra.get("model", {})
    new_size = extra.get("model", {}).pop("img_size", img_size)
    extra.pop("model", None)
    cfg = validate(deep_merge(raw, extra))
    state = rundir.load_checkpoint(run / "checkpoints" / f"{checkpoint}.pt")

    d = cfg.data
    bundle = load_dataset(d.name, d.root, limit=d.limit, seed=d.split_seed, pool_test=d.split == "pooled",
                          **d.source_options())
    split = make_splits(bundle, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed,
                        dedupe=d.dedupe,
                        dedupe_threshold=d.dedupe_threshold, check_leakage=False)  # the split training made
    test = bundle.test if split["test"] is None else bundle.train.subset(split["test"])
    if not set(extra.get("data", {})) - {"root", "workers"}:  # the run's data (perhaps another copy of it)
        check_split(run, split, bundle.train.classes, test, doing="eval would score other images")
    num_classes = len(bundle.train.classes)
    data_size = tuple(test.item_shape[1:])
    trained = read_yaml(str(run / "config.yaml")).get("model", {})
    model, mcfg = build_model(cfg, in_chans=test.item_shape[0], num_classes=num_classes,
                              img_size=tuple(trained["img_size"]) if "img_size" in trained else data_size)
    try:
        model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    except RuntimeError as err:  # torch's message spans many lines; the first mismatch says enough
        detail = next((x.strip() for x in str(err).splitlines() if "size mismatch" in x or "Missing key" in x),
                      str(err).splitlines()[0])
        raise ValueError(f"{run}: its weights do not fit the model built for this data ({num_classes} classes, "
                         f"{test.item_shape[0]} channels): {detail}") from None
    model.to(dev).eval()
    size = mcfg.get("img_size") or data_size
    if new_size is not None or asked:
        ndim = len(data_size)
        size = int_sizes((new_size,) * ndim if isinstance(new_size, int) and not isinstance(new_size, bool)
                         else new_size, (ndim,))
        if size is None:
            raise ValueError(f"model.img_size must be a positive int or a list of {ndim} positive ints, "
                             f"got {new_size!r}")
    size = tuple(size)
    norm = state.get("norm") or {"mean": [0.5] * test.item_shape[0], "std": [0.5] * test.item_shape[0]}
    aug = BatchAugment(mean=torch.tensor(norm["mean"]), std=torch.tensor(norm["std"]), num_classes=num_classes,
                       img_size=size if size != data_size else None, channels=mcfg.get("in_chans"), device=dev)
    feed = make_feed(test, dev, d.workers, cfg.train.seed)
    precision = _trained_precision(run, cfg, dev)
    logits = predict(model, feed, aug, cfg.train.eval_batch_size, autocast_for(precision, dev))
    metrics = classification_metrics(logits, test.labels, num_classes)
    metrics.update(img_size=list(size), test_size=len(feed), checkpoint=checkpoint, precision=precision,
                   device=str(dev))
    return metrics


def _trained_precision(run: Path, cfg, device: torch.device) -> str:
    """The precision the run was evaluated in when it finished (final.json's ``precision``, what
    ``auto`` resolved to on its device), so that eval reproduces its numbers; else the config's."""
    final = run / "final.json"
    if final.is_file():
        try:
            recorded = json.loads(final.read_text()).get("precision")
        except (ValueError, AttributeError):
            recorded = None
        if recorded in ("fp32", "bf16"):
            return recorded
    return resolve_precision(cfg.train.precision, device)


