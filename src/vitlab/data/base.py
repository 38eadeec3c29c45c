"""The in-memory dataset types every source returns, and the ``DATASETS`` registry."""
from __future__ import annotations

import tokenize
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..registry import Registry

#: what reading a damaged file raises: OSError (gzip's bad CRC, truncation), EOFError, ValueError,
#: zlib.error (a damaged deflate stream in a .gz, .nii.gz or compressed .npz), and SyntaxError /
#: tokenize.TokenError (numpy parsing a damaged .npy header, which is a Python literal)
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, SyntaxError, tokenize.TokenError)

# Every source is ``factory(root, seed, *, options...) -> DataBundle``; ``root`` (the user's path or
# None) and ``seed`` come from ``load_dataset``, the keyword-only options from the user.
DATASETS: Registry = Registry("dataset", fixed=("root", "seed"))


def int_sizes(value, lengths: Tuple[int, ...], low: int = 1, square: bool = False) -> Optional[Tuple[int, ...]]:
    """``value`` as a tuple of ints >= ``low`` of one of ``lengths``, or None when it is not one
    (the caller names the option in its error). ``square``: a single int means (value, value)."""
    if square and isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) not in lengths
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        return None
    return tuple(value)


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

    @property
    def item_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def subset(self, idx: torch.Tensor) -> "ArrayDataset":
        """The items at ``idx`` (an int64 index tensor), same classes and name."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), self.name)


class FileDataset(torch.utils.data.Dataset):
    """A dataset decoded from its files on demand, for folders too large to hold in memory.

    Same ``labels`` / ``classes`` / ``name`` / ``subset`` / ``item_shape`` as :class:`ArrayDataset`,
    no ``images``: item i is ``(decode(paths[i]), labels[i])``, a uint8 (C, H, W) tensor. The
    trainer streams it through DataLoader workers."""

    def __init__(self, paths: List, labels: torch.Tensor, classes: List[str], name: str, decode, item_shape: tuple):
        self.paths, self.labels, self.classes, self.name = list(paths), labels, list(classes), name
        self.decode, self._shape = decode, tuple(item_shape)
        if labels.dtype != torch.int64 or labels.shape != (len(self.paths),):
            raise ValueError(f"{name}: labels must be int64 ({len(self.paths)},), got {labels.dtype} {tuple(labels.shape)}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.decode(self.paths[i])), self.labels[i]

    @property
    def item_shape(self) -> tuple:
        return self._shape

    def subset(self, idx: torch.Tensor) -> "FileDataset":
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return FileDataset([self.paths[i] for i in idx.tolist()], self.labels[idx], self.classes, self.name,
                           self.decode, self._shape)


def concat(first: "ArrayDataset | FileDataset", second: "ArrayDataset | FileDataset") -> "ArrayDataset | FileDataset":
    """``first``'s items followed by ``second``'s (same kind, classes and item shape; a
    FileDataset keeps ``first``'s decoder)."""
    if type(first) is not type(second) or list(first.classes) != list(second.classes) \
            or first.item_shape != second.item_shape:
        raise ValueError(f"{first.name}: cannot pool {type(first).__name__} {first.item_shape} with "
                         f"{type(second).__name__} {second.item_shape} (classes {first.classes} vs {second.classes})")
    labels = torch.cat([first.labels, second.labels])
    if isinstance(first, FileDataset):
        return FileDataset(first.paths + second.paths, labels, first.classes, first.name, first.decode, first.item_shape)
    return ArrayDataset(torch.cat([first.images, second.images]), labels, list(first.classes), first.name)


@dataclass
class DataBundle:
    """What a source returns: the training pool, the official test set (None when the data has no
    official split) and where it was read from. ``pooled``: the pool holds the official test set too
    (``load_dataset(pool_test=True)``), so the split draws its test set from it."""

    train: "ArrayDataset | FileDataset"
    test: "Optional[ArrayDataset | FileDataset]"
    source: str
    pooled: bool = False

    def __post_init__(self):
        if self.test is not None and list(self.test.classes) != list(self.train.classes):
            raise ValueError(f"{self.train.name}: train and test classes differ: "
                             f"{self.train.classes} vs {self.test.classes}")
        if self.test is not None and self.test.item_shape != self.train.item_shape:
            raise ValueError(f"{self.train.name}: train items are {self.train.item_shape} "
                             f"but test items are {self.test.item_shape}")
