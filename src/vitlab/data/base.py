"""The in-memory dataset types every source returns, and the ``DATASETS`` registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..registry import Registry

# Every source is ``factory(root, seed, *, options...) -> DataBundle``; ``root`` (the user's path or
# None) and ``seed`` come from ``load_dataset``, the keyword-only options from the user.
DATASETS: Registry = Registry("dataset", fixed=("root", "seed"))


@dataclass
class ArrayDataset:
    """A whole dataset held in memory.

    images: uint8, channels-first: (N, C, H, W) images or (N, C, H, W, D) volumes.
    labels: int64 (N,), ``labels[i]`` indexes ``classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    name: str

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim not in (4, 5):
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W) or (N, C, H, W, D), "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 ({self.images.shape[0]},), "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise ValueError(f"{self.name}: labels span [{int(self.labels.min())}, {int(self.labels.max())}] "
                             f"but there are {len(self.classes)} classes")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> "ArrayDataset":
        """The items at ``idx`` (an int64 index tensor), same classes and name."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), self.name)


@dataclass
class DataBundle:
    """What a source returns: the training pool, the official test set (None when the data has no
    official split) and where it was read from."""

    train: ArrayDataset
    test: Optional[ArrayDataset]
    source: str

    def __post_init__(self):
        if self.test is not None and list(self.test.classes) != list(self.train.classes):
            raise ValueError(f"{self.train.name}: train and test classes differ: "
                             f"{self.train.classes} vs {self.test.classes}")
        if self.test is not None and self.test.images.shape[1:] != self.train.images.shape[1:]:
            raise ValueError(f"{self.train.name}: train items are {tuple(self.train.images.shape[1:])} "
                             f"but test items are {tuple(self.test.images.shape[1:])}")
