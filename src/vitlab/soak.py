"""Kill-and-resume checks: a run killed with SIGKILL at random moments and resumed each time must end
exactly as the run that was never stopped. Used by tests/test_resume.py and scripts/soak_resume.py."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

# Fields that measure time, not learning: they differ between any two runs.
TIMING = {"seconds", "img_s", "elapsed", "data_share", "train_images_per_s", "infer_ms_per_batch"}


def train_command(out: Path, config: str, overrides: List[str], resume: bool = False) -> List[str]:
    base = [sys.executable, "-m", "vitlab", "train", "--quiet"]
    return base + (["--resume", str(out)] if resume else [config, "--out", str(out), "--force", *overrides])


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    return obj


def differences(a: Path, b: Path) -> List[str]:
    """What differs between two finished run directories, timing fields aside ([] = identical)."""
    out = []
    for name in ("final.json",):
        if _strip(json.loads((a / name).read_text())) != _strip(json.loads((b / name).read_text())):
            out.append(name)
    lines = [[_strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    if lines[0] != lines[1]:
        out.append("metrics.jsonl")
    for ckpt in ("best.pt", "last.pt"):
        sa, sb = (torch.load(d / "checkpoints" / ckpt, weights_only=True) for d in (a, b))
        for part in ("model", "ema"):
            pa, pb = sa.get(part), sb.get(part)
            if (pa is None) != (pb is None) or (pa is not None and (pa.keys() != pb.keys() or any(
                    not torch.equal(pa[k], pb[k]) for k in pa))):
                out.append(f"{ckpt}:{part}")
    return out


def progress(out: Path) -> tuple:
    """(fraction of training done at the last checkpoint, a description for the log)."""
    ckpt = out / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return 0.0, "before the first checkpoint"
    state = torch.load(ckpt, weights_only=True)
    epochs = state["run"]["epoch"]
    step = state["partial"]["step"] if state.get("partial") else 0
    total_epochs = int(state.get("epochs") or max(epochs, 1))
    steps = int(state.get("steps_per_epoch") or 1)
    return (epochs + step / steps) / total_epochs, f"last checkpoint: {epochs} epochs + {step} steps"


def run_to_end(out: Path, config: str, overrides: List[str], env: Optional[dict] = None) -> float:
    """Train uninterrupted; returns the wall time in seconds."""
    t = time.perf_counter()
    subprocess.run(train_command(out, config, overrides), check=True, env=env, capture_output=True)
    return time.perf_counter() - t


def startup_seconds(env: Optional[dict] = None) -> float:
    """Wall time of starting ``vitlab`` before any training (interpreter, torch import)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vitlab.cli, vitlab.train"], check=True, env=env)
    return time.perf_counter() - t


def killed_run(out: Path, config: str, overrides: List[str], kills: int, wall: float, startup: float,
               seed: int = 0, env: Optional[dict] = None, log=lambda s: None) -> int:
    """Train into ``out``, SIGKILL it ``kills`` times at random moments, resuming after each kill, then
    let it finish. Each kill is drawn uniformly between the end of start-up and the expected end of
    the remaining training (``wall`` is an uninterrupted run's time), so kills land in training,
    evaluation and checkpoint writing alike. Returns the kills delivered (a kill drawn after the
    process already ended is not counted, and the run starts over)."""
    from .compare.runner import run_state

    def start_over(why: str) -> bool:
        """A run that finished before its kill: start over so every drawn kill lands in a live run."""
        log(f"{why}; restarting from scratch")
        for f in ("final.json", "status.json"):
            (out / f).unlink(missing_ok=True)
        return False

    rng = random.Random(seed)
    delivered, started = 0, False
    while True:
        resume = started and (out / "checkpoints" / "last.pt").is_file()
        proc = subprocess.Popen(train_command(out, config, overrides, resume=resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = True
        if delivered >= kills:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"final resume failed: {err.decode().strip().splitlines()[-1:]}")
            return delivered
        done, _ = progress(out) if resume else (0.0, "")
        delay = rng.uniform(startup, startup + (wall - startup) * (1 - done) * 1.1)
        try:
            proc.wait(timeout=delay)
            if proc.returncode != 0:
                raise RuntimeError(f"run failed: {proc.stderr.read().decode().strip().splitlines()[-1:]}")
            started = start_over(f"run ended before a kill at {delay:.2f}s")
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if run_state(out) == "finished":  # killed on its way out, after final.json: nothing to resume
                started = start_over(f"run finished before the kill at {delay:.2f}s")
                continue
            delivered += 1
            log(f"kill {delivered}/{kills} at {delay:.2f}s ({progress(out)[1]})")


def soak(workdir: Path, config: str, overrides: List[str], kills: int, seed: int = 0, runs: int = 1,
         log=print) -> dict:
    """Reference run, then ``runs`` killed-and-resumed runs with ``kills`` kills spread across them;
    returns {"kills": n, "runs": r, "identical_runs": m, "differences": {...}}."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref = workdir / "reference"
    startup = startup_seconds(env)
    wall = run_to_end(ref, config, overrides, env)
    log(f"reference run: {wall:.1f}s (start-up {startup:.1f}s)")
    per_run = [kills // runs + (i < kills % runs) for i in range(runs)]
    total, identical, diffs = 0, 0, {}
    for i, k in enumerate(per_run):
        out = workdir / f"killed-{i}"
        total += killed_run(out, config, overrides, k, wall, startup, seed=seed * 1000 + i, env=env, log=log)
        d = differences(ref, out)
        identical += not d
        if d:
            diffs[out.name] = d
        log(f"{out.name}: {k} kills, {'identical' if not d else 'DIFFERENT: ' + ', '.join(d)}")
    return {"kills": total, "runs": runs, "identical_runs": identical, "differences": diffs}
