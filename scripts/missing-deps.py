#!/usr/bin/env python3
"""Print vitlab's requirements (pyproject.toml) that this Python does not satisfy, one per line.

Run on a machine without network before installing there: feed the output to
``scripts/offline-wheels.sh`` on a machine with network. Needs only the standard library and
``packaging`` (which pip vendors); it does not import vitlab, whose own imports may be the missing ones.

    python3 scripts/missing-deps.py [--extras dev]     # exit 0; prints nothing when all are there
"""
from __future__ import annotations

import argparse
import re
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
    except ImportError:  # Python 3.10: the two lists are simple enough to read with a pattern
        text = pyproject.read_text()
        deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        reqs = re.findall(r'^\s*"([^"]+)"', deps, re.M)
        for extra in extras:
            m = re.search(rf"^{re.escape(extra)} = \[(.*?)\]", text, re.M)
            reqs += re.findall(r'"([^"]+)"', m.group(1)) if m else []
        return reqs
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
    args = ap.parse_args(argv)
    for req in missing(requirements(args.pyproject, args.extras)):
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main())
