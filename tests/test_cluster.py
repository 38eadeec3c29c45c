"""Comparisons through submitit: every run one job (submitit's local executor here; Slurm's sbatch
faked to check the job array it is given); finished runs skipped, partial runs resumed, as locally."""
import json
import os
import stat

import pytest

from test_compare import EXP
from vitlab.cli import main
from vitlab.compare import load_experiment, run_compare
from vitlab.compare import runner
from vitlab.compare.runner import ClusterOptions, plan_compare

ONE_SEED = EXP.replace("seeds: 2", "seeds: 1")  # two arms x one seed: two jobs


def test_submitit_local_jobs_finish_then_skip_then_resume(tmp_path, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    out = tmp_path / "cmp"
    assert main(["compare", str(exp_file), "--out", str(out), "--launcher", "submitit-local", "--jobs", "2",
                 "--time-min", "20"]) == 0
    captured = capsys.readouterr()
    assert "2/2 runs finished" in captured.out and (out / "report.md").is_file()
    assert "2 to run as submitit local jobs (2 at a time)" in captured.err and "[2/2]" in captured.err
    records = json.loads((out / "slurm" / "jobs.json").read_text())
    assert set(records) == {"none-s0", "rope_axial-s0"} and {r["launcher"] for r in records.values()} == {"submitit-local"}
    for name, rec in records.items():  # each job ran the local launcher's command, and logged it
        log = (out / "slurm" / f"{rec['job_id']}_0_log.err").read_text()
        assert f"-m vitlab train --quiet {(out / 'configs' / name).resolve()}.yaml --out {(out / 'runs' / name).resolve()}" in log
    finals = {n: (out / "runs" / n / "final.json").stat().st_mtime for n in records}

    # a second call submits nothing: both runs are finished
    lines = []
    states = run_compare(load_experiment(str(exp_file)), out, launcher="submitit-local", log=lines.append)
    assert set(states.values()) == {"finished"} and "0 to run" in lines[0]
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == records
    assert finals == {n: (out / "runs" / n / "final.json").stat().st_mtime for n in records}

    # a partial run (a checkpoint, no final.json) is resumed by its job, not restarted
    run = out / "runs" / "rope_axial-s0"
    acc = json.loads((run / "final.json").read_text())["acc1"]
    (run / "final.json").unlink()
    (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
    states = run_compare(load_experiment(str(exp_file)), out, launcher="submitit-local",
                         cluster=ClusterOptions(time_min=20), log=lines.append)
    assert set(states.values()) == {"finished"}
    rec = json.loads((out / "slurm" / "jobs.json").read_text())["rope_axial-s0"]
    assert rec["job_id"] != records["rope_axial-s0"]["job_id"]
    assert f"--resume {run.resolve()}" in (out / "slurm" / f"{rec['job_id']}_0_log.err").read_text()
    assert json.loads((run / "final.json").read_text())["acc1"] == acc


def test_no_wait_then_a_later_call_waits_for_the_same_jobs(tmp_path, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    out = tmp_path / "cmp"
    assert main(["compare", str(exp_file), "--out", str(out), "--launcher", "submitit-local", "--no-wait"]) == 0
    assert "jobs submitted" in capsys.readouterr().out and not (out / "report.md").exists()
    records = json.loads((out / "slurm" / "jobs.json").read_text())
    assert len(records) == 2
    # the jobs are still starting (a Python + torch import at least): the local launcher must not run them too
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 2
    assert "still queued or running as jobs" in capsys.readouterr().err
    # a submitit call attaches to them instead of submitting again, and reports when they are done
    assert main(["compare", str(exp_file), "--out", str(out), "--launcher", "submitit-local"]) == 0
    captured = capsys.readouterr()
    assert "2 still running as jobs of an earlier call, 0 to run" in captured.err and "2/2 runs finished" in captured.out
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == records


FAKE_SBATCH = """#!/bin/sh
cp "$1" "{dest}"
echo "Submitted batch job 4242"
"""


def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun on PATH that record the batch script and answer with job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(dest=tmp_path / "submitted.sh")), ("srun", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_job_array_and_no_wait(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path, monkeypatch)
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    out = tmp_path / "cmp"
    assert main(["compare", str(exp_file), "--out", str(out), "--launcher", "slurm", "--no-wait", "--jobs", "1",
                 "--partition", "gpu", "--gpus-per-run", "1", "--cpus-per-run", "4", "--time-min", "90",
                 "--mem-gb", "16", "--slurm-arg", "account=lab"]) == 0
    captured = capsys.readouterr()
    assert "vitlab report" in captured.out and "on CPUs" not in captured.err
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=4", "--time=90", "--mem=16GB",
                 "--account=lab", "--array=0-1%1", f"--output={(out / 'slurm').resolve()}"):
        assert f"#SBATCH {line}" in script, line
    records = json.loads((out / "slurm" / "jobs.json").read_text())
    assert {r["job_id"] for r in records.values()} == {"4242_0", "4242_1"}
    assert not (out / "runs" / "none-s0" / "final.json").exists()  # nothing ran here
    # without --gpus-per-run the jobs ask Slurm for no GPU: said, as on a GPU cluster it is a slip
    assert main(["compare", str(exp_file), "--out", str(tmp_path / "cpu"), "--launcher", "slurm", "--no-wait"]) == 0
    assert "#SBATCH --gpus-per-node" not in (tmp_path / "submitted.sh").read_text()
    assert "on CPUs (no GPU asked for: --gpus-per-run)" in capsys.readouterr().err


def test_data_not_found_stops_a_local_comparison_but_only_warns_before_slurm_jobs(tmp_path, monkeypatch, capsys):
    """Every run reads the same data, so it is looked for once before anything starts; compute nodes
    may mount what the submitting host does not, so under Slurm a miss only warns."""
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED.replace("data.name: synthetic", f"data.name: mnist\n  data.root: {tmp_path}/nodata")
                        .replace("data.options: {num_classes: 4, img_size: 16, n_train: 256, n_test: 96}", "data.options: {}"))
    for argv in ([], ["--dry-run"], ["--launcher", "submitit-local"]):
        assert main(["compare", str(exp_file), "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "dataset 'mnist' not found" in err and f"{tmp_path}/nodata" in err
        assert not (tmp_path / "o").exists()
    fake_slurm(tmp_path, monkeypatch)
    assert main(["compare", str(exp_file), "--out", str(tmp_path / "o"), "--launcher", "slurm", "--no-wait"]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset 'mnist' not found" in err and "the Slurm jobs look again where they run" in err
    assert (tmp_path / "submitted.sh").is_file()


@pytest.mark.parametrize("argv,words", [
    (["--launcher", "kubernetes"], ["'kubernetes'", "local, slurm, submitit-local"]),
    (["--launcher", "local", "--partition", "gpu"], ["--partition", "slurm or submitit-local"]),
    (["--no-wait"], ["--no-wait", "slurm or submitit-local"]),
    (["--launcher", "submitit-local", "--slurm-arg", "account=x"], ["--slurm-arg", "slurm only"]),
    (["--launcher", "submitit-local", "--cpus-per-run", "0"], ["cpus-per-run=0"]),
    (["--procs-per-run", "0"], ["procs-per-run=0", ">= 1"]),
    # ranks 2 and 3 would look for GPUs the job does not have
    (["--launcher", "submitit-local", "--gpus-per-run", "2", "--procs-per-run", "4"],
     ["procs-per-run=4", "gpus-per-run=2", "a GPU of its own"]),
])
def test_bad_launcher_options_are_one_line_errors(tmp_path, argv, words, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    assert main(["compare", str(exp_file), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_slurm_without_sbatch_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    assert main(["compare", str(exp_file), "--out", str(tmp_path / "o"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sbatch" in err and "local, submitit-local" in err


def test_gpu_groups():
    assert runner._gpu_groups(["0", "1", "2"], 1) == ["0", "1", "2"]
    assert runner._gpu_groups(["0", "1", "2"], 2) == ["0,1"]  # the odd GPU out stays unused
    assert runner._gpu_groups(["GPU-a", "GPU-b"], 2) == ["GPU-a,GPU-b"]
    assert runner._gpu_groups(["0"], 2) == [] and runner._gpu_groups([], 1) == []


def test_local_runs_at_once_get_gpus_of_their_own_and_train_data_parallel(tmp_path, monkeypatch):
    """Four GPUs, two runs at once, two processes per run: each run trains under torchrun with its own
    pair of GPUs (here CPU-only: the runs record the CUDA_VISIBLE_DEVICES they were given)."""
    monkeypatch.setattr(runner, "_visible_gpus", lambda: ["0", "1", "2", "3"])
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    out, lines = tmp_path / "cmp", []
    states = run_compare(load_experiment(str(exp_file)), out, jobs=2, procs=2, log=lines.append)
    assert set(states.values()) == {"finished"}, lines
    assert "(2 at a time, 2 processes each; GPUs 0,1 | 2,3, one group per run)" in lines[0]
    runs = [out / "runs" / n for n in ("none-s0", "rope_axial-s0")]
    assert sorted(json.loads((r / "env.json").read_text())["cuda_visible_devices"] for r in runs) == ["0,1", "2,3"]
    assert [json.loads((r / "final.json").read_text())["world_size"] for r in runs] == [2, 2]


def test_submitit_local_jobs_at_once_get_gpus_of_their_own(tmp_path, monkeypatch):
    """submitit's local executor gave every job GPUs 0..G-1, the same ones for jobs at once; each job
    now gets a group no other running job holds (here CPU-only: the runs record what they were given)."""
    monkeypatch.setattr(runner, "_visible_gpus", lambda: ["0", "1", "2", "3"])
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    out, lines = tmp_path / "cmp", []
    states = run_compare(load_experiment(str(exp_file)), out, jobs=2, launcher="submitit-local",
                         cluster=ClusterOptions(gpus_per_run=1, time_min=20), log=lines.append)
    assert set(states.values()) == {"finished"}, lines
    assert "(2 at a time); GPUs 0 | 1 | 2 | 3, one group per job" in lines[0]
    records = json.loads((out / "slurm" / "jobs.json").read_text())
    seen = {n: json.loads((out / "runs" / n / "env.json").read_text())["cuda_visible_devices"] for n in records}
    assert sorted(seen.values()) == ["0", "1"] and seen == {n: r["gpus"] for n, r in records.items()}


@pytest.mark.parametrize("visible", [["0"], []])
def test_more_gpus_per_job_than_this_machine_shows_is_refused(tmp_path, monkeypatch, visible):
    monkeypatch.setattr(runner, "_visible_gpus", lambda: visible)
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    for call in (run_compare, plan_compare):  # --dry-run checks it too
        with pytest.raises(ValueError, match=f"--gpus-per-run 2 but this machine shows {len(visible)} GPU"):
            call(load_experiment(str(exp_file)), tmp_path / "o", launcher="submitit-local",
                 cluster=ClusterOptions(gpus_per_run=2), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_job_launcher_runs_data_parallel_under_torchrun(tmp_path, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP.replace("seeds: 2", "seeds: 1").replace("  rope_axial: {model.qk_pe: rope_axial}\n", ""))
    out = tmp_path / "cmp"
    assert main(["compare", str(exp_file), "--out", str(out), "--launcher", "submitit-local",
                 "--procs-per-run", "2", "--cpus-per-run", "2"]) == 0
    assert "each on 2 processes (torchrun)" in capsys.readouterr().err
    rec = json.loads((out / "slurm" / "jobs.json").read_text())["none-s0"]
    log = (out / "slurm" / f"{rec['job_id']}_0_log.err").read_text()
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m vitlab train --quiet" in log
    assert "train.threads=1" in log  # the job's 2 CPUs shared by its 2 processes
    assert json.loads((out / "runs" / "none-s0" / "final.json").read_text())["world_size"] == 2


def test_more_processes_per_run_than_gpus_here_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_visible_gpus", lambda: ["0"])
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    with pytest.raises(ValueError, match="--procs-per-run 2 but this machine shows 1 GPU"):
        run_compare(load_experiment(str(exp_file)), tmp_path / "o", procs=2, log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_a_second_comparison_into_the_same_out_is_refused(tmp_path):
    """Two calls into one --out trained the same runs at once (the second resumed what the first was
    training): the second is refused while the first holds OUT/.lock."""
    import fcntl

    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    out = tmp_path / "cmp"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # what a running `vitlab compare` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 123 on somehost\n")
        held.flush()
        with pytest.raises(ValueError, match=r"another vitlab compare \(pid 123 on somehost\) is running in"):
            run_compare(load_experiment(str(exp_file)), out, log=lambda m: None)
        assert not (out / "runs").exists()


def test_the_error_shown_for_a_failed_run_is_vitlabs_not_torchruns_banner():
    torchrun_tail = ["vitlab: error: train.batch_size=31 must divide by the 2 processes", "Traceback (most recent",
                     "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "=" * 40,
                     "Root Cause (first observed failure):", "  exitcode  : 2", "=" * 40]
    assert runner.error_line(torchrun_tail) == "vitlab: error: train.batch_size=31 must divide by the 2 processes"
    assert runner.error_line(["Killed", "=" * 10]) == "Killed"
    assert runner.error_line(["", "  "], "exit status 9") == "exit status 9"


def test_a_failed_run_retried_resumes_from_its_checkpoint(tmp_path):
    """--retry-failed restarted a failed run with --force, throwing away the epochs in its last.pt
    (a run fails mid-training when, say, a process of it is lost); a diverged one starts afresh."""
    spec = load_experiment(str(_write(tmp_path, ONE_SEED))).runs()[0]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for state, has_ckpt, resumes in (("failed", True, True), ("failed", False, False), ("diverged", True, False)):
        (run / "status.json").write_text(json.dumps({"status": state}))
        ckpt = run / "checkpoints" / "last.pt"
        ckpt.write_bytes(b"x") if has_ckpt else ckpt.unlink(missing_ok=True)
        cmd = runner._command(spec, run, tmp_path / "cfg.yaml", 0)
        assert ("--resume" in cmd) == resumes and ("--force" in cmd) != resumes, (state, has_ckpt, cmd)


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_a_jobs_run_outlives_slurms_time_limit_warning_and_saves_a_checkpoint_when_stopped(tmp_path):
    """Slurm sends submitit's time-limit warning (SIGUSR2) to every process of the job step, the run's
    too, whose default action for it is to die at once with its last minutes unsaved. The run ignores
    it; the job's checkpoint() then stops it with SIGTERM, and it saves a checkpoint to resume from."""
    import signal
    import threading
    import time

    from vitlab.config import dump_yaml, load_config
    from vitlab.compare.runner import RunJob, run_state

    cfg = load_config("fashion-mnist-quick", [
        "data.name=synthetic", "data.options.num_classes=4", "data.options.img_size=16", "data.options.n_train=512",
        "model.patch_size=4", "model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=32",
        "train.epochs=200"])
    cfg_file, run = tmp_path / "run.yaml", tmp_path / "run"
    cfg_file.write_text(dump_yaml(cfg))
    job = RunJob(None, run, cfg_file, threads=1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(job()))
    thread.start()
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert time.time() < deadline and thread.is_alive(), "the run did not finish an epoch"
            time.sleep(0.1)
        os.kill(job._proc.pid, signal.SIGUSR2)
        time.sleep(1.0)
        assert job._proc.poll() is None, "SIGUSR2 killed the run"
        job.checkpoint()
    finally:  # the run stops at its next step; a test that failed before stops it here
        thread.join(timeout=90)
        if thread.is_alive():
            job._proc.kill()
            thread.join()
    assert result["returncode"] == 128 + signal.SIGTERM, result
    assert run_state(run) == "partial" and json.loads((run / "status.json").read_text())["status"] == "interrupted"


def test_threads_per_run_count_the_cpus_this_process_may_use(monkeypatch):
    """Inside a Slurm allocation, a container's cpuset or taskset, os.cpu_count() still counts the whole
    machine's CPUs: two runs at once each took half the machine's threads on a quarter of its CPUs."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert runner.usable_cpus() == 4
    local = ClusterOptions()
    assert runner.run_threads("local", local, jobs=2, procs=1) == 2
    assert runner.run_threads("local", local, jobs=1, procs=1) == 0  # one run: torch's own default
    assert runner.run_threads("local", local, jobs=8, procs=1) == 1
    assert runner.run_threads("slurm", ClusterOptions(cpus_per_run=16), jobs=8, procs=2) == 8  # the job's own
