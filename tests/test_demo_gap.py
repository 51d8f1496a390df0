"""`make demo`'s promise: the audit finds the demo's planted site gap and flags no sex or age group.

This runs the demo at its default size (the same run `make demo` makes), so it is the slowest test.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from medtl.data.privacy import load_key, site_code
from medtl.data.synthetic import GAP_SITE, SITES
from medtl.workflow.demo import run_demo


@pytest.mark.slow
def test_demo_audit_flags_the_planted_site_gap_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        outputs = run_demo(tmp_path / "out", progress=False)
    audit = json.loads((outputs.output_dir / "audit.json").read_text())
    gap_site = site_code(load_key(), SITES[GAP_SITE].name)  # the summary's gap_institution
    flagged = [g for g in audit["gaps"] if g["flagged"]]
    assert any(g["attribute"] == "site" for g in flagged), "the planted site gap must be flagged"
    site_gap = next(g for g in flagged if g["attribute"] == "site")
    assert site_gap["ci"][0] > 0 and site_gap["ci"][0] <= site_gap["value"] <= site_gap["ci"][1]
    site_flags = [g for g in flagged if g["attribute"] == "site"]
    assert {g["worst_group"] for g in site_flags} == {gap_site}, "every flagged site gap must point at the planted site"
    # Site-free attributes carry no planted gap: nothing flagged there (scanners nest within sites).
    for gap in flagged:
        assert {"site", "scanner"} & set(gap["attribute"].split("&")), gap["attribute"]
    sites = {g["group"]: g for g in audit["groups"] if g["attribute"] == "site" and not g["suppressed"]}
    worst = min(sites, key=lambda s: sites[s]["metrics"]["auroc"]["value"])
    assert worst == gap_site
    assert outputs.audit_passed is False
    # The report shows the flag: the site row of the tested-gaps table carries the flagged badge;
    # its figures (ROC, PR, calibration, confusion, subgroup forests) are embedded, not linked.
    html = outputs.report_path.read_text()
    assert html.count('<img src="data:image/png;base64,') >= 5
    subgroups = html[html.index('id="subgroups"'):html.index('id="amplification"')]
    assert gap_site in subgroups and "flagged" in subgroups
    assert audit["reference"]["kind"] == "scratch" and audit["amplification"]
