"""Run every arm x grid point x seed as an independent ``vitlab train`` process; skip finished runs,
resume interrupted ones, so an interrupted comparison picks up where it stopped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional

from .. import rundir
from ..config import dump_yaml
from .experiment import Experiment, RunSpec


def run_state(run: Path) -> str:
    """finished / failed / diverged / partial (a checkpoint to resume from: interrupted or killed) / new."""
    status = run / "status.json"
    if status.is_file():
        try:
            state = json.loads(status.read_text())["status"]
        except (ValueError, KeyError):
            state = "partial"
        if state == "finished" and (run / "final.json").is_file():
            return "finished"
        if state in ("failed", "diverged"):
            return state
    return "partial" if (run / "checkpoints" / "last.pt").is_file() else "new"


def _command(spec: RunSpec, run: Path, cfg_file: Path, threads: int) -> List[str]:
    base = [sys.executable, "-m", "vitlab", "train", "--quiet"]
    if run_state(run) == "partial":
        return base + ["--resume", str(run)]
    return base + [str(cfg_file), "--out", str(run), "--force"] + ([f"train.threads={threads}"] if threads else [])


def run_compare(exp: Experiment, out: Path, *, extra: Optional[List[str]] = None, jobs: int = 1,
                retry_failed: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the experiment into ``out``; returns {name: state} after the runs."""
    specs = exp.runs(extra)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    manifest = {"base": exp.base, "baseline": exp.baseline, "seeds": exp.seeds, "arms": exp.arms, "grid": exp.grid,
                "overrides": exp.overrides, "extra": list(extra or []), "description": exp.description,
                "runs": [{"name": s.name, "arm": s.arm, "point": s.point, "seed": s.seed} for s in specs]}
    previous = out / "experiment.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if {r["name"] for r in old["runs"]} != {r["name"] for r in manifest["runs"]} or old["base"] != exp.base:
            raise ValueError(f"{out} holds another experiment (different arms, seeds or base); use another --out")
        for spec in specs:  # a finished run must have been trained with the config this experiment asks for
            saved = out / "configs" / f"{spec.name}.yaml"
            if saved.is_file() and saved.read_text() != dump_yaml(spec.config):
                raise ValueError(f"{spec.name}: its config differs from this experiment's (changed base, overrides "
                                 f"or arm keys); use another --out")
    rundir.write_json(previous, manifest)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    todo = []
    for spec in specs:
        run = out / "runs" / spec.name
        state = run_state(run)
        if state == "finished" or (state in ("failed", "diverged") and not retry_failed):
            continue
        cfg_file = out / "configs" / f"{spec.name}.yaml"
        rundir.atomic_write_text(cfg_file, dump_yaml(spec.config))
        todo.append((spec, run, cfg_file))
    log(f"{len(specs)} runs: {len(specs) - len(todo)} already done, {len(todo)} to run ({jobs} at a time)")
    start, done = time.time(), [0]

    def one(item):
        spec, run, cfg_file = item
        t0 = time.time()
        proc = subprocess.run(_command(spec, run, cfg_file, threads), capture_output=True, text=True)
        done[0] += 1
        elapsed = time.time() - start
        eta = elapsed / done[0] * (len(todo) - done[0])  # elapsed already reflects --jobs
        if proc.returncode == 0:
            final = json.loads((run / "final.json").read_text())
            log(f"[{done[0]}/{len(todo)}] {spec.name}: acc1 {final['acc1']:.4f} in {time.time() - t0:.0f}s "
                f"(elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)")
        else:
            err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            log(f"[{done[0]}/{len(todo)}] {spec.name}: FAILED ({err})")
            if not (run / "status.json").is_file():
                run.mkdir(parents=True, exist_ok=True)
                rundir.set_status(run, "failed", err)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    return {s.name: run_state(out / "runs" / s.name) for s in specs}
