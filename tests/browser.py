"""Headless Chromium (Debian's package) for the tests that look at a report as a person would."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# no network here: without these flags Chromium keeps trying to reach its services
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Runs in the page after load: what a reader would see (tables with their rows, images decoded).
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => (i.complete && i.naturalWidth > 0) ? [i.naturalWidth, i.naturalHeight] : null);
  const tables = [...document.querySelectorAll('table')].map(t => [t.rows.length, t.rows[0].cells.length]);
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs, tables, h2: [...document.querySelectorAll('h2')].map(h => h.textContent)});
  document.body.appendChild(pre);
});</script>"""


def _run(args, tmp: Path) -> str:
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout


def rendered(page: Path, tmp: Path) -> dict:
    """Load ``page`` (with the probe appended) and return what the rendered DOM holds."""
    probe = tmp / "probed.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not render (chromium printed {dom[:300]!r})"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(page: Path, png: Path, tmp: Path, width: int = 1200, height: int = 2400) -> Path:
    _run([f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()], tmp)
    return png
