"""Seeded, stratified splits, and their JSON form (the trainer writes it as ``split.json``)."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import dedupe as dedupe_mod
from .base import DataBundle

Number = Union[float, int, Fraction]


def _exact(fractions: Sequence[Number]) -> List[Fraction]:
    """The fractions as exact rationals (0.1 -> 1/10) that sum to exactly 1."""
    if len(fractions) < 1 or any((not isinstance(f, (int, float, Fraction))) or f < 0 or not math.isfinite(f)
                                 for f in fractions):
        raise ValueError(f"split fractions must be non-negative numbers, got {tuple(fractions)}")
    exact = [Fraction(f).limit_denominator(10**9) for f in fractions]
    if abs(float(sum(exact)) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {tuple(fractions)} (sum {float(sum(exact)):.6g})")
    exact[-1] = 1 - sum(exact[:-1])  # absorb the float round-off so the parts cover every index
    if exact[-1] < 0:
        raise ValueError(f"split fractions must sum to 1, got {tuple(fractions)}")
    return exact


def _class_counts(sizes: Sequence[int], fractions: Sequence[Fraction]) -> List[List[int]]:
    """How many items of each class go to each part.

    Each class's count for part i is floor or ceil of ``size * f_i`` (proportions kept within one
    item per class): the counts are differences of the rounded cumulative boundaries
    ``floor(size * (f_0 + ... + f_i) + u)`` for an offset u in [0, 1). Per class we pick the offset
    that keeps the running deficit of every part smallest (error diffusion), which keeps the part
    totals near ``N * f_i`` too (within one item in randomised checks with up to four parts); with two
    parts the deficit never leaves [-1/2, 1/2], so the first part holds exactly ``round(N * f_0)``.
    """
    cum = [sum(fractions[: i + 1], Fraction(0)) for i in range(len(fractions))]
    deficit = [Fraction(0)] * len(fractions)
    out = []
    for n in sizes:
        bounds = [n * c for c in cum]  # exact cumulative targets, the last is n
        offsets = sorted({Fraction(0)} | {1 - (b - math.floor(b)) for b in bounds if b != math.floor(b)})
        best = None
        for u in offsets:
            edges = [0] + [math.floor(b + u) for b in bounds]  # u < 1: edges[0] = 0 and edges[-1] = n
            counts = [edges[i + 1] - edges[i] for i in range(len(fractions))]
            new = [d + n * f - c for d, f, c in zip(deficit, fractions, counts)]
            key = (max(abs(x) for x in new), sum(abs(x) for x in new))
            if best is None or key < best[0]:
                best = (key, counts, new)
        out.append(best[1])
        deficit = best[2]
    return out


def _split(labels: torch.Tensor, fractions: Sequence[Fraction], seed: int) -> List[torch.Tensor]:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels).tolist()  # sorted
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    counts = _class_counts([len(m) for m in members], fractions)
    parts: List[List[torch.Tensor]] = [[] for _ in fractions]
    for idx, per_part in zip(members, counts):
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for part, chunk in zip(parts, torch.split(idx, per_part)):
            part.append(chunk)
    return [torch.sort(torch.cat(p)).values if p else torch.zeros(0, dtype=torch.int64) for p in parts]


def stratified_split(labels: torch.Tensor, fractions: Tuple[float, ...], seed: int) -> List[torch.Tensor]:
    """Split ``range(len(labels))`` into ``len(fractions)`` parts, class by class.

    Args:
        labels: (N,) integer class labels.
        fractions: non-negative, summing to 1, e.g. ``(0.8, 0.1, 0.1)``.
        seed: the same seed gives the same parts.

    Returns:
        One sorted int64 index tensor per part; the parts are disjoint and cover every index. Every
        class puts floor or ceil of ``n_class * fraction`` items into each part.
    """
    return _split(labels, _exact(fractions), seed)


def stratified_take(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Exactly ``min(k, N)`` sorted indices, stratified by class (for ``load_dataset(limit=k)``)."""
    n = len(labels)
    if k >= n:
        return torch.arange(n)
    return _split(labels, [Fraction(k, n), Fraction(n - k, n)], seed)[0]


def make_splits(bundle: DataBundle, *, val_fraction: float = 0.1, seed: int = 0,
                test_fraction: float = 0.1, dedupe: bool = False, dedupe_threshold: int = dedupe_mod.DEFAULT_THRESHOLD,
                check_leakage: bool = True) -> Dict[str, object]:
    """The run's split of ``bundle``.

    With an official test set: ``{"train", "val"}`` carved stratified from ``bundle.train`` (val gets
    ``val_fraction``), ``"test": None`` (meaning: use ``bundle.test``), scheme ``"official-test"``.
    Without: a stratified ``(1 - val - test) / val / test`` split of the pool, scheme ``"80/10/10"``
    at the defaults, ``"80/10/10 (pooled: train + official test)"`` when the pool holds the official
    test set too (``bundle.pooled``, ``data.split=pooled``). Index tensors are sorted int64 into
    ``bundle.train``.

    Leakage check (``check_leakage``, or ``dedupe``): every image (pool and official test set) is
    perceptual-hashed first; ``"leakage"`` records the near-duplicates (pHash Hamming distance <=
    ``dedupe_threshold``) and how many val/test images have one on the other side of each boundary
    (see :func:`vitlab.data.dedupe.leakage_record`). File-backed datasets are hashed only with
    ``dedupe``. With ``dedupe``, near-duplicates are dropped from the pool before splitting: the
    official test set is kept whole and pool items near one of its images go; among the rest, in
    index order, an item goes when it is near one already kept. The split of what remains is
    stratified and seeded as usual and has no near-duplicate across any boundary.
    """
    for key, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"{key} must be in [0, 1), got {f}")
    if bundle.test is None and val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    threshold = dedupe_mod.check_threshold(dedupe_threshold)
    n = len(bundle.train)
    dup = (dedupe_mod.bundle_duplicates(bundle, threshold, streamed=bool(dedupe))
           if dedupe or check_leakage else None)
    pool = torch.arange(n)  # the pool items the split draws from: all, or those dedupe keeps
    if dedupe:
        fixed = np.r_[np.zeros(n, dtype=bool), np.ones(len(dup.group) - n, dtype=bool)]
        pool = torch.from_numpy(np.flatnonzero(dedupe_mod.dedupe_keep(dup, fixed)[:n]))
    labels = bundle.train.labels[pool]
    if bundle.test is not None:
        train, val = (pool[p] for p in stratified_split(labels, (1 - val_fraction, val_fraction), seed))
        split = {"train": train, "val": val, "test": None, "scheme": "official-test", "seed": int(seed)}
        test = torch.arange(n, n + len(bundle.test))
    else:
        fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
        train, val, test = (pool[p] for p in stratified_split(labels, fractions, seed))
        scheme = "/".join(f"{100 * f:g}" for f in fractions)
        if bundle.pooled:
            scheme += " (pooled: train + official test)"
        split = {"train": train, "val": val, "test": test, "scheme": scheme, "seed": int(seed)}
    # an empty part fails much later with a message about empty arrays (metrics, batching)
    empty = [name for name, part in (("training", train), ("validation", val), ("test", test)) if len(part) == 0]
    if empty:
        raise ValueError(f"too little data: the split of {len(pool)} pool images (val_fraction={val_fraction}"
                         f"{'' if bundle.test is not None else f', test_fraction={test_fraction}'}) leaves the "
                         f"{' and '.join(empty)} set empty; use more images or larger fractions")
    split["leakage"] = None
    if dedupe or check_leakage:
        parts = {"train": train.numpy(), "val": val.numpy(), "test": test.numpy()}
        split["leakage"] = dedupe_mod.leakage_record(dup, threshold, parts, removed=n - len(pool))
    return split


_KEYS = ("train", "val", "test", "scheme", "seed")
_OPTIONAL = ("leakage",)  # absent from splits made before the leakage check


def split_to_json(split: Dict[str, object]) -> Dict[str, object]:
    """``split`` with its index tensors as lists of ints (``json.dump``-able)."""
    missing = [k for k in _KEYS if k not in split]
    if missing:
        raise ValueError(f"split lacks key(s) {missing}; a split has {list(_KEYS)}")
    out = {k: (None if split[k] is None else torch.as_tensor(split[k]).tolist()) if k in ("train", "val", "test")
           else split[k] for k in _KEYS}
    out.update({k: split[k] for k in _OPTIONAL if k in split})
    return out


def dataset_digest(ds) -> str:
    """SHA-256 of a dataset's labels and its pixels (in memory) or its files' names and sizes
    (streamed: no decoding): split.json's fingerprint of a test set that is not carved from the pool
    (an official one, which indices cannot pin down). Another copy of the same files matches; other
    images, images in other class folders or in another order do not."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(ds.labels.numpy(), dtype="<i8").tobytes())
    if hasattr(ds, "images"):
        h.update(np.ascontiguousarray(ds.images.numpy()).tobytes())
    else:
        for path in ds.paths:
            path = Path(path)
            h.update(f"{path.name}\0{path.stat().st_size if path.is_file() else -1}\0".encode())
    return h.hexdigest()


def check_split(run: Path, split: Dict[str, object], classes: List[str], test, pool=None, *, doing: str) -> None:
    """The split rebuilt here must be the run's (``split.json``): otherwise the data changed since the
    run started (another copy, another version, another class list), and ``doing`` (what would follow:
    "eval would score other images") would be wrong. A carved test set is checked by its indices, an
    official one by its fingerprint (:func:`dataset_digest`; runs from before split.json held one: by
    its classes). Given the training ``pool``, the train and val indices and the pool's fingerprint
    (where split.json holds one) are checked too."""
    import json

    path = Path(run) / "split.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: not valid JSON; cannot check that the data is the run's") from None
    rebuilt = None if split["test"] is None else split["test"].tolist()
    digest = dataset_digest(test)
    same = (isinstance(saved, dict) and saved.get("test") == rebuilt and saved.get("classes", classes) == classes
            and saved.get("test_sha256", digest) == digest)
    if same and pool is not None:
        same = (all(saved.get(k) == torch.as_tensor(split[k]).tolist() for k in ("train", "val"))
                and ("pool_sha256" not in saved or saved["pool_sha256"] == dataset_digest(pool)))
    if not same:
        raise ValueError(f"{run}: the split rebuilt from the data differs from the run's split.json: the data "
                         f"changed since the run started (another copy or version?); {doing}")


def split_from_json(d: Dict[str, object]) -> Dict[str, object]:
    """The inverse of :func:`split_to_json`: index lists back to int64 tensors."""
    missing = [k for k in _KEYS if k not in d]
    if missing:
        raise ValueError(f"split.json lacks key(s) {missing}; a split has {list(_KEYS)}")
    out: Dict[str, Optional[object]] = {k: d[k] for k in _KEYS + _OPTIONAL if k in d}
    for k in ("train", "val", "test"):
        out[k] = None if d[k] is None else torch.tensor(d[k], dtype=torch.int64).reshape(-1)
    return out
