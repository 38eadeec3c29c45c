#!/usr/bin/env bash
# Set up vitlab (and Debian's Fashion-MNIST package) and run the main job. Until `vitlab compare`
# lands, the main job is the speed benchmark of the positional-encoding catalogue on the STRING
# study's CIFAR shape (a few minutes on a laptop CPU); `vitlab train fashion-mnist` trains one run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-data.sh
python3 -m pip install --quiet --disable-pip-version-check -e .
vitlab bench "$@"
