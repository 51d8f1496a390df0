"""The audit sections of the evaluation report: subgroup audit, bias amplification, limitations.

Each section function returns the body of its section; `medtl.evaluation.report` frames it
(title, number, checklist items). Groups the audit marked `suppressed` show no numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from medtl.evaluation import report_plots as rp
from medtl.evaluation.report_html import (
    _audit_status,
    _badge,
    _cross,
    _display,
    _e,
    _estimate,
    _figure,
    _is_number,
    _kv,
    _metric_name,
    _num,
    _status_badge,
    _table,
)
from medtl.evaluation.report_types import EvaluationMethods, ReportInputs

_AMP = {"widened": "bad", "amplified": "bad", "narrowed": "ok", "reduced": "ok", "unchanged": "muted"}
# Advice in a note to promote a version ("(promote one with `medtl registry promote`, ...)").
_PROMOTE_HINT = re.compile(r"\s*\([^()]*medtl registry promote[^()]*\)")


def _imprecise_keys(audit: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """(attribute, group, metric or "*") triples the audit marks imprecise, in any of its spellings."""
    keys: set[tuple[str, str, str]] = set()
    for g in audit.get("groups", []):
        a, n = str(g.get("attribute")), str(g.get("group"))
        flag = g.get("imprecise")
        if flag is True:
            keys.add((a, n, "*"))
        elif isinstance(flag, list | tuple):
            keys.update((a, n, str(m)) for m in flag)
        keys.update((a, n, str(m)) for m, v in (g.get("metrics") or {}).items()
                    if isinstance(v, Mapping) and v.get("imprecise"))
    for item in audit.get("imprecise", []) if isinstance(audit.get("imprecise"), list) else []:
        if isinstance(item, Mapping):
            keys.add((str(item.get("attribute")), str(item.get("group")), str(item.get("metric", "*"))))
    return keys


def _suppression_limit(x: ReportInputs) -> int:
    """Groups with at most this many patients were suppressed by the audit."""
    settings = x.audit.get("settings") or {}
    return int(settings.get("min_group_size", x.methods.min_group_size))


def _tolerances(x: ReportInputs) -> dict[str, float]:
    """The tolerances the audit applied (audit.json "tolerance"), else those of the methods."""
    return {**x.methods.tolerances, **(x.audit.get("tolerance") or {})}


def _reference(ref: Any) -> str:
    if isinstance(ref, Mapping) and "label" in ref:
        return f"{ref.get('label') or 'unnamed'} ({'paired' if ref.get('paired') else 'unpaired'} comparison)"
    return _display(ref) if ref else "none"


def _group_table(x: ReportInputs, attribute: str, groups: list[Mapping[str, Any]], metrics: list[str]) -> str:
    imprecise, limit = _imprecise_keys(x.audit), _suppression_limit(x)
    rows, classes = [], []
    suppressed = [g for g in groups if g.get("suppressed")]
    # Many suppressed cells (intersections of small groups) fold into one row: they carry no numbers.
    fold = len(suppressed) > 3
    for g in groups:
        name = str(g.get("group"))
        label = _e(_cross(name)) + (" " + _badge("imprecise", "warn") if (attribute, name, "*") in imprecise else "")
        if g.get("suppressed"):  # the audit's numbers, if any were left, are never read
            if not fold:
                rows.append([label, f"&le; {limit}", "—",
                             *([f"suppressed, n &le; {limit}"] + [""] * (len(metrics) - 1))])
                classes.append("suppressed")
            continue
        withheld = g.get("n") is None  # reported, but its counts would give a suppressed group's away
        if g.get("note") and not withheld:
            label += f' <span class="ci">{_e(g["note"])}</span>'
        cells = []
        for m in metrics:
            entry = (g.get("metrics") or {}).get(m)
            flag = " " + _badge("imprecise", "warn") if (attribute, name, m) in imprecise else ""
            cells.append(_estimate(entry) + flag if entry is not None else "n/a")
        counts = ['<span class="suppressed" title="withheld so that no suppressed group\'s size follows by '
                  'subtraction">withheld</span>'] * 2 if withheld else [_num(g.get("n")), _num(g.get("n_patients"))]
        rows.append([label, *counts, *cells])
        classes.append("")
    table = _table(["Group", "Cases", "Patients", *(_metric_name(m) for m in metrics)], rows, cls="groups",
                   row_classes=classes) if rows else ""
    if fold:
        names = ", ".join(_e(_cross(str(g.get("group")))) for g in suppressed)
        table += (f'<p class="muted suppressed">{len(suppressed)} groups suppressed (at most {limit} patients each; '
                  f"no numbers shown): {names}.</p>")
    return table


def _subgroups(x: ReportInputs) -> str:
    """Body of the subgroup audit section: summary, forest plots, group and gap tables, notes."""
    audit = x.audit
    groups = [g for g in audit.get("groups", []) if isinstance(g, Mapping)]
    present = list(dict.fromkeys(m for g in groups for m in (g.get("metrics") or {})))
    metrics = [m for m in x.methods.metrics if m in present] or present
    gaps = [g for g in audit.get("gaps", []) if isinstance(g, Mapping)]
    tolerances = _tolerances(x)
    tested = [g for g in gaps if str(g.get("kind", "difference")) == "difference"
              and g.get("tolerance", tolerances.get(str(g.get("metric")))) is not None]
    shown = {*metrics, *(str(g.get("metric")) for g in tested)}
    rest = [g for g in gaps if not any(g is t for t in tested) and str(g.get("metric")) in shown]
    n_suppressed = sum(1 for g in groups if g.get("suppressed"))
    correction = audit.get("correction") or {}
    body = _kv([("Audit result", _status_badge(audit)),
                ("Attributes evaluated", _e(_evaluated_text(audit))),
                ("Reference model", _e(_reference(audit.get("reference")))),
                ("Groups", _e(f"{len(groups) - n_suppressed} reported, {n_suppressed} suppressed "
                              f"(at most {_suppression_limit(x)} patients)")),
                ("Gaps tested", _e(f"{len(tested)}; {sum(1 for g in tested if g.get('flagged'))} flagged"
                                   + (f"; multiple-testing correction: {correction.get('method')}"
                                      if correction.get("method") else ""))),
                ("Tolerances", _e(", ".join(f"{_metric_name(k)} {v:g}" for k, v in tolerances.items()) or "none"))],
               raw=True)
    body += _unevaluated(x)
    primary = next((m for m in metrics if m in ("auroc", "auroc_macro", "dice")), metrics[0] if metrics else None)
    if primary:
        overall = ((audit.get("overall") or {}).get("metrics") or {}).get(primary) or x.results.metrics.get(primary)
        plot = rp.group_forest(groups, primary, _metric_name(primary), (overall or {}).get("value"))
        if plot:
            body += '<div class="figures wide">' + _figure(
                plot, f"{_metric_name(primary)} by group with {x.methods.ci_level:.0%} CIs; the vertical line is "
                "the overall test value; hollow markers are imprecise estimates.") + "</div>"
    for attribute in dict.fromkeys(str(g.get("attribute")) for g in groups):
        members = [g for g in groups if str(g.get("attribute")) == attribute]
        body += f'<h3>By {_e(_cross(attribute))}</h3>' + _group_table(x, attribute, members, metrics)
    if tested:
        plot = rp.gap_forest(tested, tolerances, {m: _metric_name(m) for m in shown})
        body += '<div class="figures wide">' + _figure(
            plot, "Between-group differences (max − min) with the CI of the worst-vs-best pair, one panel per metric; dashed lines mark the "
            "tolerance; flagged gaps (vermillion diamonds) have their whole CI above it; hollow = inconclusive."
        ) + "</div>"
    body += "<h3>Gaps tested against a tolerance</h3>" + _gap_table(tested, x.methods)
    if rest:
        body += "<h3>Descriptive gaps (not tested)</h3>" + _gap_table(rest, x.methods)
    notes = [_shown_note(n, audit) for n in audit.get("notes", []) if isinstance(n, str)]
    if notes:
        body += "<h3>Audit notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return body


def _shown_note(note: str, audit: Mapping[str, Any]) -> str:
    """An audit note as the report shows it: advice to promote only in the report of a promotable version.

    A first run has no champion to compare with, and its note says to promote one; the version of
    this report can become the champion only if its own audit passed.
    """
    status = _audit_status(audit)
    if status == "passed" or "medtl registry promote" not in note:
        return note
    text = _PROMOTE_HINT.sub("", note)
    text = "; ".join(part for part in text.split("; ") if "medtl registry promote" not in part)
    why = {"failed": "its audit failed", "inconclusive": "its audit is inconclusive"}.get(
        str(status), "its audit is not recorded as passed")
    return (f"{text}; this version cannot become the champion ({why}): a later version whose audit passed "
            "can, or set audit.reference: scratch to compare with a from-scratch twin")


def _unevaluated_entries(audit: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [u for u in audit.get("unevaluated_attributes") or [] if isinstance(u, Mapping)]


def _evaluated_text(audit: Mapping[str, Any]) -> str:
    evaluated = audit.get("evaluated_attributes")
    if not isinstance(evaluated, list):
        return "not recorded"
    names = ", ".join(_cross(a) for a in evaluated) or "none"
    missing = len(_unevaluated_entries(audit))
    return names + (f"; {missing} not evaluated (below)" if missing else "")


def _unevaluated(x: ReportInputs) -> str:
    """Why the audit is inconclusive, or which attributes its verdict leaves out, and what would help."""
    entries = _unevaluated_entries(x.audit)
    status = _audit_status(x.audit)
    if status != "inconclusive" and not entries:
        return ""
    limit = _suppression_limit(x)
    if status == "inconclusive":
        body = ('<p class="warn"><strong>Inconclusive, not a pass:</strong> no subgroup gap could be decided (none '
                "was shown within its tolerance or beyond it), so this audit checked nothing. An attribute is "
                "evaluated when a tested gap's confidence interval lies wholly on one side of the tolerance: that "
                f"needs two or more groups with a value of a tested metric (more than {limit} patients each, with "
                "enough positives and negatives) and enough patients for a narrow interval. The registry will not "
                "promote this version.</p>")
    else:
        body = ('<p class="muted">The verdict rests on the evaluated attributes only; these could not be '
                "evaluated:</p>")
    rows = [[_e(_cross(u.get("attribute"))), _e(u.get("reason") or "not recorded"),
             _e(u.get("remedy") or "not recorded")] for u in entries]
    return body + (_table(("Attribute", "Why it was not evaluated", "What would make it evaluable"), rows,
                          cls="compact") if rows else "")


def _gap_table(gaps: Sequence[Mapping[str, Any]], methods: EvaluationMethods) -> str:
    rows, classes = [], []
    for g in gaps:
        level = g.get("ci_level")
        level_text = f' <span class="ci">({level:.1%} CI)</span>' if _is_number(level) and abs(
            level - methods.ci_level) > 1e-9 else ""
        ends = " → ".join(_e(v) for v in (g.get("worst_group"), g.get("best_group")) if v is not None)
        status = str(g.get("status") or ("flagged" if g.get("flagged") else "not recorded"))
        kind = {"flagged": "bad", "within": "ok", "inconclusive": "warn"}.get(status, "muted")
        rows.append([_e(_cross(g.get("attribute"))), _e(_metric_name(str(g.get("metric")))),
                     _e(str(g.get("kind", "difference")).replace("_", " ")), _estimate(g) + level_text,
                     ends or "—", _num(g.get("tolerance", methods.tolerances.get(str(g.get("metric"))))),
                     _badge(status.replace("_", " "), kind)])
        classes.append("flagged" if g.get("flagged") else "")
    return _table(("Attribute", "Metric", "Kind", "Gap [CI]", "Worst → best group", "Tolerance", "Status"),
                  rows, cls="compact", row_classes=classes)


def _amplification(x: ReportInputs) -> str:
    """Body of the bias amplification section: model gap against reference gap."""
    items = x.amplification if x.amplification is not None else x.audit.get("amplification")
    items = [a for a in (items or []) if isinstance(a, Mapping)]
    intro = ("<p>Does the transfer-learned model widen or narrow the between-group gaps of a reference model "
             "(e.g. the current champion or a from-scratch baseline)? Delta = model gap − reference gap; "
             "a gap is widened or narrowed only when the change is distinguishable from zero.</p>")
    reference = x.audit.get("reference")
    if isinstance(reference, Mapping):
        how = ("paired: both models scored on the same test patients, the delta's CI from the same bootstrap "
               "replicates" if reference.get("paired") else
               "unpaired: the reference's own audit.json (other test data possible), so deltas carry no CI and "
               f"count as unchanged within {_num(0.01)}")
        intro += _kv([("Reference", _e(reference.get("label") or "not named")), ("Comparison", _e(how))], raw=True)
        test = reference.get("test")
        if isinstance(test, Mapping) and test:
            shared = [k for k in test if k in x.results.metrics]
            intro += "<h3>Reference and model on the same test set</h3>" + _table(
                ("Metric", "Reference", "Model"),
                [[_e(_metric_name(k)), _estimate(test[k]), _estimate(x.results.metrics[k])] for k in shared],
                cls="compact")
            if _near_chance(test):
                intro += ('<p class="warn"><strong>Read with care:</strong> the reference does not discriminate '
                          "better than chance on this test set (its AUROC CI includes 0.5). Its between-group gaps "
                          "are small because it is poor everywhere, so a widened gap here shows what the "
                          "transfer-learned model gained, not bias that transfer introduced. A reference that "
                          "works (longer training from scratch, or the champion) is needed to judge "
                          "amplification.</p>")
    elif x.amplification is None:
        reasons = [_shown_note(n, x.audit) for n in x.audit.get("notes", [])
                   if isinstance(n, str) and n.startswith("bias amplification")]
        return intro + "<p>" + _e(reasons[0] if reasons else "No reference model was compared.") + "</p>"
    rows = [[_e(_cross(a.get("attribute"))), _e(_metric_name(str(a.get("metric")))),
             _e(str(a.get("kind", "difference")).replace("_", " ")), _num(a.get("reference")), _num(a.get("model")),
             _estimate({"value": a.get("delta"), "ci": a.get("ci")}), _badge(str(a.get("direction", "n/a")), _AMP.get(
                 str(a.get("direction")), "muted"))] for a in items]
    body = intro + _table(("Attribute", "Metric", "Kind", "Reference gap", "Model gap", "Delta [CI]", "Direction"),
                          rows, cls="compact", row_classes=["flagged" if a.get("direction") in ("widened", "amplified")
                                                            else "" for a in items])
    return body


def _near_chance(test: Mapping[str, Any]) -> bool:
    """Whether a model's test AUROC (binary or macro) has a CI reaching down to 0.5."""
    estimate = test.get("auroc") or test.get("auroc_macro")
    ci = estimate.get("ci") if isinstance(estimate, Mapping) else None
    return bool(ci) and _is_number(ci[0]) and ci[0] <= 0.5


def _derived_limitations(x: ReportInputs) -> list[str]:
    out = []
    unevaluated = [_cross(u.get("attribute")) for u in _unevaluated_entries(x.audit)]
    if _audit_status(x.audit) == "inconclusive":
        out.append("The subgroup audit is inconclusive: no between-group gap could be decided on this test set "
                   "(none shown within tolerance or beyond it), so performance differences between groups are "
                   "unknown.")
    elif unevaluated:
        out.append(f"Not evaluated by the subgroup audit (no decided gap): {', '.join(unevaluated[:12])}.")
    groups = x.audit.get("groups", [])
    suppressed = [f"{_cross(g.get('attribute'))} = {_cross(g.get('group'))}" for g in groups if g.get("suppressed")]
    if suppressed:
        out.append(f"{len(suppressed)} subgroup(s) had at most {_suppression_limit(x)} patients and were "
                   f"suppressed; performance there is unknown: {', '.join(suppressed[:12])}.")
    imprecise = sorted({f"{_cross(a)} = {_cross(g)}" for a, g, _ in _imprecise_keys(x.audit)})
    if imprecise:
        out.append(f"Estimates for {', '.join(imprecise[:12])} rest on few positive or negative cases (imprecise); "
                   "read their confidence intervals, not their point values.")
    flagged = [f"{_cross(g.get('attribute'))} ({_metric_name(str(g.get('metric')))})" for g in x.audit.get("gaps", [])
               if g.get("flagged")]
    if flagged:
        out.append(f"Performance gaps beyond tolerance: {', '.join(flagged)}. Review before use in these groups.")
    if x.data.synthetic:
        out.append("The data are synthetic: these numbers say nothing about clinical performance.")
    if len(x.data.sites) <= 1:
        out.append("Data come from a single site (or sites were not recorded); performance elsewhere is unknown.")
    if not x.methods.external_validation:
        out.append("Internal validation only: the test split shares sources with training data (no external test set).")
    if 0 < x.results.n_patients < 100:
        out.append(f"The test set has only {x.results.n_patients} patients; confidence intervals are wide.")
    missing = x.model.load_report.get("missing")
    if isinstance(missing, list | tuple) and missing:
        out.append(f"{len(missing)} encoder parameter tensor(s) were not initialised from the pretrained weights.")
    if x.data.k_anonymity.get("passed") is False:
        out.append("The manifest's k-anonymity is below the required k: re-identification risk from subgroup codes.")
    if x.data.leakage.get("passed") is False:
        out.append("The leakage check failed: patients appear in more than one split; results are optimistic.")
    return out


def _limitations(x: ReportInputs) -> str:
    """Body of the limitations section: the caller's, then those derived from the data."""
    items = [*x.limitations, *_derived_limitations(x)]
    body = "<ul>" + "".join(f"<li>{_e(t)}</li>" for t in items) + "</ul>" if items else "<p>None recorded.</p>"
    return body
