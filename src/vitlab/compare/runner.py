"""Run every arm x grid point x seed as an independent ``vitlab train`` process; skip finished runs,
resume interrupted ones, so an interrupted comparison picks up where it stopped."""
from __future__ import annotations

import collections
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from submitit.helpers import Checkpointable

from .. import rundir
from ..config import dump_yaml
from .experiment import Experiment, RunSpec


def run_state(run: Path) -> str:
    """finished / failed / diverged / partial (a checkpoint to resume from: interrupted or killed) / new."""
    status = run / "status.json"
    if status.is_file():
        try:
            record = json.loads(status.read_text())
        except ValueError:
            record = None
        state = record.get("status") if isinstance(record, dict) else "partial"
        if state == "finished" and (run / "final.json").is_file():
            return "finished"
        if state in ("failed", "diverged"):
            return state
    return "partial" if (run / "checkpoints" / "last.pt").is_file() else "new"


def error_line(lines: List[str], fallback: str = "no message") -> str:
    """The message that says why a run failed: its last ``vitlab: error:`` line (under torchrun the
    last line is torchrun's closing banner, a row of '='), else the last line with a letter in it."""
    lines = [x.strip() for x in lines if x.strip()]
    for line in reversed(lines):
        if line.startswith("vitlab: error:"):
            return line
    return next((x for x in reversed(lines) if any(c.isalpha() for c in x)), fallback)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (a Slurm allocation, a container's cpuset or
    taskset narrow it; os.cpu_count() counts the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_threads(launcher: str, cluster: ClusterOptions, jobs: Optional[int], procs: int) -> int:
    """torch threads per training process (0: torch's default): the job's CPUs over its processes on
    Slurm (or submitit-local given --cpus-per-run), else this machine's usable CPUs over the
    processes running at once, when more than one."""
    if launcher == "slurm" or (launcher == "submitit-local" and cluster.cpus_per_run):
        return max(1, cluster.cpus_per_run // procs) if cluster.cpus_per_run else 0  # the job's allocation
    at_once = (jobs or 1) * procs
    return max(1, usable_cpus() // at_once) if at_once > 1 else 0


def _command(spec: RunSpec, run: Path, cfg_file: Path, threads: int, procs: int = 1) -> List[str]:
    """The one command that trains (or resumes) a run, whatever the launcher; ``procs`` > 1 trains it
    data-parallel under torchrun (``--standalone``: a free rendezvous port of its own on this host)."""
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    base = launch + ["-m", "vitlab", "train", "--quiet"]
    state = run_state(run)
    # a failed run retried (--retry-failed) resumes from its checkpoint when it has one: a crash or a
    # lost process mid-training is no reason to throw its epochs away (a diverged one starts afresh)
    if state == "partial" or (state == "failed" and (run / "checkpoints" / "last.pt").is_file()):
        return base + ["--resume", str(run)]
    return base + [str(cfg_file), "--out", str(run), "--force"] + ([f"train.threads={threads}"] if threads else [])


def _manifest(exp: Experiment, specs: List[RunSpec], extra: Optional[List[str]]) -> dict:
    return {"base": exp.base, "baseline": exp.baseline, "seeds": exp.seeds, "arms": exp.arms, "grid": exp.grid,
            "overrides": exp.overrides, "extra": list(extra or []), "description": exp.description,
            "metric": exp.metric, "correction": exp.correction, "arm_recipe_keys": exp.arm_recipe_keys,
            "runs": [{"name": s.name, "arm": s.arm, "point": s.point, "seed": s.seed} for s in specs]}


def _check_same_experiment(out: Path, specs: List[RunSpec], manifest: dict, log: Callable[[str], None]) -> None:
    """A comparison directory already there must hold this experiment: the same runs, and each run's
    saved config the one this experiment asks for (so a finished run is never reused for another),
    both its configs/NAME.yaml and, for a run that would be skipped or resumed, the config.yaml it
    trained with (a launcher's own keys, train.threads and train.device, aside). A damaged
    experiment.json is rewritten: the runs are still checked one by one."""
    from .report import _flat, read_manifest, trained_differently

    if (out / "experiment.json").is_file():
        try:
            old = read_manifest(out)
        except ValueError as err:
            log(f"warning: {str(err).split('; rerun')[0]}; rewriting it (the runs are checked by their configs)")
        else:
            if {r["name"] for r in old["runs"]} != {r["name"] for r in manifest["runs"]} or old["base"] != manifest["base"]:
                raise ValueError(f"{out} holds another experiment (different arms, seeds or base); use another --out")
    for spec in specs:
        saved = out / "configs" / f"{spec.name}.yaml"
        if saved.is_file() and not _same_config(saved, spec.config):
            raise ValueError(f"{spec.name}: its config differs from this experiment's (changed base, overrides "
                             f"or arm keys); use another --out")
        run = out / "runs" / spec.name
        if run_state(run) in ("finished", "partial", "failed") and (run / "config.yaml").is_file():
            got, want = _flat(_config_dict(run / "config.yaml")), _flat(spec.config.to_dict())
            differ = trained_differently(got, want)
            if differ:
                k = differ[0]
                raise ValueError(f"{run}: trained with {k}={got.get(k)!r}, but this experiment gives run {spec.name} "
                                 f"{k}={want.get(k)!r}: a run directory from another arm or comparison; delete it "
                                 f"to train it again, or use another --out")


def _config_dict(path: Path) -> dict:
    """A saved run config as a dict, keys added to vitlab since it was written at their defaults
    (``with_defaults``); {} if unreadable (which then differs from any experiment's)."""
    from ..config import read_yaml, with_defaults

    try:
        return with_defaults(read_yaml(str(path)))
    except ValueError:
        return {}


def _same_config(saved: Path, cfg) -> bool:
    """``saved`` (a configs/NAME.yaml) is ``cfg``, compared as configs rather than as text: a key added
    to vitlab since it was written reads as its default (``with_defaults``), so an upgrade alone does
    not make a comparison's finished runs foreign to it."""
    return _config_dict(saved) == cfg.to_dict()


def _check_data(spec: RunSpec, launcher: str, log: Callable[[str], None]) -> None:
    """Look for the data once, before anything starts, rather than have every run (or job) fail on it:
    every run of a comparison reads the same data (``check_fairness`` keeps the split keys equal). A
    source that downloads (``download: true``) or generates its data is not looked for. Under Slurm
    a miss is a warning: the compute nodes may mount what this host does not."""
    from ..data.locate import PLACES, find_root

    data = spec.config.data
    if data.name not in PLACES or data.options.get("download"):
        return
    try:
        find_root(data.name, data.root)
    except FileNotFoundError as err:
        if launcher != "slurm":
            raise
        log(f"warning: {err} (from this host; the Slurm jobs look again where they run)")


def _prepare(exp: Experiment, out: Path, extra: Optional[List[str]], launcher: str,
             cluster: Optional["ClusterOptions"], wait: bool, log: Callable[[str], None],
             jobs: Optional[int] = None, procs: Optional[int] = None):
    """What every call checks before it writes anything: the launcher, every run's config, an earlier
    comparison in ``out``, the data. Returns (cluster options, run specs, manifest)."""
    cluster = check_launcher(launcher, cluster, wait, jobs=jobs, procs=procs)
    specs = exp.runs(extra)
    manifest = _manifest(exp, specs, extra)
    _check_same_experiment(out, specs, manifest, log)
    _check_data(specs[0], launcher, log)
    limits = sorted({s.config.train.time_limit_min for s in specs if s.config.train.time_limit_min})
    if limits:
        log(f"note: train.time_limit_min={', '.join(f'{x:g}' for x in limits)}: a run that reaches it stops before its "
            f"planned epochs (or fits its schedule to fewer, with train.time_limit_fit=true), and the report "
            f"then says the comparison is not at equal training "
            f"(train.time_limit_min=null turns the limit off)")
    return cluster, specs, manifest


def _action(name: str, state: str, in_flight: Dict[str, dict], retry_failed: bool) -> str:
    """What a call does with a run: ``run``, ``resume``, ``skip`` (finished; failed or diverged unless
    ``retry_failed``) or ``in flight`` (a job of an earlier call, still queued or running)."""
    if name in in_flight:
        return "in flight"
    if state == "finished" or (state in ("failed", "diverged") and not retry_failed):
        return "skip"
    return "resume" if state == "partial" else "run"


def plan_compare(exp: Experiment, out: Path, *, extra: Optional[List[str]] = None, retry_failed: bool = False,
                 launcher: str = "local", cluster: Optional["ClusterOptions"] = None, wait: bool = True,
                 log: Callable[[str], None] = print, jobs: Optional[int] = None,
                 procs: Optional[int] = None) -> List[dict]:
    """What :func:`run_compare` would do, checked as it checks (every run's config, the launcher, a
    comparison already in ``out``, the data) but without training, submitting or writing anything: one dict
    per run with its name, arm, grid point, seed, state (:func:`run_state`) and action (``run``,
    ``resume``, ``skip``; ``in flight`` for a job an earlier call submitted)."""
    out = Path(out)
    cluster, specs, _ = _prepare(exp, out, extra, launcher, cluster, wait, log, jobs, procs)
    _check_gpus_here(launcher, cluster, procs, specs)
    in_flight = _in_flight(out)
    plan = []
    for spec in specs:
        state = run_state(out / "runs" / spec.name)
        plan.append({"name": spec.name, "arm": spec.arm, "point": spec.point, "seed": spec.seed, "state": state,
                     "action": _action(spec.name, state, in_flight, retry_failed)})
    return plan


def run_compare(exp: Experiment, out: Path, *, extra: Optional[List[str]] = None, jobs: Optional[int] = 1,
                retry_failed: bool = False, log: Callable[[str], None] = print, launcher: str = "local",
                cluster: Optional["ClusterOptions"] = None, wait: bool = True,
                poll_s: Optional[float] = None, procs: Optional[int] = None) -> dict:
    """Run the experiment into ``out``; returns {name: state} after the runs (with ``wait=False``:
    right after submitting them).

    ``launcher``: ``local`` runs ``jobs`` ``vitlab train`` processes at a time here; ``slurm`` and
    ``submitit-local`` submit each run as a submitit job (see :func:`_run_jobs`), with the resources
    of ``cluster``. Whatever the launcher, a run is the same command (:func:`_command`), finished runs
    are skipped and partial ones resumed.

    ``procs``: processes per run (data-parallel under torchrun); default 1, or with a job launcher
    the run's GPUs (``cluster.gpus_per_run``). The local launcher gives each run it runs at once
    GPUs of its own (``CUDA_VISIBLE_DEVICES``, ``procs`` each) when this machine has several."""
    out = Path(out)
    # before anything is written
    cluster, specs, manifest = _prepare(exp, out, extra, launcher, cluster, wait, log, jobs, procs)
    _check_gpus_here(launcher, cluster, procs, specs)  # (plan_compare checks as much)
    # a second compare into one --out would resume or restart the runs this one is training
    with rundir.exclusive(out, "vitlab compare", "wait for it to end, or give another --out"):
        return _run_compare(exp, out, cluster, specs, manifest, extra, jobs, retry_failed, log, launcher, wait,
                            poll_s, procs)


def _run_compare(exp, out, cluster, specs, manifest, extra, jobs, retry_failed, log, launcher, wait, poll_s,
                 procs) -> dict:
    procs = procs or (cluster.gpus_per_run if launcher != "local" and (cluster.gpus_per_run or 0) > 1 else 1)
    rundir.make_dir(out / "runs")
    rundir.make_dir(out / "configs")
    rundir.write_json(out / "experiment.json", manifest)
    in_flight = _in_flight(out)  # runs an earlier call submitted that are still queued or running
    if in_flight and launcher == "local":
        ids = ", ".join(f"{n} ({r['launcher']} job {r['job_id']})" for n, r in sorted(in_flight.items()))
        raise ValueError(f"{len(in_flight)} run(s) of {out} are still queued or running as jobs: {ids}; wait for "
                         f"them (vitlab compare --launcher {next(iter(in_flight.values()))['launcher']} ...) or "
                         f"cancel them first")
    threads = run_threads(launcher, cluster, jobs, procs)
    todo = []
    for spec in specs:  # every run's config, the one `vitlab report` checks the run against
        run, cfg_file = out / "runs" / spec.name, out / "configs" / f"{spec.name}.yaml"
        launch = _action(spec.name, run_state(run), in_flight, retry_failed) in ("run", "resume")
        if launch or not cfg_file.is_file():  # a run launched now trains from this very file
            rundir.atomic_write_text(cfg_file, dump_yaml(spec.config))
        if launch:
            todo.append((spec, run, cfg_file))
    if launcher != "local":
        return _run_jobs(specs, todo, in_flight, out, launcher, cluster, jobs, threads, wait, log, poll_s, procs)
    jobs = jobs or 1
    groups = _gpu_groups(_visible_gpus(), procs)
    where = f"{jobs} at a time" + (f", {procs} processes each" if procs > 1 else "") + _gpu_note(groups, jobs)
    log(f"{len(specs)} runs: {len(specs) - len(todo)} already done, {len(todo)} to run ({where})")
    tally = _Tally(len(todo), log)
    free: "queue.Queue[str]" = queue.Queue()  # GPU groups not in use (a group repeats when runs must share)
    for i in range(max(jobs, len(groups)) if groups else 0):
        free.put(groups[i % len(groups)])

    children: Dict[int, subprocess.Popen] = {}  # the runs training now, which a stop must reach
    stopping = threading.Event()
    guard = threading.Lock()

    def one(item):
        spec, run, cfg_file = item
        t0 = time.time()
        # a run with an explicit train.device (cpu, cuda:N) keeps it; auto and cuda get a GPU group
        gpus = free.get() if groups and _on_gpus(spec) else None
        env = None if gpus is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
        try:
            with guard:
                if stopping.is_set():
                    return
                proc = subprocess.Popen(_command(spec, run, cfg_file, threads, procs), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
                children[proc.pid] = proc
            _, stderr = proc.communicate()
            with guard:
                children.pop(proc.pid, None)
        finally:
            if gpus is not None:
                free.put(gpus)
        if stopping.is_set() and proc.returncode != 0:
            return  # stopped with the comparison: its status says interrupted, the next call resumes it
        err = "" if proc.returncode == 0 else error_line(stderr.splitlines())
        tally.finished(spec.name, run, err, time.time() - t0)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        try:
            list(pool.map(one, todo))
        except (KeyboardInterrupt, rundir.Terminated):
            # a terminal's Ctrl-C reached the runs too, a SIGTERM (kill, a scheduler) only this process:
            # each run gets one, checkpoints at its next step and exits; none starts after
            with guard:
                stopping.set()
                running = list(children.values())
            for proc in running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            log(f"stopping: {len(running)} run(s) save a checkpoint; the same command again resumes them")
            for proc in running:
                proc.wait()
            raise
    return {s.name: run_state(out / "runs" / s.name) for s in specs}


def _on_gpus(spec: RunSpec) -> bool:
    """The run takes the GPUs a launcher gives it (``auto``, ``cuda``); an explicit ``cpu`` or ``cuda:N``
    keeps what it names."""
    return str(spec.config.train.device) in ("auto", "cuda")


def _check_gpus_here(launcher: str, cluster: "ClusterOptions", procs: Optional[int], specs: List[RunSpec]) -> None:
    """Before anything is written: a launcher that runs on this machine (local, submitit-local) cannot
    give a run more GPUs than this machine shows. Without GPUs, several processes per run train on
    the CPU (gloo); GPUs asked for by ``--gpus-per-run`` must be here."""
    if launcher == "slurm" or not any(_on_gpus(s) for s in specs):
        return
    asked = cluster.gpus_per_run if launcher == "submitit-local" else None
    need = asked if asked is not None else (procs or 1)
    if asked is None and need <= 1:
        return
    visible = _visible_gpus()
    if (visible or asked is not None) and need > len(visible):
        flag = "--gpus-per-run" if asked is not None else "--procs-per-run"
        raise ValueError(f"{flag} {need} but this machine shows {len(visible)} GPU(s) "
                         f"({','.join(visible) or 'none'}): each process of a run takes a GPU of its own")


def _gpu_note(groups: List[str], at_once: int, what: str = "run") -> str:
    """How the runs at once share this machine's GPU groups, for the first progress line."""
    if not groups:
        return ""
    return (f"; GPUs {' | '.join(groups)}, one group per {what}" if at_once <= len(groups) else
            f"; GPUs {' | '.join(groups)}, shared: more {what}s at a time than GPU groups")


def _visible_gpus() -> List[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    import torch

    n = torch.cuda.device_count()  # NVML's count: does not initialise CUDA in this process
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(n)]
    return [x.strip() for x in listed.split(",") if x.strip()][:n]


def _gpu_groups(gpus: List[str], procs: int) -> List[str]:
    """Disjoint groups of ``procs`` GPUs, as ``CUDA_VISIBLE_DEVICES`` values (none if fewer GPUs)."""
    return [",".join(gpus[i:i + procs]) for i in range(0, len(gpus) - procs + 1, procs)]


class _Tally:
    """Progress over the runs of one call: a line per finished run with elapsed time and ETA."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.done, self.start = total, log, 0, time.time()
        self.lock = threading.Lock()  # the local launcher reports from its worker threads

    def finished(self, name: str, run: Path, err: str, seconds: float) -> None:
        """``err``: empty when the run's command succeeded, else its last error line (the run is then
        marked failed unless it wrote its own status)."""
        with self.lock:
            self._finished(name, run, err, seconds)

    def _finished(self, name: str, run: Path, err: str, seconds: float) -> None:
        self.done += 1
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)  # elapsed already reflects --jobs
        head = f"[{self.done}/{self.total}] {name}"
        if not err and (run / "final.json").is_file():
            final = json.loads((run / "final.json").read_text())
            self.log(f"{head}: acc1 {final['acc1']:.4f} in {seconds:.0f}s "
                     f"(elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)")
            return
        err = err or "no final.json written"
        self.log(f"{head}: FAILED ({err})")
        if not (run / "status.json").is_file():
            rundir.make_dir(run)
            rundir.set_status(run, "failed", err)


# ---- cluster launchers: each run one submitit job -------------------------------------------------------------

LAUNCHERS = ("local", "slurm", "submitit-local")
#: where submitit keeps its job files (submission scripts, pickles, logs), under the comparison directory
JOB_DIR = "slurm"


@dataclass(frozen=True)
class ClusterOptions:
    """One run's job resources (``--launcher slurm`` / ``submitit-local``).

    ``gpus_per_run`` None: none on Slurm; under ``submitit-local`` one per process of the run, as the
    local launcher gives (jobs at once get GPUs of their own while there are enough).
    ``cpus_per_run`` also sets the run's torch threads.
    ``slurm_args``: further ``#SBATCH`` options (``{"account": "abc", "qos": "high"}``)."""

    partition: Optional[str] = None
    gpus_per_run: Optional[int] = None
    cpus_per_run: Optional[int] = None
    time_min: int = 24 * 60
    mem_gb: Optional[float] = None
    slurm_args: Dict[str, str] = field(default_factory=dict)


def check_launcher(launcher: str, cluster: Optional[ClusterOptions], wait: bool, jobs: Optional[int] = None,
                   procs: Optional[int] = None) -> ClusterOptions:
    """Validate the launcher and its options (``jobs``: runs at once, ``procs``: processes per run);
    one-line ValueErrors naming the value and the choices."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("launcher 'slurm' needs Slurm's sbatch, which is not on PATH here; valid launchers on this "
                         "machine: local, submitit-local")
    given = cluster if cluster is not None else ClusterOptions()
    if launcher == "local":
        if given != ClusterOptions():
            raise ValueError("--partition, --gpus-per-run, --cpus-per-run, --time-min, --mem-gb and --slurm-arg "
                             "apply to --launcher slurm or submitit-local, not local")
        if not wait:
            raise ValueError("--no-wait needs a job launcher (slurm or submitit-local); the local launcher runs "
                             "here and waits")
    if launcher == "submitit-local" and (given.partition or given.slurm_args):
        raise ValueError("--partition and --slurm-arg apply to --launcher slurm only")
    for name, value, low in (("jobs", jobs, 1), ("procs-per-run", procs, 1), ("gpus-per-run", given.gpus_per_run, 0),
                             ("cpus-per-run", given.cpus_per_run, 1), ("time-min", given.time_min, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name}={value}; must be >= {low}")
    if procs and procs > 1 and given.gpus_per_run and procs > given.gpus_per_run:
        raise ValueError(f"procs-per-run={procs} but gpus-per-run={given.gpus_per_run}: each process of a run "
                         f"takes a GPU of its own; give --procs-per-run {given.gpus_per_run} or leave it out")
    if given.mem_gb is not None and not 0 < given.mem_gb < math.inf:  # nan too
        raise ValueError(f"mem-gb={given.mem_gb}; must be a positive number of GB")
    return given


def _ignore_usr2() -> None:
    """In a job's run (and in torchrun's workers: an ignored signal stays ignored across exec): submitit
    asks Slurm to warn a job before its time limit with SIGUSR2 (``--signal=USR2@90``), which Slurm
    sends to every process of the job step. Its default action would kill the run at once, with up to
    ``train.checkpoint_every_min`` of work unsaved, before :meth:`RunJob.checkpoint` could stop it with
    SIGTERM, which saves a checkpoint at the next step."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RunJob(Checkpointable):
    """One run as a submitit job. It runs the command the local launcher runs (:func:`_command`),
    chosen when the job starts: a job requeued after a timeout or preemption resumes the run from
    its last checkpoint. Before requeueing, submitit calls :meth:`checkpoint`, which stops
    ``vitlab train`` with SIGTERM (it saves a checkpoint at the next step and exits).

    ``gpus``: the run's ``CUDA_VISIBLE_DEVICES`` (submitit-local, which picks them here); None keeps the
    job's own (Slurm sets it to the job's allocation)."""

    def __init__(self, spec: RunSpec, run: Path, cfg_file: Path, threads: int, procs: int = 1,
                 gpus: Optional[str] = None):
        self.spec, self.run, self.cfg_file, self.threads, self.procs = spec, Path(run), Path(cfg_file), threads, procs
        self.gpus = gpus
        self._proc: Optional[subprocess.Popen] = None

    def __call__(self) -> dict:
        cmd = _command(self.spec, self.run, self.cfg_file, self.threads, self.procs)
        print("vitlab job: " + " ".join(cmd), file=sys.stderr, flush=True)
        tail: collections.deque = collections.deque(maxlen=200)
        env = None if self.gpus is None else {**os.environ, "CUDA_VISIBLE_DEVICES": self.gpus}
        self._proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_ignore_usr2)
        for line in self._proc.stderr:  # the job's log keeps the run's messages; the last line is the error
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
        rc = self._proc.wait()
        sys.stderr.flush()
        return {"returncode": rc, "error": "" if rc == 0 else error_line(list(tail), f"exit status {rc}")}

    def checkpoint(self, *args, **kwargs):
        proc = self._proc
        if proc is not None and proc.poll() is None:
            print("vitlab job: stopping the run with SIGTERM before the job is requeued", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)  # Slurm signals 90 s before the limit (submitit's signal_delay_s)
            except subprocess.TimeoutExpired:
                pass
        return super().checkpoint(*args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None  # a process handle is not picklable (and belongs to this job only)
        return state


def _records_path(out: Path) -> Path:
    return Path(out) / JOB_DIR / "jobs.json"


def _read_records(out: Path) -> Dict[str, dict]:
    path = _records_path(out)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _pid_alive(pid: int) -> bool:
    """A submitit local job's controller process is still running (not exited, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"submitit" in cmdline


def _job_active(out: Path, record: dict) -> bool:
    """Whether a recorded job is still queued or running."""
    import submitit

    folder = Path(out) / JOB_DIR
    if record["launcher"] == "slurm":
        if shutil.which("sacct") is None:
            return False  # Slurm is not reachable from here: nothing can be known
        return not submitit.SlurmJob(folder=folder, job_id=str(record["job_id"])).done(force_check=True)
    return _pid_alive(int(record["job_id"]))


def _in_flight(out: Path) -> Dict[str, dict]:
    """{run name: job record} for the runs whose recorded job is still queued or running."""
    return {name: rec for name, rec in _read_records(out).items() if _job_active(out, rec)}


def _executor(out: Path, launcher: str, cluster: ClusterOptions, jobs: Optional[int]):
    import submitit

    ex = submitit.AutoExecutor(folder=Path(out) / JOB_DIR, cluster="slurm" if launcher == "slurm" else "local")
    # submitit's local executor would give every job GPUs 0..G-1, the same ones for jobs at once (and
    # indices that ignore this process's CUDA_VISIBLE_DEVICES); each RunJob gets its group from
    # _run_jobs instead, so the executor itself hands out none
    gpus = (cluster.gpus_per_run or 0) if launcher == "slurm" else 0
    params = {"name": f"vitlab-{Path(out).resolve().name}", "timeout_min": int(cluster.time_min), "nodes": 1,
              "tasks_per_node": 1, "gpus_per_node": int(gpus), "cpus_per_task": cluster.cpus_per_run,
              "mem_gb": cluster.mem_gb}
    if launcher == "slurm" and not gpus:  # a CPU job script, with no GPU line: "--gpus-per-node=0" names a
        del params["gpus_per_node"]       # GPU gres, which a cluster without GPUs may not define
    if launcher == "slurm":
        params.update(slurm_partition=cluster.partition, slurm_additional_parameters=dict(cluster.slurm_args) or None,
                      slurm_array_parallelism=jobs)
    ex.update_parameters(**params)
    return ex


def _run_jobs(specs: List[RunSpec], todo: list, in_flight: Dict[str, dict], out: Path, launcher: str,
              cluster: ClusterOptions, jobs: Optional[int], threads: int, wait: bool, log: Callable[[str], None],
              poll_s: Optional[float], procs: int = 1) -> dict:
    """Submit ``todo`` as submitit jobs (files under ``out/slurm/``); with ``wait``, also wait for them
    and for the still-running jobs of an earlier call (``in_flight``), with progress lines.

    Slurm: one job array, at most ``jobs`` tasks running at once when given; Slurm gives each its GPUs.
    submitit-local: at most ``jobs`` (default 1) at a time while waiting, with ``wait=False`` every job
    at once; each job gets the least used group of this machine's GPUs (``cluster.gpus_per_run``, by
    default ``procs``, per group), so jobs at once share none while there are groups enough."""
    import submitit

    out = Path(out)
    ex = _executor(out, launcher, cluster, jobs)
    records = _read_records(out)
    poll_s = poll_s if poll_s is not None else (30.0 if launcher == "slurm" else 1.0)
    cap = len(todo) if (launcher == "slurm" or not wait) else (jobs or 1)
    if launcher == "slurm":
        what = f"{len(todo)} to submit as one Slurm job array" + (f" (at most {jobs} running at once)" if jobs else "")
    else:
        what = f"{len(todo)} to run as submitit local jobs" + (f" ({cap} at a time)" if wait else " (all at once)")
    if procs > 1:
        what += f", each on {procs} processes (torchrun)"
    if launcher == "slurm" and not cluster.gpus_per_run:  # said, since on a GPU cluster it is a slip
        what += ", on CPUs (no GPU asked for: --gpus-per-run)"
    visible: List[str] = []
    groups: List[str] = []
    if launcher == "submitit-local":
        visible = _visible_gpus()
        per = cluster.gpus_per_run if cluster.gpus_per_run is not None else procs
        groups = _gpu_groups(visible, per) if per else []
        what += _gpu_note(groups, min(cap, len(todo) + len(in_flight)), "job")
    log(f"{len(specs)} runs: {len(specs) - len(todo) - len(in_flight)} already done, "
        + (f"{len(in_flight)} still running as jobs of an earlier call, " if in_flight else "")
        + f"{what}; job files in {out / JOB_DIR}")
    items = {spec.name: (spec, run, cfg_file) for spec, run, cfg_file in todo}
    queue = list(items)
    active: Dict[str, object] = {}  # name -> submitit job (None: a local job of an earlier call)
    gpu_of = {n: rec.get("gpus") for n, rec in in_flight.items()}  # submitit-local: each job's GPU group

    def gpus_for(name: str) -> Optional[str]:
        """The CUDA_VISIBLE_DEVICES of a submitit-local job: the group fewest active jobs hold."""
        if launcher != "submitit-local":
            return None
        if not (groups and _on_gpus(items[name][0])):
            return ",".join(visible)  # a CPU run, or one that names its GPU, keeps this machine's view
        held = collections.Counter(gpu_of.get(n) for n in active)
        return min(groups, key=lambda g: held[g])

    def submit(names: List[str]) -> None:
        if not names:
            return
        if launcher == "slurm":
            fns = [RunJob(items[n][0], items[n][1].resolve(), items[n][2].resolve(), threads, procs) for n in names]
            with ex.batch():  # one Slurm job array
                submitted = [ex.submit(fn) for fn in fns]
        else:
            submitted = []
            for n in names:  # one at a time: each job's GPU group depends on the jobs already started
                gpu_of[n] = gpus_for(n)
                submitted.append(ex.submit(RunJob(items[n][0], items[n][1].resolve(), items[n][2].resolve(),
                                                  threads, procs, gpu_of[n])))
                active[n] = submitted[-1]
        for n, job in zip(names, submitted):
            records[n] = {"launcher": launcher, "job_id": str(job.job_id), "submitted": time.time(),
                          **({"gpus": gpu_of[n]} if n in gpu_of else {})}
            active[n] = job
        rundir.write_json(_records_path(out), records)

    for name, rec in in_flight.items():
        active[name] = (submitit.SlurmJob(folder=out / JOB_DIR, job_id=str(rec["job_id"]))
                        if rec["launcher"] == "slurm" else None)
    submit(queue[:cap])
    queue = queue[cap:]
    if not wait:
        ids = sorted({str(records[n]["job_id"]).split("_")[0] for n in active})
        log(f"{len(todo)} job(s) submitted; job id(s) in flight: {', '.join(ids) or 'none'}. `vitlab report {out}` "
            f"once they finish, or the same `vitlab compare` command again to wait for them")
        return {s.name: run_state(out / "runs" / s.name) for s in specs}

    tally = _Tally(len(active) + len(queue), log)
    seen = ""
    try:
        while active or queue:
            for name, job in list(active.items()):
                done = (not _pid_alive(int(records[name]["job_id"]))) if job is None else job.done()
                if not done:
                    continue
                del active[name]
                err = ""
                if job is not None:
                    try:
                        result = job.result()
                        err = result["error"] if isinstance(result, dict) else ""
                    except Exception as e:  # cancelled, killed, out of memory, node failure ...
                        err = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                run = out / "runs" / name
                if err or run_state(run) != "finished":
                    err = err or (f"job {records[name]['job_id']} ended without finishing the run; its log is "
                                  f"in {out / JOB_DIR}")
                final = run / "final.json"
                seconds = json.loads(final.read_text()).get("seconds") if final.is_file() and not err else None
                tally.finished(name, run, err, seconds or 0.0)
            if queue and len(active) < cap:
                n = cap - len(active)
                submit(queue[:n])
                queue = queue[n:]
            states = collections.Counter(("running" if job is None else str(job.state).lower())
                                         for job in active.values())
            line = ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
            if active and line != seen:
                log(f"jobs: {line}; {tally.done}/{tally.total} done"
                    + (f", {len(queue)} not yet submitted" if queue else ""))
                seen = line
            if active or queue:
                time.sleep(poll_s)
    except (KeyboardInterrupt, rundir.Terminated):
        log(f"stopped waiting; submitted jobs keep running (job files in {out / JOB_DIR}); the same command again "
            f"waits for them, `vitlab report {out}` reports what has finished")
        raise
    return {s.name: run_state(out / "runs" / s.name) for s in specs}
