"""report.html: the report's markdown lines as one self-contained page (images embedded), readable
offline and mailable as one file."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

_NUMBER = re.compile(r"^[-+\[]?[\d.,]+")  # numbers, intervals "[0.71, 0.75]", "0.75 ± 0.01": right-aligned
_PIPE = re.compile(r"(?<!\\)\|")  # a cell boundary: a | not escaped as \|
_RULE = re.compile(r"^\|[\s:|-]+\|$")  # a markdown table's header rule, |---|---:|
_IMAGE = re.compile(r"^!\[([^\]]*)\]\((figures/[\w.-]+\.png)\)$")  # a figure the report drew


def to_html(lines: List[str], out: Path) -> str:
    """A self-contained HTML page of the markdown lines this module writes (headings, paragraphs,
    tables, images embedded as base64). Only the report's own figures (``out/figures/*.png``) are
    embedded; any other image line (a description that looks like one) stays text."""
    import base64
    import html

    body, table = [], []

    def inline(text: str) -> str:
        text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
        return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

    def cell(c: str) -> str:
        return f"<td>{html.escape(c)}</td>" if _NUMBER.match(c) or not c else f"<td class='t'>{inline(c)}</td>"

    def flush_table():
        if not table:
            return
        head, *rest = [[c.strip().replace("\\|", "|") for c in _PIPE.split(row.strip()[1:-1])]
                       for row in table if not _RULE.match(row.strip())]
        body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rest)
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
        elif _IMAGE.match(line) and (out / _IMAGE.match(line)[2]).is_file():
            alt, src = _IMAGE.match(line).groups()
            data = base64.b64encode((out / src).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td.t{text-align:left}th{background:#f4f4f4}code{background:#f4f4f4;padding:0 3px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vitlab report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
