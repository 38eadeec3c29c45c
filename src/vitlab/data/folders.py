"""Class-per-folder trees, shared by ``imagefolder`` and ``volumes``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

# Split folder pairs we recognise: Kaggle's brain-tumour MRI layout, then the usual lower-case one.
SPLIT_PAIRS = (("Training", "Testing"), ("train", "test"))


def _visible_dirs(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> Tuple[Path, Optional[Path]]:
    """(training tree, test tree or None): ``root/Training`` + ``root/Testing`` (or ``train`` + ``test``)
    when present, else ``root`` itself with no official test."""
    names = {p.name for p in _visible_dirs(root)}
    for train, test in SPLIT_PAIRS:
        if train in names:
            return root / train, (root / test if test in names else None)
    return root, None


def class_files(tree: Path, kind: str) -> Dict[str, List[Path]]:
    """{class name: sorted files} for the class folders of ``tree`` (hidden entries ignored).

    Raises:
        ValueError: ``tree`` has no class folders, or a class folder holds no files (naming it).
    """
    classes = _visible_dirs(tree)
    if not classes:
        raise ValueError(f"{kind}: {tree} holds no class folders; expected one sub-folder per class "
                         f"(optionally under {SPLIT_PAIRS[0][0]}/ and {SPLIT_PAIRS[0][1]}/)")
    out = {}
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise ValueError(f"{kind}: class folder {folder} is empty")
        out[folder.name] = files
    return out


def check_same_classes(kind: str, train: List[str], test: List[str], root: Path) -> None:
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ValueError(f"{kind}: {root} has different train and test classes "
                         f"(only in train: {only_train}, only in test: {only_test})")
