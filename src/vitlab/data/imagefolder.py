"""Image trees (one folder per class, optionally under Training/ + Testing/, train/ + test/ or ImageNet's
train/ + val/), decoded with Pillow."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .base import DATASETS, ArrayDataset, DataBundle, FileDataset, int_sizes
from .folders import check_same_classes, class_files, class_list, split_folders
from .intensity import Intensity, check_intensity, to_unit
from .locate import find_root, register_place


def _probe(path: Path) -> Optional[Path]:
    return path if path.is_dir() else None


register_place("imagefolder", _probe,
               how="give data.root= a folder with one sub-folder of images per class (optionally under Training/ "
                   "and Testing/, train/ and test/, or train/ and val/ as ImageNet's)",
               in_data_root=False)


def _size(img_size) -> Optional[Tuple[int, int]]:
    if img_size is None:
        return None
    size = int_sizes(img_size, (2,), square=True)
    if size is None:
        raise ValueError(f"imagefolder option img_size={img_size!r}; expected a positive int or (H, W), or None "
                         f"to keep the files' own (equal) size")
    return size


DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # Pillow's modes of more than 8 bits per pixel


def decode(path: Path, channels: int, size: Optional[Tuple[int, int]], resize: Optional[int] = None,
           intensity: Intensity = "auto") -> np.ndarray:
    """One image as uint8 (C, H, W): grey, palette, RGB, RGBA, 16-bit or float images, their values
    mapped to 0..255 as ``intensity`` says (:mod:`vitlab.data.intensity`); resized with
    Pillow's bilinear filter, which is antialiased when shrinking. With ``resize``: the shorter side
    is resized to ``resize`` (aspect kept, antialiased bilinear) and the centre ``size`` cropped, by
    torchvision.transforms.v2 on the PIL image; a JPEG at least twice that size is decoded at a
    reduced DCT scale first (Pillow's ``draft``), never below the resize target. Raises Pillow's
    errors (OSError, ValueError, ...) for a file it cannot decode."""
    with Image.open(path) as img:
        if resize is not None and img.format == "JPEG":
            w, h = img.size
            short = min(w, h)
            img.draft("L" if channels == 1 else "RGB", (-(-w * resize // short), -(-h * resize // short)))
        img.load()  # decode now so a truncated file fails here
        if img.mode in DEEP_MODES or intensity != "auto":
            # 16-bit / float (common for medical PNG/TIFF) or an explicit intensity mapping: Pillow's
            # convert("L") would clip them, so map the file's values to 0..255 here
            if img.mode not in DEEP_MODES:
                img = img.convert("L" if channels == 1 else "RGB")
            arr = to_unit(np.asarray(img, dtype=np.float64), intensity) * 255.0
            img = Image.fromarray(np.round(arr).astype(np.uint8))
        img = img.convert("L" if channels == 1 else "RGB")  # RGBA -> RGB drops alpha, grey -> RGB replicates
        if resize is not None:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms.v2 import functional as TF
            img = TF.resize(img, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
            img = TF.center_crop(img, [size[0], size[1]])
        elif size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.array(img, dtype=np.uint8)  # a writable copy, for torch.from_numpy
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """A file of a streamed folder that does not decode when a worker reads it (one line naming it).

    A DataLoader worker's exception comes back to the main process as the same type built from a
    text holding the worker's whole traceback; this type keeps only its own message from that text
    (the traceback stays in ``worker_traceback``), so the user sees one line."""

    def __init__(self, message: str):
        self.worker_traceback = None
        tag = f"{type(self).__name__}: "
        if message.startswith("Caught ") and "Traceback" in message:
            last = [line for line in message.splitlines() if tag in line]
            if last:
                self.worker_traceback, message = message, last[-1].split(tag, 1)[1]
        super().__init__(message)


def _streamed_decode(path: Path, root: str, **options) -> np.ndarray:
    """:func:`decode` in a DataLoader worker: a file that does not decode is one clear error."""
    try:
        return decode(path, **options)
    except _UNREADABLE as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UnreadableImageError(
            f"imagefolder: cannot decode {path} ({reason}); streamed folders (data.options.stream=true) check "
            f"only file headers when listed, so data.on_bad_image=skip cannot drop it: delete or replace it "
            f"(`python -m vitlab.data.check_images {root}` lists every file that does not decode)") from None


def _verify(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()  # checks the file without decoding its pixels


def _walk(tree: Path, files: Dict[str, List[Path]], read, on_bad_image: str, skipped: List[Path]):
    """Yield (label, path, read(path)) for every readable file; an unreadable one is skipped and
    counted, or fatal with ``on_bad_image='fail'``; a class folder with no readable file is an error."""
    for label, (cls, paths) in enumerate(files.items()):
        kept = 0
        for path in paths:
            try:
                out = read(path)
            except _UNREADABLE as err:
                if on_bad_image == "fail":
                    raise ValueError(f"imagefolder: cannot read {path} as an image ({type(err).__name__}: {err})") \
                        from None
                skipped.append(path)
                continue
            kept += 1
            yield label, path, out
        if kept == 0:
            raise ValueError(f"imagefolder: class folder {tree / cls} holds no readable image "
                             f"({len(paths)} file(s) Pillow cannot decode)")


def _read_tree(tree: Path, files: Dict[str, List[Path]], channels: int, size, resize, intensity, on_bad_image: str,
               skipped: List[Path]) -> ArrayDataset:
    images: Optional[torch.Tensor] = None
    labels: List[int] = []
    reader = functools.partial(decode, channels=channels, size=size, resize=resize, intensity=intensity)
    for label, path, arr in _walk(tree, files, reader, on_bad_image, skipped):
        if images is None:  # preallocate once the size is known: the folder may be large
            images = torch.empty((sum(len(p) for p in files.values()), *arr.shape), dtype=torch.uint8)
        if tuple(arr.shape) != tuple(images.shape[1:]):
            raise ValueError(f"imagefolder: {path} is {arr.shape[1:]} but earlier images are "
                             f"{tuple(images.shape[2:])}; pass img_size= to resize every image")
        images[len(labels)] = torch.from_numpy(arr)
        labels.append(label)
    if len(labels) < len(images):  # files were skipped: drop the unused tail of the preallocation
        images = images[: len(labels)].clone()
    return ArrayDataset(images, torch.tensor(labels, dtype=torch.int64), list(files), "imagefolder")


def _list_tree(tree: Path, files: Dict[str, List[Path]], channels: int, size, resize, intensity, on_bad_image: str,
               skipped: List[Path], folder: Path) -> FileDataset:
    """The tree as a :class:`FileDataset`: every file's header is checked now (``Image.verify``,
    which reads no pixels, so a truncated JPEG passes), its pixels decoded (and resized / cropped)
    when a worker asks for the item; a file that fails then is an :class:`UnreadableImageError`
    (whose advice names ``folder``, the data root)."""
    found = [(label, path) for label, path, _ in _walk(tree, files, _verify, on_bad_image, skipped)]
    reader = functools.partial(_streamed_decode, root=str(folder), channels=channels, size=size, resize=resize, intensity=intensity)
    return FileDataset([p for _, p in found], torch.tensor([lb for lb, _ in found], dtype=torch.int64), list(files),
                       "imagefolder", reader, tuple(reader(found[0][1]).shape))


def check_options(*, img_size, channels, on_bad_image, stream, classes, resize, intensity):
    """The imagefolder options' values, checked before any image is read (a ``classes`` list file is
    read): one-line ValueErrors. Returns (size, the class subset or None, intensity)."""
    if stream and img_size is None:
        raise ValueError("imagefolder option stream=true needs img_size (streamed batches need one size)")
    size = _size(img_size)
    if resize is not None:
        if img_size is None:
            raise ValueError(f"imagefolder option resize={resize!r} needs img_size (the size of the centre crop)")
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < max(size):
            raise ValueError(f"imagefolder option resize={resize!r}; expected an int >= the largest side of "
                             f"img_size={img_size!r} (the shorter side is resized to it, then cropped)")
    wanted = class_list(classes, "imagefolder") if classes is not None else None
    if channels not in (1, 3):
        raise ValueError(f"imagefolder option channels={channels!r}; valid: 1, 3")
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"imagefolder option on_bad_image={on_bad_image!r}; valid: 'skip', 'fail'")
    return size, wanted, check_intensity(intensity, "imagefolder")


@DATASETS.register("imagefolder", "image tree, one folder per class (optionally Training/ + Testing/, train/ + "
                                  "test/ or train/ + val/), any format Pillow reads, resized to img_size", check=check_options,
                   size=lambda **options: check_options(**options)[0])
def imagefolder(root: Optional[str], seed: int, *, img_size: Union[int, Tuple[int, int], None] = 224,
                channels: int = 3, on_bad_image: str = "skip", stream: bool = False,
                classes: Union[None, str, List[str]] = None, resize: Optional[int] = None,
                intensity: Intensity = "auto") -> DataBundle:
    """Options: ``img_size`` (int or (H, W); None keeps the files' size, which must then agree),
    ``channels`` (1: grey, 3: RGB), ``on_bad_image`` (``skip``: one warning with the count;
    ``fail``: ValueError naming the file), ``stream`` (decode on demand in DataLoader workers
    instead of holding the folder in memory: for ImageNet-scale trees; needs ``img_size``),
    ``classes`` (a subset: a list of class folder names, or a text file with one per line such as
    an ImageNet-100 list; labels follow folder-name order), ``resize`` (shorter side to this many
    pixels, then the centre ``img_size`` crop, as ImageNet evaluation does (256 -> 224); default:
    every image squeezed to ``img_size``), ``intensity`` (how the files' values become 0..255:
    ``auto``, ``minmax``, ``percentile`` or a fixed ``[low, high]`` window; see
    :mod:`vitlab.data.intensity`)."""
    size, wanted, intensity = check_options(img_size=img_size, channels=channels, on_bad_image=on_bad_image,
                                            stream=stream, classes=classes, resize=resize, intensity=intensity)
    folder = find_root("imagefolder", root)
    train_dir, test_dir = split_folders(folder, "imagefolder")
    train_files = class_files(train_dir, "imagefolder", only=wanted)
    test_files = class_files(test_dir, "imagefolder", only=wanted) if test_dir is not None else None
    if test_files is not None:  # before decoding anything
        check_same_classes("imagefolder", list(train_files), list(test_files), folder)
    skipped: List[Path] = []
    read = functools.partial(_list_tree, folder=folder) if stream else _read_tree
    args = (channels, size, resize, intensity, on_bad_image, skipped)
    train = read(train_dir, train_files, *args)
    test = None if test_files is None else read(test_dir, test_files, *args)
    if skipped:
        warnings.warn(f"imagefolder: skipped {len(skipped)} file(s) under {folder} that are not readable images "
                      f"(first: {skipped[0]}); on_bad_image='fail' stops at the first")
    return DataBundle(train, test, str(folder))
