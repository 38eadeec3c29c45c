"""The ``vitlab`` command line: a thin shell over functions the tests call directly.

A user error (bad name, bad value, missing file) is one line on stderr and exit status 2; a
traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import json
import sys
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

    return {"token_pe": entries(TOKEN_PES), "qk_pe": entries(QK_PES), "attn": entries(KERNELS),
            "sizes": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                      for k, v in SIZES.items()},
            "notes": COMBINATION_NOTES}


def cmd_list(args) -> int:
    cat = catalogue()
    if args.json:
        print(json.dumps(cat, indent=2, default=str))
        return 0
    titles = {"token_pe": "Token PEs (model.token_pe)", "qk_pe": "Q/K PEs (model.qk_pe)",
              "attn": "Attention kernels (model.attn)"}
    for key, title in titles.items():
        print(title)
        for name, e in cat[key].items():
            opts = ", ".join(f"{k}={v}" for k, v in e["options"].items())
            print(f"  {name:22s} {e['doc']}" + (f"  [options: {opts}]" if opts else ""))
        print()
    print("Size presets (model.size)")
    for name, s in cat["sizes"].items():
        print(f"  {name:22s} " + " ".join(f"{k}={v}" for k, v in s.items()))
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
                       warmup=args.warmup, device=args.device, seed=args.seed, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
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
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
