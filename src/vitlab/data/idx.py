"""MNIST and Fashion-MNIST from their IDX files (``.gz`` or raw), parsed with numpy."""
from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import DATASETS, READ_ERRORS, ArrayDataset, DataBundle
from .download import find_or_download
from .locate import register_place

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# torchvision's download layout: <root>/<Folder>/raw/
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/ "FILE FORMATS") as a uint8 array.

    Header: two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions, then
    one big-endian int32 per dimension. Files ending in ``.gz`` are decompressed.

    Raises:
        ValueError: naming the file, for a wrong magic number, a type other than 0x08, or a size
            that does not match the header (truncated or padded file).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except READ_ERRORS as err:
        raise ValueError(f"{path}: cannot read IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, "
                         f"expected 0000 then type and rank)")
    dtype, ndim = raw[2], raw[3]
    if dtype != 0x08:
        raise ValueError(f"{path}: IDX type code 0x{dtype:02x} is not supported (only 0x08, unsigned byte)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, rank {ndim} needs {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if min(dims, default=0) < 0:
        raise ValueError(f"{path}: IDX header gives negative dimension(s) {dims} (corrupt)")
    expected = header + math.prod(dims)  # (a Python int: no overflow on a corrupt header's huge sizes)
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX size mismatch: header says {dims} = {expected} bytes, file has "
                         f"{len(raw)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _file(folder: Path, stem: str) -> Optional[Path]:
    """The raw file when present (faster), else the ``.gz``."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _probe(name: str):
    def probe(path: Path) -> Optional[Path]:
        for folder in (path, path / TORCHVISION_FOLDER[name] / "raw", path / "raw"):
            if folder.is_dir() and _file(folder, FILES["train_images"]) is not None:
                return folder
        return None
    return probe


register_place(
    "mnist", _probe("mnist"),
    how="with a network: data.options.download=true (torchvision.datasets.MNIST), or put the four IDX "
        "files from https://ossci-datasets.s3.amazonaws.com/mnist/ in $VITLAB_DATA/mnist")
register_place(
    "fashion-mnist", _probe("fashion-mnist"), system=("/usr/share/datasets/fashion-mnist",),
    how="`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs /usr/share/datasets/fashion-mnist); "
        "or with a network: data.options.download=true (torchvision.datasets.FashionMNIST), or "
        "the four IDX files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ in "
        "$VITLAB_DATA/fashion-mnist")


def _split(folder: Path, part: str, name: str, classes) -> ArrayDataset:
    paths = {kind: _file(folder, FILES[f"{part}_{kind}"]) for kind in ("images", "labels")}
    for kind, p in paths.items():
        if p is None:
            raise FileNotFoundError(f"{name}: {folder} lacks {FILES[f'{part}_{kind}']}[.gz]")
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{name}: {paths['images']} holds {images.shape} images but {paths['labels']} holds "
                         f"{labels.shape} labels; expected (N, H, W) and (N,)")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, H, W)
                        torch.from_numpy(labels.astype(np.int64)), list(classes), name)


def load_idx_dataset(name: str, root: Optional[str], classes, download: bool) -> DataBundle:
    folder = find_or_download(name, root, download)
    return DataBundle(_split(folder, "train", name, classes), _split(folder, "test", name, classes), str(folder))


@DATASETS.register("mnist", "MNIST digits: IDX files (gz or raw), 60000 train / 10000 test, 1x28x28",
                   size=lambda **_: (28, 28))
def mnist(root: Optional[str], seed: int, *, download: bool = False) -> DataBundle:
    return load_idx_dataset("mnist", root, MNIST_CLASSES, download)


@DATASETS.register("fashion-mnist", "Fashion-MNIST: IDX files (gz or raw; Debian's dataset-fashion-mnist), "
                                    "60000 train / 10000 test, 1x28x28", size=lambda **_: (28, 28))
def fashion_mnist(root: Optional[str], seed: int, *, download: bool = False) -> DataBundle:
    return load_idx_dataset("fashion-mnist", root, FASHION_CLASSES, download)
