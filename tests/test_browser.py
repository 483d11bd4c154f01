"""results/summary.html and the `snakemake --report` HTML open in headless Chromium as a new user
would see them: every stage's category is there and every image loads; screenshots are saved.

The pages are opened from a probe page (in a temporary folder) that frames them and, once they
have loaded, checks in the browser itself that each image decodes (naturalWidth > 0), then writes
its findings into its own DOM, which `chromium --dump-dom` prints. No browser driver is needed.
The run is the tiny study's reference run (tests/_tiny.py). Skipped when Chromium is absent
(`apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from _tiny import STUDY, base_run, snakemake_cmd

pytestmark = pytest.mark.slow

#: the report's categories, one per stage (REPORT_CATEGORY in workflow/rules/common.smk)
CATEGORIES = ["1. Quality control", "2. Integration", "3. Clusters and cell types", "4. Scores",
              "5. Claims", "6. Summary"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", "--hide-scrollbars"]
#: where to keep the screenshots (they are otherwise left in pytest's temporary folder)
SCREENSHOTS = Path(os.environ["LIVERMSC_SCREENSHOTS"]) if os.environ.get(
    "LIVERMSC_SCREENSHOTS") else None

#: runs in the probe page: inspect the framed page, then write JSON into <pre id="result">
PROBE = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="%(url)s" style="width:1200px;height:900px"></iframe>
<script>
const frame = document.getElementById("page");
function decodes(src) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img.naturalWidth > 0);
    img.onerror = () => resolve(false);
    img.src = src;
  });
}
async function probe() {
  const win = frame.contentWindow, doc = frame.contentDocument;
  const out = {title: doc.title, text: doc.body ? doc.body.innerText : "", images: [],
               categories: null, results: []};
  for (const img of doc.images) {
    const ok = img.complete && img.naturalWidth > 0 ? true : await decodes(img.src);
    out.images.push({src: img.src.slice(0, 120), alt: img.alt, ok: ok});
  }
  if (win.categories !== undefined) {
    out.categories = win.categories;
    for (const [path, res] of Object.entries(win.results)) {
      const image = (res.mime_type || "").startsWith("image/");
      out.results.push({path: path, mime: res.mime_type, has_data: !!res.data_uri,
                        ok: image ? await decodes(res.data_uri) : null});
    }
  }
  document.getElementById("result").textContent = JSON.stringify(out);
}
frame.addEventListener("load", () => setTimeout(() => probe().catch((e) => {
  document.getElementById("result").textContent = JSON.stringify({error: String(e)});
}), 1500));
</script></body></html>"""


def chromium() -> str | None:
    """The Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browse(binary: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def probe_page(binary: str, page: Path, folder: Path) -> dict:
    """Open ``page`` in the probe; return what the browser found there."""
    probe = folder / f"probe_{page.stem}.html"
    probe.write_text(PROBE % {"url": page.resolve().as_uri()})
    proc = _browse(binary, "--virtual-time-budget=30000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert found and found.group(1) != "pending", proc.stdout[-2000:] + proc.stderr[-2000:]
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    return json.loads(text.replace("&amp;", "&"))


def screenshot(binary: str, page: Path, out: Path, size: str = "1280,1600") -> Path:
    """Save a screenshot of ``page`` (PNG) and return its path."""
    proc = _browse(binary, f"--window-size={size}", "--virtual-time-budget=15000",
                   f"--screenshot={out}", page.resolve().as_uri())
    assert out.is_file() and out.stat().st_size > 10_000, proc.stderr[-2000:]
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, SCREENSHOTS / out.name)
    return out


@pytest.fixture(scope="module")
def browser() -> str:
    binary = chromium()
    if binary is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    return binary


@pytest.fixture(scope="module")
def run_with_report(tmp_path_factory) -> Path:
    """The tiny reference run, plus its `snakemake --report results/report.html`."""
    work = base_run(tmp_path_factory)
    report = work / "results" / "report.html"
    if not report.is_file():
        proc = subprocess.run(snakemake_cmd(work, "--report", str(report)), capture_output=True,
                              text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return work


def test_summary_page_shows_its_figures(browser, run_with_report, tmp_path):
    page = run_with_report / "results" / "summary.html"
    found = probe_page(browser, page, tmp_path)
    assert found["images"], "summary.html shows no image"
    broken = [i["src"] for i in found["images"] if not i["ok"]]
    assert not broken, f"images that do not load in summary.html: {broken}"
    assert STUDY in found["text"] and "verdict" in found["text"].lower()
    shot = screenshot(browser, page, tmp_path / "summary.png")
    assert shot.stat().st_size > 10_000


def test_report_has_every_stage_and_every_image_loads(browser, run_with_report, tmp_path):
    page = run_with_report / "results" / "report.html"
    found = probe_page(browser, page, tmp_path)
    assert found["categories"] is not None, "the report's data did not load"
    assert sorted(found["categories"]) == CATEGORIES
    for category in CATEGORIES:
        assert category in found["text"], f"{category!r} is not shown in the report's menu"
    images = [r for r in found["results"] if r["ok"] is not None]
    broken = [r["path"] for r in images if not r["ok"]]
    assert not broken, f"report images that do not load: {broken}"
    paths = {r["path"] for r in found["results"]}
    figures = run_with_report / "results" / STUDY / "figures"
    for name in ("umap_cell_type", "markers_dotplot", "integration_metrics"):
        assert f"results/{STUDY}/figures/{name}.png" in paths, name
    assert any(p.startswith(f"results/{STUDY}/qc/figures/") for p in paths)
    for table in ("qc/qc_summary.tsv", "scores/sample_scores.tsv", "integration_metrics.tsv",
                  "claims.tsv"):
        assert f"results/{STUDY}/{table}" in paths, table
    assert len(images) >= len(list(figures.glob("*.png")))
    assert all(r["has_data"] for r in found["results"])
    screenshot(browser, page, tmp_path / "report.png")

