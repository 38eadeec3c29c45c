"""``load_dataset``: one entry point over every registered source."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .base import DATASETS, DataBundle
from .splits import stratified_take


def load_dataset(name: str, root: Optional[str] = None, *, limit: Optional[int] = None, seed: int = 0,
                 **options) -> DataBundle:
    """Load dataset ``name`` (a ``DATASETS`` entry; ``vitlab list`` shows them) into memory.

    Args:
        root: where the data is; None searches ``$VITLAB_DATA``, the user cache and system copies
            (see :func:`vitlab.data.find_root`).
        limit: keep at most ``limit`` training images, stratified by class (seeded); the test set is
            untouched.
        seed: seeds ``limit``'s choice and the sources that draw samples (``synthetic``,
            ``mricron-brain``).
        **options: the source's own options (e.g. ``img_size`` for ``imagefolder``); an unknown option
            is a ValueError naming the valid ones. Nothing is downloaded unless ``download=True``.

    Raises:
        FileNotFoundError: the data is not there (the message lists where vitlab looked and how to get it).
        ValueError: an unknown name or option, or malformed files (the message names the file).
    """
    bundle = DATASETS.build(name, options, root=root, seed=seed)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if limit < len(bundle.train):
            bundle = replace(bundle, train=bundle.train.subset(stratified_take(bundle.train.labels, limit, seed)))
    return bundle
