"""MedMNIST-style ``.npz`` files: ``{train,val,test}_{images,labels}`` arrays (https://medmnist.com)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .base import DATASETS, READ_ERRORS, ArrayDataset, DataBundle
from .locate import find_root, register_place


def _probe(path: Path) -> Optional[Path]:
    if path.is_file() and path.suffix == ".npz":
        return path
    if path.is_dir() and any(path.glob("*.npz")):
        return path
    return None


register_place("npz", _probe,
               how="give data.root= a MedMNIST-style .npz file (e.g. pathmnist.npz from "
                   "https://zenodo.org/records/10519652, or `pip install medmnist`) or a folder holding one",
               in_data_root=False)


def _images(arr: np.ndarray, key: str, path: Path) -> torch.Tensor:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) with C in 1, 3, 4 -> (N, C, H, W); other 4-D arrays are
    MedMNIST-3D volumes (N, H, W, D) -> (N, 1, H, W, D); (N, H, W, D, C) -> (N, C, H, W, D)."""
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: {key} is {arr.dtype}; expected uint8 images")
    if arr.ndim == 3:
        out = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
        out = np.moveaxis(arr, -1, 1)
    elif arr.ndim == 4:
        out = arr[:, None]
    elif arr.ndim == 5:
        out = np.moveaxis(arr, -1, 1)
    else:
        raise ValueError(f"{path}: {key} has shape {arr.shape}; expected (N, H, W), (N, H, W, C) or (N, H, W, D)")
    return torch.from_numpy(np.ascontiguousarray(out))


def _labels(arr: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{path}: {key} has shape {arr.shape}; expected (N,) or (N, 1) class labels "
                         f"(multi-label data such as ChestMNIST is not supported)")
    if not np.issubdtype(arr.dtype, np.integer) or (len(arr) and arr.min() < 0):
        raise ValueError(f"{path}: {key} must hold non-negative integer labels, got {arr.dtype}")
    return torch.from_numpy(arr.astype(np.int64))


@DATASETS.register("npz", "MedMNIST-style .npz (train/val/test images and labels); val is merged into the train pool")
def npz(root: Optional[str], seed: int, *, file: Optional[str] = None,
        classes: Optional[List[str]] = None) -> DataBundle:
    """Options: ``file`` (the .npz inside a root folder holding several), ``classes`` (names; default
    "0", "1", ...). The official val split joins train (the trainer carves its own validation set);
    the official test split is kept."""
    found = find_root("npz", root)
    if found.is_file():
        if file is not None:
            raise ValueError(f"npz: root {found} is already a file; option file={file!r} needs a folder root")
        path = found
    elif file is not None:
        path = found / file
        if not path.is_file():
            there = sorted(p.name for p in found.glob("*.npz"))
            raise FileNotFoundError(f"npz: {path} does not exist (.npz files there: {there})")
    else:
        files = sorted(found.glob("*.npz"))
        if len(files) != 1:
            raise ValueError(f"npz: {found} holds {len(files)} .npz files ({[p.name for p in files]}); "
                             f"pick one with option file=")
        path = files[0]
    if not zipfile.is_zipfile(path):  # else numpy reads it as a pickle and refuses that, which misleads
        raise ValueError(f"npz: {path} is not a .npz archive (numpy.savez writes a zip file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (*READ_ERRORS, zipfile.BadZipFile) as err:
        raise ValueError(f"npz: cannot read {path} ({type(err).__name__}: {err})") from None
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise ValueError(f"npz: {path} lacks train_images/train_labels (keys: {sorted(arrays)})")
    parts = {}
    for part in ("train", "val", "test"):
        if f"{part}_images" in arrays:
            if f"{part}_labels" not in arrays:
                raise ValueError(f"npz: {path} has {part}_images but no {part}_labels")
            images = _images(arrays[f"{part}_images"], f"{part}_images", path)
            labels = _labels(arrays[f"{part}_labels"], f"{part}_labels", path)
            if len(images) != len(labels):
                raise ValueError(f"npz: {path} has {len(images)} {part}_images but {len(labels)} {part}_labels")
            parts[part] = (images, labels)
    if not sum(len(parts[p][1]) for p in ("train", "val") if p in parts):
        raise ValueError(f"npz: {path} holds no training images (train_images"
                         f"{' and val_images' if 'val' in parts else ''} are empty)")
    n_classes = 1 + max(int(lab.max()) for _, lab in parts.values() if len(lab))
    names = [str(c) for c in range(n_classes)] if classes is None else [str(c) for c in classes]
    if len(names) < n_classes:
        raise ValueError(f"npz: option classes has {len(names)} names but the labels go up to {n_classes - 1}")
    pool = [parts[p] for p in ("train", "val") if p in parts]
    train = ArrayDataset(torch.cat([im for im, _ in pool]), torch.cat([lab for _, lab in pool]), names, "npz")
    test = ArrayDataset(*parts["test"], names, "npz") if "test" in parts else None
    return DataBundle(train, test, str(path))
