"""Data-parallel training under torchrun (2 CPU processes, gloo): the same run as one process with the
same global batch, only rank 0 writes, and a killed distributed run resumes exactly."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitlab.soak import differences, progress

CFG = ["data.name=synthetic", "data.options.num_classes=4", "data.options.img_size=16",
       "data.options.n_train=1024", "data.options.n_test=128", "model.patch_size=4", "model.dim=32",
       "model.depth=2", "model.heads=2", "data.hflip=false", "data.crop_pad=0", "train.batch_size=64",
       "train.epochs=2", "train.threads=1", "train.eval_batch_size=128", "train.precision=fp32"]
ENV = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def torchrun(out, *extra, resume=False, launch=("--standalone", "--nproc_per_node", "2"), entry=("-m", "vitlab")):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *entry, "train", "--quiet"]
    cmd += ["--resume", str(out)] if resume else ["fashion-mnist-quick", *CFG, *extra, "--out", str(out), "--force"]
    return cmd


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, children first read from /proc (Linux)."""
    def children(p):
        try:
            text = Path(f"/proc/{p}/task/{p}/children").read_text()
        except OSError:
            return []
        return [int(c) for c in text.split()]
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def mid_epoch_checkpoint(proc: subprocess.Popen, out: Path) -> str:
    """Wait until the running ``proc`` has saved a mid-epoch checkpoint in ``out``; its progress line
    ("" if the run ended first, which the caller's assertions then report)."""
    where = ""
    while proc.poll() is None:
        try:
            frac, where = progress(out)
        except Exception:  # noqa: BLE001 - not there yet, or being replaced; look again
            continue
        if "steps" in where and "+ 0 steps" not in where:
            break
        time.sleep(0.02)
    return where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    subprocess.run(torchrun(base / "two"), check=True, env=ENV, capture_output=True)
    subprocess.run([sys.executable, "-m", "vitlab", "train", "fashion-mnist-quick", *CFG, "--out",
                    str(base / "one"), "--quiet"], check=True, env=ENV, capture_output=True)
    return base


def assert_same_training(ref: Path, run: Path) -> None:
    """Same weights up to float summation order (the gradient all-reduce), same metrics and accuracies."""
    one = torch.load(ref / "checkpoints/last.pt", weights_only=True)["model"]
    two = torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, run))
    assert [m["epoch"] for m in m2] == [m["epoch"] for m in m1] == [1, 2]
    for a, b in zip(m1, m2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1e-9)
    f1, f2 = (json.loads((d / "final.json").read_text()) for d in (ref, run))
    assert f2["acc1"] == f1["acc1"] and f2["test_size"] == f1["test_size"] == 128
    assert f2["loss"] == pytest.approx(f1["loss"], rel=1e-4)


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    assert_same_training(runs / "one", runs / "two")
    f1, f2 = (json.loads((runs / d / "final.json").read_text()) for d in ("one", "two"))
    assert f2["world_size"] == 2 and f1["world_size"] == 1


def test_a_class_weighted_loss_on_two_processes_matches_one_process(tmp_path):
    """Imbalanced classes (600/250/120/54) and train.class_weighted: each process's slice holds another
    mix of classes, so the slices' own weighted means, averaged, were not the batch's weighted mean;
    every process now divides by the whole batch's weight sum."""
    import numpy as np

    from vitlab.data.synthetic import render

    gen = torch.Generator().manual_seed(0)
    train = torch.cat([torch.full((n,), k) for k, n in enumerate((600, 250, 120, 54))])
    train = train[torch.randperm(len(train), generator=gen)]
    test = torch.arange(128) % 4
    images = {part: render(labels, (16, 16), 1, 4, gen)[:, 0].numpy() for part, labels in (("train", train), ("test", test))}
    np.savez(tmp_path / "imbalanced.npz", train_images=images["train"], train_labels=train.numpy()[:, None],
             test_images=images["test"], test_labels=test.numpy()[:, None])
    cfg = [a for a in CFG if not a.startswith("data.")] + [
        "data.name=npz", f"data.root={tmp_path / 'imbalanced.npz'}", "data.hflip=false", "data.crop_pad=0",
        "train.class_weighted=true"]
    subprocess.run([sys.executable, "-m", "vitlab", "train", "fashion-mnist-quick", *cfg, "--out",
                    str(tmp_path / "one"), "--quiet"], check=True, env=ENV, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vitlab", "train", "--quiet", "fashion-mnist-quick", *cfg, "--out", str(tmp_path / "two")],
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_two_nodes_joined_by_a_c10d_rendezvous_train_the_same_run(runs, tmp_path):
    """Multi-node: two launchers (one process each, as on two machines) meet at a c10d rendezvous
    endpoint. Global ranks, not local ones (both are local rank 0), decide who writes and which
    slice each takes, so the run equals the single-node 2-process one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    launch = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "vitlab-test")
    nodes = [subprocess.Popen(torchrun(out, launch=launch), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert_same_training(runs / "two", out)
    assert json.loads((out / "final.json").read_text())["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one writer


def test_only_rank_zero_writes(runs):
    names = sorted(p.name for p in (runs / "two").iterdir())
    assert names == [".lock", "attention.npz", "checkpoints", "config.yaml", "env.json", "final.json", "metrics.jsonl",
                     "predictions.npz", "split.json", "status.json"]
    assert len((runs / "two/metrics.jsonl").read_text().splitlines()) == 2  # not one line per rank
    assert json.loads((runs / "two/env.json").read_text())["world_size"] == 2


def test_killed_distributed_run_resumes_exactly(runs, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(out, "train.checkpoint_every_min=0.0005"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    where = mid_epoch_checkpoint(proc, out)
    kill_tree(proc.pid)  # torchrun and both workers (which run in sessions of their own)
    proc.wait(timeout=60)
    time.sleep(0.5)  # let the kernel reap the workers before the resumed run starts
    assert proc.returncode == -signal.SIGKILL, "the run ended before a mid-epoch checkpoint was seen"
    res = subprocess.run(torchrun(out, resume=True), env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = runs / "two"
    # the checkpoint interval does not change the training, so the resumed run equals the reference
    assert differences(ref, out) == [], where


def test_sigterm_to_torchrun_checkpoints_and_resumes_exactly(runs, tmp_path):
    """What a Slurm job does to a data-parallel run before its time limit (the job launcher's
    requeue): SIGTERM to torchrun, which passes it to every rank; the ranks agree on the step to
    stop at, save one checkpoint, rank 0 alone marks the run interrupted, and it resumes exactly."""
    out = tmp_path / "termed"
    proc = subprocess.Popen(torchrun(out, "train.checkpoint_every_min=0.0005"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    mid_epoch_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0, "the run ended before it could be stopped"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["reason"].startswith("signal 15"), (status, err[-2000:])
    assert "vitlab: SIGTERM received: checkpoint saved" in err
    res = subprocess.run(torchrun(out, resume=True), env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("test acc1") == 1  # one summary line, from rank 0
    assert differences(runs / "two", out) == []


COUNTING = """
import atexit, os, sys
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

counts = {"reduce": 0, "step": 0}
init, step = DistributedDataParallel.__init__, torch.optim.AdamW.step

def counting_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    def hook(state, bucket):
        counts["reduce"] += 1
        return allreduce_hook(state, bucket)
    self.register_comm_hook(dist.group.WORLD, hook)

def counting_step(self, *args, **kwargs):
    counts["step"] += 1
    return step(self, *args, **kwargs)

DistributedDataParallel.__init__, torch.optim.AdamW.step = counting_init, counting_step
# one write() of a short line: atomic on a pipe, so the two ranks' lines never interleave (print writes twice)
atexit.register(lambda: os.write(2, f"rank {os.environ['RANK']}: {counts['reduce']} reduce {counts['step']} step\\n".encode()))
from vitlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_accumulated_steps_reduce_once_and_match_the_whole_batch(runs, tmp_path):
    """Two processes x two micro-batches of 16 equal one process taking the global batch of 64 at once:
    the loss is a mean over equal slices, and this recipe draws no augmentation. The gradients are
    all-reduced once per optimizer step (counted by a comm hook; this model's gradients fit one
    bucket): the first micro-batch's forward pass ran outside no_sync, and DDP, which decides in the
    forward pass, reduced every micro-batch."""
    out = tmp_path / "accum"
    (tmp_path / "counting.py").write_text(COUNTING)
    proc = subprocess.run(torchrun(out, "train.batch_size=32", "train.accum_steps=2",
                                   entry=(str(tmp_path / "counting.py"),)), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counted = sorted(line for line in proc.stderr.splitlines() if " reduce " in line)
    steps = 2 * 1024 * 9 // 10 // 64  # 2 epochs of the 90% training share, whole batches of 64
    assert counted == [f"rank {r}: {steps} reduce {steps} step" for r in (0, 1)], proc.stderr[-2000:]
    assert_same_training(runs / "one", out)


FITTING = """
import os, sys
import vitlab.train.loop as loop
fit = loop.fit_epochs

def printing_fit(*args):
    fitted = fit(*args)
    os.write(2, f"fit_epochs{args} = {fitted}\\n".encode())  # one write: the ranks' lines cannot interleave
    return fitted

loop.fit_epochs = printing_fit
from vitlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_every_rank_fits_the_same_schedule_to_the_time_limit(tmp_path):
    """train.time_limit_fit under torchrun: the ranks fit the schedule from the same numbers (each
    rank's own clock differs by a millisecond or so; a rank that fitted another epoch count would
    wait in an all-reduce the others never reach)."""
    (tmp_path / "fitting.py").write_text(FITTING)
    proc = subprocess.run(torchrun(tmp_path / "r", "train.time_limit_min=60", "train.time_limit_fit=true",
                                   entry=(str(tmp_path / "fitting.py"),)),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [line for line in proc.stderr.splitlines() if line.startswith("fit_epochs(")]
    assert len(calls) == 2 and calls[0] == calls[1], calls


def test_a_loss_past_the_divergence_limit_on_one_rank_stops_every_rank(tmp_path):
    """Near chance level the two ranks' slices give losses either side of a limit set there (found at
    step 2 on the machine this was written on). A rank that skipped its backward pass would leave the
    other waiting in the gradient all-reduce; both run it, then agree to stop as diverged."""
    proc = subprocess.run(torchrun(tmp_path / "r", "train.diverge_loss=1.39"), env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["status"] == "diverged" and status["reason"].startswith("diverged: loss"), proc.stderr[-2000:]
    assert proc.stderr.count(f"vitlab: error: run {tmp_path / 'r'} diverged") == 2  # both ranks, same decision
    assert "gloo" not in proc.stderr


def test_batch_not_divisible_by_world_is_refused(tmp_path):
    proc = subprocess.run(torchrun(tmp_path / "r", "train.batch_size=63"), env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "train.batch_size=63 must divide by the 2 processes" in proc.stderr


SHARED_PROBE = """
import os, sys
from pathlib import Path
from vitlab.train import distributed as d
info = d.from_env()
d.init(info, __import__("torch").device("cpu"))
run_dir = Path(sys.argv[1] if info.rank == 0 else sys.argv[2])  # rank 1's "node" mounts sys.argv[2] there
if info.rank == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
try:
    d.require_shared(info, run_dir, wait_s=0.5)
    said = "shared"
except RuntimeError as err:
    said = str(err)
Path(sys.argv[3], f"rank{info.rank}.txt").write_text(said)
d.shutdown(info)
"""


@pytest.mark.parametrize("case", ["shared", "elsewhere", "stale"])
def test_every_rank_must_see_the_run_directory(tmp_path, case):
    """On nodes without a shared file system, rank 1 would find no best checkpoint to evaluate at the
    end of training; the run stops at its start instead, on every rank, naming the blind ranks. A
    node whose local directory of that name holds an earlier run's check file ("stale") is as blind."""
    from vitlab.train.distributed import SHARED_MARKER

    mine, theirs = tmp_path / "run", tmp_path / ("run" if case == "shared" else "elsewhere")
    if case == "stale":
        theirs.mkdir()
        (theirs / SHARED_MARKER).write_text("written by an earlier run")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--no-python", sys.executable, "-c", SHARED_PROBE, str(mine), str(theirs), str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert not (mine / SHARED_MARKER).exists()  # rank 0 removes its check file, pass or fail
    if case == "shared":
        assert said == ["shared", "shared"]
    else:
        verb = "does not see" if case == "elsewhere" else "reads another file at"
        for text in said:  # both ranks raise, with the same message
            host = socket.gethostname()
            assert text == (f"rank 1 on {host} {verb} {theirs / SHARED_MARKER} (rank 0 on {host} wrote "
                            f"{mine / SHARED_MARKER}): the run directory must be on a file system every node "
                            f"shares")


def test_only_rank_zero_marks_a_stopped_run_failed(tmp_path, monkeypatch):
    from vitlab import rundir
    from vitlab.cli import _mark_stopped

    rundir.set_status(tmp_path, "running")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _mark_stopped(tmp_path, RuntimeError("rank 1 stopped"))
    assert rundir.read_json(tmp_path / "status.json")["status"] == "running"  # rank 0's to say
    monkeypatch.setenv("RANK", "0")
    _mark_stopped(tmp_path, RuntimeError("rank 0 stopped"))
    assert rundir.read_json(tmp_path / "status.json") | {"time": 0} == {"status": "failed", "reason": "rank 0 stopped",
                                                                          "time": 0}


def test_batch_norm_is_synchronised_across_gpus_and_flagged_on_cpu():
    import timm
    from vitlab import create_model
    from vitlab.train.distributed import DistInfo, sync_batchnorm

    two, cuda, cpu = DistInfo(rank=0, world=2), torch.device("cuda"), torch.device("cpu")
    for name in ("resnet18", "efficientnet_b0"):  # plain BatchNorm2d; timm's BatchNormAct2d
        net = timm.create_model(name, num_classes=3).eval()
        x = torch.randn(2, 3, 32, 32)
        params, keys, y = {id(p) for p in net.parameters()}, list(net.state_dict()), net(x)
        synced = sync_batchnorm(two, net, cuda)  # converting the modules needs no GPU
        assert not any(type(m) in (torch.nn.BatchNorm2d, timm.layers.BatchNormAct2d) for m in synced.modules())
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        assert {id(p) for p in synced.parameters()} == params and list(synced.state_dict()) == keys
        # in eval mode a synchronised norm is the plain one: same outputs (BatchNormAct keeps its activation)
        torch.testing.assert_close(synced(x), y)
    net = timm.create_model("resnet18", num_classes=3)
    assert sync_batchnorm(DistInfo(), net, cuda) is net  # one process: nothing to synchronise
    with pytest.warns(UserWarning, match="each normalises over its own slice"):
        assert sync_batchnorm(two, net, cpu) is net
    vit = create_model(img_size=16, patch_size=4, dim=32, depth=1, heads=2)
    assert sync_batchnorm(two, vit, cuda) is vit  # layer norms only


def _norm_stats_worker(rank, init_file, out):
    import torch.distributed as dist

    from vitlab.train.distributed import DistInfo, broadcast_norm_stats

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.LayerNorm(2))
    with torch.no_grad():
        net[1].running_mean.fill_(rank + 1.0)
        net[1].num_batches_tracked.fill_(10 * (rank + 1))
        net[2].weight.fill_(rank + 1.0)  # not a batch norm: left alone
    broadcast_norm_stats(DistInfo(rank=rank, world=2), net)
    torch.save({"mean": net[1].running_mean, "count": net[1].num_batches_tracked, "ln": net[2].weight},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ranks_evaluate_with_rank_zeros_batch_norm_statistics(tmp_path):
    """On CPU (no SyncBatchNorm) each rank's running statistics follow its own slices: before
    evaluating, every rank takes rank 0's, the ones its checkpoint holds."""
    import torch.multiprocessing as mp

    mp.spawn(_norm_stats_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for g in got:
        assert torch.equal(g["mean"], torch.ones(2)) and int(g["count"]) == 10
    assert torch.equal(got[1]["ln"], torch.full((2,), 2.0))
