"""``vitlab bench``: time train steps and inference for a set of variants on one shape.

Variants run interleaved in one process (round r visits them in an order rotated by r), so drift
in the machine's speed hits every variant alike; each figure is a median over rounds. Ratios are
against the ``none`` model and timm's ``VisionTransformer`` of the same dims; MFU is the model's
counted FLOPs per second over the matmul peak measured in the same run, on the same device and in
the same precision (fp32, or bf16 under autocast).
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .flops import flop_counter
from .models import KERNELS, QK_PES, SIZES, TOKEN_PES, make_config
from .models.inspect import fold_string
from .models.vit import VisionTransformer
from .train.loop import autocast_for, resolve_precision

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
        kind = ("qk_pe" if name in QK_PES else "token_pe" if name in TOKEN_PES else "attn" if name in KERNELS
                else None)
        if kind in kwargs:
            what = {"qk_pe": "q/k PEs", "token_pe": "token PEs", "attn": "attention kernels"}[kind]
            raise ValueError(f"variant {spec!r}: two {what} ({kwargs[kind]}, {name}); give one")
        if kind is not None:
            kwargs.update({kind: name, f"{kind}_kwargs": options})
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


def matmul_peak(device: torch.device, n: Optional[int] = None, reps: int = 10, dtype=torch.float32) -> float:
    """Measured dense matmul FLOP/s on ``device`` in ``dtype``: the best of ``reps`` timings (after
    one warm-up) of back-to-back (n x n) products between two synchronisations (a peak: noise only
    slows a timing, so the fastest is the closest to what the device sustains; a median of 5 on a
    busy 2-core CPU read 103 to 125 GFLOP/s from one call to the next). CPU: n = 2048, one
    product per timing. CUDA: n = 8192 and 10 products per timing, so that a timing is milliseconds
    of tensor-core work rather than kernel-launch latency (fp32 follows torch's TF32 setting, as the
    models' matmuls do)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    inner = 10 if cuda else 1
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 * inner / min(times[1:])


def bench_device(device: str) -> torch.device:
    """``device`` as a torch device; a one-line ValueError when it is not one, or is CUDA without a GPU."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); valid here: cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); valid: "
                             + ", ".join(["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]))
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}; valid: cpu, cuda, cuda:N")
    return dev


def _allow_recompiles(n_models: int) -> None:
    """Every variant compiles its own graphs of the same forward code: raise dynamo's per-code
    recompile limit (8 by default) so that no variant silently falls back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        try:
            current = getattr(dynamo_config, name)
        except AttributeError:
            continue
        setattr(dynamo_config, name, max(current, 4 * n_models + 8))
        return


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(model, x, y) -> int:
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode (matmuls, convs, SDPA;
    :func:`vitlab.flops.flop_counter`, which also counts the CPU's fused attention)."""
    with flop_counter() as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# The aten ops that ``F.scaled_dot_product_attention`` dispatches to, as the bench table names them.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (backend)",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math",
}


@contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (not just ``sys.stderr``): some torch builds' profiler backend prints
    a line from C++ at every start and stop, which would interleave with the bench's own progress."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def attention_kernels(fn: Callable[[], None]) -> str:
    """Which attention kernels ``fn`` (one train step's forward + backward, or one forward) runs, read
    off torch's profiler: the fused SDPA kernels torch dispatched to (``flash``, ``mem-efficient``,
    ``cudnn``, ``flash (cpu)``; ``math`` is SDPA's unfused fallback), or ``written out`` where the
    model never calls SDPA (vitlab's own GEMM + softmax + GEMM route). This is how the bench shows
    whether a q/k PE keeps torch's fused kernels on the device it runs on."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():  # torch 2.11's profiler warns, at every stop, that it keeps one cycle
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    seen = {SDPA_OPS[e.name] for e in prof.events() if e.name in SDPA_OPS}
    return " + ".join(sorted(seen)) if seen else "written out"


def step_memory(fn: Callable[[], None], device: torch.device) -> float:
    """MiB that ``fn`` (one train step) allocates on a CUDA ``device`` at its peak, above what was
    allocated before it (the resting models, optimizer states and the previous step's gradients,
    which are freed only after the next forward): mostly the activations the backward keeps,
    PoPE's twice-wide q/k among them. CUDA only: the CPU allocator keeps no such count."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _timed(fn: Callable[[], None], device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def run_bench(shape: str = "string-cifar", variants: Optional[List[str]] = None, batch: int = 128,
              steps: int = 10, warmup: int = 2, device: str = "cpu", seed: int = 0,
              num_classes: int = 10, precision: str = "auto", compile: bool = False,
              compile_backend: str = "inductor", log: Optional[Callable[[str], None]] = None) -> dict:
    """Benchmark ``variants`` on the size preset ``shape``; returns a JSON-able dict of results.

    ``device``: cpu or cuda[:N] (timings between ``torch.cuda.synchronize`` calls; the matmul peak
    measured on that device in the run's precision). ``precision``: fp32, bf16 (autocast) or auto
    (bf16 on CUDA). ``compile``: time ``torch.compile``'d models (``compile_backend``); the
    warm-up rounds absorb the compilation, and each model's first train step and first inference
    (which compile it) are reported apart as ``compile_s`` / ``infer_compile_s``, their excess over
    the median; FLOPs are counted on the eager models."""
    if shape not in SIZES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SIZES)}")
    for name, value, low in (("batch", batch, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    dev = bench_device(device)
    precision = resolve_precision(precision, dev)
    if compile and warmup < 1:
        raise ValueError("--compile needs --warmup >= 1 (the first call of each model compiles it)")
    log = log or (lambda msg: None)
    autocast = autocast_for(precision, dev)
    size = SIZES[shape]
    cfg = make_config(**size, num_classes=num_classes)
    volumes = len(cfg.img_size) == 3  # timm's VisionTransformer takes images only
    if variants is not None and not any(v.strip() for v in variants):
        raise ValueError("--variants is empty; give comma-separated variants, e.g. none,rope_axial")
    specs = variants or [v for v in DEFAULT_VARIANTS if not (volumes and v == "timm")]
    repeated = sorted({v for v in specs if specs.count(v) > 1})
    if repeated:
        raise ValueError(f"--variants names {', '.join(repeated)} more than once; give each once")
    if volumes and "timm" in specs:
        raise ValueError(f"variant 'timm': timm's VisionTransformer takes 2D images, and shape {shape!r} is 3D "
                         f"volumes; leave it out of --variants")
    parsed = [parse_variant(s) for s in specs]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=gen).to(dev)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)

    models, opts, infer_models = {}, {}, {}
    for v in parsed:
        torch.manual_seed(seed)
        m = build(v, size, num_classes).to(dev)
        models[v.spec], opts[v.spec] = m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=dev.type == "cuda")
        infer_models[v.spec] = m
        if v.kwargs.get("qk_pe", "").startswith("string_"):
            folded = copy.deepcopy(m)
            fold_string(folded)
            infer_models[f"{v.spec} (folded)"] = folded

    peak = matmul_peak(dev, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    with autocast():
        flops = {k: step_flops(m, x, y) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in infer_models.items()}
    kernels = {}
    for k, m in infer_models.items():  # eager models, before any compile
        if k in models:
            def step(m=m):
                with autocast():
                    F.cross_entropy(m(x).float(), y).backward()
                m.zero_grad(set_to_none=True)
        else:  # a folded STRING copy: inference only
            def step(m=m):
                with torch.inference_mode(), autocast():
                    m.eval()(x)
        kernels[k] = attention_kernels(step)
    if compile:  # timed from here on through the compiled wrappers (same parameters)
        # Graphs compiled earlier in this process (an earlier bench, a notebook's run) would be reused
        # by these models of the same code: drop them, so each compile_s is a cold compile.
        import torch._dynamo as dynamo

        dynamo.reset()
        _allow_recompiles(len(infer_models))
        models = {k: torch.compile(m, backend=compile_backend) for k, m in models.items()}
        infer_models = {k: torch.compile(m, backend=compile_backend) for k, m in infer_models.items()}
    log(f"matmul peak {peak / 1e9:.1f} GFLOP/s; timing {len(models)} variants x {steps} steps (+{warmup} warm-up)")

    def train_step(k):
        m, opt = models[k], opts[k]
        with autocast():
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # The first call of each model, timed apart: under --compile it compiles the model's graphs, and
    # its excess over the median step is the compile cost a run pays once (reported as compile_s).
    train: Dict[str, List[float]] = {k: [] for k in models}
    first: Dict[str, float] = {}
    keys = list(models)
    for r in range(warmup + steps):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            models[k].train()
            t = _timed(lambda: train_step(k), dev)
            if r == 0 and compile:
                first[k] = t
                log(f"compiled {k} (train step) in {t:.1f}s")
            if r >= warmup:
                train[k].append(t)
        log(f"train round {r + 1}/{warmup + steps}")

    step_mib = {k: step_memory(lambda: train_step(k), dev) for k in keys} if dev.type == "cuda" else {}

    infer: Dict[str, List[float]] = {k: [] for k in infer_models}
    ifirst: Dict[str, float] = {}
    ikeys = list(infer_models)
    for m in infer_models.values():
        m.eval()
    with torch.inference_mode():
        for r in range(warmup + steps):
            order = ikeys[r % len(ikeys):] + ikeys[: r % len(ikeys)]
            for k in order:
                with autocast():
                    t = _timed(lambda: infer_models[k](x), dev)
                if r == 0 and compile:
                    ifirst[k] = t
                    log(f"compiled {k} (inference) in {t:.1f}s")
                if r >= warmup:
                    infer[k].append(t)
    log("inference done")

    med = {k: statistics.median(v) for k, v in train.items()}
    imed = {k: statistics.median(v) for k, v in infer.items()}

    def excess(first_call: Dict[str, float], median: Dict[str, float], k: str) -> Optional[float]:
        # A model whose graphs dynamo already holds compiles nothing on its first call (a folded STRING
        # copy reuses the graphs of rope_axial's code): its excess is timing noise of either sign, so 0.
        return max(0.0, first_call[k] - median[k]) if k in first_call else None

    rows = []
    for k in ikeys:
        base_key = k.removesuffix(" (folded)")
        row = {"variant": k, "params": params[k], "attention": kernels[k],
               "infer_ms": imed[k] * 1e3,
               "infer_vs_none": imed[k] / imed["none"] if "none" in imed else None,
               "infer_vs_rope_axial": imed[k] / imed["rope_axial"] if "rope_axial" in imed else None,
               "infer_compile_s": excess(ifirst, imed, k)}
        if k in med:
            row.update(train_ms=med[k] * 1e3, train_img_s=batch / med[k],
                       train_vs_none=med[k] / med["none"] if "none" in med else None,
                       train_vs_timm=med[k] / med["timm"] if "timm" in med else None,
                       train_vs_rope_axial=med[k] / med["rope_axial"] if "rope_axial" in med else None,
                       gflops_step=flops[k] / 1e9, mfu=flops[k] / med[k] / peak, step_mib=step_mib.get(k),
                       compile_s=excess(first, med, k))
        else:
            row["folded_from"] = base_key
        rows.append(row)
    return {
        "shape": shape, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()},
        "batch": batch, "steps": steps, "warmup": warmup, "device": str(dev),
        "dtype": "float32" if precision == "fp32" else "bf16 autocast",
        "compile": compile_backend if compile else None,
        "machine": _machine(dev), "matmul_peak_gflops": peak / 1e9, "rows": rows,
        "baseline_token_pe": None if cfg.token_pe == "none" else cfg.token_pe,
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
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32  # convolutions (the patch embedding)
    return info


def format_table(result: dict) -> str:
    """Markdown table of a :func:`run_bench` result (the step-memory column only where measured, on
    CUDA; the compile-time columns only under --compile)."""
    def f(key, fmt):
        return lambda r: "" if r.get(key) is None else format(r[key], fmt)

    columns = [("variant", "---", lambda r: r["variant"]), ("attention", "---", f("attention", "")),
               ("params", "---:", f("params", ",")), ("train ms", "---:", f("train_ms", ".1f")),
               ("x none", "---:", f("train_vs_none", ".3f")), ("x timm", "---:", f("train_vs_timm", ".3f")),
               ("x rope_axial", "---:", f("train_vs_rope_axial", ".3f")), ("img/s", "---:", f("train_img_s", ".0f")),
               ("GFLOP/step", "---:", f("gflops_step", ".1f")), ("MFU", "---:", f("mfu", ".1%")),
               ("step MiB", "---:", f("step_mib", ",.0f")), ("infer ms", "---:", f("infer_ms", ".1f")),
               ("infer x none", "---:", f("infer_vs_none", ".3f")),
               ("infer x rope_axial", "---:", f("infer_vs_rope_axial", ".3f")),
               ("compile s", "---:", f("compile_s", ".1f")), ("infer compile s", "---:", f("infer_compile_s", ".1f"))]
    for name, key in (("step MiB", "step_mib"), ("compile s", "compile_s"), ("infer compile s", "infer_compile_s")):
        if all(r.get(key) is None for r in result["rows"]):  # measured only on CUDA / under --compile
            columns = [c for c in columns if c[0] != name]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "|".join(c[1] for c in columns) + "|"]
    lines += ["| " + " | ".join(c[2](r) for c in columns) + " |" for r in result["rows"]]
    m = result["machine"]
    lines.append("")
    where = (f"{m['gpu']}, CUDA {m.get('cuda')}" if "gpu" in m
             else f"{m.get('cpu', m['processor'])}, {m['threads']} threads")
    lines.append(f"{result['shape']}, batch {result['batch']}, {result['dtype']}"
                 f"{', torch.compile (' + result['compile'] + ')' if result.get('compile') else ''}, {result['device']} "
                 f"({where}, torch {m['torch']}); "
                 f"medians of {result['steps']} interleaved rounds after {result['warmup']} warm-up; "
                 f"matmul peak ({'bf16' if 'bf16' in result['dtype'] else 'fp32'}) {result['matmul_peak_gflops']:.1f} GFLOP/s")
    lines.append("")
    lines.append("MFU: model FLOPs of a train step (forward, backward without recomputation; the AdamW step not "
                 "counted) per second, over the matmul peak measured above on this device, not the vendor's "
                 "datasheet figure"
                 + ("; above 100%: the model's own matmuls ran faster than the peak's n x n products here"
                    if any((r.get("mfu") or 0) > 1 for r in result["rows"]) else "") + ".")
    base = result.get("baseline_token_pe")
    if base:
        lines.append(f"On this shape every variant keeps the size preset's token PE ({base}) unless it names "
                     f"another: `none` is that model without a q/k PE, and x none is relative to it.")
    return "\n".join(lines)


# ---- the input pipeline ---------------------------------------------------------------------------------------

def run_input_bench(config: str, overrides: Optional[List[str]] = None, workers: Optional[List[int]] = None,
                    batches: int = 20, warmup: int = 2, batch: Optional[int] = None, seed: int = 0,
                    log: Optional[Callable[[str], None]] = None) -> dict:
    """Throughput of a run config's input pipeline: its training pool, read by the feed training
    uses (in memory; or, for a streamed folder, decoded, resized and cropped by ``w`` DataLoader
    worker processes, for each ``w`` of ``workers``), then the run's batched augmentation on the
    run's device, over ``batches`` batches after ``warmup`` ones (at least one per worker: workers
    start together), in a seeded random order.

    Per worker count: images timed, the first batch's latency (worker start-up included), the time
    spent waiting for batches and augmenting them, and images/s over both. The model-size resize
    that training adds when ``model.img_size`` differs from the data's is not included."""
    from .config import load_config
    from .data import load_dataset
    from .data.base import FileDataset
    from .train.augment import BatchAugment, check_dims
    from .train.feed import make_feed
    from .train.loop import pick_device

    cfg = load_config(config, overrides)
    d, t = cfg.data, cfg.train
    for name, value, low in (("steps", batches, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if workers is not None and (not workers or min(workers) < 0):
        raise ValueError(f"workers={workers}; expected worker counts >= 0, e.g. 0,1,2")
    log = log or (lambda msg: None)
    device = pick_device(t.device)
    t0 = time.perf_counter()
    bundle = load_dataset(d.name, d.root, limit=d.limit, seed=d.split_seed, **d.source_options())
    load_s = time.perf_counter() - t0
    ds = bundle.train
    streamed = isinstance(ds, FileDataset)
    bs = batch or t.batch_size
    counts = (workers if workers is not None else sorted({0, d.workers})) if streamed else [None]
    # w workers start together, so their first w batches arrive at once: the warm-up takes at least
    # those, or the timed window would start on a queue filled in parallel and overstate img/s
    warm = {w: max(warmup, w or 0) for w in counts}
    need = (batches + max(warm.values())) * bs
    if len(ds) < need:
        raise ValueError(f"{len(ds)} training images hold {len(ds) // bs} batches of {bs}, fewer than the "
                         f"{max(warm.values())} + {batches} asked for (warm-up at least one batch per worker): lower "
                         f"--warmup, --steps, --batch or --workers")
    log(f"{'listed' if streamed else 'loaded'} {len(ds)} training images in {load_s:.1f}s")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:need]
    short = [w for w in counts if w and batches < 4 * w]
    if short:
        log(f"note: {batches} timed batches are fewer than 4 per worker for --workers {','.join(map(str, short))}: "
            f"those rates lean on batches the workers decoded at once and overstate; --steps {4 * max(short)} or "
            f"more times them fairly")
    if workers is not None and not streamed:
        log(f"note: --workers {','.join(map(str, workers))} does not apply: the data is held in memory (no "
            f"DataLoader workers); data.options.stream=true decodes a folder with workers")
    channels = ds.item_shape[0]
    check_dims(cfg.data, len(ds.item_shape) - 1)
    rows = []
    for w in counts:
        feed = make_feed(ds, device, w or 0, seed)
        augment = BatchAugment.from_config(cfg, mean=torch.full((channels,), 0.5), std=torch.full((channels,), 0.25),
                                           num_classes=len(ds.classes), channels=channels, img_size=None, seed=seed,
                                           device=device)
        it = feed.batches(order, bs)
        wait = aug = 0.0
        n, first = 0, None
        start = time.perf_counter()
        for i in range(warm[w] + batches):
            a = time.perf_counter()
            x, y = next(it)
            _sync(device)
            b = time.perf_counter()
            augment(x, y)
            _sync(device)
            c = time.perf_counter()
            if first is None:
                first = c - start
            if i >= warm[w]:
                wait, aug, n = wait + b - a, aug + c - b, n + x.shape[0]
        it.close()  # stops the DataLoader's workers
        rows.append({"workers": w, "images": n, "warmup": warm[w], "first_batch_s": first, "loader_s": wait,
                     "augment_s": aug, "img_s": n / (wait + aug), "short_window": w in short})
        log(f"workers {'in memory' if w is None else w}: {n / (wait + aug):.0f} img/s")
    aug_keys = {k: getattr(d, k) for k in ("hflip", "crop_pad", "auto_augment", "affine_degrees", "mixup", "cutmix",
                                           "random_erasing")}
    aug_keys["auto_augment"] = {"autoaugment": f"autoaugment ({d.auto_augment_policy} policy)",
                                "randaugment": f"randaugment ({d.randaugment_ops} ops, magnitude {d.randaugment_magnitude})",
                                }.get(d.auto_augment, d.auto_augment)
    return {"config": config, "overrides": list(overrides or []), "dataset": d.name, "source": bundle.source,
            "streamed": streamed, "train_images": len(ds), "classes": len(ds.classes),
            "item_shape": list(ds.item_shape), "options": dict(d.options), "batch": bs, "batches": batches,
            "warmup": warmup, "device": str(device), "load_s": load_s,
            "augment": {k: v for k, v in aug_keys.items() if v not in (False, 0, 0.0, "none")},
            "machine": _machine(device), "rows": rows}


def format_input_table(result: dict) -> str:
    """Markdown table of a :func:`run_input_bench` result."""
    lines = ["| workers | images | first batch s | waiting for batches s | augment s | img/s (decode + augment) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        w = "in memory" if r["workers"] is None else r["workers"]
        lines.append(f"| {w} | {r['images']:,} | {r['first_batch_s']:.2f} | {r['loader_s']:.2f} | "
                     f"{r['augment_s']:.2f} | {r['img_s']:,.0f}{' *' if r.get('short_window') else ''} |")
    m = result["machine"]
    where = m.get("gpu") or f"{m.get('cpu', m['processor'])}, {m['threads']} threads"
    aug = ", ".join(f"{k}={v}" for k, v in result["augment"].items()) or "none"
    opts = ", ".join(f"{k}={v}" for k, v in result["options"].items())
    lines.append("")
    lines.append(f"{result['dataset']} ({result['source']}{'; ' + opts if opts else ''}): {result['train_images']:,} "
                 f"training images, {result['classes']} classes, items {tuple(result['item_shape'])}, "
                 f"{'decoded by DataLoader workers' if result['streamed'] else 'held in memory'} "
                 f"({'listed and checked' if result['streamed'] else 'loaded'} in {result['load_s']:.1f} s); batch "
                 f"{result['batch']}, {result['batches']} batches timed after {result['warmup']} warm-up (at least one "
                 f"per worker), seeded random order; augmentation ({aug}) on {result['device']} ({where}, torch "
                 f"{m['torch']})")
    if any(r.get("short_window") for r in result["rows"]):
        lines.append("* fewer than 4 timed batches per worker: the rate leans on batches the workers decoded at "
                     "once, and overstates; time more batches (--steps)")
    return "\n".join(lines)
