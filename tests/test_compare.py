"""Comparisons: a tiny two-arm, two-seed experiment end to end; resume skips finished runs; the
statistics against scipy's own; bad experiments are one-line errors."""
import json
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import browser
from vitlab.cli import main
from vitlab.compare import load_experiment, run_compare
from vitlab.compare.report import ranking_table
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
    printed = capsys.readouterr().out
    assert "4/4 runs finished" in printed
    report = (out / "report.md").read_text()
    table = [line for line in printed.splitlines() if line.startswith("|")]  # the ranking, in the terminal too
    assert len(table) == 4 and "\n".join(table) in report and table[0].startswith("| rank | arm |")
    assert "| rank | arm |" in report and "rope_axial" in report and "baseline" in report
    assert "| p | p adj. | verdict |" in report and "The p-values of the 1 test are adjusted for their number by Holm's" in report
    figs = ("learning_curves", "accuracy_vs_time", "confusion", "roc", "resolution", "attention")
    for fig in figs:
        assert f"figures/{fig}.png" in report and (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert "sweeps.png" not in report  # no numeric option varies in this experiment
    assert "## Per-class AUROC" in report and "| 8 px | 12 px | 16 px (trained) | 20 px | 24 px |" in report
    page = (out / "report.html").read_text()
    assert "## Arms" in report and "| none (baseline) | `model.qk_pe=none` |" in report
    assert "Not the PE or the kernel alone" not in report and "Not an equal-training" not in report
    assert "| arm | params | MFLOPs / image | epochs |" in report and "CPU threads" not in report
    assert page.count("data:image/png;base64,") == len(figs) and page.count("<table>") == 5
    assert "<td class='t'>rope_axial</td>" in page
    if browser.CHROMIUM:  # CI installs Debian's chromium (scripts/system-data.sh)
        seen = browser.rendered(out / "report.html", tmp_path)
        assert len(seen["imgs"]) == len(figs) and all(i and i[0] > 300 and i[1] > 200 for i in seen["imgs"])
        assert seen["tables"][0] == [3, 9] and len(seen["tables"]) == 5  # ranking: header + 2 arms, 9 columns
        assert seen["h2"][0] == "Ranking (test accuracy (top-1))" and "ROC curves" in " ".join(seen["h2"])
        from PIL import Image
        shot = Image.open(browser.screenshot(out / "report.html", tmp_path / "shot.png", tmp_path)).convert("RGB")
        colours = len(np.unique(np.asarray(shot.resize((300, 600))).reshape(-1, 3), axis=0))
        assert shot.size == (1200, 2400) and colours > 200  # text, tables and plots, not a blank page
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


def test_report_says_what_makes_arms_unequal():
    """The report names each arm's settings, arms that change the backbone as well as the PE, runs cut
    short by the time limit (a slower arm trains less), mixed CPU thread counts, and each arm's own
    training size in the resolution table."""
    from vitlab.compare.report import arms_lines, cut_short_lines, resolution_table, threads_lines

    def run(arm, seed, epochs=6, reason="", threads=1, size=16):
        return {"name": f"{arm}-s{seed}", "arm": arm, "point": {}, "seed": seed,
                "config": {"train": {"epochs": 6, "threads": threads}},
                "final": {"epochs": epochs, "reason": reason, "model": {"img_size": [size, size]},
                          "resolution_images": 8,
                          "resolution": [{"img_size": [h, h], "acc1": 0.5} for h in (8, 16, 32)]}}

    even = [run("none", 0), run("pope_diff", 0)]
    assert cut_short_lines(even) == [] and threads_lines(even) == []
    cut = [run("none", 0), run("pope_diff", 0, 4, "time limit of 0.05 min reached in epoch 5", threads=2)]
    text = " ".join(cut_short_lines(cut))
    assert "Not an equal-training comparison" in text and "pope_diff-s0 (4/6 epochs)" in text and "none-s0" not in text
    fitted = run("none", 1, 3, "schedule fitted to the time limit: 3 of 6 epochs (an epoch trains in 2.0 s)")
    fitted["final"]["planned_epochs"] = 6
    text = " ".join(cut_short_lines([*cut, fitted]))
    assert "of 3 finished runs, 1 stopped at the time limit" in text and "pope_diff-s0 (4/6 epochs)" in text
    assert "1 fitted their schedule to the time limit" in text and "none-s1 (3/6 epochs)" in text
    assert "none-s0" not in text
    assert "different numbers of CPU threads (1, 2" in " ".join(threads_lines(cut))
    from vitlab.compare.report import world_lines
    assert world_lines(even) == []  # final.json without world_size: one process
    two = run("pope_diff", 0)
    two["final"]["world_size"] = 2
    text = " ".join(world_lines([run("none", 0), two]))
    assert "different numbers of data-parallel processes (1 process: none-s0; 2 processes: pope_diff-s0)" in text
    manifest = {"baseline": "none", "arms": {"none": {"model.qk_pe": "none"},
                                             "pope_diff": {"model.qk_pe": "pope", "model.attn": "differential",
                                                           "model.qk_pe_kwargs.theta": 50, "model.dim": 64}}}
    arms = "\n".join(arms_lines(manifest))
    assert "| none (baseline) | `model.qk_pe=none` |" in arms and "`model.dim=64`" in arms
    assert "pope_diff also sets `model.dim`." in arms  # the PE/kernel keys and their options are not flagged
    plain = {"arms": {"a": {"model.qk_pe": "pope", "model.qk_pe_kwargs.theta": 50}, "b": {"model.attn": "eager",
                                                                                          "model.attn_kwargs.check": True}},
             "baseline": "a"}
    assert "Not the PE" not in "\n".join(arms_lines(plain))
    same = "\n".join(resolution_table({"finished": even}, ["none", "pope_diff"]))
    assert "Trained at 16 px" in same and "16 px (trained)" in same and "*" not in same
    mixed = "\n".join(resolution_table({"finished": [run("none", 0), run("big", 0, size=32)]}, ["none", "big"]))
    assert "none 16 px, big 32 px" in mixed and "(trained)" not in mixed
    assert "| none | 0.5000 | 0.5000 * | 0.5000 |" in mixed and "| big | 0.5000 | 0.5000 | 0.5000 * |" in mixed


def test_failed_runs_are_listed_not_dropped(tmp_path):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP.replace("rope_axial: {model.qk_pe: rope_axial}",
                                    "rope_axial: {model.qk_pe: rope_axial}\n  diverges: {train.lr: 1.0e+30, train.clip_grad: null, train.warmup_epochs: 0}")
                        + "arm_recipe_keys: [train.lr, train.clip_grad, train.warmup_epochs]\n")
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


def test_equal_paired_differences_floor_the_std_at_one_test_image():
    """Accuracies are whole numbers of test images: an arm exactly one image behind on every seed has
    no spread in its differences, t is infinite and scipy's p is 0. With the metric's step known
    (1/test images) the std is floored at the smallest one whole images allow, so more consistent
    evidence never gets a larger p: +3,+3,+3 images beats +2,+2,+3, which beats +1,+1,+0, and
    +1,+1,+1 is a tie. Where the differences vary, the floor never binds (scipy's ttest_rel)."""
    step = 1 / 256
    base = {0: 124 / 256, 1: 152 / 256, 2: 151 / 256}
    ahead = {k: (lambda inc: paired_test({s: v + i * step for (s, v), i in zip(base.items(), inc)}, base, step))(k)
             for k in [(3, 3, 3), (2, 2, 3), (2, 2, 2), (1, 1, 1), (1, 1, 0)]}
    ps = [ahead[k]["p"] for k in [(3, 3, 3), (2, 2, 3), (2, 2, 2), (1, 1, 1), (1, 1, 0)]]
    assert ps == sorted(ps) and len(set(ps)) == 5
    assert ahead[(3, 3, 3)]["test"] == "t, std floored" and ahead[(3, 3, 3)]["verdict"] == "better"
    assert ahead[(1, 1, 1)]["verdict"] == "tie"
    # floored std = step/sqrt(3): t = mean / (std/sqrt(3)) = 3 * mean / step
    assert ahead[(1, 1, 1)]["p"] == pytest.approx(2 * stats.t.sf(3.0, 2))
    varied = [v + i * step for v, i in zip(base.values(), (2, 2, 3))]
    assert ahead[(2, 2, 3)]["test"] == "t"
    assert ahead[(2, 2, 3)]["p"] == pytest.approx(stats.ttest_rel(varied, list(base.values())).pvalue, rel=1e-12)
    behind = {s: v - step for s, v in base.items()}
    with warnings.catch_warnings():  # scipy warns of the degenerate case, then says p = 0
        warnings.simplefilter("ignore")
        assert stats.ttest_rel(list(behind.values()), list(base.values())).pvalue == 0
    t = paired_test(behind, base, step)
    assert t["verdict"] == "tie" and t["diff"] == pytest.approx(-step)
    f32 = {s: float(np.float32(v)) for s, v in behind.items()}  # as final.json stored them before float64
    assert paired_test(f32, {s: float(np.float32(v)) for s, v in base.items()}, step)["p"] == pytest.approx(t["p"])
    noise = paired_test({s: v + 1e-7 for s, v in base.items()}, base, step)  # rounding, not a difference
    assert noise["p"] == 1.0 and noise["verdict"] == "tie"
    assert paired_test({0: 0.9, 1: 0.8}, {0: 0.85})["verdict"] == "untested"  # one pair: nothing to test
    rows = summarize({"base": base, "behind": behind, "one": {0: 0.99}}, "base", resolution=step)
    text = "\n".join(ranking_table(rows, "acc1"))
    assert "(std floored)" in text and "untested (1 seed paired with the baseline's)" in text
    flat = {0: 0.5, 1: 0.5}
    assert "n/a (all seeds equal)" in "\n".join(ranking_table(summarize({"a": flat, "b": {0: 0.4, 1: 0.6}}, "b"),
                                                               "acc1"))


def test_equal_differences_of_a_metric_without_a_step_use_the_exact_sign_test():
    """AUROC moves in uneven steps: equal paired differences get the exact sign test, p = 2/2^n."""
    base = {s: 0.9 + 0.01 * s for s in range(6)}
    t3 = paired_test({s: base[s] + 0.002 for s in range(3)}, base)
    assert t3["test"] == "sign" and t3["p"] == pytest.approx(0.25) and t3["verdict"] == "tie"
    t6 = paired_test({s: v + 0.002 for s, v in base.items()}, base)
    assert t6["p"] == pytest.approx(2 / 2**6) and t6["verdict"] == "better"
    assert "0.25 (sign test)" in "\n".join(ranking_table(summarize({"b": base, "a": {s: base[s] + 0.002 for s in
                                                                                           range(3)}}, "b"), "auroc"))


def test_the_report_takes_the_accuracy_step_from_its_runs_test_size():
    from vitlab.compare.report import metric_step, ranking_rows

    runs = [{"arm": arm, "seed": s, "point": {}, "final": {"test_size": 256, "acc1": (150 + s + 3 * (arm == "a")) / 256,
                                                           "auroc_macro": 0.9 + 0.01 * s + 0.002 * (arm == "a")}}
            for arm in ("base", "a") for s in range(3)]
    assert metric_step(runs, "acc1") == 1 / 256 and metric_step(runs, "auroc_macro") is None
    row = next(r for r in ranking_rows({"baseline": "base", "metric": "acc1"}, runs) if r["group"] == "a")
    assert row["test"] == "t, std floored" and row["p"] == pytest.approx(2 * stats.t.sf(9.0, 2))
    row = next(r for r in ranking_rows({"baseline": "base", "metric": "auroc_macro"}, runs) if r["group"] == "a")
    assert row["test"] == "sign"
    runs[0]["final"]["test_size"] = 255  # runs on test sets of other sizes: no one step
    assert metric_step(runs, "acc1") is None


def test_a_difference_over_fewer_seeds_than_the_means_says_so():
    """Δ and p pair seeds; the means are over all of each arm's seeds. Where a seed is missing on one
    side (a failed run), the table says how many seeds Δ pairs: 0.7800 - 0.8100 is not its +0.0100."""
    rows = summarize({"base": {0: 0.80, 1: 0.82}, "arm": {0: 0.81, 1: 0.83, 2: 0.70}}, "base")
    text = "\n".join(ranking_table(rows, "acc1"))
    assert "| +0.0100 (2 paired seeds) |" in text
    rows = summarize({"base": {0: 0.80, 1: 0.82}, "arm": {0: 0.81, 1: 0.84}}, "base")
    assert "| +0.0150 |" in "\n".join(ranking_table(rows, "acc1"))


def test_accuracy_is_an_exact_fraction():
    from vitlab.eval.metrics import classification_metrics

    labels = torch.arange(40) % 4
    logits = torch.nn.functional.one_hot(labels, 4).float()
    logits[:13] = torch.nn.functional.one_hot((labels[:13] + 1) % 4, 4).float()  # 13 wrong: 27/40 right
    assert classification_metrics(logits, labels, 4)["acc1"] == 27 / 40 == 0.675


def test_verdicts_use_p_values_adjusted_for_the_number_of_arms():
    """Seven arms, each a little better than the baseline on every seed: alone, each paired test says
    p < 0.05; adjusted for seven comparisons (Holm, the default), most of them are ties."""
    from statsmodels.stats.multitest import multipletests

    from vitlab.compare.stats import adjust_p

    base = {0: 0.80, 1: 0.82, 2: 0.81}
    noise = [(0.004, -0.003, 0.0), (0.003, 0.0, -0.004), (-0.002, 0.004, 0.0), (0.0, -0.003, 0.004),
             (0.002, 0.002, -0.004), (-0.004, 0.0, 0.003), (0.001, -0.004, 0.002)]
    groups = {"base": base, **{f"a{i}": {s: base[s] + 0.01 + 0.001 * i + e for s, e in enumerate(n)}
                               for i, n in enumerate(noise)}}
    raw = summarize(groups, "base", correction="none")
    tested = [r for r in raw if r["verdict"] != "baseline"]
    assert all(r["p"] < 0.05 and r["verdict"] == "better" and r["p_adj"] == r["p"] for r in tested)
    rows = summarize(groups, "base")  # holm
    by = {r["group"]: r for r in rows}
    reject, expected, _, _ = multipletests([by[f"a{i}"]["p"] for i in range(7)], alpha=0.05, method="holm")
    assert [by[f"a{i}"]["p_adj"] for i in range(7)] == pytest.approx(list(expected))
    assert [by[f"a{i}"]["verdict"] == "better" for i in range(7)] == list(reject)
    assert sum(reject) < 7 and all(by[f"a{i}"]["p_adj"] >= by[f"a{i}"]["p"] for i in range(7))
    assert by["base"]["verdict"] == "baseline" and by["base"]["p_adj"] is None
    bh = {r["group"]: r for r in summarize(groups, "base", correction="fdr_bh")}
    assert all(bh[g]["p_adj"] <= by[g]["p_adj"] + 1e-12 for g in bh if g != "base")  # BH is never stricter
    one = summarize({"base": base, "a0": groups["a0"]}, "base")  # one comparison: nothing to adjust
    assert one[0]["p_adj"] == pytest.approx(one[0]["p"])
    with pytest.raises(ValueError, match="correction 'sidak'.*holm"):
        adjust_p(rows, "sidak")


def test_dry_run_lists_every_run_and_what_would_happen_without_writing(tmp_path, capsys, monkeypatch):
    from vitlab.compare.runner import plan_compare

    out = tmp_path / "o"
    assert main(["compare", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "24 runs = 8 arms x 1 grid point x 3 seeds; baseline none, metric acc1, correction holm" in text
    assert text.endswith("dry run, nothing trained or written: 24 to run\n") and len(text.splitlines()) == 26
    assert "rope_mixed+learned-s2" in text and "model.qk_pe=rope_mixed model.token_pe=learned" in text
    assert not out.exists()
    # an earlier, unfinished comparison in out: finished runs skipped, a killed one resumed, a failed one
    # skipped unless --retry-failed
    for name, files in {"none-s0": {"status.json": '{"status": "finished"}', "final.json": "{}"},
                        "none-s1": {"checkpoints/last.pt": ""}, "none-s2": {"status.json": '{"status": "failed"}'}}.items():
        for f, text in files.items():
            (out / "runs" / name / f).parent.mkdir(parents=True, exist_ok=True)
            (out / "runs" / name / f).write_text(text)
    before = sorted(p for p in out.rglob("*"))
    exp = load_experiment(None)
    for retry, failed_action in ((False, "skip"), (True, "run")):
        plan = {r["name"]: (r["action"], r["state"]) for r in plan_compare(exp, out, retry_failed=retry)}
        assert plan["none-s0"] == ("skip", "finished") and plan["none-s1"] == ("resume", "partial")
        assert plan["none-s2"] == (failed_action, "failed") and plan["pope-s0"] == ("run", "new")
    assert main(["compare", "--dry-run", "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith("nothing trained or written: 2 to skip, 1 to resume, 21 to run\n")
    assert sorted(p for p in out.rglob("*")) == before  # nothing written
    assert "time_limit_min" not in text  # the default study trains every arm its full epochs
    assert main(["compare", "default", "train.time_limit_min=2", "--dry-run", "--out", str(tmp_path / "o2")]) == 0
    said = capsys.readouterr()
    assert "note: train.time_limit_min=2: a run that reaches it stops before its planned epochs" in said.out + said.err
    monkeypatch.setattr("shutil.which", lambda name: None)  # no sbatch: the launcher is checked too
    assert main(["compare", "--dry-run", "--out", str(out), "--launcher", "slurm"]) == 2
    assert "sbatch" in capsys.readouterr().err


@pytest.mark.parametrize("text,words", [
    ("base: fashion-mnist-quick\n", ["needs 'base' and 'arms'"]),
    ("base: fashion-mnist-quick\narms: {a: {model.qk_pe: ropee}}\n", ["arm 'a'", "ropee"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\nseeds: 0\n", ["seeds"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\nbaseline: b\n", ["baseline 'b'"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\ncolour: 1\n", ["colour"]),
    ("base: fashion-mnist-quick\narms: {a: {qk_pe: pope}}\n", ["must be dotted"]),
    # unfair: arms that differ in the recipe or the split, a split key on the grid
    ("base: fashion-mnist-quick\narms: {a: {}, b: {train.lr: 0.1}}\n", ["arm 'b' sets train.lr", "arm_recipe_keys"]),
    ("base: fashion-mnist-quick\narms: {a: {}, b: {data.limit: 100}}\n", ["arm 'b' sets data.limit", "split"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\ngrid: {data.val_fraction: [0.1, 0.2]}\n", ["data.val_fraction", "split"]),
    ("base: fashion-mnist-quick\narms: {a: {}, b: {data.split: pooled}}\n", ["data.split", "split"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\nmetric: f1\n", ["metric 'f1'", "auroc_macro"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\nseeds: [1, 1]\n", ["distinct"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\ncorrection: sidak\n", ["correction 'sidak'", "holm", "fdr_bh"]),
    # a data source or option no run could load: one error, not one failed run (or cluster job) per arm x seed
    ("base: fashion-mnist-quick\noverrides: {data.name: fashion_mnist}\narms: {a: {}, b: {}}\n",
     ["'fashion_mnist'", "fashion-mnist"]),
    ("base: fashion-mnist-quick\noverrides: {data.options.colour: 1}\narms: {a: {}}\n", ["'colour'", "download"]),
    # a grid key an arm sets would override the arm in every run, under the arm's label
    ("base: fashion-mnist-quick\narms: {a: {model.qk_pe: none}, b: {model.qk_pe: rope_axial}}\n"
     "grid: {model.qk_pe: [pope]}\n", ["grid key model.qk_pe is also set by arm(s) a, b"]),
    ("base: fashion-mnist-quick\narms: {a: {model.qk_pe: string_cayley},\n"
     "       b: {model.qk_pe: string_cayley, model.qk_pe_kwargs: {sparsity: 0.5}}}\n"
     "grid: {model.qk_pe_kwargs.sparsity: [0.1, 0.2]}\n",
     ["grid key model.qk_pe_kwargs.sparsity is also set by arm(s) b"]),
    # keys that are not text (YAML reads 1, 0.5, 5 as numbers)
    ("base: fashion-mnist-quick\narms: {1: {}, b: {}}\n", ["arm name 1 must be text (quote it: '1')"]),
    ("base: fashion-mnist-quick\narms: {0.5: {}}\n", ["arm name 0.5 must be text"]),
    ("base: fashion-mnist-quick\n3: x\ncolour: 1\narms: {a: {}}\n", ["unknown experiment key(s) [3, 'colour']"]),
    ("base: fashion-mnist-quick\narms: {a: {5: 1}}\n", ["arm 'a': experiment key 5 must be text"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\ngrid: {5: [1, 2]}\n", ["grid: experiment key 5 must be text"]),
    ("base: fashion-mnist-quick\noverrides: {5: 1}\narms: {a: {}}\n", ["overrides: experiment key 5 must be text"]),
    # arm names and grid values name folders: none may leave the comparison directory
    ("base: fashion-mnist-quick\narms: {a: {}, ../../escape: {}}\n", ["arm name '../../escape'", "folder name"]),
    ("base: fashion-mnist-quick\narms: {a: {}, /tmp/escape: {}}\n", ["arm name '/tmp/escape'"]),
    ("base: fashion-mnist-quick\narms: {a: {}, '..': {}}\n", ["arm name '..'"]),
    ("base: fashion-mnist-quick\narms: {a: {}, 'b\\c': {}}\n", ["arm name 'b\\\\c'"]),
    ("base: fashion-mnist-quick\narms: {a: {}, '': {}}\n", ["arm name ''"]),
    ("base: fashion-mnist-quick\narms: {a: {}}\ngrid: {train.lr: [0.001, 0.001]}\n", ["'a-lr0.001-s0'", "repeated"]),
])
def test_bad_experiments(tmp_path, text, words, capsys):
    f = tmp_path / "e.yaml"
    f.write_text(text)
    assert main(["compare", str(f), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()  # refused before anything is written
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("argv,words", [
    # an override of a key an arm or the grid sets would be silently ignored for those runs
    (["model.qk_pe=pope"], ["override model.qk_pe conflicts with arm(s) none, rope_axial"]),
    (["model.qk_pe_kwargs.sparsity=0.5"], ["override model.qk_pe_kwargs.sparsity", "arm(s) rope_axial"]),
    (["train.lr=0.01"], ["override train.lr conflicts with the grid"]),
    (["train.seed=5"], ["override train.seed conflicts with the experiment's seeds", "--seeds"]),
    # launcher options out of range, refused by the dry run as by a real call
    (["--jobs", "0"], ["jobs=0; must be >= 1"]),
    (["--jobs", "-1"], ["jobs=-1; must be >= 1"]),
    (["--procs-per-run", "-1"], ["procs-per-run=-1; must be >= 1"]),
    (["--launcher", "submitit-local", "--mem-gb", "nan"], ["mem-gb=nan; must be a positive number of GB"]),
    (["--launcher", "submitit-local", "--mem-gb", "-1"], ["mem-gb=-1.0; must be a positive number of GB"]),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_conflicting_overrides_and_bad_launcher_options(tmp_path, argv, words, dry_run, capsys):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP.replace("{model.qk_pe: rope_axial}", "{model.qk_pe: rope_axial, model.qk_pe_kwargs: {}}")
                        + "grid: {train.lr: [0.002]}\n")
    argv = ["compare", str(exp_file), *argv, "--out", str(tmp_path / "o"), "--quiet"] + ["--dry-run"] * dry_run
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()
    if dry_run:  # the same experiment without the bad option is fine
        assert main(["compare", str(exp_file), "model.dim=64", "--out", str(tmp_path / "o"), "--dry-run"]) == 0


def test_default_study_expands_to_eight_arms_three_seeds():
    exp = load_experiment(None)
    runs = exp.runs()
    assert len(runs) == 24 and exp.baseline == "none"
    assert {r.config.model.get("qk_pe") for r in runs} == {"none", "rope_axial", "rope_mixed", "string_cayley", "pope"}
    assert len({r.config.data.split_seed for r in runs}) == 1


def _finals(out):
    skip = {"seconds", "train_images_per_s", "infer_ms_per_batch", "data_share"}  # timing fields
    return {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in skip}
            for p in sorted(out.glob("runs/*/final.json"))}


def _ranking(out):
    lines = (out / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| rank |"))
    return lines[start: start + 4]


def test_the_same_comparison_twice_gives_the_same_numbers(tmp_path):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP.replace("train.epochs: 2", "train.epochs: 1"))
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):  # two at a time, as a user with --jobs 2 would
        assert main(["compare", str(exp_file), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
    assert _finals(a) == _finals(b) and len(_finals(a)) == 4
    assert _ranking(a) == _ranking(b)
    import numpy as np
    for run in ("none-s0", "rope_axial-s1"):
        pa, pb = (np.load(o / "runs" / run / "predictions.npz") for o in (a, b))
        assert np.array_equal(pa["probs"], pb["probs"]) and pa["probs"].shape == (96, 4)
    # a run directory mixed in from elsewhere (here: trained with another lr) is refused by the report
    import yaml
    cfg_file = b / "runs" / "none-s1" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["train"]["lr"] = 0.5
    cfg_file.write_text(yaml.safe_dump(cfg))
    from vitlab.compare.report import write_report
    with pytest.raises(ValueError, match=r"differ in train.lr \(0.002 vs 0.5\).*not a fair comparison"):
        write_report(b)


def test_sweeps_and_grid_pairing_from_run_directories(tmp_path):
    """The report finds a sweep of one numeric option among the arms (STRING's sparsity f) and in the
    grid, and pairs each arm with the baseline at the same grid point; fed with hand-written run
    directories (the run directory is the report's only input)."""
    from vitlab.compare.report import ranking_rows, sweep_series

    arms = {"rope": {"model.qk_pe": "rope_axial"},
            **{f"f{f}": {"model.qk_pe": "string_cayley", "model.qk_pe_kwargs": {"sparsity": f}} for f in (1.0, 0.5, 0.2)}}
    manifest = {"baseline": "rope", "arms": arms, "grid": {"train.lr": [0.001, 0.003]}, "metric": "acc1"}
    finished = []
    for arm in arms:
        for lr in (0.001, 0.003):
            for seed in range(3):
                acc = 0.5 + (0.1 if lr == 0.003 else 0.0) + (0.01 * seed) + (0.02 if arm != "rope" else 0.0)
                acc += {"f1.0": 0.0, "f0.5": 0.001, "f0.2": 0.002}.get(arm, 0.0) * (seed + 1)
                finished.append({"arm": arm, "point": {"train.lr": lr}, "seed": seed, "final": {"acc1": acc}})
    data = {"manifest": manifest, "finished": finished}
    series = sweep_series(data)
    assert [s["key"] for s in series] == ["train.lr", "model.qk_pe_kwargs.sparsity"]
    assert set(series[0]["lines"]) == set(arms) and sorted(series[0]["lines"]["rope"]) == [0.001, 0.003]
    (label, by_f), = series[1]["lines"].items()
    assert label == "model.qk_pe=string_cayley" and sorted(by_f) == [0.2, 0.5, 1.0] and len(by_f[0.2]) == 6
    rows = {r["group"]: r for r in ranking_rows(manifest, finished)}
    assert rows["rope @ train.lr=0.003"]["verdict"] == "baseline"
    # paired with rope at the same lr: +0.02 (+ the f-dependent part), not +0.12 against the other point
    assert rows["f1.0 @ train.lr=0.003"]["diff"] == pytest.approx(0.02)
    assert rows["f0.2 @ train.lr=0.001"]["diff"] == pytest.approx(0.02 + 0.002 * 2)


def test_every_shipped_study_expands_and_validates():
    from vitlab.compare.experiment import studies

    names = studies()
    assert {"default", "string-cifar", "string-cifar-quick", "clearvit", "clearvit-quick", "minivit-quick",
            "pope-mri", "pope-mri-quick", "pope-mri-grid", "volume-3d-quick", "string-mnist-quick"} <= set(names)
    for name in names:
        exp = load_experiment(name)
        runs = exp.runs()
        assert len({r.config.data.split_seed for r in runs}) == 1 and len(runs) == len(exp.arms) * len(exp.points()) * 3
    sparsity = sorted(r.config.model.get("qk_pe_kwargs", {}).get("sparsity", 0) for r in load_experiment("string-cifar").runs()
                      if r.seed == 0)
    assert sparsity == [0, 0, 0.1, 0.2, 0.3, 0.5, 1.0]
    assert len(load_experiment("clearvit").arms) == 7 and load_experiment("pope-mri").metric == "auroc_macro"
    assert load_experiment("string-cifar-quick").base == "cifar10-string-quick"
    assert len(load_experiment("default", seeds=1).runs()) == 8


def test_unknown_study_lists_the_studies(capsys):
    assert main(["compare", "string-cifarr", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'string-cifarr'" in err and "string-cifar-quick" in err


def test_every_quick_study_builds_and_runs_each_arm_forward():
    """Every arm of every shipped quick study builds (timm baselines included) and maps a batch of
    the study's data shape to logits, so a study fails here rather than hours into a comparison."""
    import torch

    from vitlab.compare.experiment import studies
    from vitlab.train.build import build_model

    shapes = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
    for name in [s for s in studies() if s.endswith("-quick")]:
        for spec in load_experiment(name).runs():
            if spec.seed:
                continue
            d = spec.config.data
            if d.name == "imagefolder":
                shape = (d.options.get("channels", 3), d.options["img_size"], d.options["img_size"])
            elif d.name == "mricron-brain":
                shape = (1, *d.options["patch"])
            else:
                shape = shapes[d.name]
            model, _ = build_model(spec.config, in_chans=shape[0], num_classes=4, img_size=shape[1:])
            with torch.no_grad():
                out = model.eval()(torch.randn(2, *shape))
            assert out.shape == (2, 4) and torch.isfinite(out).all(), (name, spec.name)


def test_cost_table_timings_are_medians_over_seeds():
    """One run slowed by other work on the machine (160 ms against 0.9 ms) moved the mean of the
    infer ms column a hundredfold; the timings are medians, the metrics still means."""
    from vitlab.compare.report import cost_lines

    finals = [{"final": {"acc1": 0.5 + 0.01 * s, "params": 10, "flops": 1e6, "seconds": 10.0 + s,
                         "infer_ms_per_batch": ms, "train_images_per_s": 100.0}}
              for s, ms in enumerate([0.9, 160.0, 1.0])]
    row = next(line for line in cost_lines(["a"], {"a": finals}) if line.startswith("| a |"))
    assert row == "| a | 10 | 1.0 |  | 100 | 1.0 | 11 | 0.5100 |  |  |"


def test_sigterm_to_compare_stops_its_running_run_with_a_checkpoint_and_the_next_call_resumes(tmp_path):
    """kill (SIGTERM) reaches the comparison only, not its process group: the run it was training kept
    training alone, and the next call trained alongside it. Now the run gets the signal, saves a
    checkpoint and exits before the comparison does; the next call resumes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    exp_file, out = tmp_path / "exp.yaml", tmp_path / "out"
    exp_file.write_text(EXP.replace("train.epochs: 2", "train.epochs: 40").replace("seeds: 2", "seeds: 1"))
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "compare", str(exp_file), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "runs" / "none-s0"
    deadline = time.time() + 120
    while not (first / "checkpoints" / "last.pt").is_file():  # the first run is training
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    child = int((first / ".lock").read_text().split()[1])  # "pid N on HOST"
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the run ended with the comparison
    assert json.loads((first / "status.json").read_text())["status"] == "interrupted"
    assert "save a checkpoint" in log
    assert log.rstrip().endswith("vitlab: SIGTERM received"), log  # was "vitlab: ", the message left empty
    assert not (out / "runs" / "rope_axial-s0").exists()  # and no other run started
    from vitlab.compare.runner import plan_compare
    plan = {r["name"]: r["action"] for r in plan_compare(load_experiment(str(exp_file)), out, log=lambda m: None)}
    assert plan == {"none-s0": "resume", "rope_axial-s0": "run"}


def test_a_comparison_saved_before_a_config_key_existed_is_still_this_experiment(tmp_path, capsys):
    """Saved configs are compared as configs, a key they lack at its default: text comparison
    refused every finished comparison once vitlab added a key ("its config differs"), and the
    report refused runs trained on either side of the upgrade (one config has the key, one not)."""
    exp_file, out = tmp_path / "exp.yaml", tmp_path / "out"
    exp_file.write_text(EXP.replace("seeds: 2", "seeds: 1").replace("train.epochs: 2", "train.epochs: 1"))
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 0
    older = [*(out / "configs").glob("*.yaml"), out / "runs" / "none-s0" / "config.yaml"]
    for path in older:  # as written before train.time_limit_fit existed (rope_axial-s0 "trained after")
        path.write_text("".join(x for x in path.read_text().splitlines(True) if "time_limit_fit" not in x))
    capsys.readouterr()
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    from vitlab.compare.runner import plan_compare
    plan = {r["name"]: r["action"] for r in plan_compare(load_experiment(str(exp_file)), out, log=lambda m: None)}
    assert plan == {"none-s0": "skip", "rope_axial-s0": "skip"}
    edited = out / "configs" / "none-s0.yaml"
    edited.write_text(edited.read_text().replace("lr: 0.002", "lr: 0.003"))
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 2
    assert "none-s0: its config differs from this experiment's" in capsys.readouterr().err


def test_a_run_trained_with_another_config_is_refused_before_anything_trains(tmp_path, capsys):
    """A run retrained by hand (`vitlab train ... --force`) into a comparison, with another lr: the
    dry run listed it as "skip finished", and compare trained every other run before the report
    refused it. Its own config.yaml is now checked first. A damaged experiment.json (which made
    compare fail with a traceback, though the report said to rerun compare) is rewritten."""
    exp_file, out = tmp_path / "exp.yaml", tmp_path / "out"
    exp_file.write_text(EXP.replace("seeds: 2", "seeds: 1").replace("train.epochs: 2", "train.epochs: 1"))
    assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    for damaged in ("[1]", '{"base": "x"}', ""):
        (out / "experiment.json").write_text(damaged)
        assert main(["compare", str(exp_file), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        assert "experiment.json" in err and "rewriting it" in err, err
        assert json.loads((out / "experiment.json").read_text())["base"] == "fashion-mnist-quick"
    run = out / "runs" / "none-s0"
    assert main(["train", str(out / "configs" / "none-s0.yaml"), "train.lr=0.01", "--out", str(run), "--force",
                 "--quiet"]) == 0
    capsys.readouterr()
    for argv in (["--dry-run"], []):
        assert main(["compare", str(exp_file), "--out", str(out), "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run}: trained with train.lr=0.01" in err and "delete it" in err, err
