#!/usr/bin/env bash
# Set up (install vitlab with its test extras) and run the whole test suite.
# CI runs exactly this (.ci/run). pytest's exit status passes through: "no tests ran" (5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python3 -m pytest -q "$@"
