"""CIFAR-10 and CIFAR-100 from the python pickle batches (https://www.cs.toronto.edu/~kriz/cifar.html)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .base import DATASETS, ArrayDataset, DataBundle
from .download import find_or_download
from .locate import register_place

FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
TRAIN = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
TEST = {"cifar10": "test_batch", "cifar100": "test"}
META = {"cifar10": "batches.meta", "cifar100": "meta"}


def _probe(name: str):
    def probe(path: Path) -> Optional[Path]:
        for folder in (path, path / FOLDER[name]):
            if folder.is_dir() and (folder / TRAIN[name][0]).is_file() and (folder / META[name]).is_file():
                return folder
        return None
    return probe


for _name, _url in (("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")):
    register_place(
        _name, _probe(_name),
        how=f"with a network: data.options.download=true (torchvision.datasets.{_name.upper()}), or "
            f"unpack https://www.cs.toronto.edu/~kriz/{_url} (giving {FOLDER[_name]}/) into $VITLAB_DATA")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch {path} is missing")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(err).__name__}: {err})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (it holds a {type(content).__name__}, not a dict)")
    return content


def _pixels(value, path: Path) -> np.ndarray:
    """A batch's ``data`` as uint8, refusing what a cast would wrap or truncate (values outside
    0..255, fractions, non-numbers) instead of corrupting the pixels."""
    try:
        data = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: CIFAR pixel data is not an array ({type(err).__name__}: {err})") from None
    if data.dtype == np.uint8:
        return data
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"{path}: CIFAR pixel data is {data.dtype}; expected uint8 values 0..255")
    bad = ~((data >= 0) & (data <= 255) & (data == np.round(data)))  # NaN compares False: bad too
    if bad.any():
        raise ValueError(f"{path}: CIFAR pixel values must be integers 0..255, found {data[bad].flat[0]!r} "
                         f"({data.dtype})")
    return data.astype(np.uint8)


def _batches(paths: List[Path], label_key: bytes, name: str, classes: List[str]) -> ArrayDataset:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{path}: CIFAR batch lacks {b'data'!r} or {label_key!r} (keys: {list(batch)})")
        data = _pixels(batch[b"data"], path)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[label_key]):
            raise ValueError(f"{path}: expected (N, 3072) pixels and N labels, got {data.shape} and "
                             f"{len(batch[label_key])}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane, each 32x32 row-major
        found = np.asarray(batch[label_key])  # (a cast to int64 would truncate float labels silently)
        if found.dtype.kind not in "iu" or (found.size and not 0 <= found.min() <= found.max() < len(classes)):
            span = f" in [{found.min()}, {found.max()}]" if found.dtype.kind in "iuf" and found.size else ""
            raise ValueError(f"{path}: CIFAR {label_key.decode()} must be integers 0..{len(classes) - 1}, found "
                             f"{found.dtype} values{span}")
        labels.append(found.astype(np.int64))
    return ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                        classes, name)


def load_cifar(name: str, root: Optional[str], label_type: str, download: bool) -> DataBundle:
    folder = find_or_download(name, root, download)
    meta = _unpickle(folder / META[name])
    names_key = {"cifar10": b"label_names", "cifar100": f"{label_type}_label_names".encode()}[name]
    if names_key not in meta:
        raise ValueError(f"{folder / META[name]}: lacks {names_key!r} (keys: {list(meta)})")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    label_key = {"cifar10": b"labels", "cifar100": f"{label_type}_labels".encode()}[name]
    train = _batches([folder / b for b in TRAIN[name]], label_key, name, classes)
    test = _batches([folder / TEST[name]], label_key, name, classes)
    return DataBundle(train, test, str(folder))


@DATASETS.register("cifar10", "CIFAR-10: python pickle batches, 50000 train / 10000 test, 3x32x32, 10 classes",
                   size=lambda **_: (32, 32))
def cifar10(root: Optional[str], seed: int, *, download: bool = False) -> DataBundle:
    return load_cifar("cifar10", root, "fine", download)


def check_cifar100_options(*, labels, download) -> None:
    if labels not in ("fine", "coarse"):
        raise ValueError(f"cifar100 option labels={labels!r}; valid: 'fine', 'coarse'")


@DATASETS.register("cifar100", "CIFAR-100: python pickle batches, 50000 train / 10000 test, 3x32x32, "
                               "100 fine (or 20 coarse) classes", check=check_cifar100_options,
                   size=lambda **_: (32, 32))
def cifar100(root: Optional[str], seed: int, *, labels: str = "fine", download: bool = False) -> DataBundle:
    """Option ``labels``: ``fine`` (100 classes, default) or ``coarse`` (20 superclasses)."""
    check_cifar100_options(labels=labels, download=download)
    return load_cifar("cifar100", root, labels, download)
