"""The ``vitlab`` command line: a thin shell over functions the tests call directly.

A user error (bad name, bad value, missing file) is one line on stderr and exit status 2; a
traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import collections
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

    from .compare.experiment import studies
    from .config import presets
    from .data import DATASETS

    return {"token_pe": entries(TOKEN_PES), "qk_pe": entries(QK_PES), "attn": entries(KERNELS),
            "datasets": entries(DATASETS), "presets": presets(), "studies": studies(),
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
    print("\nStudies (vitlab compare NAME): " + ", ".join(cat["studies"]))
    print("\nCombinations")
    for note in cat["notes"]:
        print(f"  - {note}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import format_input_table, format_table, run_bench, run_input_bench

    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}; must be >= 1 (or 0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if not args.quiet else None
    if args.save:  # checked before minutes of timing, not after
        from . import rundir

        save = Path(args.save)
        if save.suffix != ".json":
            raise ValueError(f"--save {save}: expected a .json file name (the table goes beside it as .md)")
        for path in (save, save.with_suffix(".md")):  # the table beside it too: not found out after the timing
            if path.is_dir():
                raise rundir.OutputError(f"--save {save}: {path} is a directory; give a file name such as "
                                         f"{save.parent / 'bench.json'}")
        rundir.check_output_dir(save.parent)
    if args.input or args.overrides:
        if not args.input:
            raise ValueError(f"overrides {args.overrides} need --input PRESET_OR_YAML (the input-pipeline bench)")
        model_only = [flag for flag, given in (("--variants", args.variants is not None), ("--compile", args.compile),
                                               ("--device", args.device != "cpu"), ("--shape", args.shape != "string-cifar"),
                                               ("--precision", args.precision != "auto")) if given]
        if model_only:  # the input bench times no model; it decodes on the CPU and augments on train.device
            raise ValueError(f"{', '.join(model_only)}: options of the model bench, not of --input (the input "
                             f"pipeline's bench takes --workers, --batch, --steps, --warmup, and augments on the "
                             f"config's train.device: override it, e.g. train.device=cpu)")
        try:
            workers = [int(w) for w in args.workers.split(",")] if args.workers else None
        except ValueError:
            raise ValueError(f"--workers {args.workers!r}; expected comma-separated counts, e.g. 0,1,2") from None
        result = run_input_bench(args.input, args.overrides, workers=workers, batches=args.steps,
                                 warmup=args.warmup, batch=args.batch, seed=args.seed, log=log)
        _save_bench(args.save, result, format_input_table(result))
        print(json.dumps(result, indent=2) if args.json else format_input_table(result))
        return 0
    if args.workers:
        raise ValueError("--workers is an option of the input-pipeline bench: give --input PRESET_OR_YAML too")
    variants = args.variants.split(",") if args.variants is not None else None  # "" is an error, not the default
    batch = 128 if args.batch is None else args.batch  # --batch 0 is an error, not the default
    result = run_bench(shape=args.shape, variants=variants, batch=batch, steps=args.steps,
                       warmup=args.warmup, device=args.device, seed=args.seed, precision=args.precision,
                       compile=args.compile, log=log)
    _save_bench(args.save, result, format_table(result))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def _save_bench(path, result: dict, table: str) -> None:
    """``--save X.json``: the result as JSON and, beside it, ``X.md`` with the table (atomic writes)."""
    if path:
        from . import rundir

        path = Path(path)
        rundir.write_json(path, result)
        rundir.atomic_write_text(path.with_suffix(".md"), table + "\n")


def _is_main() -> bool:
    """Rank 0 under torchrun, or a single process."""
    from .train.distributed import from_env

    return from_env().is_main


def _mark_stopped(run_dir: Path, err: BaseException) -> None:
    """A run that stopped on an error must not keep saying ``running`` (a reader would wait for it or
    take its files for a live run's); diverged/interrupted runs have set their own status already,
    and a signal outside the training loop (loading data, the final evaluation) marks it
    ``interrupted``. Under torchrun only rank 0 writes it: another rank stopping by the same signal
    would otherwise race rank 0's ``interrupted`` with a ``failed``."""
    from . import rundir

    if not _is_main():
        return
    signum = 2 if isinstance(err, KeyboardInterrupt) else getattr(err, "signum", None)
    try:
        if rundir.read_json(run_dir / "status.json").get("status") == "running":
            if isinstance(err, (KeyboardInterrupt, rundir.Terminated)):
                rundir.set_status(run_dir, "interrupted", f"signal {signum} outside the training steps")
            else:
                rundir.set_status(run_dir, "failed", _one_line(err))
    except (OSError, ValueError, AttributeError):  # no status yet, or the disk refuses even this
        pass


def _stopped(run_dir: Path, err: BaseException):
    """Re-raise what stopped a run after marking its status; a SIGTERM outside the training steps
    (which checkpoint and say so themselves) says how to continue."""
    from .rundir import Terminated

    _mark_stopped(run_dir, err)
    if isinstance(err, Terminated) and not str(err):
        raise Terminated(f"SIGTERM received outside the training steps; continue with: vitlab train --resume "
                         f"{run_dir}") from None
    raise err


def _default_out(cfg_source: str | None, cfg) -> Path:
    stem = Path(cfg_source).stem if cfg_source else "run"
    qk = cfg.model.get("qk_pe", "")
    tag = "-".join(filter(None, [stem, str(cfg.model.get("name", "vit")).replace(":", "_"), qk, f"s{cfg.train.seed}"]))
    return Path("runs") / tag


def _refuse_existing_run(out: Path) -> None:
    """A new run must not overwrite a finished run, nor an unfinished one (its checkpoint is what
    ``--resume`` continues from), unless ``--force`` says so."""
    from . import rundir

    if (out / "final.json").exists():
        raise ValueError(f"{out} already holds a finished run; use --out elsewhere, --force, or --resume")
    if (out / "config.yaml").exists() or any((out / "checkpoints").glob("*.pt")):
        try:
            status = rundir.read_json(out / "status.json")["status"]
        except (OSError, ValueError, KeyError, TypeError):  # no status (yet), or not one we wrote
            status = None
        state = f" ({status})" if status and status != "finished" else ""  # finished without final.json: unfinished
        raise ValueError(f"{out} holds an unfinished run{state}; use --resume {out} to continue it, --force "
                         f"to start over, or another --out")


def _run_lock(run_dir: Path):
    """Rank 0 holds ``RUN/.lock`` while it trains: a second ``vitlab train`` on the same directory
    (``--resume`` of a run still going, ``--force`` over it) would interleave two trainings' metrics
    and checkpoints. The other ranks of a torchrun job write nothing and take no lock."""
    import contextlib

    from . import rundir

    if not _is_main():
        return contextlib.nullcontext()
    return rundir.exclusive(run_dir, "vitlab train", "wait for it to end (or stop it), or give another --out")


def cmd_train(args) -> int:
    from . import rundir
    from .config import load_config, read_yaml, validate
    from .train import train_run

    if args.resume:
        run_dir = Path(args.resume)
        given = [f"`{x}`" for x in [args.config, *args.overrides] if x] + (["--out"] if args.out else []) \
            + (["--force"] if args.force else [])
        if given:  # silently training the stored config instead would look like the change took effect
            raise ValueError(f"--resume {run_dir} continues that run with its own config.yaml; drop "
                             f"{', '.join(given)} (to change the config, start a new run with --out)")
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (not a vitlab run directory)")
        from .compare.runner import run_state

        if run_state(run_dir) == "finished":  # resuming would evaluate it again and overwrite final.json
            raise ValueError(f"--resume {run_dir}: the run has finished (final.json); nothing to resume "
                             f"(`vitlab eval {run_dir}` evaluates it again without rewriting it)")
        with _run_lock(run_dir):  # first: a run still loading its data has no checkpoint yet
            if not (run_dir / "checkpoints" / "last.pt").is_file():
                raise FileNotFoundError(f"--resume {run_dir}: no checkpoints/last.pt to resume from")
            cfg = validate(read_yaml(str(run_dir / "config.yaml")))
            try:
                final = train_run(cfg, run_dir, resume=True, progress=not args.quiet)
            except BaseException as err:
                _stopped(run_dir, err)
    else:
        if not args.config:  # None or "": an empty name would silently train the built-in defaults
            raise ValueError("give a preset or YAML file (see `vitlab train --help`), or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else _default_out(args.config, cfg)
        if not args.force:
            _refuse_existing_run(out)
        rundir.check_output_dir(out)  # before minutes of data loading
        with _run_lock(out):
            if not args.force:  # (again: a run may have started between the first look and the lock)
                _refuse_existing_run(out)
            try:
                final = train_run(cfg, out, progress=not args.quiet)
            except BaseException as err:
                _stopped(out, err)
        run_dir = out
    if not _is_main():  # one summary line per run, not one per torchrun process
        return 0
    print(f"{run_dir}: test acc1 {final['acc1']:.4f}  acc5 {_shown(final['acc5'])}  loss {final['loss']:.4f}  "
          f"auroc {_shown(final['auroc_macro'])}  {final['epochs']} epochs in {final['seconds']:.0f}s "
          f"({final['status']})")
    return 0


def _shown(metric) -> str:
    """A metric for the summary line: 4 decimals, or n/a where undefined (acc5 of 5 classes or fewer,
    AUROC without both classes in the test set)."""
    return "n/a" if metric is None else f"{metric:.4f}"


def cmd_eval(args) -> int:
    from .train.evaluate import eval_run

    result = eval_run(args.run_dir, args.overrides, checkpoint=args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.run_dir}: acc1 {result['acc1']:.4f}  acc5 {_shown(result['acc5'])}  loss {result['loss']:.4f}  "
              f"(img_size {result['img_size']}, {result['test_size']} images)")
    return 0


def cmd_validate(args) -> int:
    from .config import dump_yaml, load_config

    if not args.config:  # "" would validate the built-in defaults, and name their problem
        raise ValueError("give a preset or YAML file to validate (see `vitlab validate --help`)")
    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .compare import load_experiment, run_compare
    from .compare.report import ranking_summary, write_report
    from .rundir import check_output_dir

    if args.experiment and "=" in args.experiment and not Path(args.experiment).exists():
        # `vitlab compare train.epochs=1`: the default study with an override, not a file of that name
        args.overrides, args.experiment = [args.experiment, *args.overrides], None
    exp = load_experiment(args.experiment, seeds=args.seeds)
    out = Path(args.out) if args.out else Path("runs") / (Path(args.experiment).stem if args.experiment else "default-study")
    check_output_dir(out)
    if args.dry_run:
        return _print_plan(exp, out, args)
    def log(m: str) -> None:  # --quiet: no progress lines, but warnings still
        if not args.quiet or m.startswith("warning:"):
            print(m, file=sys.stderr, flush=True)
    states = run_compare(exp, out, extra=args.overrides, jobs=args.jobs, retry_failed=args.retry_failed, log=log,
                         launcher=args.launcher, cluster=_cluster_options(args), wait=not args.no_wait,
                         procs=args.procs_per_run)
    if args.no_wait:
        print(f"{out}: jobs submitted ({sum(st == 'finished' for st in states.values())}/{len(states)} runs already "
              f"finished); when they are done: vitlab report {out}")
        return 0
    report = write_report(out)
    print(ranking_summary(out))
    failed = [n for n, st in states.items() if st != "finished"]
    print(f"{out}: {len(states) - len(failed)}/{len(states)} runs finished; report: {report}")
    return 1 if failed else 0


def _print_plan(exp, out: Path, args) -> int:
    """``vitlab compare --dry-run``: every run and what a real call would do with it; nothing written."""
    from .compare.runner import plan_compare

    plan = plan_compare(exp, out, extra=args.overrides, retry_failed=args.retry_failed, launcher=args.launcher,
                        cluster=_cluster_options(args), wait=not args.no_wait, jobs=args.jobs,
                        procs=args.procs_per_run, log=lambda m: print(m, file=sys.stderr, flush=True))
    points = len(exp.points())
    print(f"{out}: {len(plan)} runs = {len(exp.arms)} arms x {points} grid point{'s' * (points != 1)} x "
          f"{len(exp.seeds)} seeds; baseline {exp.baseline}, metric {exp.metric}, correction {exp.correction}, "
          f"launcher {args.launcher}")
    width = max(len(r["name"]) for r in plan)
    for r in plan:
        point = " ".join(f"{k}={v}" for k, v in r["point"].items())
        keys = " ".join(f"{k}={v}" for k, v in exp.arms[r["arm"]].items()) or "(base config)"
        print(f"  {r['name']:<{width}}  {r['action']:<9}  {r['state']:<8}  {keys}{'  @ ' + point if point else ''}")
    counts = collections.Counter(r["action"] for r in plan)
    said = {"run": "to run", "resume": "to resume", "skip": "to skip", "in flight": "in flight"}
    print("dry run, nothing trained or written: " + ", ".join(f"{n} {said[a]}" for a, n in counts.items()))
    return 0


def _cluster_options(args):
    """The job resources given on the command line (None when none was: the launcher's defaults)."""
    from .compare.runner import ClusterOptions

    slurm_args = {}
    for item in args.slurm_arg or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--slurm-arg {item!r} is not key=value (e.g. --slurm-arg account=abc)")
        slurm_args[key.lstrip("-")] = value
    given = {"partition": args.partition, "gpus_per_run": args.gpus_per_run, "cpus_per_run": args.cpus_per_run,
             "time_min": args.time_min, "mem_gb": args.mem_gb}
    return ClusterOptions(**{k: v for k, v in given.items() if v is not None}, slurm_args=slurm_args)


def cmd_report(args) -> int:
    from .compare.report import ranking_summary, write_report

    report = write_report(args.dir)
    print(ranking_summary(args.dir))
    print(report)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"vitlab: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitlab", description="A laboratory for Vision Transformers: "
                                "compare positional encodings and attention mechanisms fairly.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list the catalogue (token PEs, q/k PEs, kernels, sizes) with each entry's "
                                        "options, and the datasets, presets and studies")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("bench", help="time train steps and inference of variants, interleaved, medians; or, with "
                                     "--input, the input pipeline of a run config")
    s.add_argument("overrides", nargs="*", default=[], help="with --input: dotted overrides of that config (data.root=...)")
    s.add_argument("--input", metavar="PRESET_OR_YAML", help="time this run config's input pipeline instead: "
                   "images/s decoded + augmented, per DataLoader worker count")
    s.add_argument("--workers", help="with --input: comma-separated worker counts (default: 0 and data.workers)")
    s.add_argument("--shape", default="string-cifar", help=f"size preset ({', '.join(SIZES)})")
    s.add_argument("--variants", default=None,
                   help="comma-separated variants, each like rope_mixed+learned or string_cayley:sparsity=0.5, "
                        "or 'timm' (default: the PE catalogue plus timm)")
    s.add_argument("--batch", type=int, default=None, help="batch size (default 128; with --input: train.batch_size)")
    s.add_argument("--steps", type=int, default=10, help="timed rounds (medians are taken over them); with --input: "
                   "timed batches")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 = autocast; auto = bf16 on CUDA, fp32 on CPU")
    s.add_argument("--compile", action="store_true", help="time torch.compile'd models (warm-up rounds compile)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.add_argument("--save", metavar="FILE.json", help="also write the result to FILE.json and the table to FILE.md")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="train one run: vitlab train PRESET_OR_YAML [section.key=value ...]")
    s.add_argument("config", nargs="?", help="a preset name from configs/ or a YAML file")
    s.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.lr=3e-4 model.qk_pe=rope_mixed")
    s.add_argument("--out", help="run directory (default runs/<preset>-<model name>-<qk_pe>-s<seed>, e.g. "
                                        "runs/fashion-mnist-quick-vit-rope_mixed-s1)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    s.add_argument("--force", action="store_true", help="overwrite a run (finished or not) in --out")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="re-evaluate a run's checkpoint, e.g. at another image size: vitlab eval RUN_DIR model.img_size=40")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", default=[], help="data.* keys (another split/source) and model.img_size")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N; the run's "
                                                      "precision (final.json) is used, bf16 autocast included")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compare", help="run every arm x grid point x seed of an experiment and write the report "
                                       "(no argument: the default study on Fashion-MNIST)")
    s.add_argument("experiment", nargs="?", help="a study's name (`vitlab list` shows them) or an experiment YAML "
                                                 "(base, arms, grid, seeds, baseline, metric, correction)")
    s.add_argument("overrides", nargs="*", default=[], help="dotted overrides applied to every run")
    s.add_argument("--out", help="comparison directory (default runs/<experiment>; runs/default-study without one)")
    s.add_argument("--jobs", type=int, default=None, help="runs at once (default 1; each gets cores/jobs threads); "
                   "with --launcher slurm: the job array's parallelism (default: the scheduler's)")
    s.add_argument("--retry-failed", action="store_true",
                   help="run failed runs again (from their last checkpoint when they have one)")
    s.add_argument("--dry-run", action="store_true", help="check the experiment (every run's config, the launcher, "
                   "an earlier comparison in --out) and list its runs and what would happen to each, without "
                   "training or writing anything")
    s.add_argument("--procs-per-run", type=int, metavar="N", help="train each run data-parallel on N processes "
                   "(torchrun; default 1, with a job launcher --gpus-per-run); locally, runs at once get GPUs "
                   "of their own, N each")
    g = s.add_argument_group("cluster", "each run as a submitit job; job files under OUT/slurm/")
    g.add_argument("--launcher", default="local", help="local (processes here, default), slurm (sbatch through "
                   "submitit) or submitit-local (submitit's local executor: jobs on this machine)")
    g.add_argument("--no-wait", action="store_true", help="submit the jobs and return; `vitlab report OUT` later")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--gpus-per-run", type=int, help="GPUs per job (Slurm default 0; submitit-local default one "
                   "per process, jobs at once getting GPUs of their own)")
    g.add_argument("--cpus-per-run", type=int, help="CPUs per job, also the run's torch threads")
    g.add_argument("--time-min", type=int, help="time limit per job in minutes (default 1440); a job that reaches "
                   "it is requeued and resumes from its checkpoint")
    g.add_argument("--mem-gb", type=float, help="memory per job in GB")
    g.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                   help="another #SBATCH option, repeatable (e.g. --slurm-arg account=abc --slurm-arg qos=high)")
    s.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 instead of the experiment's seeds")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="write report.md, report.html and figures/ for a comparison directory")
    s.add_argument("dir")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("validate", help="check a preset or YAML (+ overrides) and print the resolved config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.epochs=2")
    s.set_defaults(func=cmd_validate)
    return p


def _one_line(err: BaseException) -> str:
    """The message of a user error on one line; an OSError from the system as "reason: path"."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None and str(err).startswith("[Errno"):
        where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else f"{err.filename}"
        msg = f"{err.strerror}: {where}"
    else:
        msg = str(err) or type(err).__name__
    return " ".join(msg.split())


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
    from .rundir import Terminated, sigterm_raises

    try:
        with sigterm_raises():
            return args.func(args)
    except BrokenPipeError:  # e.g. `vitlab list | head`
        return 0
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"vitlab: {str(err) or 'SIGTERM received'}", file=sys.stderr)
        return 128 + Terminated.signum
    except (ValueError, OSError, RuntimeError) as err:  # OSError: unreadable input, unwritable output
        if args.debug:
            raise
        print(f"vitlab: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Interrupted as err:  # SIGINT/SIGTERM in training: checkpoint saved
        print(f"vitlab: {err}", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
