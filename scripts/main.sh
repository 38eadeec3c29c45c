#!/usr/bin/env bash
# Set up vitlab and run the main job. Until `vitlab compare` lands this is the speed benchmark of
# the positional-encoding catalogue on the STRING study's CIFAR shape (a few minutes on a laptop CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e .
vitlab bench "$@"
