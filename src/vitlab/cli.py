"""The ``vitlab`` command line: a thin shell over functions the tests call directly.

A user error (bad name, bad value, missing file) is one line on stderr and exit status 2; a
traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .models import KERNELS, QK_PES, SIZES, TOKEN_PES

COMBINATION_NOTES = [
    "every token PE combines with every q/k PE, and every q/k PE with every kernel",
    "differential, differential_entropy: need an even number of heads (they pair sub-heads)",
    "rope_axial, rope_mixed, string_*: head_dim divisible by 2*ndim (4 in 2D, 6 in 3D); pope: by ndim",
    "sincos: dim divisible by 2*ndim; learned3d: 3D models only, dim divisible by 3",
]


def catalogue() -> dict:
    """Everything registered, with descriptions and options (what ``vitlab list`` prints)."""
    def entries(reg):
        return {n: {"doc": reg.doc(n), "options": reg.options(n)} for n in reg.names()}

    from .config import presets
    from .data import DATASETS

    return {"token_pe": entries(TOKEN_PES), "qk_pe": entries(QK_PES), "attn": entries(KERNELS),
            "datasets": entries(DATASETS), "presets": presets(),
            "sizes": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                      for k, v in SIZES.items()},
            "notes": COMBINATION_NOTES}


def cmd_list(args) -> int:
    cat = catalogue()
    if args.json:
        print(json.dumps(cat, indent=2, default=str))
        return 0
    titles = {"token_pe": "Token PEs (model.token_pe)", "qk_pe": "Q/K PEs (model.qk_pe)",
              "attn": "Attention kernels (model.attn)", "datasets": "Datasets (data.name; options: data.options.*)"}
    for key, title in titles.items():
        print(title)
        for name, e in cat[key].items():
            opts = ", ".join(f"{k}={v}" for k, v in e["options"].items())
            print(f"  {name:22s} {e['doc']}" + (f"  [options: {opts}]" if opts else ""))
        print()
    print("Size presets (model.size)")
    for name, s in cat["sizes"].items():
        print(f"  {name:22s} " + " ".join(f"{k}={v}" for k, v in s.items()))
    print("\nPresets (vitlab train NAME): " + ", ".join(cat["presets"]))
    print("\nCombinations")
    for note in cat["notes"]:
        print(f"  - {note}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import format_table, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",") if args.variants else None
    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if not args.quiet else None
    result = run_bench(shape=args.shape, variants=variants, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, device=args.device, seed=args.seed, precision=args.precision, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def _default_out(cfg_source: str | None, cfg) -> Path:
    stem = Path(cfg_source).stem if cfg_source else "run"
    qk = cfg.model.get("qk_pe", "")
    tag = "-".join(filter(None, [stem, str(cfg.model.get("name", "vit")).replace(":", "_"), qk, f"s{cfg.train.seed}"]))
    return Path("runs") / tag


def cmd_train(args) -> int:
    from .config import load_config, read_yaml, validate
    from .train import train_run

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (not a vitlab run directory)")
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no checkpoints/last.pt to resume from")
        cfg = validate(read_yaml(str(run_dir / "config.yaml")))
        final = train_run(cfg, run_dir, resume=True, progress=not args.quiet)
    else:
        if args.config is None:
            raise ValueError("give a preset or YAML file (see `vitlab train --help`), or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else _default_out(args.config, cfg)
        if (out / "final.json").exists() and not args.force:
            raise ValueError(f"{out} already holds a finished run; use --out elsewhere, --force, or --resume")
        final = train_run(cfg, out, progress=not args.quiet)
        run_dir = out
    print(f"{run_dir}: test acc1 {final['acc1']:.4f}  acc5 {final['acc5']:.4f}  loss {final['loss']:.4f}  "
          f"auroc {final['auroc_macro'] if final['auroc_macro'] is None else round(final['auroc_macro'], 4)}  "
          f"{final['epochs']} epochs in {final['seconds']:.0f}s ({final['status']})")
    return 0


def cmd_eval(args) -> int:
    from .train.evaluate import eval_run

    result = eval_run(args.run_dir, args.overrides, checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.run_dir}: acc1 {result['acc1']:.4f}  acc5 {result['acc5']:.4f}  loss {result['loss']:.4f}  "
              f"(img_size {result['img_size']}, {result['test_size']} images)")
    return 0


def cmd_validate(args) -> int:
    from .config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .compare import load_experiment, run_compare
    from .compare.report import write_report

    exp = load_experiment(args.experiment)
    out = Path(args.out) if args.out else Path("runs") / (Path(args.experiment).stem if args.experiment else "default-study")
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.quiet else (lambda m: None)
    states = run_compare(exp, out, extra=args.overrides, jobs=args.jobs, retry_failed=args.retry_failed, log=log)
    report = write_report(out)
    failed = [n for n, st in states.items() if st != "finished"]
    print(f"{out}: {len(states) - len(failed)}/{len(states)} runs finished; report: {report}")
    return 1 if failed else 0


def cmd_report(args) -> int:
    from .compare.report import write_report

    print(write_report(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitlab", description="A laboratory for Vision Transformers: "
                                "compare positional encodings and attention mechanisms fairly.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list every registered token PE, q/k PE, kernel and size preset")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("bench", help="time train steps and inference of variants, interleaved, medians")
    s.add_argument("--shape", default="string-cifar", help=f"size preset ({', '.join(SIZES)})")
    s.add_argument("--variants", default=None,
                   help="comma-separated variants, each like rope_mixed+learned or string_cayley:sparsity=0.5, "
                        "or 'timm' (default: the PE catalogue plus timm)")
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--steps", type=int, default=10, help="timed rounds (medians are taken over them)")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--device", default="cpu")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="train one run: vitlab train PRESET_OR_YAML [section.key=value ...]")
    s.add_argument("config", nargs="?", help="a preset name from configs/ or a YAML file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.qk_pe=rope_mixed")
    s.add_argument("--out", help="run directory (default runs/<preset>-<qk_pe>-s<seed>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    s.add_argument("--force", action="store_true", help="overwrite a finished run in --out")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="re-evaluate a run's checkpoint, e.g. at another image size: vitlab eval RUN_DIR model.img_size=40")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="data.* keys (another split/source) and model.img_size")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compare", help="run every arm x grid point x seed of an experiment and write the report "
                                       "(no argument: the default study on Fashion-MNIST)")
    s.add_argument("experiment", nargs="?", help="experiment YAML (base, arms, grid, seeds, baseline)")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    s.add_argument("--out", help="comparison directory (default runs/<experiment>)")
    s.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores/jobs threads)")
    s.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="write report.md for a comparison directory")
    s.add_argument("dir")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("validate", help="check a preset or YAML (+ overrides) and print the resolved config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_validate)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    from .train.loop import Interrupted

    warnings.formatwarning = lambda msg, category, *rest: f"vitlab: warning: {msg}\n"  # one line, no source
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options (`vitlab train X --out d train.lr=1e-3`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `vitlab list | head`
        return 0
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        if args.debug:
            raise
        msg = " ".join(str(err).split())  # one line
        print(f"vitlab: error: {msg}", file=sys.stderr)
        return 2
    except Interrupted as err:  # SIGINT/SIGTERM in training: checkpoint saved
        print(f"vitlab: {err}", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
