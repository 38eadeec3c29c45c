#!/usr/bin/env python3
"""Print vitlab's requirements (pyproject.toml) that this Python does not satisfy, one per line
(with ``--all``: every requirement).

Run on a machine without network before installing there: feed the output to
``scripts/offline-wheels.sh`` on a machine with network. Needs only the standard library and
``packaging`` (which pip vendors); it does not import vitlab, whose own imports may be the missing ones.

    python3 scripts/missing-deps.py [--extras dev] [--all]   # exit 0; prints nothing when all are there
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip always carries tomli, tomllib's original
        from pip._vendor import tomli as tomllib
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def missing(reqs: list[str]) -> list[str]:
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(str(req))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(str(req))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extras", action="append", default=[], help="also check an optional group (dev)")
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--all", action="store_true", help="print every requirement, met or not")
    args = ap.parse_args(argv)
    reqs = requirements(args.pyproject, args.extras)
    for req in reqs if args.all else missing(reqs):
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
