"""The external-validation report: a registered model on a new site's (or period's) labelled studies.

One self-contained HTML page (figures inline, the run report's stylesheet): identification,
"External validation: yes", internal and external test metrics side by side with their CIs, the
frozen operating threshold, calibration on the external set with a recalibration advice, the
subgroup audit, the dataset-shift section and what was left out. Inputs are aggregates and
pseudonyms only; the page is PHI-scanned before it is logged, like every other output.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtl.evaluation import report_plots as rp
from medtl.evaluation.report_html import _badge, _e, _estimate, _figure, _kv, _metric_name, _table
from medtl.evaluation.shift import render_shift_html

SHOWN_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "tpr", "tnr", "ppv", "npv", "brier", "ece",
                 "calibration_slope", "calibration_intercept", "dice", "hd95")


def recalibration_advice(external: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the frozen model's probabilities need recalibrating on the external set, and why.

    Advised when the calibration slope's CI excludes 1 or the intercept's CI excludes 0 (the
    logistic recalibration framework of Van Calster et al., 2019); a note otherwise.
    """
    slope, intercept = external.get("calibration_slope") or {}, external.get("calibration_intercept") or {}
    reasons = []
    if slope.get("ci") and not (slope["ci"][0] <= 1.0 <= slope["ci"][1]):
        reasons.append("the calibration slope's CI excludes 1 (scores too extreme or too timid)")
    if intercept.get("ci") and not (intercept["ci"][0] <= 0.0 <= intercept["ci"][1]):
        reasons.append("the calibration intercept's CI excludes 0 (risks systematically over- or underestimated)")
    if not (slope.get("ci") or intercept.get("ci")):
        return False, "Calibration could not be estimated with a CI on this set (too few studies or one class)."
    if reasons:
        return True, "Recalibration is advised: " + "; ".join(reasons) + "."
    return False, "No recalibration advised: slope and intercept CIs include 1 and 0."


def render_external_report(inputs: Mapping[str, Any], out_path: Path, *, generated_at: dt.datetime | None = None) -> str:
    """Write the external-validation report to `out_path` and return its HTML.

    Args:
        inputs: `model` (name/version, run id), `internal` and `external` metric mappings
            ({metric: {"value", "ci"}}), `threshold`, `counts` (studies/patients evaluated and
            left out by reason), `audit` (audit.json), `shift` (`compare_profiles` output or None),
            `curves` (external report data, binary) and `task`.
        out_path: The HTML file to write.
        generated_at: The time stamp shown (default now, UTC).
    """
    stamp = (generated_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    css = (Path(__file__).parent / "templates" / "report.css").read_text(encoding="utf-8")
    sections = [_identification(inputs, stamp), _metrics(inputs), _calibration(inputs), _audit(inputs.get("audit")),
                render_shift_html(inputs["shift"]) if inputs.get("shift") else
                '<section id="shift"><h2>Dataset shift</h2><p class="muted">No reference profile was recorded with '
                "this model (trained before medtl recorded one, or on too few studies).</p></section>",
                _left_out(inputs)]
    page = "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>External validation of {_e(inputs['model']['name'])}</title><style>{css}</style></head><body>",
        '<header><p class="kicker">medtl external validation report</p>',
        f"<h1>{_e(inputs['model']['name'])}</h1></header><main>", *sections, "</main></body></html>",
    ])
    out_path.write_text(page, encoding="utf-8")
    return page


def _identification(inputs: Mapping[str, Any], stamp: str) -> str:
    model, counts = inputs["model"], inputs["counts"]
    pairs = [("External validation", "yes"), ("Model", model["name"]), ("Training run", model.get("run_id", "")),
             ("Validation run", inputs.get("run_id", "")), ("Task", inputs["task"]),
             ("Operating threshold (frozen at training)", inputs.get("threshold")),
             ("Studies evaluated", counts.get("studies", 0)), ("Patients evaluated", counts.get("patients", 0)),
             ("Generated", stamp)]
    return f'<section id="identification"><h2>Identification</h2>{_kv(pairs)}</section>'


def _metrics(inputs: Mapping[str, Any]) -> str:
    internal, external = inputs.get("internal") or {}, inputs.get("external") or {}
    names = [m for m in SHOWN_METRICS if m in external or m in internal]
    rows = [[_e(_metric_name(m)), _estimate(internal.get(m)) if m in internal else "n/a",
             _estimate(external.get(m)) if m in external else "n/a"] for m in names]
    table = _table(["Metric", "Internal test (training run)", "External test"], rows)
    figures = ""
    curves = inputs.get("curves") or {}
    if "roc" in curves:
        figures = _figure(rp.roc_plot({"external": curves["roc"]}), "ROC curve on the external test set")
    return (f'<section id="results"><h2>Internal and external test metrics</h2><p>95% CIs from a patient-level '
            f"bootstrap. The external metrics use the threshold frozen at training, never one chosen on the external "
            f"data.</p>{table}{figures}</section>")


def _calibration(inputs: Mapping[str, Any]) -> str:
    external = inputs.get("external") or {}
    if "calibration_slope" not in external:
        return ""
    advised, text = recalibration_advice(external)
    badge = _badge("recalibration advised", "fail") if advised else _badge("calibrated", "pass")
    figure = ""
    curves = inputs.get("curves") or {}
    if "reliability" in curves:
        figure = _figure(rp.reliability_plot({"external": curves["reliability"]}), "Reliability on the external set")
    return f'<section id="calibration"><h2>Calibration on the external set</h2><p>{badge} {_e(text)}</p>{figure}</section>'


def _audit(audit: Mapping[str, Any] | None) -> str:
    if not audit:
        return ""
    status = str(audit.get("status", "passed" if audit.get("passed") else "failed"))
    kind = {"passed": "pass", "failed": "fail"}.get(status, "muted")
    rows = [[_e(str(g.get("attribute", ""))), _e(str(g.get("group", ""))),
             _e(str(g["n"])) if g.get("n") is not None else "",  # suppressed groups publish no count
             "suppressed (too small to report)" if g.get("suppressed") else ""] for g in audit.get("groups", [])]
    return (f'<section id="subgroups"><h2>Subgroup audit on the external set</h2><p>{_badge(status, kind)} '
            f"Evaluated attributes: {_e(', '.join(audit.get('evaluated_attributes', [])) or 'none')}. "
            f"Details in audit.json.</p>{_table(['Attribute', 'Group', 'Studies', ''], rows)}</section>")


def _left_out(inputs: Mapping[str, Any]) -> str:
    left = inputs["counts"].get("left_out", {})
    rows = [[_e(reason), _e(str(n))] for reason, n in left.items()]
    return (f'<section id="limitations"><h2>Left out</h2><p>External validation needs patients the model never '
            f"saw; studies of training patients (same pseudonym under the project key, or identical pixels) are "
            f"left out.</p>{_table(['Reason', 'Studies'], rows)}</section>")
