#!/usr/bin/env bash
# Install the Debian packages the tests and the default presets use:
#   dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist   (Fashion-MNIST IDX files)
#   mricron-data          -> /usr/share/mricron/templates        (T1 template + AAL atlas, 3D task)
#   chromium (tests only) -> /usr/bin/chromium                   (renders report.html headless)
# Pass --no-browser to skip chromium (the main job does not need it).
# Skips what is already there; without root (and no sudo) it says what to install and goes on.
set -uo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || need+=(mricron-data)
[ "${1:-}" = "--no-browser" ] || command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: not a Debian system; real-data and browser tests will be skipped (install ${need[*]} or set VITLAB_DATA)" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo -n"
if ! $sudo true 2>/dev/null; then
  echo "note: run 'sudo apt-get install -y ${need[*]}' for the real-data and browser tests" >&2
  exit 0
fi
$sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
