#!/usr/bin/env bash
# Set up (vitlab with its test extras, and Debian's Fashion-MNIST / mricron-data packages) and run
# the whole test suite. CI runs exactly this (.ci/run). pytest's exit status passes through, so
# "no tests ran" (5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-data.sh
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python3 -m pytest -q "$@"
