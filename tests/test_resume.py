"""Crash safety: SIGKILL at random moments + resume == never stopped (bit for bit); SIGTERM/SIGINT
save a checkpoint and exit; unsafe or truncated checkpoints are refused; divergence is marked."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from vitlab.cli import main
from vitlab.soak import differences, killed_run, progress, run_to_end, startup_seconds, train_command
from vitlab.train.loop import read_metrics

SMALL = ["data.name=synthetic", "data.options.num_classes=4", "data.options.img_size=16",
         "data.options.n_train=2048", "data.options.n_test=128", "model.patch_size=4", "model.dim=48",
         "model.depth=2", "model.heads=2", "model.qk_pe=rope_mixed", "model.token_pe=learned",
         "data.hflip=true", "data.crop_pad=2", "data.mixup=0.2", "data.random_erasing=0.25", "model.drop_path=0.1",
         "train.batch_size=32", "train.epochs=3", "train.ema=0.9", "train.threads=1",
         "train.checkpoint_every_min=0.001", "train.eval_batch_size=128"]
ENV = {**os.environ, "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    wall = run_to_end(out, "fashion-mnist-quick", SMALL, ENV)
    return out, wall


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference, tmp_path):
    ref, wall = reference
    out = tmp_path / "killed"
    log = []
    kills = killed_run(out, "fashion-mnist-quick", SMALL, 3, wall, startup_seconds(ENV), seed=1, env=ENV,
                       log=log.append)
    assert kills == 3, log
    assert differences(ref, out) == [], log


def test_sigkill_right_after_a_mid_epoch_checkpoint_resumes_exactly(reference, tmp_path):
    """Deterministic coverage of the mid-epoch case: kill as soon as a checkpoint holds a partial epoch."""
    ref, _ = reference
    out = tmp_path / "mid"
    proc = subprocess.Popen(train_command(out, "fashion-mnist-quick", SMALL), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    where = ""
    while proc.poll() is None:
        try:
            frac, where = progress(out)
        except Exception:  # noqa: BLE001 - the checkpoint is being replaced; look again
            continue
        if "+ 0 steps" not in where and "steps" in where and frac > 0.3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before a mid-epoch checkpoint was seen"
    assert not (out / "final.json").exists()
    # the same checkpoint as an older vitlab wrote it, without the gradient-norm sums: it resumes too
    old = tmp_path / "old"
    shutil.copytree(out, old)
    state = torch.load(old / "checkpoints" / "last.pt", weights_only=True)
    for key in ("grad_norm", "steps"):
        del state["partial"]["sums"][key]
    torch.save(state, old / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0, where
    assert differences(ref, out) == [], where
    assert main(["train", "--resume", str(old), "--quiet"]) == 0, where
    assert differences(ref, old) == ["metrics.jsonl"], where  # that epoch's grad_norm: its later steps only


def test_sigterm_saves_a_checkpoint_and_resume_matches(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "term"
    proc = subprocess.Popen(train_command(out, "fashion-mnist-quick", SMALL), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "checkpoints" / "last.pt").is_file():  # wait until training is under way
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the signal came during the final evaluation, which completes
        pytest.skip("run finished before SIGTERM landed")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"
    assert not (out / "final.json").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert differences(ref, out) == []


def test_interrupted_run_is_resumed_by_compare_runner(tmp_path):
    from vitlab.compare.runner import run_state
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    (tmp_path / "status.json").write_text(json.dumps({"status": "interrupted", "reason": "signal 15"}))
    assert run_state(tmp_path) == "partial"
    (tmp_path / "status.json").write_text(json.dumps({"status": "diverged", "reason": "loss nan"}))
    assert run_state(tmp_path) == "diverged"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["train", "fashion-mnist-quick", *SMALL, "train.epochs=1", "data.options.n_train=256",
                 "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    good = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    torch.save({**good, "evil": Payload()}, run / "checkpoints" / "best.pt")
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to load" in err and "execute code" in err
    # a truncated checkpoint: a clear message, for eval and for resume (of a run not finished)
    (run / "final.json").unlink()
    (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
    data = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 2])
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupt" in err


def test_torn_metrics_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_acc": 0.6}\n{"epoch": 3, "va')
    assert [m["epoch"] for m in read_metrics(path)] == [1, 2]
    assert [m["epoch"] for m in read_metrics(path, epochs=1)] == [1]


def with_patched_loss(tmp_path, capsys, monkeypatch, change, *extra):
    """Train 3 epochs with the training loss of the n-th call replaced by ``change(n, loss)``; returns
    (exit code, stderr, run directory)."""
    import vitlab.train.loop as loop

    calls, real = [], loop.train_loss

    def patched(*args):
        calls.append(1)
        return change(len(calls), real(*args))

    monkeypatch.setattr(loop, "train_loss", patched)
    run = tmp_path / "run"
    code = main(["train", "fashion-mnist-quick", *SMALL, "train.epochs=3", "data.options.n_train=256", *extra,
                 "--out", str(run), "--quiet"])
    return code, capsys.readouterr().err, run


def test_divergence_after_good_epochs_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """The loss turns NaN in epoch 2 (patched loss function): the run stops as diverged, the last good
    checkpoint (end of epoch 1) is kept, final.json evaluates the best epoch and says diverged."""
    code, err, run = with_patched_loss(  # 7 steps an epoch (230 images): NaN in epoch 2
        tmp_path, capsys, monkeypatch, lambda n, loss: loss * float("nan") if n > 10 else loss,
        "train.checkpoint_every_min=0")
    assert code == 2 and "diverged: loss not finite at epoch 2 step" in err and err.count("\n") == 1, err
    status = json.loads((run / "status.json").read_text())
    final = json.loads((run / "final.json").read_text())
    assert status["status"] == "diverged" and final["status"] == "diverged" and final["best_epoch"] == 1
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["run"]["epoch"] == 1 and state["partial"] is None
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1]


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_step(tmp_path, capsys, monkeypatch):
    """Step 4 of epoch 2 has a finite loss but a NaN gradient. The optimizer step would write NaN into
    every weight and the next step's loss would say so, one step late and blaming the wrong one: the
    gradient's norm is checked before the step, and the weights of the last good epoch are kept."""
    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    code, err, run = with_patched_loss(  # 7 steps an epoch: call 11 is epoch 2 step 4
        tmp_path, capsys, monkeypatch, lambda n, loss: NanGradient.apply(loss) if n == 11 else loss,
        "train.clip_grad=null")
    assert code == 2 and "diverged: gradient not finite at epoch 2 step 4" in err and err.count("\n") == 1, err
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "diverged" and final["best_epoch"] == 1 and 0 <= final["acc1"] <= 1
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_weights_broken_by_an_epochs_last_steps_count_as_divergence(tmp_path, capsys, monkeypatch):
    """The batch losses of epoch 2 were finite but its last step left the weights NaN: validation's
    logits are not finite. That stopped the run as failed with scikit-learn's "Input contains NaN"
    and no final.json; it is a divergence, and the best epoch is evaluated as for a diverged loss."""
    import vitlab.train.loop as loop
    calls = {"n": 0}
    real = loop.predict

    def broken_after_epoch_1(*args, **kwargs):
        calls["n"] += 1
        logits = real(*args, **kwargs)
        return logits * float("nan") if calls["n"] == 2 else logits  # epoch 2's validation

    monkeypatch.setattr(loop, "predict", broken_after_epoch_1)
    run = tmp_path / "run"
    code = main(["train", "fashion-mnist-quick", *SMALL, "train.epochs=3", "data.options.n_train=256",
                 "--out", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "diverged: validation logits not finite after epoch 2" in err and err.count("\n") == 1, err
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "diverged" and final["best_epoch"] == 1 and 0 <= final["acc1"] <= 1
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1]


def test_exploding_loss_counts_as_divergence(tmp_path):
    """A finite loss above train.diverge_loss stops the run too (here the bound is below chance level,
    so the first step trips it and nothing can be evaluated)."""
    from vitlab.config import load_config
    from vitlab.train import train_run
    from vitlab.train.loop import Diverged
    with pytest.raises(Diverged, match=r"loss .* > 0.5 at epoch 1 step 1; no epoch finished"):
        train_run(load_config("fashion-mnist-quick", SMALL + ["train.diverge_loss=0.5", "train.epochs=1"]),
                  tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r/status.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "r/final.json").exists()


def test_a_repeated_sigterm_still_saves_but_a_second_ctrl_c_stops_at_once():
    """Slurm signals every process of a job, and torchrun forwards its own SIGTERM too: a worker got
    two and died without its checkpoint (the second fell through to the default handler)."""
    import os
    import time

    from vitlab.train.loop import SignalGuard

    before = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job, nohup,
    # starts with SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with SignalGuard() as guard:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            assert guard.signum == signal.SIGTERM  # still alive: the loop saves and exits
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after a signal: at once
                time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_atomic_write_flushes_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """The rename that publishes a checkpoint is itself made durable (the folder is fsynced after it)."""
    import os
    import stat

    from vitlab import rundir

    synced = []
    real = os.fsync
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    rundir.atomic_write_text(tmp_path / "status.json", "{}")
    assert synced == [False, True] and (tmp_path / "status.json").read_text() == "{}"


def test_a_run_being_trained_is_not_trained_again_alongside(tmp_path, capsys):
    """`--resume` of a run still going (or `--force` over it) started a second trainer on the same
    directory: both finished, leaving 57 interleaved lines in a 30-epoch run's metrics.jsonl. The
    running trainer holds RUN/.lock; the second is refused in one line and marks nothing failed."""
    import fcntl

    from vitlab import rundir
    from vitlab.config import dump_yaml, load_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(load_config("fashion-mnist-quick", [])))
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    rundir.set_status(run, "running")
    with open(run / ".lock", "a+") as held:  # what the running `vitlab train` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 123 on somehost\n")
        held.flush()
        for argv in (["train", "--resume", str(run)], ["train", "fashion-mnist-quick", "--out", str(run), "--force"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err == (f"vitlab: error: another vitlab train (pid 123 on somehost) is running in {run}; wait for "
                           f"it to end (or stop it), or give another --out\n")
            assert rundir.read_json(run / "status.json")["status"] == "running"
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"a checkpoint"


def test_sigterm_during_the_final_evaluation_marks_the_run_interrupted_and_resume_evaluates(
        tmp_path, capsys, monkeypatch):
    """Outside the training steps (loading data, the final evaluation) SIGTERM killed the process where it
    stood and status.json kept saying running; now the run is marked interrupted, the command exits 143
    naming --resume, and the resume evaluates what the last checkpoint holds."""
    import vitlab.train.loop as loop

    real, calls = loop.evaluate_run, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_run", signalled)
    run = tmp_path / "run"
    assert main(["train", "fashion-mnist-quick", *SMALL, "train.epochs=1", "data.options.n_train=256",
                 "--out", str(run), "--quiet"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SIGTERM" in err and f"--resume {run}" in err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and "outside the training steps" in status["reason"]
    assert not (run / "final.json").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert json.loads((run / "final.json").read_text())["epochs"] == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the command's handler is gone again


def test_resume_of_a_run_still_loading_its_data_names_the_process(tmp_path, capsys):
    """Before its first checkpoint a run still holds its lock: --resume names that process instead of
    saying there is no checkpoint to resume from."""
    from vitlab import rundir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: {name: synthetic}\n")
    with rundir.exclusive(run, "vitlab train", "wait"):
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another vitlab train (pid" in err
    assert main(["train", "--resume", str(run), "--quiet"]) == 2  # not running: no checkpoint, said so
    assert "no checkpoints/last.pt" in capsys.readouterr().err
