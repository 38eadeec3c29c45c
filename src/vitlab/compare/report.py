"""``vitlab report DIR``: the comparison's report.md from its run directories (the only input)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

from .. import rundir
from ..data.dedupe import leakage_line
from .runner import run_state
from .stats import ALPHA, summarize


def _fmt(v, spec=".4f"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def collect(out: Path) -> dict:
    out = Path(out)
    manifest_file = out / "experiment.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{out}: no experiment.json (not a vitlab compare directory)")
    manifest = json.loads(manifest_file.read_text())
    finished, others = [], []
    for r in manifest["runs"]:
        run = out / "runs" / r["name"]
        state = run_state(run)
        if state == "finished":
            finished.append({**r, "final": json.loads((run / "final.json").read_text())})
        else:
            reason = ""
            if (run / "status.json").is_file():
                reason = json.loads((run / "status.json").read_text()).get("reason", "")
            others.append({**r, "state": state, "reason": reason})
    splits = {json.dumps(json.loads((out / "runs" / r["name"] / "split.json").read_text()).get("test"))
              for r in finished if (out / "runs" / r["name"] / "split.json").is_file()}
    if len(splits) > 1:
        raise ValueError(f"{out}: the finished runs do not share one test split; a comparison needs one split")
    return {"manifest": manifest, "finished": finished, "others": others}


def group_name(r: dict) -> str:
    point = ", ".join(f"{k}={v}" for k, v in r["point"].items())
    return f"{r['arm']} @ {point}" if point else r["arm"]


def write_report(out: Path) -> Path:
    """Write ``out/report.md``; returns its path."""
    out = Path(out)
    data = collect(out)
    m = data["manifest"]
    groups: Dict[str, Dict[int, float]] = {}
    costs: Dict[str, List[dict]] = {}
    for r in data["finished"]:
        groups.setdefault(group_name(r), {})[r["seed"]] = r["final"]["acc1"]
        costs.setdefault(group_name(r), []).append(r["final"])
    baseline = m["baseline"] if m["baseline"] in groups else None
    rows = summarize(groups, baseline)
    lines = [f"# Comparison: {out.name}", ""]
    if m.get("description"):
        lines += [m["description"], ""]
    lines += [f"Base config `{m['base']}`, seeds {m['seeds']}, baseline arm `{m['baseline']}`; every run on the same "
              f"stratified split. {len(data['finished'])} of {len(m['runs'])} runs finished.", ""]
    if data["finished"]:
        first = out / "runs" / data["finished"][0]["name"] / "split.json"
        if first.is_file():
            lines += [leakage_line(json.loads(first.read_text())), ""]
    lines += ["## Ranking (test accuracy)", "",
              f"Mean ± sample std over seeds, 95% t-interval of the mean, and a two-sided paired t-test "
              f"against the baseline, paired by seed (scipy `ttest_rel`). Differences with p >= {ALPHA} are "
              f"called ties: the seeds do not support ranking them.", "",
              "| rank | arm | n | acc1 mean ± std | 95% CI | Δ vs baseline | p | verdict |",
              "|---:|---|---:|---|---|---:|---:|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['group']} | {r['n']} | {_fmt(r['mean'])} ± {_fmt(r['std'])} | "
                     f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {_fmt(r['diff'], '+.4f')} | "
                     f"{_fmt(r['p'], '.3g')} | {r['verdict']} |")
    lines += ["", "## Cost", "", "| arm | params | MFLOPs / image | train img/s | infer ms / batch | wall s / run |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in [r["group"] for r in rows]:
        cs = costs[name]
        mean = lambda k: sum(c[k] for c in cs if c.get(k) is not None) / max(1, sum(c.get(k) is not None for c in cs))
        lines.append(f"| {name} | {cs[0]['params']:,} | {cs[0]['flops'] / 1e6:.1f} | {mean('train_images_per_s'):.0f} | "
                     f"{mean('infer_ms_per_batch'):.1f} | {mean('seconds'):.0f} |")
    if data["others"]:
        lines += ["", "## Runs not finished", "", "| run | state | reason |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['state']} | {r['reason']} |" for r in data["others"]]
    if data["finished"]:
        lines += figures(out, data, [r["group"] for r in rows])
    path = out / "report.md"
    rundir.atomic_write_text(path, "\n".join(lines) + "\n")
    rundir.atomic_write_text(out / "report.html", to_html(lines, out))
    return path


def figures(out: Path, data: dict, order: List[str]) -> List[str]:
    """Draw the figures into out/figures and return the report lines that show them."""
    from . import plots

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    runs: Dict[str, List[str]] = {}
    finals: Dict[str, List[dict]] = {}
    for r in data["finished"]:
        runs.setdefault(group_name(r), []).append(r["name"])
        finals.setdefault(group_name(r), []).append(r["final"])
    runs = {g: runs[g] for g in order}
    finals = {g: finals[g] for g in order}
    split = json.loads((out / "runs" / data["finished"][0]["name"] / "split.json").read_text())
    classes = split.get("classes") or [str(i) for i in range(len(data["finished"][0]["final"]["confusion"]))]
    shown = [("Learning curves", plots.learning_curves(out, runs, fig_dir / "learning_curves.png")),
             ("Accuracy versus training time", plots.accuracy_vs_time(finals, fig_dir / "accuracy_vs_time.png")),
             ("Confusion matrices (rows: true class, summed over seeds)",
              plots.confusions(finals, classes, fig_dir / "confusion.png"))]
    lines = []
    for title, path in shown:
        lines += ["", f"## {title}", "", f"![{title}](figures/{path.name})"]
    return lines


def to_html(lines: List[str], out: Path) -> str:
    """A self-contained HTML page of the markdown lines this module writes (headings, paragraphs,
    tables, images embedded as base64)."""
    import base64
    import html

    body, table = [], []

    def flush_table():
        if not table:
            return
        head, *rest = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table if "---" not in row]
        body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rest)
                    + "</tbody></table>")
        table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            data = base64.b64encode((out / src.rstrip(")")).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:nth-child(2),th:nth-child(2){text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vitlab report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
