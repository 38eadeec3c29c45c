#!/usr/bin/env bash
# The GPU tables of BENCHMARKS.md, in one go: `vitlab bench --device cuda` on the STRING study's CIFAR
# shape (bf16 autocast and fp32) and on ViT-Tiny at 224 px (bf16, eager and torch.compile'd), plus a
# short training run on the GPU (synthetic data) that checks the whole fast path end to end.
#
#   bash scripts/gpu-bench.sh OUTDIR [PART ...]
#   PART: env cifar-bf16 cifar-fp32 tiny-bf16 tiny-compile train (default: all, in that order)
#
# Each bench PART writes OUTDIR/PART.json and OUTDIR/PART.md (`vitlab bench --save`); `env` writes
# OUTDIR/env.txt (GPU, driver, torch, timm); `train` writes OUTDIR/train.json (the run's final.json).
# `tiny-compile` starts from an empty inductor cache (OUTDIR/inductor-cache), so its compile columns
# are what a first run pays; within the run, a variant whose graph matches an earlier one's (folded
# STRING and rope_axial) reuses it. Each part can take minutes: run them as separate commands where
# a command's time is limited.
# A failing part does not stop the others; the exit status is non-zero if any failed.
# Knobs (environment): DEVICE (cuda), STEPS (20), WARMUP (3), CIFAR_BATCH (128), TINY_BATCH (256),
# VARIANTS (bench's default catalogue). DEVICE=cpu with small values is a dry run of this script.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUTDIR [env cifar-bf16 cifar-fp32 tiny-bf16 tiny-compile train]" >&2; exit 2; }
out=$1; shift
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(env cifar-bf16 cifar-fp32 tiny-bf16 tiny-compile train)
device=${DEVICE:-cuda}; steps=${STEPS:-20}; warmup=${WARMUP:-3}
mkdir -p "$out" || exit 2
python3 -c "import vitlab" 2>/dev/null || {
    echo "gpu-bench: error: python3 cannot import vitlab; install it first: python3 -m pip install -e ." >&2; exit 2; }
vitlab=(python3 -m vitlab)
common=(--device "$device" --steps "$steps" --warmup "$warmup")
[ -n "${VARIANTS:-}" ] && common+=(--variants "$VARIANTS")
failed=()
run() {  # run PART CMD...: time it, keep going on failure
    local part=$1; shift
    echo "== $part: $*" >&2
    local t0=$SECONDS
    if "$@"; then echo "== $part: done in $((SECONDS - t0)) s" >&2
    else echo "== $part: FAILED (exit $?) after $((SECONDS - t0)) s" >&2; failed+=("$part"); fi
}
env_info() {  # OUTDIR/env.txt: the GPU, the versions, and whether torch.compile can build GPU kernels
    {
        nvidia-smi || true
        python3 -c 'import sys, torch, timm, torchvision; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "timm", timm.__version__)'
        gcc --version 2>&1 | head -1 || echo "no gcc (torch.compile's inductor needs a C compiler)"
        python3 -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]
print("Python.h", "found" if os.path.isfile(os.path.join(p, "Python.h")) else "MISSING (inductor needs it)", "in", p)'
        # a one-op compile: if this fails, tiny-compile will too (seconds here instead of minutes there)
        python3 -c "import torch; f = torch.compile(lambda x: x.sin() + 1)
print('torch.compile on $device:', 'ok' if f(torch.ones(8, device='$device')).sum().item() > 0 else 'wrong')" 2>&1 \
            | tail -1 || true
    } > "$out/env.txt" 2>&1
    cat "$out/env.txt"
}
for part in "${parts[@]}"; do
    case $part in
        env) run env env_info ;;
        cifar-bf16) run "$part" "${vitlab[@]}" bench --shape string-cifar --batch "${CIFAR_BATCH:-128}" --precision bf16 \
            "${common[@]}" --save "$out/$part.json" ;;
        cifar-fp32) run "$part" "${vitlab[@]}" bench --shape string-cifar --batch "${CIFAR_BATCH:-128}" --precision fp32 \
            "${common[@]}" --save "$out/$part.json" ;;
        tiny-bf16) run "$part" "${vitlab[@]}" bench --shape clearvit-tiny --batch "${TINY_BATCH:-256}" --precision bf16 \
            "${common[@]}" --save "$out/$part.json" ;;
        tiny-compile) rm -rf "$out/inductor-cache"  # a cold compiler cache: the compile columns are a first run's
            run "$part" env TORCHINDUCTOR_CACHE_DIR="$out/inductor-cache" "${vitlab[@]}" bench --shape clearvit-tiny \
            --batch "${TINY_BATCH:-256}" --precision bf16 --compile "${common[@]}" --save "$out/$part.json" ;;
        train) rm -rf "$out/train-run"  # a re-run into the same OUTDIR starts afresh
            run "$part" bash -c "${vitlab[*]} train fashion-mnist-quick data.name=synthetic \
'data.options={num_classes: 10, img_size: 28, n_train: 4096, n_test: 1024}' train.epochs=2 \
train.device=$device model.qk_pe=rope_mixed --out '$out/train-run' --quiet && cp '$out/train-run/final.json' '$out/train.json'" ;;
        *) echo "gpu-bench: error: unknown part '$part'; valid: env cifar-bf16 cifar-fp32 tiny-bf16 tiny-compile train" >&2
           exit 2 ;;
    esac
done
[ ${#failed[@]} -eq 0 ] || { echo "gpu-bench: failed parts: ${failed[*]}" >&2; exit 1; }
