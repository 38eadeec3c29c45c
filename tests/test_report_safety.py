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
