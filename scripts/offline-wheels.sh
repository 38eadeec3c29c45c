#!/usr/bin/env bash
# Wheels for installing vitlab on a machine without network (a cluster GPU node, an air-gapped
# workstation) whose Python already has PyTorch. Three steps:
#   there:  python3 scripts/missing-deps.py                   # what that Python lacks, e.g. pydantic>=2.5
#   here:   bash scripts/offline-wheels.sh DIR 3.12 'pydantic>=2.5' ...   # run where pip reaches PyPI
#   there:  python3 -m pip install --no-index --find-links DIR --no-build-isolation -e .
# Usage: offline-wheels.sh DIR [PYTHON_VERSION (default 3.12)] [REQUIREMENT ...]
# The wheels are for CPython PYTHON_VERSION on x86-64 Linux (manylinux), with their dependencies; the
# install there takes what is already installed where it satisfies a requirement. With no
# REQUIREMENT: every vitlab dependency except torch and torchvision (which decide the CUDA build and
# belong to the machine's own image).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [PYTHON_VERSION] [REQUIREMENT ...]" >&2; exit 2; }
dir=$1; py=${2:-3.12}; shift $(( $# >= 2 ? 2 : 1 ))
[[ $py =~ ^3\.[0-9]+$ ]] || { echo "offline-wheels: error: PYTHON_VERSION $py is not like 3.12" >&2; exit 2; }
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    # timm needs torch + torchvision: fetched without its dependencies, then its other ones by name.
    mapfile -t all < <(python3 scripts/missing-deps.py --all)
    reqs=(); timm=()
    for r in "${all[@]}"; do
        case $r in torch[\<\>=~!\ ]*|torchvision*) ;; timm*) timm+=("$r") ;; *) reqs+=("$r") ;; esac
    done
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$py" --implementation cp -d "$dir" "${timm[@]}"
    set -- "${reqs[@]}" huggingface_hub safetensors
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d "$dir" "$@"
echo "offline-wheels: $(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1))"
