"""The HTML evaluation report: sections, inline figures, privacy, escaping, determinism, hash."""

from __future__ import annotations

import base64
import copy
import dataclasses
import datetime as dt
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtl.errors import InputError, MedtlError
from medtl.evaluation.metrics import classification_report_data
from medtl.evaluation.report import SECTION_IDS, render_report, verify_report_hash, write_pdf
from medtl.evaluation.report_types import ReportInputs, Results
from tests.evaluation.conftest import PLANTED_FOLDER, PLANTED_PATIENT

WHEN = dt.datetime(2025, 11, 21, 9, 30, tzinfo=dt.UTC)


class _Page(HTMLParser):
    """Just enough of the DOM for the assertions: ids, images, links, tags, table rows per section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.rows: dict[str, list[tuple[str, list[str]]]] = {}
        self._section = ""
        self._row: tuple[str, list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self._section = a.get("id", "")
        elif tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "tr":
            self._row = (a.get("class", ""), [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _render(inputs: ReportInputs, path: Path, when: dt.datetime = WHEN) -> tuple[str, str]:
    digest = render_report(inputs, path, generated_at=when)
    return digest, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def classification_report(tmp_path_factory, classification_inputs) -> tuple[str, str]:
    return _render(classification_inputs, tmp_path_factory.mktemp("report") / "report.html")


@pytest.fixture(scope="module")
def segmentation_report(tmp_path_factory, segmentation_inputs) -> tuple[str, str]:
    return _render(segmentation_inputs, tmp_path_factory.mktemp("report") / "report.html")


@pytest.fixture(params=["classification", "segmentation"])
def any_report(request) -> str:
    return request.getfixturevalue(f"{request.param}_report")[1]


def test_every_section_has_its_id_and_a_contents_link(any_report):
    page = _parse(any_report)
    for sid in SECTION_IDS:
        assert page.ids.count(sid) == 1, sid
        assert f"#{sid}" in page.links, sid
    assert page.ids.index("identification") < page.ids.index("results") < page.ids.index("audit-trail")


def test_every_image_is_an_inline_nonblank_png_with_alt_text(any_report):
    page = _parse(any_report)
    assert len(page.images) >= 3
    for img in page.images:
        assert len(img.get("alt", "")) > 20
        assert img["src"].startswith("data:image/png;base64,")
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).convert("L"))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels.std() > 10, img["alt"]  # not a blank canvas
        assert (pixels < 128).mean() > 0.005, img["alt"]  # some ink: axes, text, lines


def test_classification_report_has_roc_pr_calibration_confusion_forest_and_efficiency_plots(classification_report):
    alts = " | ".join(i["alt"] for i in _parse(classification_report[1]).images)
    for expected in ("ROC curve", "Precision-recall", "Reliability diagram", "Confusion matrix",
                     "AUROC by subgroup", "Subgroup gaps", "Data-efficiency curve"):
        assert expected in alts


def test_report_is_self_contained_without_urls_scripts_or_external_resources(any_report):
    page = _parse(any_report)
    assert not re.search(r"https?:", any_report, flags=re.IGNORECASE)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "@import" not in any_report and "url(" not in any_report
    assert all(link.startswith("#") for link in page.links)


def test_suppressed_groups_show_no_numbers(classification_report):
    rows = [r for r in _parse(classification_report[1]).rows["subgroups"] if "suppressed" in r[0]]
    assert len(rows) == 2  # age_band 90+ and the M&90+ intersection
    for _, cells in rows:
        numbers = " ".join(cells[1:]).replace("≤ 10", "")
        assert "suppressed" in numbers
        assert not re.search(r"\d", numbers), cells
    assert "0.432" not in classification_report[1]  # the planted AUROC of a suppressed group


def test_planted_patient_ids_and_identifying_folders_are_not_rendered(classification_report, segmentation_report):
    for _, text in (classification_report, segmentation_report):
        assert PLANTED_PATIENT not in text
        assert PLANTED_FOLDER not in text
        assert "…/efficientnet_lite0.pth" in text  # the weight file is named, its folder is not


def test_small_subgroup_counts_of_the_partitions_are_suppressed(classification_report):
    rows = _parse(classification_report[1]).rows["partitions"]
    row_90 = next(cells for _, cells in rows if cells and cells[0] == "90+")
    assert row_90[1:] == ["*", "*", "*"]
    label_row = next(cells for _, cells in rows if cells and cells[0] == "1")
    assert label_row[1:] == ["620", "132", "133"]  # label totals per split are shown exactly


def test_strings_from_inputs_are_escaped(tmp_path, classification_inputs):
    hostile = dataclasses.replace(classification_inputs.identification,
                                  intended_use='<script>alert("x")</script><img src=x onerror=alert(1)>')
    _, text = _render(dataclasses.replace(classification_inputs, identification=hostile), tmp_path / "r.html")
    assert "<script" not in text and "onerror=alert(1)>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text


def test_render_is_deterministic_except_for_the_timestamp_and_leaves_inputs_alone(
        tmp_path, classification_report, classification_inputs):
    before = copy.deepcopy(dataclasses.asdict(classification_inputs))
    again = _render(classification_inputs, tmp_path / "again.html")
    assert again == classification_report
    later, text_later = _render(classification_inputs, tmp_path / "later.html", WHEN + dt.timedelta(hours=5))
    assert later != classification_report[0]
    stamp = re.compile(r"2025-11-21 (09|14):30:00 UTC")
    assert stamp.sub("T", _drop_hash(classification_report[1])) == stamp.sub("T", _drop_hash(text_later))
    assert dataclasses.asdict(classification_inputs) == before


def _drop_hash(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if 'data-medtl-report-sha256="' not in line)


def test_report_hash_is_returned_recorded_and_detects_tampering(tmp_path, classification_report):
    digest, text = classification_report
    path = tmp_path / "report.html"
    path.write_bytes(text.encode("utf-8"))
    assert f'data-medtl-report-sha256="{digest}"' in text
    assert verify_report_hash(path)
    path.write_bytes(text.replace("Specificity (TNR)", "Specificity").encode("utf-8"))
    assert not verify_report_hash(path)
    path.write_bytes(_drop_hash(text).encode("utf-8"))
    with pytest.raises(InputError, match="one hash line"):
        verify_report_hash(path)


def test_segmentation_report_draws_dice_distributions_without_listing_cases(segmentation_report,
                                                                            segmentation_inputs):
    text = segmentation_report[1]
    page = _parse(text)
    assert any("per-case Dice" in i["alt"] for i in page.images)
    classes = {cells[0] for _, cells in page.rows["results"] if cells}
    assert {"liver", "tumour"} <= classes
    for values in segmentation_inputs.results.dice_per_case.values():
        assert not any(f"{v:.7f}".rstrip("0") in text for v in values if len(f"{v:.7f}".rstrip("0")) > 6)


def test_limitations_are_derived_from_audit_data_and_design(classification_report, tmp_path,
                                                             classification_inputs):
    items = _section_text(classification_report[1], "limitations")
    assert "radiology reports" in items  # given by the caller, listed first
    assert "age_band = 90+" in items and "suppressed" in items
    assert "imprecise" in items and "beyond tolerance" in items and "Internal validation only" in items
    single = dataclasses.replace(classification_inputs.data, sites={"SITE-3fa21c": 2660}, synthetic=True)
    _, text = _render(dataclasses.replace(classification_inputs, data=single), tmp_path / "r.html")
    items = _section_text(text, "limitations")
    assert "single site" in items and "synthetic" in items


def _section_text(text: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', text, flags=re.DOTALL)
    assert match, sid
    return re.sub(r"<[^>]+>", " ", match.group(1))


def test_amplification_defaults_to_the_audit_and_marks_widened_gaps(classification_report):
    rows = _parse(classification_report[1]).rows["amplification"]
    widened = [(cls, cells) for cls, cells in rows if "widened" in cells]
    assert len(widened) == 1 and widened[0][0] == "flagged" and widened[0][1][0] == "age_band"


def test_multiclass_curves_are_drawn_one_vs_rest(tmp_path, classification_inputs):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    scores = rng.dirichlet([1, 1, 1], 300)
    scores[np.arange(300), y] += 1.0
    scores /= scores.sum(axis=1, keepdims=True)
    names = np.array(["normal", "pneumonia", "covid"])
    curves = classification_report_data(names[y], scores, classes=list(names))
    results = Results(metrics={"auroc_macro": {"value": 0.83, "ci": [0.79, 0.87]}}, n_cases=300, n_patients=150,
                      curves=curves)
    _, text = _render(dataclasses.replace(classification_inputs, results=results), tmp_path / "r.html")
    alts = [i["alt"] for i in _parse(text).images]
    assert any("class covid vs rest" in a for a in alts if a.startswith("ROC"))
    assert any(a.startswith("Confusion matrix") and "true covid predicted covid" in a for a in alts)


def _test_set_table(text: str) -> list[list[str]]:
    """The rows (header first) of the "Test sets side by side" table in the results section."""
    results = re.search(r'<section id="results">(.*?)</section>', text, flags=re.DOTALL).group(1)
    match = re.search(r'<h3 id="test-sets">Test sets side by side</h3>(.*?</table>)', results, flags=re.DOTALL)
    assert match, "no side-by-side table in the results section"
    return [cells for _, cells in _parse(match.group(1)).rows[""]]


def test_continual_report_shows_new_and_old_test_metrics_side_by_side(tmp_path, continual_inputs):
    _, text = _render(continual_inputs, tmp_path / "r.html")
    rows = _test_set_table(text)
    assert rows[0] == ["Metric", "New test (n = 400)", "Old test (n = 180)"]
    by_metric = {r[0]: r[1:] for r in rows[1:]}
    new = continual_inputs.results.metrics["auroc"]
    assert by_metric["AUROC"] == [f"{new['value']:.3f} [{new['ci'][0]:.3f}, {new['ci'][1]:.3f}]",
                                  "0.871 [0.831, 0.911]"]
    assert by_metric["Sensitivity (TPR)"][1] == "0.772 [0.712, 0.832]"
    assert by_metric["Specificity (TNR)"][1] == "0.843 [0.793, 0.893]"
    assert by_metric["Accuracy"][1] == "0.818 [0.778, 0.858]" and by_metric["Brier score"][1] == "0.142 [0.122, 0.162]"
    assert "forgetting" in _section_text(text, "results")
    assert PLANTED_PATIENT not in text


def test_adaptation_report_shows_source_and_target_site_test_side_by_side(tmp_path, adaptation_inputs):
    _, text = _render(adaptation_inputs, tmp_path / "r.html")
    rows = _test_set_table(text)
    assert rows[0] == ["Metric", "Source test (n = 42)", "Target-site test (n = 12)"]
    assert rows[1:] == [["AUROC", "0.947 [0.927, 0.967]", "0.630 [0.480, 0.780]"],
                        ["Accuracy", "0.905 [0.875, 0.935]", "0.583"],
                        ["Brier score", "0.081 [0.071, 0.091]", "n/a"]]
    assert "adaptation" in _section_text(text, "results") and "forgetting" not in _section_text(text, "results")


def test_segmentation_side_by_side_table_keeps_overall_metrics_only(tmp_path, segmentation_inputs):
    old = {"metrics": {"dice": {"value": 0.744, "ci": [0.70, 0.78]}, "dice_liver": {"value": 0.9, "ci": None}}}
    results = dataclasses.replace(segmentation_inputs.results, test_sets={"old_test": old})
    _, text = _render(dataclasses.replace(segmentation_inputs, results=results), tmp_path / "r.html")
    rows = _test_set_table(text)
    assert rows[0] == ["Metric", "New test (n = 400)", "Old test"]  # no count recorded for the old test
    assert rows[1] == ["Dice", "0.810 [0.780, 0.840]", "0.744 [0.700, 0.780]"]
    assert rows[2] == ["HD95 (mm)", "7.900 [6.500, 9.300]", "n/a"] and len(rows) == 3


def test_side_by_side_table_survives_the_report_inputs_json_round_trip(tmp_path, continual_inputs):
    import json

    from medtl.workflow.report import inputs_from_json, inputs_to_json

    saved = inputs_to_json(continual_inputs)
    again = inputs_from_json(saved)
    assert again.results.test_sets["old_test"]["n_cases"] == 180
    # The JSON sorts keys, so rows may come in another order; their content must not change.
    before = _test_set_table(_render(continual_inputs, tmp_path / "b.html")[1])
    after = _test_set_table(_render(again, tmp_path / "a.html")[1])
    assert after[0] == before[0] and sorted(after[1:]) == sorted(before[1:])
    raw = json.loads(saved)
    del raw["results"]["test_sets"]  # report_inputs.json of runs made before the field existed
    assert inputs_from_json(json.dumps(raw)).results.test_sets == {}


def test_plain_run_report_has_no_side_by_side_table(any_report):
    assert "Test sets side by side" not in any_report and 'id="test-sets"' not in any_report


@pytest.mark.slow  # importing the audit brings in MONAI and torch (segmentation metrics)
def test_report_renders_from_a_real_bias_audit(tmp_path, classification_inputs):
    from medtl.evaluation.audit import BiasAudit

    rng = np.random.default_rng(5)
    n = 600
    patients = np.array([f"P-{i // 2:05d}" for i in range(n)])
    split = np.where(np.arange(n) < 200, "val", "test")
    sex = np.where(rng.random(n // 2) < 0.5, "F", "M").repeat(2)
    age = rng.choice(["18-29", "50-59", "80-89", "90+"], p=[0.3, 0.4, 0.27, 0.03], size=n // 2).repeat(2)
    y = (rng.random(n) < 0.35).astype(int)
    score = np.clip(rng.normal(0.3 + 0.4 * y - 0.1 * (age == "80-89") * y, 0.18), 0, 1)
    predictions = pd.DataFrame({"id": [f"R-{i}" for i in range(n)], "split": split, "y_true": y, "y_score": score,
                                "sex": sex, "age_band": age})
    audit = BiasAudit(["sex", "age_band"], intersections=False, n_boot=100, seed=0,
                      progress=False).run(predictions, patients).to_dict()
    _, text = _render(dataclasses.replace(classification_inputs, audit=audit, amplification=None), tmp_path / "r.html")
    page = _parse(text)
    groups = {cells[0].split()[0] for _, cells in page.rows["subgroups"] if cells and cells[0]}
    assert {"F", "M", "18-29", "80-89"} <= groups
    assert "P-00" not in text
    assert any(a.startswith("Subgroup gaps") or "by subgroup" in a for a in (i["alt"] for i in page.images))


def test_render_rejects_inputs_that_are_not_report_inputs(tmp_path, classification_inputs):
    with pytest.raises(InputError, match="ReportInputs"):
        render_report(dataclasses.asdict(classification_inputs), tmp_path / "r.html")  # type: ignore[arg-type]


def test_write_pdf_without_chromium_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MedtlError, match="chromium must be installed"):
        write_pdf(tmp_path / "r.html", tmp_path / "r.pdf")


def test_partition_counts_hidden_upstream_render_as_one_marker_and_sites_show_no_totals(
        tmp_path, classification_inputs):
    # medtl.workflow.report hides counts as None (small, or withheld to protect a small one); the
    # report also hides any small count it is handed, and never shows per-site totals.
    splits = {s: {"n_patients": n, "n_studies": n, "site": sites}
              for s, n, sites in (("train", 90, {"SITE-a": 50, "SITE-b": None, "SITE-c": None}),
                                  ("test", 40, {"SITE-a": 15, "SITE-b": 13, "SITE-c": 7}))}
    data = dataclasses.replace(classification_inputs.data, splits=splits,
                               sites={"SITE-a": 65, "SITE-b": 43, "SITE-c": 22}, source="<b>export</b>")
    _, text = _render(dataclasses.replace(classification_inputs, data=data), tmp_path / "r.html")
    rows = {cells[0]: cells[1:] for _, cells in _parse(text).rows["partitions"] if cells and cells[0].startswith("SITE")}
    assert rows == {"SITE-a": ["50", "15"], "SITE-b": ["*", "13"], "SITE-c": ["*", "*"]}
    data_section = text[text.index('id="data"'):text.index('id="partitions"')]
    assert "3: SITE-a, SITE-b, SITE-c" in data_section and "65" not in data_section
    assert "&lt;b&gt;export&lt;/b&gt;" in data_section  # the source is escaped


@pytest.mark.parametrize(("ci", "warned"), [([0.42, 0.58], True), ([0.81, 0.9], False)])
def test_amplification_warns_when_the_reference_is_no_better_than_chance(tmp_path, classification_inputs, ci, warned):
    reference = {"kind": "scratch", "label": "from scratch", "paired": True,
                 "test": {"auroc": {"value": sum(ci) / 2, "ci": ci}}}
    audit = {**classification_inputs.audit, "reference": reference}
    _, text = _render(dataclasses.replace(classification_inputs, audit=audit), tmp_path / "r.html")
    section = text[text.index('id="amplification"'):text.index('id="limitations"')]
    assert "from scratch" in section and "paired: both models" in section
    assert ("does not discriminate better than chance" in section) is warned


def test_many_suppressed_groups_fold_into_one_line_without_numbers(tmp_path, classification_inputs):
    from tests.evaluation.conftest import _suppressed

    cells = [_suppressed("age_band&site", f"{band}&SITE-3fa21c") for band in ("0-17", "18-29", "30-39", "40-49", "50-59")]
    audit = {**classification_inputs.audit, "groups": [*classification_inputs.audit["groups"], *cells]}
    _, text = _render(dataclasses.replace(classification_inputs, audit=audit), tmp_path / "r.html")
    section = text[text.index("By age_band × site"):]
    section = section[:section.index("</p>")]
    assert "5 groups suppressed (at most 10 patients each; no numbers shown)" in section
    assert "<table" not in section  # no table of empty rows
    assert not re.search(r"\d", section.split("no numbers shown):")[1].replace("0-17", "").replace(
        "18-29", "").replace("30-39", "").replace("40-49", "").replace("50-59", "").replace("3fa21c", ""))


def _inconclusive_audit() -> dict:
    """A small real test set's audit.json: every group suppressed, so no gap could be measured."""
    groups = [{"attribute": a, "group": g, "n": None, "n_patients": None, "n_positive": None, "n_negative": None,
               "suppressed": True, "imprecise": None, "note": "suppressed, n <= 10", "metrics": {}}
              for a, g in (("sex", "F"), ("sex", "M"), ("site", "A"), ("site", "B"))]
    unevaluated = [{"attribute": a, "reason": "all 2 of its groups were suppressed (at most 10 patients each), so "
                    "fewer than two groups have numbers and no gap can be measured",
                    "remedy": "more test patients per group (more than 10 in at least two groups), or a lower "
                              "audit.min_group_size"} for a in ("sex", "site")]
    return {"passed": False, "status": "inconclusive", "task": "classification", "reference": None,
            "overall": {"attribute": "overall", "group": "all", "n": 18, "n_patients": 18, "suppressed": False,
                        "metrics": {"auroc": {"value": 0.81, "ci": [0.6, 0.95]}}},
            "groups": groups, "gaps": [], "amplification": [], "thresholds": None,
            "tolerance": {"auroc": 0.05, "fnr": 0.1, "equalized_odds": 0.1},
            "correction": {"method": "bonferroni", "alpha": 0.05, "tested": 0, "ci_level": 0.95},
            "settings": {"min_group_size": 10}, "evaluated_attributes": [], "unevaluated_attributes": unevaluated,
            "notes": ["audit inconclusive: no attribute could be evaluated"]}


def test_an_inconclusive_audit_is_shown_as_such_never_as_a_green_pass(tmp_path, classification_inputs):
    inputs = dataclasses.replace(classification_inputs, audit=_inconclusive_audit(), amplification=None)
    _, text = _render(inputs, tmp_path / "r.html")
    for sid in ("identification", "subgroups", "audit-trail"):
        section = re.search(rf'<section id="{sid}">(.*?)(</section>|$)', text, flags=re.DOTALL).group(1)
        assert '<span class="badge warn">inconclusive</span>' in section, sid
        assert '<span class="badge ok">passed</span>' not in section, sid
    headline = _section_text(text, "identification")
    assert "Flagged gaps" in headline and "none decided" in headline
    subgroups = _section_text(text, "subgroups")
    assert "Inconclusive, not a pass" in subgroups and "checked nothing" in subgroups
    rows = {cells[0]: cells for _, cells in _parse(text).rows["subgroups"] if len(cells) == 3}
    assert {"sex", "site"} <= set(rows)
    assert "were suppressed" in rows["sex"][1] and "audit.min_group_size" in rows["sex"][2]
    assert "inconclusive" in _section_text(text, "limitations")


def test_a_verdict_lists_the_attributes_it_could_not_evaluate(tmp_path, classification_inputs):
    audit = {**classification_inputs.audit, "status": "failed", "evaluated_attributes": ["sex", "age_band"],
             "unevaluated_attributes": [{"attribute": "sex&age_band", "reason": "all 4 of its groups were "
                                         "suppressed", "remedy": "more test patients per group"}]}
    _, text = _render(dataclasses.replace(classification_inputs, audit=audit), tmp_path / "r.html")
    subgroups = _section_text(text, "subgroups")
    assert "could not be evaluated" in subgroups and "sex × age_band" in subgroups
    assert '<span class="badge bad">failed</span>' in text
    assert "Not evaluated by the subgroup audit" in _section_text(text, "limitations")


def test_an_audit_json_without_status_still_renders_from_passed(tmp_path, classification_inputs):
    audit = {k: v for k, v in classification_inputs.audit.items() if k != "status"}
    _, text = _render(dataclasses.replace(classification_inputs, audit={**audit, "passed": True}), tmp_path / "r.html")
    assert '<span class="badge ok">passed</span>' in text


NO_CHAMPION = ("bias amplification: not computed, model 'chest' has no champion version with an audit.json yet "
               "(promote one with `medtl registry promote`, or set audit.reference: scratch)")


@pytest.mark.parametrize("status", ["inconclusive", "failed"])
def test_the_no_champion_note_never_advises_promoting_a_version_whose_audit_did_not_pass(
        tmp_path, classification_inputs, status):
    audit = {**_inconclusive_audit(), "status": status, "notes": [NO_CHAMPION]}
    _, text = _render(dataclasses.replace(classification_inputs, audit=audit, amplification=None), tmp_path / "r.html")
    assert "registry promote" not in text
    for sid in ("amplification", "subgroups"):
        section = _section_text(text, sid)
        assert "has no champion version" in section and "this version cannot become the champion" in section, sid
        assert f"its audit {'is inconclusive' if status == 'inconclusive' else 'failed'}" in section
    passed = {**_inconclusive_audit(), "status": "passed", "passed": True, "notes": [NO_CHAMPION]}
    _, text = _render(dataclasses.replace(classification_inputs, audit=passed, amplification=None), tmp_path / "p.html")
    assert "`medtl registry promote`" in _section_text(text, "amplification")


def test_an_inconclusive_report_says_no_gap_could_be_decided(tmp_path, classification_inputs):
    inputs = dataclasses.replace(classification_inputs, audit=_inconclusive_audit(), amplification=None)
    _, text = _render(inputs, tmp_path / "r.html")
    assert "no subgroup gap could be decided" in _section_text(text, "subgroups")
    assert "could be decided" in _section_text(text, "limitations")
