"""`vitlab report` on a damaged comparison directory: a one-line error naming the file, and the
earlier report (report.md, report.html, figures/) left exactly as it was; a report that succeeds
replaces all of it at once. One tiny comparison (two arms, one seed) is built for the module and
copied by each test."""
import json
import shutil

import pytest

from test_compare import EXP
from vitlab.cli import main

ONE_SEED = EXP.replace("train.epochs: 2", "train.epochs: 1").replace("seeds: 2", "seeds: 1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(experiment file, a finished comparison with its report)."""
    root = tmp_path_factory.mktemp("built")
    exp_file = root / "exp.yaml"
    exp_file.write_text(ONE_SEED)
    assert main(["compare", str(exp_file), "--out", str(root / "cmp"), "--quiet"]) == 0
    return exp_file, root / "cmp"


@pytest.fixture
def cmp(built, tmp_path):
    shutil.copytree(built[1], tmp_path / "cmp")
    return tmp_path / "cmp"


def report_files(out):
    """Every file of the report, with its modification time and bytes (rewritten = changed)."""
    paths = [out / "report.md", out / "report.html", *sorted((out / "figures").iterdir())]
    return {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def refused(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), (words, err)


def test_no_finished_run_leaves_the_report_unchanged(built, cmp, capsys):
    before = report_files(cmp)
    shutil.rmtree(cmp / "runs")
    refused(["report", str(cmp)], capsys, f"no finished runs under {cmp / 'runs'} (2 new); report left unchanged")
    assert report_files(cmp) == before
    # `vitlab compare` whose runs all failed ends the same way, its earlier report kept
    shutil.copytree(built[1] / "runs", cmp / "runs")
    for run in (cmp / "runs").iterdir():
        (run / "status.json").write_text(json.dumps({"status": "failed", "reason": "out of memory"}))
    refused(["compare", str(built[0]), "--out", str(cmp), "--quiet"], capsys,
            "no finished runs", "(2 failed; none-s0: out of memory)", "report left unchanged")
    assert report_files(cmp) == before


def test_a_report_that_fails_midway_leaves_the_earlier_report_whole(cmp, capsys):
    before = report_files(cmp)
    pred = cmp / "runs" / "none-s0" / "predictions.npz"
    pred.write_bytes(pred.read_bytes()[:300])  # truncated: read only for the ROC figure, after three others
    refused(["report", str(cmp)], capsys, f"{pred}: unreadable")
    assert report_files(cmp) == before
    assert sorted(p.name for p in cmp.iterdir()) == [".lock", "configs", "experiment.json", "figures",
                                                     "report.html", "report.md", "runs"]  # no temporary folder left
    # a report that succeeds replaces report.md, report.html and figures/ together (no stale figure kept)
    pred.unlink()
    (cmp / "figures" / "stale.png").write_bytes(b"old")
    assert main(["report", str(cmp)]) == 0
    after = report_files(cmp)
    assert set(after) == set(before) and all(after[k][0] != before[k][0] for k in after)  # all new, stale.png gone
    assert "figures/roc.png" in (cmp / "report.md").read_text()
    assert sorted(p.name for p in cmp.iterdir()) == [".lock", "configs", "experiment.json", "figures", "report.html",
                                                     "report.md", "runs"]


def test_a_run_of_another_arm_is_refused(cmp, capsys):
    before = report_files(cmp)
    shutil.rmtree(cmp / "runs" / "none-s0")
    shutil.copytree(cmp / "runs" / "rope_axial-s0", cmp / "runs" / "none-s0")
    refused(["report", str(cmp)], capsys, f"{cmp / 'runs' / 'none-s0'}: trained with model.qk_pe='rope_axial'",
            "run none-s0 (arm none) model.qk_pe='none'")
    assert report_files(cmp) == before


@pytest.mark.parametrize("name,text,words", [
    ("runs/none-s0/final.json", "[1, 2, 3]", ["expected a JSON object, got list"]),
    ("runs/none-s0/final.json", '{"acc1": 0.5, ', ["not valid JSON"]),
    ("runs/none-s0/final.json", "", ["not valid JSON"]),
    ("runs/none-s0/final.json", '{"acc1": null}', ["no valid acc1, params, flops, seconds, confusion"]),
    ("runs/none-s0/split.json", "[]", ["expected a JSON object"]),
    ("runs/none-s0/config.yaml", "data: [\n", ["not valid YAML"]),
    ("configs/none-s0.yaml", "- 1\n", ["not a run config"]),
    ("experiment.json", json.dumps({"runs": [{"name": "x", "arm": "a", "point": {}, "seed": 0}], "baseline": "a"}),
     ["'base' must be str, got None"]),
    ("experiment.json", json.dumps({"runs": [{"name": "../../x", "arm": "a", "point": {}, "seed": 0}],
                                    "baseline": "a", "base": "b", "seeds": [0]}), ["run name '../../x'"]),
])
def test_damaged_files_are_one_line_errors_naming_the_file(cmp, capsys, name, text, words):
    before = report_files(cmp)
    (cmp / name).write_text(text)
    refused(["report", str(cmp)], capsys, str(cmp / name), *words)
    assert report_files(cmp) == before


def test_damaged_status_of_an_unfinished_run(cmp, capsys):
    (cmp / "runs" / "none-s0" / "status.json").write_text("garbage")
    refused(["report", str(cmp)], capsys, f"{cmp / 'runs' / 'none-s0' / 'status.json'}: not valid JSON")
    (cmp / "runs" / "none-s0" / "status.json").write_text("[1]")  # the run state reads it too
    refused(["report", str(cmp)], capsys, "status.json: expected a JSON object")


def _edit_final(cmp, run, **changes):
    path = cmp / "runs" / run / "final.json"
    final = json.loads(path.read_text())
    final.update(changes)
    path.write_text(json.dumps(final))
    return path


@pytest.mark.parametrize("changes,bad", [
    ({"acc5": "0.9"}, "acc5"), ({"epochs": "1"}, "epochs"), ({"auroc_per_class": 0.5}, "auroc_per_class"),
    ({"resolution": [{"img_size": 16}]}, "resolution"), ({"acc1": 11.3}, "acc1"),  # a percentage
    ({"confusion": []}, "confusion"), ({"confusion": [[1, 2], [3]]}, "confusion"), ({"params": True}, "params"),
])
def test_malformed_final_entries_are_one_line_errors(cmp, capsys, changes, bad):
    """Every final.json entry the report reads is checked when the runs are collected: a mistyped one
    was a traceback from deep in a table or figure."""
    before = report_files(cmp)
    path = _edit_final(cmp, "none-s0", **changes)
    refused(["report", str(cmp)], capsys, str(path), f"no valid {bad}")
    assert report_files(cmp) == before


def test_runs_with_other_label_sets_or_damaged_metrics_lines_are_refused(built, cmp, capsys):
    before = report_files(cmp)
    path = _edit_final(cmp, "rope_axial-s0", confusion=[[1, 0], [0, 1]])
    refused(["report", str(cmp)], capsys, f"{path}: a 2-class confusion matrix, but "
            f"{cmp / 'runs' / 'none-s0' / 'final.json'} has 4 classes")
    shutil.copy(built[1] / "runs" / "rope_axial-s0" / "final.json", path)  # whole again
    metrics = cmp / "runs" / "none-s0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"epoch": 2, "loss": 0.1}) + "\n")
    refused(["report", str(cmp)], capsys, str(metrics), "entry 2 is not an epoch's metrics")
    assert report_files(cmp) == before


def test_runs_without_the_metric_are_named_not_silently_dropped(cmp):
    manifest = json.loads((cmp / "experiment.json").read_text())
    (cmp / "experiment.json").write_text(json.dumps({**manifest, "metric": "auroc_macro"}))
    _edit_final(cmp, "none-s0", auroc_macro=float("nan"))  # a class missing from the test set
    assert main(["report", str(cmp)]) == 0
    report = (cmp / "report.md").read_text()
    assert "1 finished run has no auroc_macro (undefined) and is left out of the ranking: none-s0." in report


def test_the_description_is_text_never_a_file_to_embed(cmp, tmp_path):
    """report.html embeds the report's own figures only: a description shaped like an image line
    pointing elsewhere stayed a way to mail a local file inside the report (or crashed it)."""
    (tmp_path / "secret.txt").write_text("secret-token")
    manifest = json.loads((cmp / "experiment.json").read_text())
    for text in ("![x](../../secret.txt)", "![no closing bracket", "**Read** this | and that"):
        (cmp / "experiment.json").write_text(json.dumps({**manifest, "description": text}))
        assert main(["report", str(cmp)]) == 0
        page = (cmp / "report.html").read_text()
        assert page.count("<img") == len(list((cmp / "figures").iterdir())) and "c2VjcmV0" not in page
    assert "<p><strong>Read</strong> this | and that</p>" in page


def test_table_cells_keep_their_columns():
    from vitlab.compare.html import to_html
    from vitlab.compare.report import _cell

    page = to_html(["| arm | reason |", "|---|:---|", f"| rope---axial | {_cell('bad | input' + chr(10) + 'x')} |"],
                   None)
    assert "<td class='t'>rope---axial</td><td class='t'>bad | input x</td>" in page
    page = to_html(["| arm | sets |", "|---|---|", "| a <b> | `model.qk_pe=pope` |"], None)
    assert "<td class='t'>a &lt;b&gt;</td><td class='t'><code>model.qk_pe=pope</code></td>" in page


@pytest.mark.parametrize("name", ["rope|axial", "a\nb", "tab\there"])
def test_arm_names_that_would_break_a_table_row_are_refused(name):
    from vitlab.compare.experiment import check_folder_name

    with pytest.raises(ValueError, match="without /, \\\\, \\| or control characters"):
        check_folder_name(name, "arm name")
    check_folder_name("rope$^$x über", "arm name")  # other text is fine


def test_figure_labels_are_text_not_tex(tmp_path):
    from vitlab.compare import plots

    plots.accuracy_vs_time({"rope$^$x": [{"seconds": 1.0, "acc1": 0.5}]}, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
