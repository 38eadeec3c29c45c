"""Where data lives: an explicit path, else ``$VITLAB_DATA``, else the user cache, else a system copy."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ENV = "VITLAB_DATA"


@dataclass(frozen=True)
class Place:
    """How to recognise a source's files. ``probe(path)`` returns the folder (or file) that holds
    the data when ``path`` holds it in any known layout, else None; ``system`` are copies installed
    by OS packages; ``how`` tells the user how to get the data. ``in_data_root``: whether the files
    may sit directly in ``$VITLAB_DATA`` (true for datasets recognised by their file names; false
    for generic trees such as ``imagefolder``, whose probe would accept any folder)."""

    probe: Callable[[Path], Optional[Path]]
    system: Tuple[str, ...] = ()
    how: str = ""
    in_data_root: bool = True


PLACES: Dict[str, Place] = {}


def register_place(name: str, probe: Callable[[Path], Optional[Path]], *, system: Tuple[str, ...] = (),
                   how: str = "", in_data_root: bool = True) -> None:
    PLACES[name] = Place(probe, tuple(system), how, in_data_root)


def cache_dir(name: str) -> Path:
    """The user cache for ``name``: ``$XDG_CACHE_HOME/vitlab/<name>``, by default ``~/.cache/vitlab/<name>``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitlab" / name


def candidates(name: str, root: Optional[str]) -> List[Tuple[str, Optional[Path]]]:
    """The places searched, in order, as (label for the message, path or None when unset)."""
    if root is not None:  # an explicit path is never silently replaced by another copy
        root_path = Path(root).expanduser()
        return [(str(root_path), root_path), (str(root_path / name), root_path / name)]
    env = os.environ.get(ENV)
    out: List[Tuple[str, Optional[Path]]] = []
    if env:
        out.append((f"${ENV}/{name}={Path(env) / name}", Path(env) / name))
        if name not in PLACES or PLACES[name].in_data_root:
            out.append((f"${ENV}={env}", Path(env)))
    else:
        out.append((f"${ENV} (unset)", None))
    out.append((str(cache_dir(name)), cache_dir(name)))
    out += [(s, Path(s)) for s in PLACES[name].system] if name in PLACES else []
    return out


def find_root(name: str, root: Optional[str] = None) -> Path:
    """The folder (or file) holding dataset ``name``.

    Search order: the explicit ``root`` (itself, then ``root/<name>``; when a root is given nothing
    else is searched); ``$VITLAB_DATA/<name>``, ``$VITLAB_DATA`` (not for the generic ``imagefolder``,
    ``npz`` and ``volumes``, which would match any folder); the user cache
    (``~/.cache/vitlab/<name>``); system copies (e.g. ``/usr/share/datasets/fashion-mnist`` from
    Debian's ``dataset-fashion-mnist``). Each place may hold the files directly or in torchvision's
    layout (``FashionMNIST/raw``, ``cifar-10-batches-py``, ...).

    Raises:
        FileNotFoundError: one line listing every place looked and how to get the data.
        ValueError: ``name`` is not a source that reads files.
    """
    if name not in PLACES:
        raise ValueError(f"unknown dataset {name!r} for find_root; valid: {', '.join(PLACES)}")
    for _, path in candidates(name, root):
        if path is not None and path.exists():
            found = PLACES[name].probe(path)
            if found is not None:
                return found
    looked = "; ".join(label for label, _ in candidates(name, root))
    given = Path(root).expanduser() if root is not None else None
    if given is not None and given.exists():  # "not found" alone would be misleading: say what is there
        what = "a file" if given.is_file() else "a folder"
        raise FileNotFoundError(f"dataset {name!r} not found: data.root {given} is {what} that does not hold it "
                                f"in a layout vitlab reads. To get it: {PLACES[name].how}")
    raise FileNotFoundError(f"dataset {name!r} not found; looked in: {looked}. To get it: {PLACES[name].how}")
