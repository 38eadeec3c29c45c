"""Explicit downloads through torchvision, for users with a network (never called implicitly)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .locate import ENV, cache_dir

TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def download(name: str, root: Optional[str] = None) -> Path:
    """Download ``name`` (mnist, fashion-mnist, cifar10, cifar100) with ``torchvision.datasets`` into
    ``root`` (default: the user cache, ``~/.cache/vitlab/<name>``), where ``find_root`` then finds it.

    Raises:
        ValueError: ``name`` cannot be downloaded.
        RuntimeError: one line, when the download fails (e.g. no network).
    """
    if name not in TORCHVISION_CLASS:
        raise ValueError(f"cannot download {name!r}; downloadable: {', '.join(TORCHVISION_CLASS)}")
    import torchvision.datasets as tvd

    target = Path(root).expanduser() if root is not None else cache_dir(name)
    cls = getattr(tvd, TORCHVISION_CLASS[name])
    try:
        target.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(target), train=train, download=True)
    except Exception as err:  # urllib/http/ssl/OS errors and torchvision's own RuntimeErrors all mean "no data"
        reason = " ".join(str(err).split()) or type(err).__name__
        raise RuntimeError(f"could not download {name} into {target} (no network?): {reason}; copy the files there "
                           f"or into ${ENV}/{name} instead") from None
    return target


def find_or_download(name: str, root: Optional[str], download_ok: bool) -> Path:
    """``find_root``, and when the data is missing and ``download_ok`` (the source's
    ``download=True`` option), download it and look again."""
    from .locate import find_root

    try:
        return find_root(name, root)
    except FileNotFoundError:
        if not download_ok:
            raise
        download(name, root)
        return find_root(name, root)
