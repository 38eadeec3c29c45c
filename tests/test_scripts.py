"""The helper scripts for machines other than this one: scripts/missing-deps.py (what an offline
machine's Python lacks), scripts/offline-wheels.sh (argument checks; downloading needs PyPI) and
scripts/gpu-bench.sh (dry-run on the CPU: every part it runs writes what it promises)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_missing_deps_lists_absent_and_too_old_requirements(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = [\n    "numpy>=1",\n    "no-such-package-vitlab>=1",\n'
                         '    "numpy>=999",\n    "pytest>=1; python_version < \'3\'",\n]\n'
                         '[project.optional-dependencies]\ndev = ["another-absent-package"]\n')
    run = lambda *extra: subprocess.run([sys.executable, str(ROOT / "scripts/missing-deps.py"), "--pyproject",
                                         str(pyproject), *extra], capture_output=True, text=True, check=True)
    assert run().stdout.splitlines() == ["no-such-package-vitlab>=1", "numpy>=999"]
    assert run("--extras", "dev").stdout.splitlines()[-1] == "another-absent-package"
    assert len(run("--all").stdout.splitlines()) == 4  # every requirement, met or not (markers kept)
    # this Python has everything vitlab asks for (the test suite installed it)
    assert subprocess.run([sys.executable, str(ROOT / "scripts/missing-deps.py"), "--extras", "dev"],
                          capture_output=True, text=True, check=True).stdout == ""


def test_offline_wheels_checks_its_arguments(tmp_path):
    for argv, word in (([], "usage"), ([str(tmp_path / "w"), "3.x"], "3.x is not like 3.12")):
        r = subprocess.run(["bash", str(ROOT / "scripts/offline-wheels.sh"), *argv], capture_output=True, text=True)
        assert r.returncode == 2 and word in r.stderr and not (tmp_path / "w").exists()


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "STEPS": "1", "WARMUP": "0", "CIFAR_BATCH": "2",
           "VARIANTS": "none,pope", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu-bench.sh"), str(tmp_path), "cifar-fp32", "train"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    bench = json.loads((tmp_path / "cifar-fp32.json").read_text())
    assert bench["shape"] == "string-cifar" and bench["dtype"] == "float32" and bench["batch"] == 2
    assert [row["attention"] for row in bench["rows"]] == ["flash (cpu)", "written out"]
    assert (tmp_path / "cifar-fp32.md").read_text().startswith("| variant | attention |")
    final = json.loads((tmp_path / "train.json").read_text())
    assert final["acc1"] > 0.2 and final["status"] == "finished" and final["precision"] == "bf16" and "== train: done" in r.stderr

    # a second go into the same OUTDIR (after a fix, say) re-runs the training run rather than refusing;
    # env says whether torch.compile can build kernels before tiny-compile spends minutes finding out
    again = subprocess.run(["bash", str(ROOT / "scripts/gpu-bench.sh"), str(tmp_path), "env", "train"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "== train: done" in again.stderr, again.stderr[-2000:]
    info = (tmp_path / "env.txt").read_text()
    assert "torch.compile on cpu: ok" in info and "Python.h" in info and "torch" in info

    bad = subprocess.run(["bash", str(ROOT / "scripts/gpu-bench.sh"), str(tmp_path), "cifar-fp16"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown part 'cifar-fp16'" in bad.stderr


def test_gpu_bench_reports_a_failed_part(tmp_path):
    """A part that fails (here: no such device) is named, the other parts still run, the exit status is 1."""
    env = {**os.environ, "DEVICE": "cuda:99", "STEPS": "1", "WARMUP": "0", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu-bench.sh"), str(tmp_path), "cifar-fp32", "env"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "== cifar-fp32: FAILED" in r.stderr and "failed parts: cifar-fp32" in r.stderr
    assert "== env: done" in r.stderr and "torch" in (tmp_path / "env.txt").read_text()
    assert not (tmp_path / "cifar-fp32.json").exists()
