"""``vitlab bench``: time train steps and inference for a set of variants on one shape.

Variants run interleaved in one process (round r visits them in an order rotated by r), so drift
in the machine's speed hits every variant alike; each figure is a median over rounds. Ratios are
against the ``none`` model and timm's ``VisionTransformer`` of the same dims; MFU is the model's
counted FLOPs per second over the fp32 matmul peak measured in the same run.
"""
from __future__ import annotations

import copy
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .models import KERNELS, QK_PES, SIZES, TOKEN_PES, make_config
from .models.inspect import fold_string
from .models.vit import VisionTransformer

DEFAULT_VARIANTS = ["none", "learned", "sincos", "rope_axial", "rope_mixed", "pope", "string_cayley",
                    "string_cayley:sparsity=0.1", "string_reflection", "timm"]


@dataclass
class Variant:
    spec: str
    kwargs: dict = field(default_factory=dict)
    timm: bool = False


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_variant(spec: str) -> Variant:
    """``rope_mixed+learned``, ``string_cayley:sparsity=0.5``, ``pope+differential``, ``timm``.

    Each ``+``-joined part names a q/k PE, a token PE or a kernel (``none`` = the plain model),
    with ``:key=value,...`` options for that entry."""
    if spec == "timm":
        return Variant(spec, timm=True)
    kwargs: dict = {}
    for part in spec.split("+"):
        name, _, opts = part.partition(":")
        options = {}
        for item in filter(None, opts.split(",")):
            key, eq, val = item.partition("=")
            if not eq:
                raise ValueError(f"variant {spec!r}: option {item!r} is not key=value")
            options[key] = _value(val)
        if name == "none":
            continue
        if name in QK_PES:
            kwargs.update(qk_pe=name, qk_pe_kwargs=options)
        elif name in TOKEN_PES:
            kwargs.update(token_pe=name, token_pe_kwargs=options)
        elif name in KERNELS:
            kwargs.update(attn=name, attn_kwargs=options)
        else:
            valid = sorted(set(QK_PES.names()) | set(TOKEN_PES.names()) | set(KERNELS.names()) | {"timm"})
            raise ValueError(f"variant {spec!r}: unknown name {name!r}; valid: {', '.join(valid)}")
    return Variant(spec, kwargs)


def build(variant: Variant, shape: dict, num_classes: int) -> torch.nn.Module:
    cfg = make_config(**{**shape, "num_classes": num_classes, **variant.kwargs})
    if not variant.timm:
        return VisionTransformer(cfg)
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    return TimmViT(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                   num_classes=num_classes, embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                   mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias)


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    """Measured matmul FLOP/s on ``device`` in ``dtype`` (median of ``reps``)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[1:])





def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(model, x, y) -> int:
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode (matmuls, convs, SDPA)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _timed(fn: Callable[[], None], device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def run_bench(shape: str = "string-cifar", variants: Optional[List[str]] = None, batch: int = 128,
              steps: int = 10, warmup: int = 2, device: str = "cpu", seed: int = 0,
              num_classes: int = 10, precision: str = "fp32",
              log: Optional[Callable[[str], None]] = None) -> dict:
    """Benchmark ``variants`` on the size preset ``shape``; returns a JSON-able dict of results."""
    if shape not in SIZES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SIZES)}")
    for name, value, low in (("batch", batch, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; valid: fp32, bf16")
    log = log or (lambda msg: None)
    dev = torch.device(device)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    specs = variants or DEFAULT_VARIANTS
    parsed = [parse_variant(s) for s in specs]
    size = SIZES[shape]
    cfg = make_config(**size, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=gen).to(dev)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)

    models, opts, infer_models = {}, {}, {}
    for v in parsed:
        torch.manual_seed(seed)
        m = build(v, size, num_classes).to(dev)
        models[v.spec], opts[v.spec] = m, torch.optim.AdamW(m.parameters(), lr=1e-4)
        infer_models[v.spec] = m
        if v.kwargs.get("qk_pe", "").startswith("string_"):
            folded = copy.deepcopy(m)
            fold_string(folded)
            infer_models[f"{v.spec} (folded)"] = folded

    peak = matmul_peak(dev, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    with autocast():
        flops = {k: step_flops(m, x, y) for k, m in models.items()}
    log(f"matmul peak {peak / 1e9:.1f} GFLOP/s; timing {len(models)} variants x {steps} steps (+{warmup} warm-up)")

    def train_step(k):
        m, opt = models[k], opts[k]
        with autocast():
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train: Dict[str, List[float]] = {k: [] for k in models}
    keys = list(models)
    for r in range(warmup + steps):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            models[k].train()
            t = _timed(lambda: train_step(k), dev)
            if r >= warmup:
                train[k].append(t)
        log(f"train round {r + 1}/{warmup + steps}")

    infer: Dict[str, List[float]] = {k: [] for k in infer_models}
    ikeys = list(infer_models)
    for m in infer_models.values():
        m.eval()
    with torch.inference_mode():
        for r in range(warmup + steps):
            order = ikeys[r % len(ikeys):] + ikeys[: r % len(ikeys)]
            for k in order:
                with autocast():
                    t = _timed(lambda: infer_models[k](x), dev)
                if r >= warmup:
                    infer[k].append(t)
    log("inference done")

    med = {k: statistics.median(v) for k, v in train.items()}
    imed = {k: statistics.median(v) for k, v in infer.items()}
    rows = []
    for k in ikeys:
        base_key = k.removesuffix(" (folded)")
        row = {"variant": k, "params": sum(p.numel() for p in infer_models[k].parameters()),
               "infer_ms": imed[k] * 1e3,
               "infer_vs_none": imed[k] / imed["none"] if "none" in imed else None,
               "infer_vs_rope_axial": imed[k] / imed["rope_axial"] if "rope_axial" in imed else None}
        if k in med:
            row.update(train_ms=med[k] * 1e3, train_img_s=batch / med[k],
                       train_vs_none=med[k] / med["none"] if "none" in med else None,
                       train_vs_timm=med[k] / med["timm"] if "timm" in med else None,
                       train_vs_rope_axial=med[k] / med["rope_axial"] if "rope_axial" in med else None,
                       gflops_step=flops[k] / 1e9, mfu=flops[k] / med[k] / peak)
        else:
            row["folded_from"] = base_key
        rows.append(row)
    return {
        "shape": shape, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()},
        "batch": batch, "steps": steps, "warmup": warmup, "device": str(dev),
        "dtype": "float32" if precision == "fp32" else "bf16 autocast",
        "machine": _machine(dev), "matmul_peak_gflops": peak / 1e9, "rows": rows,
    }


def _machine(dev: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def format_table(result: dict) -> str:
    """Markdown table of a :func:`run_bench` result."""
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| variant | params | train ms | x none | x timm | x rope_axial | img/s | GFLOP/step | MFU | infer ms | infer x none | infer x rope_axial |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {f(r.get('train_ms'), '.1f')} | {f(r.get('train_vs_none'), '.3f')} | "
            f"{f(r.get('train_vs_timm'), '.3f')} | {f(r.get('train_vs_rope_axial'), '.3f')} | {f(r.get('train_img_s'), '.0f')} | "
            f"{f(r.get('gflops_step'), '.1f')} | {f(r.get('mfu'), '.1%')} | {r['infer_ms']:.1f} | "
            f"{f(r.get('infer_vs_none'), '.3f')} | {f(r.get('infer_vs_rope_axial'), '.3f')} |")
    m = result["machine"]
    lines.append("")
    lines.append(f"{result['shape']}, batch {result['batch']}, {result['dtype']}, {result['device']} "
                 f"({m.get('cpu', m.get('gpu', m['processor']))}, {m['threads']} threads, torch {m['torch']}); "
                 f"medians of {result['steps']} interleaved rounds after {result['warmup']} warm-up; "
                 f"matmul peak ({'bf16' if 'bf16' in result['dtype'] else 'fp32'}) {result['matmul_peak_gflops']:.1f} GFLOP/s")
    return "\n".join(lines)
