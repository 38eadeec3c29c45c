"""Comparisons: a tiny two-arm, two-seed experiment end to end; resume skips finished runs; the
statistics against scipy's own; bad experiments are one-line errors."""
import json

import numpy as np
import pytest
from scipy import stats

from vitlab.cli import main
from vitlab.compare import load_experiment, run_compare
from vitlab.compare.stats import mean_ci, paired_test, summarize

EXP = """
description: two arms on synthetic bars
base: fashion-mnist-quick
overrides:
  data.name: synthetic
  data.options: {num_classes: 4, img_size: 16, n_train: 256, n_test: 96}
  data.hflip: false
  model.patch_size: 4
  model.dim: 32
  model.depth: 1
  model.heads: 2
  train.epochs: 2
  train.batch_size: 32
  train.precision: fp32
arms:
  none: {model.qk_pe: none}
  rope_axial: {model.qk_pe: rope_axial}
seeds: 2
baseline: none
"""


def test_two_arm_two_seed_comparison_end_to_end_and_resume(tmp_path, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP)
    out = tmp_path / "cmp"
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 0
    assert "4/4 runs finished" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| rank | arm |" in report and "rope_axial" in report and "baseline" in report
    for fig in ("learning_curves", "accuracy_vs_time", "confusion"):
        assert f"figures/{fig}.png" in report and (out / "figures" / f"{fig}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and page.count("<table>") == 2 and "<td>rope_axial</td>" in page
    finals = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/final.json")}
    assert set(finals) == {"none-s0", "none-s1", "rope_axial-s0", "rope_axial-s1"}
    splits = {(out / "runs" / n / "split.json").read_text() for n in finals}
    assert len(splits) == 1  # every arm and seed on the same split
    # resumed: nothing runs again, numbers unchanged
    mtimes = {n: (out / "runs" / n / "final.json").stat().st_mtime for n in finals}
    states = run_compare(load_experiment(str(exp_file)), out, log=lambda m: None)
    assert set(states.values()) == {"finished"}
    assert mtimes == {n: (out / "runs" / n / "final.json").stat().st_mtime for n in finals}
    # a deleted run is redone; the same seed gives the same numbers
    import shutil
    shutil.rmtree(out / "runs" / "rope_axial-s1")
    run_compare(load_experiment(str(exp_file)), out, log=lambda m: None)
    again = json.loads((out / "runs" / "rope_axial-s1" / "final.json").read_text())
    assert again["acc1"] == finals["rope_axial-s1"]["acc1"]
    # another experiment in the same directory is refused
    exp_file.write_text(EXP.replace("seeds: 2", "seeds: 3"))
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 2
    assert "holds another experiment" in capsys.readouterr().err


def test_failed_runs_are_listed_not_dropped(tmp_path):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP.replace("rope_axial: {model.qk_pe: rope_axial}",
                                    "rope_axial: {model.qk_pe: rope_axial}\n  diverges: {train.lr: 1.0e+30, train.clip_grad: null, train.warmup_epochs: 0}"))
    out = tmp_path / "cmp"
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 1
    report = (out / "report.md").read_text()
    assert "## Runs not finished" in report and "diverges-s0 | diverged" in report and "diverged" in report


def test_statistics_against_scipy():
    x = [0.81, 0.84, 0.80, 0.86]
    r = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert r["mean"] == pytest.approx(np.mean(x)) and r["std"] == pytest.approx(np.std(x, ddof=1))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    a, b = {0: 0.90, 1: 0.91, 2: 0.93}, {0: 0.85, 1: 0.88, 2: 0.86}
    t = paired_test(a, b)
    assert t["p"] == pytest.approx(stats.ttest_rel([0.90, 0.91, 0.93], [0.85, 0.88, 0.86]).pvalue)
    assert t["verdict"] == ("better" if t["p"] < 0.05 else "tie")
    close = paired_test({0: 0.9644, 1: 0.9650}, {0: 0.9645, 1: 0.9640})  # the MRI study's fourth decimal
    assert close["verdict"] == "tie"
    rows = summarize({"base": b, "arm": a}, "base")
    assert [r["group"] for r in rows] == ["arm", "base"] and rows[1]["verdict"] == "baseline"


@pytest.mark.parametrize("text,words", [
    ("base: fashion-mnist-quick\n", ["needs 'base' and 'arms'"]),
    ("base: fashion-mnist-quick\narms: {a: {model.qk_pe: ropee}}\n", ["arm 'a'", "ropee"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\nseeds: 0\n", ["seeds"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\nbaseline: b\n", ["baseline 'b'"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\ncolour: 1\n", ["colour"]),
    ("base: fashion-mnist-quick\narms: {a: {qk_pe: pope}}\n", ["must be dotted"]),
])
def test_bad_experiments(tmp_path, text, words, capsys):
    f = tmp_path / "e.yaml"
    f.write_text(text)
    assert main(["compare", str(f), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for w in words:
        assert w in err, (w, err)


def test_default_study_expands_to_eight_arms_three_seeds():
    exp = load_experiment(None)
    runs = exp.runs()
    assert len(runs) == 24 and exp.baseline == "none"
    assert {r.config.model.get("qk_pe") for r in runs} == {"none", "rope_axial", "rope_mixed", "string_cayley", "pope"}
    assert len({r.config.data.split_seed for r in runs}) == 1
