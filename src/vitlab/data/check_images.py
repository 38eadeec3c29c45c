"""List the files of an image tree that Pillow cannot decode: ``python -m vitlab.data.check_images ROOT``.

A streamed image folder (``data.options.stream=true``) checks only each file's header when it is
listed (``Image.verify``, no pixels read: a truncated JPEG passes), so a file that does not decode
stops training when a worker reaches it. This decodes every file under ROOT (hidden files and
folders skipped, as the ``imagefolder`` source does), prints ``PATH: reason`` for each one that
fails, and exits 1 when there is one (0 when every file decodes). ``--workers N`` decodes in N
processes. Delete or replace what it lists, or load the folder in memory (``stream=false``), where
``data.on_bad_image=skip`` drops such files.
"""
from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from PIL import Image

from .folders import visible_files


def problem(path: Path) -> Optional[str]:
    """Why ``path`` does not decode as an image, or None when it does (its pixels are read)."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - whatever Pillow raises, the file is unusable
        return " ".join(f"{type(err).__name__}: {err}".split())
    return None


def bad_images(root: Path, workers: int = 0) -> Iterator[Tuple[Path, str]]:
    """(path, reason) for every file under ``root`` that does not decode, in path order."""
    files = visible_files(root)
    if workers > 0:
        with Pool(workers) as pool:
            reasons = list(pool.imap(problem, files, chunksize=64))
    else:
        reasons = map(problem, files)
    for path, reason in zip(files, reasons):
        if reason is not None:
            yield path, reason


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitlab.data.check_images",
                                     description="List the files under ROOT that Pillow cannot decode.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: this one)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"check_images: error: {args.root} is not a folder", file=sys.stderr)
        return 2
    if args.workers < 0:
        print(f"check_images: error: --workers must be >= 0, got {args.workers}", file=sys.stderr)
        return 2
    bad = 0
    for path, reason in bad_images(args.root, args.workers):
        print(f"{path}: {reason}", flush=True)
        bad += 1
    print(f"check_images: {bad} file(s) under {args.root} do not decode", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
