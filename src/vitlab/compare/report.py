"""``vitlab report DIR``: the comparison's report.md and report.html from its run directories (the
only input): the ranking with intervals and paired tests, the cost table, per-class AUROC,
resolution extrapolation, and the figures (learning curves, accuracy vs time, confusion matrices,
ROC curves, extrapolation curves, attention maps, sweeps of a numeric option)."""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .. import rundir
from ..config import load_yaml_file, with_defaults
from ..data.dedupe import leakage_line
from .experiment import METRICS, check_folder_name
from .runner import run_state
from .stats import ALPHA, CORRECTIONS, EQUAL, adjust_p, is_number, mean_ci, summarize

METRIC_NAMES = {"acc1": "test accuracy (top-1)", "acc5": "test accuracy (top-5)", "auroc_macro": "test AUROC (macro, one-vs-rest)"}
#: config keys a launcher sets per run: there a run's config.yaml may differ from the experiment's configs/NAME.yaml
LAUNCH_KEYS = ("train.threads", "train.device")
#: config keys that may differ between the runs of one comparison without changing the recipe
FREE_KEYS = ("train.seed", *LAUNCH_KEYS)
#: the entries of experiment.json the report reads: (key, type, required)
MANIFEST_ENTRIES = (("base", str, True), ("seeds", list, True), ("baseline", str, True), ("arms", dict, False),
                    ("grid", dict, False), ("arm_recipe_keys", list, False), ("description", str, False))
#: the entries of a finished run's final.json every report reads, and their types
FINAL_ENTRIES = {"acc1": (int, float), "params": int, "flops": (int, float), "seconds": (int, float),
                 "confusion": list}


def _is_fraction(v) -> bool:
    """A metric value in [0, 1], or undefined (null / NaN: an AUROC with one class only in the test
    set, or over non-finite logits)."""
    return v is None or (is_number(v) and (math.isnan(v) or 0 <= v <= 1))


#: final.json entries parts of the report read when present: each one's check
FINAL_OPTIONAL = {
    "acc5": _is_fraction, "auroc_macro": _is_fraction,
    "epochs": is_number, "train_images_per_s": is_number, "infer_ms_per_batch": is_number,
    "test_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "resolution_images": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "model": lambda v: isinstance(v, dict),
    "auroc_per_class": lambda v: isinstance(v, list) and all(_is_fraction(x) for x in v),
    "resolution": lambda v: isinstance(v, list) and all(
        isinstance(x, dict) and isinstance(x.get("img_size"), list) and x["img_size"]
        and all(isinstance(h, int) for h in x["img_size"]) and _is_fraction(x.get("acc1")) for x in v),
}


def final_problems(final: dict) -> List[str]:
    """The entries of a finished run's final.json the report cannot read: missing or mistyped required
    ones, optional ones present but malformed, an accuracy outside [0, 1], a confusion matrix that is
    not square."""
    bad = [k for k, kind in FINAL_ENTRIES.items() if not isinstance(final.get(k), kind)
           or isinstance(final.get(k), bool)]
    if "acc1" not in bad and not (0 <= final["acc1"] <= 1):  # (NaN fails too)
        bad.append("acc1")
    conf = final.get("confusion")
    if "confusion" not in bad and not (conf and all(isinstance(row, list) and len(row) == len(conf)
                                                    and all(is_number(x) for x in row) for row in conf)):
        bad.append("confusion")
    return bad + [k for k, ok in FINAL_OPTIONAL.items() if final.get(k) is not None and not ok(final[k])]


def _cell(text) -> str:
    """Text as one markdown table cell: ``|`` escaped, line breaks as spaces."""
    return " ".join(str(text).split()).replace("|", "\\|")


REWRITE = "rerun `vitlab compare` with the same experiment and --out to rewrite it"


def _fmt(v, spec=".4f"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _flat(d: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _read_json(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; otherwise a one-line ValueError naming the file and saying ``fix``."""
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as err:  # not JSON (truncated, empty) or not UTF-8
        raise ValueError(f"{path}: not valid JSON ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}; {fix}")
    return value


def trained_differently(got: Dict[str, object], expected: Dict[str, object]) -> List[str]:
    """The keys, sorted, in which a run's flattened config.yaml (``got``) differs from the one its
    experiment gives it (``expected``), a launcher's own keys (``LAUNCH_KEYS``) aside."""
    return sorted(k for k in set(got) | set(expected) if k not in LAUNCH_KEYS and got.get(k) != expected.get(k))


def _read_config(path: Path, why: str) -> dict:
    """A run config (config.yaml, configs/NAME.yaml) as a dict; one-line ValueErrors naming the file."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: no {path.name}; {why}")
    raw = load_yaml_file(path, "config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a run config (expected a mapping with data/model/train sections)")
    return with_defaults(raw)  # (runs trained before vitlab had a key compare as they trained)


def read_manifest(out: Path) -> dict:
    """``out/experiment.json``, checked: every entry the report reads is there, of its type."""
    path = Path(out) / "experiment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no experiment.json (not a vitlab compare directory)")
    manifest = _read_json(path, REWRITE)
    runs = manifest.get("runs")
    if not isinstance(runs, list) or "baseline" not in manifest or not all(
            isinstance(r, dict) and {"name", "arm", "point", "seed"} <= set(r) and isinstance(r["arm"], str)
            and isinstance(r["point"], dict) and isinstance(r["seed"], int) for r in runs):
        raise ValueError(f"{path}: not a vitlab experiment manifest (it needs 'baseline' and 'runs' with "
                         f"name/arm/point/seed); {REWRITE}")
    for key, valid, default in (("metric", METRICS, "acc1"), ("correction", CORRECTIONS, "holm")):
        value = manifest.get(key, default)
        if not isinstance(value, str) or value not in valid:
            raise ValueError(f"{path}: {key} {value!r}; valid: {', '.join(valid)}")
    for key, kind, required in MANIFEST_ENTRIES:
        if not isinstance(manifest.get(key, None if required else kind()), kind):
            raise ValueError(f"{path}: {key!r} must be {kind.__name__}, got {manifest.get(key)!r}; {REWRITE}")
    for r in runs:  # a folder under runs/, never a path out of it
        check_folder_name(r["name"], f"{path}: run name")
    return manifest


def collect(out: Path) -> dict:
    """The comparison in ``out`` as the report reads it: the manifest, the finished runs (each with
    its final.json and split.json) and the others (with state and reason). A damaged file is a
    one-line ValueError naming it, never a run silently dropped."""
    out = Path(out)
    manifest = read_manifest(out)
    finished, others = [], []
    for r in manifest["runs"]:
        run = out / "runs" / r["name"]
        fix = f"delete {run} to report without it, or to train it again with `vitlab compare`"
        state = run_state(run)
        if state == "finished":
            final = _read_json(run / "final.json", fix)
            bad = final_problems(final)
            if bad:
                raise ValueError(f"{run / 'final.json'}: not a finished run's results (no valid {', '.join(bad)}); "
                                 f"{fix}")
            split = _read_json(run / "split.json", fix) if (run / "split.json").is_file() else None
            finished.append({**r, "dir": run, "final": final, "split": split})
        else:
            status = _read_json(run / "status.json", fix) if (run / "status.json").is_file() else {}
            others.append({**r, "state": state, "reason": status.get("reason", "")})
    other = [r for r in finished if len(r["final"]["confusion"]) != len(finished[0]["final"]["confusion"])]
    if other:
        first, n1, n2 = finished[0], len(finished[0]["final"]["confusion"]), len(other[0]["final"]["confusion"])
        raise ValueError(f"{other[0]['dir'] / 'final.json'}: a {n2}-class confusion matrix, but "
                         f"{first['dir'] / 'final.json'} has {n1} classes; the runs of one comparison share one "
                         f"label set")
    if len({json.dumps(r["split"].get("test")) for r in finished if r["split"] is not None}) > 1:
        raise ValueError(f"{out}: the finished runs do not share one test split; a comparison needs one split")
    check_one_recipe(out, manifest, finished)
    return {"manifest": manifest, "finished": finished, "others": others}


def check_one_recipe(out: Path, manifest: dict, finished: List[dict]) -> None:
    """Every finished run was trained with the same data and train settings, apart from its seed,
    the grid keys and the experiment's ``arm_recipe_keys``; and with the config the experiment gave
    it (``configs/NAME.yaml``: its arm's keys, grid point and seed), apart from the keys a launcher
    sets. A run directory mixed in from elsewhere or copied under another run's name, or a config
    edited by hand, is caught here."""
    free = set(FREE_KEYS) | set(manifest.get("grid", {})) | set(manifest.get("arm_recipe_keys", []))
    first, first_cfg = None, None
    for r in finished:
        raw = _read_config(r["dir"] / "config.yaml", "cannot check that it shares the comparison's recipe")
        r["config"] = raw  # for the report's notes (planned epochs, threads)
        cfg = {k: v for k, v in _flat({s: raw.get(s, {}) for s in ("data", "train", "eval")}).items()
               if k not in free and not any(k.startswith(f + ".") for f in free)}
        if first_cfg is None:
            first, first_cfg = r["name"], cfg
        for key in sorted(set(cfg) | set(first_cfg)):
            if cfg.get(key) != first_cfg.get(key):
                raise ValueError(f"{out}: runs {first} and {r['name']} differ in {key} ({first_cfg.get(key)!r} vs "
                                 f"{cfg.get(key)!r}): not one split and recipe, so not a fair comparison")
        expected_file = out / "configs" / f"{r['name']}.yaml"
        expected = _flat(_read_config(expected_file, f"cannot check that run {r['name']} was trained with its arm's "
                                                     f"config; {REWRITE}"))
        got = _flat(raw)
        differ = trained_differently(got, expected)
        if differ:
            key = differ[0]
            raise ValueError(f"{r['dir']}: trained with {key}={got.get(key)!r}, but the experiment gives run "
                             f"{r['name']} (arm {r['arm']}) {key}={expected.get(key)!r} ({expected_file}): a run "
                             f"directory from another arm or comparison; delete it to train it again with "
                             f"`vitlab compare`")


def group_name(r: dict) -> str:
    point = ", ".join(f"{k}={v}" for k, v in r["point"].items())
    return f"{r['arm']} @ {point}" if point else r["arm"]


def _metric_value(final: dict, metric: str) -> Optional[float]:
    v = final.get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def metric_step(finished: List[dict], metric: str) -> Optional[float]:
    """The smallest step of ``metric`` over these runs: one test image (1/test_size) for an accuracy
    when every run has the same test set size; None otherwise (AUROC moves in uneven steps)."""
    sizes = {r["final"].get("test_size") for r in finished}
    if metric not in ("acc1", "acc5") or len(sizes) != 1:
        return None
    size = sizes.pop()
    return 1.0 / size if isinstance(size, int) and size > 0 else None


def ranking_rows(manifest: dict, finished: List[dict]) -> List[dict]:
    """Rows of the ranking: one per arm (at each grid point), each paired with the baseline arm at
    the same grid point."""
    metric = manifest.get("metric", "acc1")
    groups: Dict[str, Dict[int, float]] = {}
    baseline_of: Dict[str, str] = {}
    for r in finished:
        g = group_name(r)
        baseline_of[g] = group_name({**r, "arm": manifest["baseline"]})
        v = _metric_value(r["final"], metric)
        groups.setdefault(g, {})
        if v is not None:
            groups[g][r["seed"]] = v
    resolution = metric_step(finished, metric)
    rows = []
    for g in groups:  # summarize() pairs with one baseline; here each grid point has its own
        base = baseline_of[g]
        sub = {g: groups[g], **({base: groups[base]} if base in groups else {})}
        row = next(x for x in summarize(sub, base if base in groups else None, metric, correction="none",
                                        resolution=resolution) if x["group"] == g)
        rows.append(row)
    adjust_p(rows, manifest.get("correction", "holm"))  # one family: every arm-vs-baseline test of the comparison
    return sorted(rows, key=lambda r: -r["mean"] if not math.isnan(r["mean"]) else math.inf)


def ranking_table(rows: List[dict], metric: str) -> List[str]:
    """The ranking as markdown table lines (header first), from :func:`ranking_rows`."""
    lines = [f"| rank | arm | n | {metric} mean ± std | 95% CI | Δ vs baseline | p | p adj. | verdict |",
             "|---:|---|---:|---|---|---:|---:|---:|---|"]
    for i, r in enumerate(rows, 1):
        ci = (f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["std"] > EQUAL
              else "n/a (all seeds equal)")  # a zero-width interval from 2-3 seeds claims a certainty they lack
        spread = f"{_fmt(r['mean'])} ± {_fmt(r['std'])} | {ci}" if r["n"] > 1 else f"{_fmt(r['mean'])} | n/a"
        verdict = r["verdict"]
        if verdict == "":
            verdict = "untested (no finished baseline run)"
        elif verdict == "untested":
            verdict = f"untested ({r['pairs']} seed{'s' * (r['pairs'] != 1)} paired with the baseline's)"
        p = _fmt(r["p"], ".3g") + {"sign": " (sign test)", "t, std floored": " (std floored)"}.get(r.get("test"), "")
        diff = _fmt(r["diff"], "+.4f")
        if diff and r["pairs"] is not None and (r["pairs"] != r["n"] or r["pairs"] != r.get("base_n", r["n"])):
            diff += f" ({r['pairs']} paired seeds)"  # the means above are over all of each one's seeds
        lines.append(f"| {i} | {r['group']} | {r['n']} | {spread} | {diff} | "
                     f"{p} | {_fmt(r['p_adj'], '.3g')} | {verdict} |")
    return lines


def unmeasured_note(finished: List[dict], metric: str) -> str:
    """The sentence naming finished runs whose ``metric`` is undefined (an AUROC with one class only
    in the test set, or over non-finite logits): the ranking cannot count them, so it says which it
    left out."""
    names = [r["name"] for r in finished if _metric_value(r["final"], metric) is None]
    if not names:
        return ""
    return (f"{len(names)} finished run{'s' * (len(names) != 1)} ha{'ve' if len(names) != 1 else 's'} no "
            f"{metric} (undefined) and {'are' if len(names) != 1 else 'is'} left out of the ranking: "
            f"{', '.join(names)}. ")


def step_note(rows: List[dict]) -> str:
    """The sentence on tests whose paired differences were all equal, when the ranking has any."""
    tests = {r.get("test") for r in rows}
    notes = []
    if "t, std floored" in tests:
        notes.append("Where every paired difference is the same number of test images (std 0, t infinite), the "
                     "std is floored at the smallest one whole images allow, one image over n seeds "
                     "(1/(test size·√n); marked std floored), so an arm 1 image ahead on each of 3 seeds is a tie. ")
    if "sign" in tests:
        notes.append("Where every paired difference is the same and the metric has no fixed step, the exact sign "
                     "test is used instead (scipy `binomtest`; p = 0.25 for 3 seeds all on one side). ")
    return "".join(notes)


def ranking_summary(out: Path) -> str:
    """The ranking table of comparison ``out`` as text, for the terminal (report.md holds it too)."""
    data = collect(out)
    metric = data["manifest"].get("metric", "acc1")
    return "\n".join(ranking_table(ranking_rows(data["manifest"], data["finished"]), metric))


def write_report(out: Path) -> Path:
    """Write ``out/report.md``, ``out/report.html`` and ``out/figures/``; returns report.md's path.
    They are built in a temporary folder in ``out`` and moved in only once complete: a report that
    fails (a damaged run file, no finished run) leaves the earlier report whole."""
    from .html import to_html

    out = Path(out)
    data = collect(out)
    if not data["finished"]:
        states = collections.Counter(r["state"] for r in data["others"])
        why = next((f"; {r['name']}: {r['reason']}" for r in data["others"] if r["reason"]), "")
        raise ValueError(f"no finished runs under {out / 'runs'} ({', '.join(f'{n} {s}' for s, n in states.items())}"
                         f"{why}); report left unchanged")
    try:
        stage = Path(tempfile.mkdtemp(dir=out, prefix=".report-", suffix=".tmp"))
    except OSError as err:
        raise rundir.output_error(out / "report.md", err) from err
    try:
        lines = report_lines(out, data, stage)
        rundir.atomic_write_text(stage / "report.md", "\n".join(lines) + "\n")
        rundir.atomic_write_text(stage / "report.html", to_html(lines, stage))
        _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "report.md"


def _swap_in(stage: Path, out: Path) -> None:
    """Move the report built in ``stage`` into ``out``, replacing the earlier one, by renames only
    (the old figures/ go into ``stage``, to be deleted with it)."""
    if (out / "figures").exists():
        os.rename(out / "figures", stage / "old-figures")
    os.rename(stage / "figures", out / "figures")
    for name in ("report.html", "report.md"):
        os.replace(stage / name, out / name)


def report_lines(out: Path, data: dict, stage: Path) -> List[str]:
    """The report's markdown lines for comparison ``out`` (:func:`collect`'s ``data``, at least one
    run finished), its figures drawn into ``stage/figures``."""
    m = data["manifest"]
    metric = m.get("metric", "acc1")
    rows = ranking_rows(m, data["finished"])
    by_group: Dict[str, List[dict]] = {}
    for r in data["finished"]:
        by_group.setdefault(group_name(r), []).append(r)
    order = [r["group"] for r in rows]
    lines = [f"# Comparison: {out.name}", ""]
    if m.get("description"):
        lines += [m["description"], ""]
    lines += [f"Base config `{m['base']}`, seeds {m['seeds']}, baseline arm `{m['baseline']}`; every run on the same "
              f"stratified split and recipe. {len(data['finished'])} of {len(m['runs'])} runs finished.", ""]
    if m.get("arm_recipe_keys"):
        lines += [f"Recipe keys some arms set differently (the experiment allows it): "
                  f"{', '.join('`' + k + '`' for k in m['arm_recipe_keys'])}.", ""]
    if data["finished"][0]["split"] is not None:
        lines += [leakage_line(data["finished"][0]["split"]), ""]
    lines += cut_short_lines(data["finished"]) + threads_lines(data["finished"]) + world_lines(data["finished"])
    correction = m.get("correction", "holm")
    tests = sum(r["p"] is not None for r in rows)
    adjusted = (f"The p-values of the {tests} test{'s' * (tests != 1)} are adjusted for their number by "
                f"{CORRECTIONS[correction]} (statsmodels `multipletests`, `{correction}`; column p adj.), and "
                f"differences with adjusted p >= {ALPHA} are called ties" if correction != "none" else
                f"The p-values are not adjusted for their number (`correction: none`); differences with p >= "
                f"{ALPHA} are called ties")
    lines += [f"## Ranking ({METRIC_NAMES.get(metric, metric)})", "",
              f"Mean ± sample std over seeds, 95% t-interval of the mean, and a two-sided paired t-test "
              f"against the baseline arm (at the same grid point), paired by seed (scipy `ttest_rel`). "
              f"{step_note(rows)}{unmeasured_note(data['finished'], metric)}"
              f"{adjusted}: the seeds do not support ranking them.", "", *ranking_table(rows, metric)]
    lines += cost_lines(order, by_group)
    lines += ["", *arms_lines(m)]
    if data["others"]:
        lines += ["", "## Runs not finished", "", "Listed, never dropped: they count in no table above.", "",
                  "| run | state | reason |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['state']} | {_cell(r['reason'])} |" for r in data["others"]]
    lines += auroc_table(data, order)
    lines += resolution_table(data, order)
    return lines + figures(stage, data, order)


#: the model keys that choose the positional encodings and the attention kernel (and their options):
#: what a comparison is about. An arm that sets another model key changes the backbone too.
PE_KEYS = ("model.token_pe", "model.qk_pe", "model.attn")


def _pe_key(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}_kwargs") for k in PE_KEYS)


def cost_lines(order: List[str], by_group: Dict[str, List[dict]]) -> List[str]:
    """The cost table: per arm (in ranking ``order``) params, FLOPs, epochs and the metrics as means over
    seeds, the timings as medians."""
    lines = ["", "## Cost and other metrics", "",
             "Mean over seeds, and the median for the timings (train img/s, infer ms, train s: a run slowed by other "
             "work on the machine moves a mean). FLOPs of one forward pass per image, counted on an evaluation batch; "
             "train img/s over the whole training; inference ms per evaluation batch (the run's `eval_batch_size`); "
             "train s: the training epochs' time, without loading the dataset, validation and the final evaluation.", "",
             "| arm | params | MFLOPs / image | epochs | train img/s | infer ms / batch | train s / run | acc1 | acc5 | "
             "AUROC (macro) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in order:
        fs = [r["final"] for r in by_group[name]]

        def mean(k, fs=fs, how=statistics.fmean):
            vals = [f[k] for f in fs if f.get(k) is not None and not math.isnan(f[k])]
            return how(vals) if vals else None

        def median(k):  # timings: one run slowed by other work on the machine moves a mean, not a median
            return mean(k, how=statistics.median)

        lines.append(f"| {name} | {fs[0]['params']:,} | {_fmt(fs[0]['flops'] / 1e6, '.1f')} | "
                     f"{_fmt(mean('epochs'), '.3g')} | {_fmt(median('train_images_per_s'), '.0f')} | "
                     f"{_fmt(median('infer_ms_per_batch'), '.1f')} | "
                     f"{_fmt(median('seconds'), '.0f')} | {_fmt(mean('acc1'))} | {_fmt(mean('acc5'))} | "
                     f"{_fmt(mean('auroc_macro'))} |")
    return lines


def arms_lines(manifest: dict) -> List[str]:
    """What each arm sets on top of the base config, and which arms change more than the PE/kernel."""
    arms = manifest.get("arms") or {}
    if not arms:
        return []
    lines = ["## Arms", "", "What each arm sets on top of the base config (and the experiment's overrides); "
             "everything else is the same for every arm.", "", "| arm | sets |", "|---|---|"]
    for name, keys in arms.items():
        sets = _cell(", ".join(f"`{k}={v}`" for k, v in keys.items()) or "nothing (the base config)")
        lines.append(f"| {name}{' (baseline)' if name == manifest['baseline'] else ''} | {sets} |")
    more = {name: [k for k in keys if not _pe_key(k)] for name, keys in arms.items()}
    more = {name: keys for name, keys in more.items() if keys}
    if more:
        lines += ["", "**Not the PE or the kernel alone:** " + "; ".join(
            f"{name} also sets {', '.join('`' + k + '`' for k in keys)}" for name, keys in more.items())
                  + ". A difference these arms show is not the positional encoding's or the attention kernel's "
                    "alone."]
    return lines


def cut_short_lines(finished: List[dict]) -> List[str]:
    """A warning when finished runs trained fewer than their planned epochs because of
    ``train.time_limit_min``: stopped by it, or with their schedule fitted to it
    (``train.time_limit_fit``). The arms then did not train equally (a slower arm trains less), and
    where the limit falls depends on the machine's speed, so those runs do not reproduce exactly."""
    def planned(r):
        return r["final"].get("planned_epochs") or (r.get("config") or {}).get("train", {}).get("epochs") or "?"

    def listed(runs):
        return ", ".join(f"{r['name']} ({r['final'].get('epochs')}/{planned(r)} epochs)" for r in runs)

    reasons = {r["name"]: str(r["final"].get("reason") or "") for r in finished}
    cut = [r for r in finished if reasons[r["name"]].startswith("time limit")]
    fitted = [r for r in finished if reasons[r["name"]].startswith("schedule fitted")]
    if not cut and not fitted:
        return []
    how = []
    if cut:
        how.append(f"{len(cut)} stopped at the time limit (`train.time_limit_min`) before their planned epochs: "
                   f"{listed(cut)}")
    if fitted:
        how.append(f"{len(fitted)} fitted their schedule to the time limit (`train.time_limit_fit`), so their "
                   f"learning rate came down to `train.min_lr` in fewer epochs: {listed(fitted)}")
    return [f"**Not an equal-training comparison:** of {len(finished)} finished runs, {'; '.join(how)}. Those "
            f"arms trained less than the others, so the ranking compares them at equal wall-clock time on this "
            f"machine, not at equal training, and where the limit fell depends on the machine's speed (the runs "
            f"do not reproduce exactly). Rerun with `train.time_limit_min=null` for an equal-training "
            f"comparison.", ""]


def threads_lines(finished: List[dict]) -> List[str]:
    """A note when the runs used different numbers of CPU threads (``vitlab compare`` sets them from
    ``--jobs``): floating-point sums then run in another order, so results differ in the last bits
    (more under bf16) from what the same seed gives with another count."""
    counts = sorted({(r.get("config") or {}).get("train", {}).get("threads", 0) for r in finished}, key=str)
    if len(counts) < 2:
        return []
    shown = ", ".join("torch's default" if not c else str(c) for c in counts)
    return [f"The runs used different numbers of CPU threads ({shown}; `vitlab compare` sets them from `--jobs`): "
            f"results depend on it in the last digits, so a run reproduces exactly only with its own count "
            f"(`train.threads` in its config.yaml).", ""]


def world_lines(finished: List[dict]) -> List[str]:
    """A note when runs trained with different numbers of processes (``--procs-per-run`` changed
    between calls): each process augments its own slice with a stream of its own, so the draws of a
    seed differ with the world size, and the arms no longer share their augmented batches."""
    sizes = {}
    for r in finished:
        sizes.setdefault(int((r.get("final") or {}).get("world_size") or 1), []).append(r["name"])
    if len(sizes) < 2:
        return []
    shown = "; ".join(f"{n} process{'es' if n > 1 else ''}: {', '.join(names)}" for n, names in sorted(sizes.items()))
    return [f"The runs trained with different numbers of data-parallel processes ({shown}). Augmentation and "
            f"dropout draw per process, so the arms did not see the same augmented batches for a seed; rerun "
            f"them with one `--procs-per-run` for a matched comparison.", ""]


def _classes(data: dict) -> List[str]:
    classes = (data["finished"][0]["split"] or {}).get("classes")
    return classes or [str(i) for i in range(len(data["finished"][0]["final"]["confusion"]))]


def auroc_table(data: dict, order: List[str]) -> List[str]:
    """Per-class one-vs-rest AUROC, mean over seeds (as the MRI study reported it)."""
    classes = _classes(data)
    if len(classes) > 12:
        return []  # too wide to read; the macro AUROC is in the cost table
    lines = ["", "## Per-class AUROC (one-vs-rest, mean over seeds)", "",
             "| arm | " + " | ".join(_cell(c) for c in classes) + " |", "|---|" + "---:|" * len(classes)]
    for name in order:
        per = [r["final"].get("auroc_per_class") or [] for r in data["finished"] if group_name(r) == name]
        cells = []
        for c in range(len(classes)):
            vals = [p[c] for p in per if len(p) > c and p[c] is not None]
            cells.append(_fmt(sum(vals) / len(vals)) if vals else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def resolution_curves(data: dict, order: List[str]) -> Dict[str, Dict[int, List[Optional[float]]]]:
    """{group: {height: [acc1 per seed]}} from final.json's ``resolution`` (runs that recorded it)."""
    curves: Dict[str, Dict[int, List[Optional[float]]]] = {}
    for name in order:
        for r in data["finished"]:
            if group_name(r) != name:
                continue
            for point in r["final"].get("resolution") or []:
                curves.setdefault(name, {}).setdefault(point["img_size"][0], []).append(point["acc1"])
    return curves


def resolution_table(data: dict, order: List[str]) -> List[str]:
    curves = resolution_curves(data, order)
    if not curves:
        return []
    heights = sorted({h for c in curves.values() for h in c})
    n = data["finished"][0]["final"].get("resolution_images")
    trained = {}  # each arm's training height: arms may differ in model.img_size
    for r in data["finished"]:
        size = r["final"].get("model", {}).get("img_size")
        trained.setdefault(group_name(r), size[0] if isinstance(size, list) else size)
    one = len(set(trained.values())) == 1
    trained_h = next(iter(trained.values())) if one else None  # the "(trained)" column; else a * per arm
    where = (f"Trained at {trained_h} px" if one else
             "Trained at different sizes (* marks each arm's): " + ", ".join(
                 f"{name} {trained[name]} px" for name in order if name in trained))
    lines = ["", "## Resolution extrapolation (test accuracy at other image sizes, mean over seeds)", "",
             f"{where}; evaluated without retraining on the first {n} test images resized to each "
             f"size (relative PEs read the new grid, learned tables are resized, sincos recomputed). "
             f"Blank: the model cannot take that size.", "",
             "| arm | " + " | ".join(f"{h} px" + (" (trained)" if h == trained_h else "") for h in heights) + " |",
             "|---|" + "---:|" * len(heights)]
    for name in order:
        cells = []
        for h in heights:
            vals = [v for v in curves.get(name, {}).get(h, []) if v is not None]
            mark = " *" if not one and h == trained.get(name) else ""
            cells.append(_fmt(mean_ci(vals)["mean"]) + mark if vals else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def figures(root: Path, data: dict, order: List[str]) -> List[str]:
    """Draw the figures into root/figures and return the report lines that show them."""
    from . import plots

    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    runs: Dict[str, List[Path]] = {g: [] for g in order}
    finals: Dict[str, List[dict]] = {g: [] for g in order}
    for r in data["finished"]:
        runs[group_name(r)].append(r["dir"])
        finals[group_name(r)].append(r["final"])
    classes = _classes(data)
    shown = [("Learning curves", plots.learning_curves(runs, fig_dir / "learning_curves.png")),
             ("Accuracy versus training time", plots.accuracy_vs_time(finals, fig_dir / "accuracy_vs_time.png")),
             ("Confusion matrices (rows: true class, summed over seeds)",
              plots.confusions(finals, classes, fig_dir / "confusion.png")),
             ("ROC curves (one-vs-rest per class, TPR averaged over seeds)",
              plots.roc_curves(runs, classes, fig_dir / "roc.png")),
             ("Resolution extrapolation", plots.resolution_plot(resolution_curves(data, order),
                                                                fig_dir / "resolution.png")),
             ("Attention maps (last block, first seed, mean over heads: the CLS row, or under mean pooling the mean patch row)",
              plots.attention_grid(runs, classes, fig_dir / "attention.png")),
             ("Sweeps", plots.sweeps(sweep_series(data), data["manifest"].get("metric", "acc1"),
                                     fig_dir / "sweeps.png"))]
    lines = []
    for title, path in shown:
        if path is not None:
            lines += ["", f"## {title}", "", f"![{title}](figures/{path.name})"]
    return lines


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sweep_series(data: dict) -> List[dict]:
    """Sweeps of one numeric option, found in the experiment: (a) a numeric grid key, one line per
    arm (other grid keys averaged); (b) three or more arms whose keys agree except one numeric key
    (the STRING study's sparsity f). Each: {"key", "lines": {label: {x: [metric per seed]}}}."""
    m = data["manifest"]
    metric = m.get("metric", "acc1")
    values = [(r, _metric_value(r["final"], metric)) for r in data["finished"]]
    out = []
    for key, grid_values in m.get("grid", {}).items():
        if len(grid_values) >= 2 and all(_numeric(v) for v in grid_values):
            lines: Dict[str, Dict[float, List[float]]] = {}
            for r, v in values:
                if v is not None:
                    lines.setdefault(r["arm"], {}).setdefault(float(r["point"][key]), []).append(v)
            out.append({"key": key, "lines": lines})
    arms = {a: _flat(keys) for a, keys in m.get("arms", {}).items()}  # {qk_pe_kwargs: {sparsity: f}} -> dotted
    for key in sorted({k for keys in arms.values() for k in keys}):
        numeric = {a: keys for a, keys in arms.items() if _numeric(keys.get(key))}
        families: Dict[str, List[str]] = {}
        for a, keys in numeric.items():
            rest = json.dumps({k: v for k, v in keys.items() if k != key}, sort_keys=True)
            families.setdefault(rest, []).append(a)
        for rest, members in families.items():
            if len({arms[a][key] for a in members}) < 3:
                continue
            label = ", ".join(f"{k}={v}" for k, v in json.loads(rest).items()) or "arms"
            series: Dict[float, List[float]] = {}
            for r, v in values:
                if r["arm"] in members and v is not None:
                    series.setdefault(float(arms[r["arm"]][key]), []).append(v)
            out.append({"key": key, "lines": {label: series}})
    return out
