#!/usr/bin/env bash
# Set up vitlab (and Debian's Fashion-MNIST package) and run the main job: `vitlab compare`, the
# default study (8 positional encodings x 3 seeds on Fashion-MNIST, quick scale; ~10 minutes on a
# 2-core laptop CPU), ending with the ranking table printed and runs/default-study/report.md. Extra
# arguments go to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-data.sh --no-browser
python3 -m pip install --quiet --disable-pip-version-check -e .
vitlab compare "$@"
