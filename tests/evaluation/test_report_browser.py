"""The report as a browser shows it: headless Chromium renders every section and every image.

Chromium loads the report inside a small wrapper page of the test's own (the report itself has
no script): the wrapper reads the report's DOM through an iframe once everything has loaded
(`--allow-file-access-from-files` makes the two file:// pages one origin) and writes what it
found into its own DOM, which `--dump-dom` prints. Console messages of the page go to stderr
with `--enable-logging=stderr`; the report must produce none.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.evaluation.report import SECTION_IDS, chromium_args, render_report, write_pdf

pytestmark = pytest.mark.slow

WRAPPER = """<!DOCTYPE html><html><body>
<iframe id="report" src="report.html" width="1280" height="2000"></iframe><pre id="out"></pre>
<script>
window.addEventListener("load", function () {
  var doc = document.getElementById("report").contentDocument;
  var images = Array.from(doc.images).map(function (img) {
    return {alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight};
  });
  var ids = Array.from(doc.querySelectorAll("section[id]")).map(function (s) { return s.id; });
  var visible = Array.from(doc.querySelectorAll("section[id]")).filter(function (s) {
    return s.getBoundingClientRect().height > 40;
  }).length;
  document.getElementById("out").textContent = JSON.stringify({images: images, ids: ids, visible: visible,
                                                               title: doc.title});
});
</script></body></html>
"""


def _run(browser: str, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *chromium_args(profile), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, classification_inputs) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    render_report(classification_inputs, folder / "report.html",
                  generated_at=dt.datetime(2025, 11, 21, tzinfo=dt.UTC))
    (folder / "wrapper.html").write_text(WRAPPER, encoding="utf-8")
    return folder


def test_chromium_renders_every_section_and_image_without_console_messages(chromium, report_dir, tmp_path):
    done = _run(chromium, tmp_path / "profile", "--allow-file-access-from-files", "--enable-logging=stderr",
                "--v=0", "--virtual-time-budget=10000", "--dump-dom", (report_dir / "wrapper.html").as_uri())
    found = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, flags=re.DOTALL)
    assert found and found.group(1), f"the wrapper reported nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    dom = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                     .replace("&gt;", ">"))
    assert dom["ids"] == list(SECTION_IDS)
    assert dom["visible"] == len(SECTION_IDS)
    assert dom["title"].startswith("Evaluation report")
    assert len(dom["images"]) >= 7
    for image in dom["images"]:
        assert image["complete"] and image["width"] > 200 and image["height"] > 200, image["alt"]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert "net::ERR" not in done.stderr  # no failed resource loads (there is nothing to fetch)


def test_screenshot_of_the_report_is_not_blank(chromium, report_dir, tmp_path):
    shot = tmp_path / "report.png"
    done = _run(chromium, tmp_path / "profile", "--hide-scrollbars", f"--screenshot={shot}",
                "--window-size=1280,4000", (report_dir / "report.html").as_uri())
    assert shot.is_file(), f"no screenshot (exit {done.returncode}):\n{done.stderr[-3000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (4000, 1280)
    grey = pixels.mean(axis=2)
    assert grey.std() > 20
    assert (grey < 100).mean() > 0.01  # text and plot lines
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200  # colour: badges, plots, headings
    # The headline band (top 1000 px) and the lower page both carry content.
    assert grey[:1000].std() > 20 and grey[2000:].std() > 20


def test_write_pdf_prints_the_report(chromium, report_dir, tmp_path):
    pdf = write_pdf(report_dir / "report.html", tmp_path / "report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 50_000
    assert len(re.findall(rb"/Type\s*/Page\b", data)) >= 5
