"""Class-per-folder trees, shared by ``imagefolder`` and ``volumes``."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

# Split folder pairs we recognise, as (training tree, held-out test tree): Kaggle's brain-tumour MRI
# layout, the usual lower-case one, and ImageNet's (train/ + val/: its val set is the held-out set
# ImageNet papers report, so it is the test set here; the trainer carves its own validation set).
SPLIT_PAIRS = (("Training", "Testing"), ("train", "test"), ("train", "val"))


def _visible_dirs(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path, kind: str = "data") -> Tuple[Path, Optional[Path]]:
    """(training tree, test tree or None): the first pair of ``SPLIT_PAIRS`` with both folders under
    ``root`` (``Training/`` + ``Testing/``, ``train/`` + ``test/``, ``train/`` + ``val/``), else a
    training folder alone (``Training/`` or ``train/``, no official test), else ``root`` itself with
    no official test. With ``train/``, ``val/`` and ``test/`` all present, test/ is the test set and
    val/ is not read (a warning says so)."""
    names = {p.name for p in _visible_dirs(root)}
    for train, test in SPLIT_PAIRS:
        if train in names and test in names:
            unused = [t for tr, t in SPLIT_PAIRS if tr == train and t != test and t in names]
            if unused:
                warnings.warn(f"{kind}: {root} holds {train}/ and {test}/ (the test set) and also "
                              f"{', '.join(u + '/' for u in unused)}, which is not read; the trainer carves its "
                              f"validation set from {train}/ (data.val_fraction)")
            return root / train, root / test
    for train, _ in SPLIT_PAIRS:
        if train in names:
            return root / train, None
    return root, None


def class_list(classes: Union[str, Sequence[str]], kind: str) -> List[str]:
    """A class subset: a list of class folder names, or the path of a text file with one class per
    line (the usual ImageNet-100 list: the first word of each line is the folder name, e.g.
    ``n01440764`` or ``n01440764 tench``; blank lines and ``#`` comments are skipped)."""
    if isinstance(classes, (str, Path)):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise ValueError(f"{kind} option classes={str(classes)!r}: no such file; give a list of class folder "
                             f"names or a text file with one class per line")
        names = [line.split()[0] for line in path.read_text(encoding="utf-8-sig").splitlines()  # (a BOM: Notepad's)
                 if line.strip() and not line.lstrip().startswith("#")]
    elif isinstance(classes, (list, tuple)):
        names = [str(c) for c in classes]
    else:
        raise ValueError(f"{kind} option classes={classes!r}; expected a list of class folder names or the path "
                         f"of a text file with one class per line")
    if not names:
        raise ValueError(f"{kind} option classes={classes!r} names no class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{kind} option classes lists {repeated[0]!r} more than once")
    return names


def visible_files(folder: Path) -> List[Path]:
    """Every file under ``folder``, sorted, hidden entries (names starting with ``.``) skipped.
    Symlinked folders are followed, as torchvision's ImageFolder does (``Path.rglob`` does not
    enter them, which dropped their images silently), each real folder once (a link back up the
    tree ends there); a broken link is listed, so reading it fails as a bad image does, not unseen."""
    out, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(top) / f for f in files if not f.startswith(".")]
    return sorted(out)


def class_files(tree: Path, kind: str, only: Optional[Sequence[str]] = None) -> Dict[str, List[Path]]:
    """{class name: sorted files} for the class folders of ``tree`` (hidden entries ignored), in
    folder-name order; ``only``: just these classes (the others are not even listed).

    Raises:
        ValueError: ``tree`` has no class folders, a class folder holds no files (naming it), or a
            class of ``only`` is not a folder there (naming it and the valid ones).
    """
    classes = _visible_dirs(tree)
    if not classes:
        raise ValueError(f"{kind}: {tree} holds no class folders; expected one sub-folder per class "
                         f"(optionally under {SPLIT_PAIRS[0][0]}/ and {SPLIT_PAIRS[0][1]}/)")
    if only is not None:
        valid = [p.name for p in classes]
        missing = [c for c in only if c not in set(valid)]
        if missing:
            more = f" ({len(missing)} of the {len(only)} listed are not)" if len(missing) > 1 else ""
            shown = ", ".join(valid[:20]) + (f", ... ({len(valid)} class folders)" if len(valid) > 20 else "")
            raise ValueError(f"{kind} option classes: {missing[0]!r} is not a class folder under {tree}{more}; "
                             f"valid: {shown}")
        keep = set(only)
        classes = [p for p in classes if p.name in keep]
    out = {}
    for folder in classes:
        files = visible_files(folder)
        if not files:
            raise ValueError(f"{kind}: class folder {folder} is empty")
        out[folder.name] = files
    return out


def check_same_classes(kind: str, train: List[str], test: List[str], root: Path) -> None:
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ValueError(f"{kind}: {root} has different train and test classes "
                         f"(only in train: {only_train}, only in test: {only_test})")
