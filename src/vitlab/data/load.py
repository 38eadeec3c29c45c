"""``load_dataset``: one entry point over every registered source."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .base import DATASETS, DataBundle, concat
from .splits import stratified_take


def pool_test_set(bundle: DataBundle) -> DataBundle:
    """``bundle`` with its official test set appended to the pool (items ``len(train)`` onwards) and
    no test set, marked ``pooled``; a bundle without a test set as it is."""
    if bundle.test is None:
        return bundle
    return DataBundle(concat(bundle.train, bundle.test), None, bundle.source, pooled=True)


def load_dataset(name: str, root: Optional[str] = None, *, limit: Optional[int] = None, seed: int = 0,
                 pool_test: bool = False, **options) -> DataBundle:
    """Load dataset ``name`` (a ``DATASETS`` entry; ``vitlab list`` shows them) into memory.

    Args:
        root: where the data is; None searches ``$VITLAB_DATA``, the user cache and system copies
            (see :func:`vitlab.data.find_root`).
        limit: keep at most ``limit`` training images, stratified by class (seeded); the test set is
            untouched (with ``pool_test``, ``limit`` applies to the pooled images).
        seed: seeds ``limit``'s choice and the sources that draw samples (``synthetic``,
            ``mricron-brain``).
        pool_test: put the official test set (if the data has one) into the pool, which the split
            then divides stratified into train/val/test (``data.split=pooled``, e.g. the 80/10/10 split
            of a study that pooled Kaggle's Training/ and Testing/); the bundle has no test set and
            ``pooled=True``.
        **options: the source's own options (e.g. ``img_size`` for ``imagefolder``); an unknown option
            is a ValueError naming the valid ones. Nothing is downloaded unless ``download=True``.

    Raises:
        FileNotFoundError: the data is not there (the message lists where vitlab looked and how to get it).
        ValueError: an unknown name or option, or malformed files (the message names the file).
    """
    bundle = DATASETS.build(name, options, root=root, seed=seed)
    if pool_test:
        bundle = pool_test_set(bundle)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if limit < len(bundle.train):
            bundle = replace(bundle, train=bundle.train.subset(stratified_take(bundle.train.labels, limit, seed)))
    return bundle
