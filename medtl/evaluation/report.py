"""The audited evaluation report: one self-contained HTML file rendered from plain data.

The report is a model card (Mitchell et al. 2019) laid out along the CLAIM (2020) and
TRIPOD+AI (2024) items that apply to a transfer-learned imaging model. Each section has a
stable id (`identification`, `data`, `partitions`, `model`, `methods`, `results`, `subgroups`,
`amplification`, `limitations`, `audit-trail`, `sign-off`) so tests and reviewers can find it.
Figures are inline PNGs (see `report_plots`); there is no script, stylesheet, font or URL
to fetch, so the file opens offline, prints to PDF and can be archived as it is. The inputs
are the dataclasses of `report_types`; the subgroup, amplification and limitations sections
are written in `report_audit`, on the HTML helpers of `report_html`.

Privacy: the report renders only aggregate numbers. It reads named fields of its inputs and
never dumps a whole input, so per-patient rows, identifiers or paths that a caller leaves in
a mapping are not shown; per-case values (segmentation Dice) are drawn only as distributions;
counts of 1 to k-1 in subgroup tables are suppressed (the CMS small-cell rule, k = 11 by
default), and so are audit groups the audit marked `suppressed`. Every string is escaped.

Integrity: the audit-trail section holds the report's SHA-256 on a line of its own. The hash
covers the UTF-8 bytes of the file *without that line*; `verify_report_hash(path)` recomputes
it. By hand: delete the line containing `data-medtl-report-sha256="`, then `sha256sum` the rest.

Example:
    >>> digest = render_report(inputs, Path("report.html"))   # doctest: +SKIP
    >>> verify_report_hash(Path("report.html"))               # doctest: +SKIP
    True
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtl.errors import InputError, MedtlError
from medtl.evaluation import report_plots as rp
from medtl.evaluation.report_audit import (
    _amplification,
    _limitations,
    _subgroups,
    _suppression_limit,
    _tolerances,
)
from medtl.evaluation.report_html import (
    _METRIC_NAMES,
    _SEG_FAMILIES,
    _audit_status,
    _display,
    _e,
    _estimate,
    _figure,
    _is_number,
    _kv,
    _metric_name,
    _num,
    _passfail,
    _status_badge,
    _table,
)
from medtl.evaluation.report_types import ReportInputs

HASH_MARKER = "data-medtl-report-sha256"
_HASH_ATTRIBUTE = HASH_MARKER + '="'  # only the hash line holds it: escaped text can never contain a raw quote
_HASH_PLACEHOLDER = "<!--medtl-report-sha256-line-->"
SECTION_IDS = ("identification", "data", "partitions", "model", "methods", "results", "subgroups",
               "amplification", "limitations", "audit-trail", "sign-off")

# Checklist items each section answers; a crosswalk for reviewers, not a claim of completeness.
_SECTIONS: dict[str, tuple[str, str]] = {
    "identification": ("Identification and intended use", "CLAIM 1, 3 · TRIPOD+AI 3b · Model card: details, intended use"),
    "data": ("Data provenance and de-identification", "CLAIM 7, 12, 13 · TRIPOD+AI 5a, 5b, 6a · Model card: data"),
    "partitions": ("Partitions and leakage check", "CLAIM 20, 21, 34 · TRIPOD+AI 20b"),
    "model": ("Model and transfer learning", "CLAIM 9, 22, 23, 24, 25 · TRIPOD+AI 12c"),
    "methods": ("Evaluation methods", "CLAIM 28, 29 · TRIPOD+AI 12e, 14, 15 · Model card: metrics"),
    "results": ("Results with confidence intervals", "CLAIM 35, 36 · TRIPOD+AI 23a · Model card: quantitative analyses"),
    "subgroups": ("Subgroup audit", "TRIPOD+AI 14, 23a · Model card: factors, disaggregated metrics"),
    "amplification": ("Bias amplification", "Model card: ethical considerations"),
    "limitations": ("Limitations and caveats", "CLAIM 38 · TRIPOD+AI 26 · Model card: caveats and recommendations"),
    "audit-trail": ("Audit trail", "CLAIM 23 · reproducibility"),
    "sign-off": ("Reviewer sign-off", "to be completed by hand"),
}


# ---------------------------------------------------------------- public API


def render_report(inputs: ReportInputs, out_path: Path, *, generated_at: dt.datetime | None = None) -> str:
    """Write the HTML report and return its SHA-256 (the hash recorded in its audit trail).

    Args:
        inputs: The report's data.
        out_path: Where to write the `.html` file (parent folders are created).
        generated_at: Time stamp printed in the report; default now (UTC). Everything else in
            the file depends only on `inputs`.

    Returns:
        The hex SHA-256 of the file's bytes without its hash line (see `verify_report_hash`).

    Raises:
        InputError: when `inputs` is not a ReportInputs.
    """
    if not isinstance(inputs, ReportInputs):
        raise InputError(f"report inputs must be a ReportInputs, not {type(inputs).__name__}; build one from the run")
    stamp = (generated_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = _page(inputs, stamp)
    digest = hashlib.sha256(_without_hash_line(page).encode("utf-8")).hexdigest()
    line = (f'<p class="hash">Report SHA-256: <code {HASH_MARKER}="{digest}">{digest}</code></p>')
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(page.replace(_HASH_PLACEHOLDER, line).encode("utf-8"))
    return digest


def verify_report_hash(path: Path) -> bool:
    """Check a report against the SHA-256 recorded in its audit trail.

    Args:
        path: The report's HTML file.

    Returns:
        True when the file, without its hash line, hashes to the recorded value.

    Raises:
        InputError: when the file has no (or more than one) hash line.
    """
    text = Path(path).read_bytes().decode("utf-8")
    lines = [line for line in text.splitlines(keepends=True) if _HASH_ATTRIBUTE in line]
    if len(lines) != 1:
        raise InputError(f"report {Path(path).name} must hold one hash line, not {len(lines)}; re-render it")
    recorded = re.search(HASH_MARKER + r'="([0-9a-f]{64})"', lines[0])
    if recorded is None:
        raise InputError(f"report {Path(path).name} hash line must hold a SHA-256, not something else; re-render it")
    rest = text.replace(lines[0], "", 1)
    return hashlib.sha256(rest.encode("utf-8")).hexdigest() == recorded.group(1)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_args(user_data_dir: Path) -> list[str]:
    """Flags for an offline, sandbox-free headless Chromium run (containers run as root)."""
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", f"--user-data-dir={user_data_dir}"]


def write_pdf(html_path: Path, pdf_path: Path, *, timeout: float = 120.0) -> Path:
    """Print the HTML report to PDF with headless Chromium.

    Args:
        html_path: The report written by `render_report`.
        pdf_path: The PDF to write.
        timeout: Seconds to wait for Chromium.

    Returns:
        `pdf_path`.

    Raises:
        MedtlError: when no Chromium is installed or it fails to print.
    """
    browser = find_chromium()
    if browser is None:
        raise MedtlError("chromium must be installed to write a PDF, not missing; `apt-get install chromium`, "
                         "or open the HTML report in a browser and print it")
    pdf_path = Path(pdf_path)
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medtl-chromium-") as profile:
        cmd = [browser, *chromium_args(Path(profile)), "--no-pdf-header-footer",
               f"--print-to-pdf={pdf_path.resolve()}", Path(html_path).resolve().as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise MedtlError(f"chromium must print the report within {timeout:g} s, not time out; retry") from err
    if done.returncode != 0 or not pdf_path.is_file() or pdf_path.stat().st_size == 0:
        raise MedtlError(f"chromium must print the report to PDF, not fail (exit {done.returncode}); "
                         "open the HTML in a browser and print it instead")
    return pdf_path


def _section(sid: str, body: str) -> str:
    title, items = _SECTIONS[sid]
    number = SECTION_IDS.index(sid) + 1
    return (f'<section id="{sid}"><h2><span class="num">{number}</span> {_e(title)}</h2>'
            f'<p class="items">{_e(items)}</p>{body}</section>')


# ---------------------------------------------------------------- sections


def _identification(x: ReportInputs) -> str:
    ident = x.identification
    pairs = [("Model", ident.model_name), ("Registry version", ident.model_version or "not registered"),
             ("Task", ident.task), ("Encoder", x.model.encoder), ("MLflow run id", ident.run_id),
             ("Run date", ident.created), ("Code version", ident.code_version)]
    if ident.developers:
        pairs.append(("Developed by", ident.developers))
    primary = _primary_metric(x)
    headline = ""
    if primary:
        headline = (f'<div class="headline"><div><span class="label">{_e(_metric_name(primary))} (test)</span>'
                    f'<span class="big">{_estimate(x.results.metrics[primary])}</span></div>'
                    f'<div><span class="label">Subgroup audit</span><span class="big">'
                    f'{_status_badge(x.audit)}</span></div>'
                    f'<div><span class="label">Flagged gaps</span><span class="big">{_flagged_headline(x.audit)}'
                    '</span></div></div>')
    use = f"<h3>Intended use</h3><p>{_e(ident.intended_use)}</p>"
    if ident.out_of_scope:
        use += f"<h3>Out of scope</h3><p>{_e(ident.out_of_scope)}</p>"
    return _section("identification", headline + _kv(pairs) + use)


def _flagged_headline(audit: Mapping[str, Any]) -> str:
    """The number of flagged gaps; "none decided" when the audit could decide no gap at all."""
    if _audit_status(audit) == "inconclusive":
        return '<span class="muted">none decided</span>'
    return _num(sum(1 for g in audit.get("gaps", []) if g.get("flagged")))


def _primary_metric(x: ReportInputs) -> str | None:
    for name in (*x.methods.metrics, "auroc", "auroc_macro", "dice"):
        if name in x.results.metrics:
            return name
    return None


def _data(x: ReportInputs) -> str:
    d = x.data
    k = d.k_anonymity
    pairs: list[tuple[str, Any]] = [("Source", d.source or "not described"),
                                    ("Synthetic data", "yes" if d.synthetic else "no"),
                                    ("Files found", _num(d.n_files)), ("Studies", _num(d.n_studies)),
                                    ("Patients", _num(d.n_patients)), ("Acquisition years", d.years or "not recorded"),
                                    ("Modalities", _display(dict(d.modalities)) or "not recorded")]
    body = _kv([*pairs, ("Sites", _site_codes(x) if d.sites else "not recorded")])
    deid = [("De-identification profile", _e(d.deid_profile or "not recorded")),
            ("Pseudonym key id", _e(d.key_id or "not recorded")),
            ("k-anonymity", _e(f"k = {k.get('k', 'n/a')} (required ≥ {_k_min(x)})")
             + " " + _passfail(k.get("passed")) if k else _e("not recorded")),
            ("Quasi-identifiers", _e(_display(k.get("quasi_identifiers", [])) or "not recorded")),
            ("PHI scan of outputs", _passfail(d.phi_scan.get("passed")) + (
                f" {_num(d.phi_scan.get('n_findings'))} finding(s)" if "n_findings" in d.phi_scan else "") + (
                f" ({_e(d.phi_scan['scope'])})" if d.phi_scan.get("scope") else "")
             if d.phi_scan else _e("not recorded")),
            ("Manifest SHA-256", f"<code>{_e(d.manifest_sha256)}</code>")]
    body += "<h3>De-identification (CLAIM 12)</h3>" + _kv(deid, raw=True)
    reasons = [(_e(reason), "quarantined", _num(n)) for reason, n in d.quarantined.items()]
    reasons += [(_e(reason), "skipped", _num(n)) for reason, n in d.skipped.items()]
    body += "<h3>Files not used, by reason</h3>" + _table(("Reason", "Outcome", "Files"), reasons)
    return _section("data", body)


# One marker for every hidden count, small or withheld to protect a small one: telling the two
# apart would narrow the small count (a split of 12 with one "< 11" and one other hidden cell).
_HIDDEN = ('<span class="suppressed" title="fewer than {k}, or withheld so that such a count cannot be '
           'recovered by subtraction">*</span>')


def _hidden(counts: Mapping[str, Any], value: str, k_min: int) -> bool:
    """None: hidden by medtl.workflow.report (protect); a small count is hidden here too, whoever made the inputs."""
    n = counts.get(value, 0)
    return n is None or (_is_number(n) and 0 < n < k_min)


def _site_codes(x: ReportInputs) -> str:
    # Studies per site are in the partition tables, split by split and protected there; totals
    # here would let a hidden cell follow by subtraction.
    return f"{len(x.data.sites)}: " + ", ".join(str(site) for site in x.data.sites)


def _partitions(x: ReportInputs) -> str:
    d = x.data
    splits = list(d.splits)
    k_min = _k_min(x)
    leak = d.leakage
    body = _kv([("Partitions disjoint at", _e(d.split_level) + " level"),
                ("Leakage check", _passfail(leak.get("passed")) + (
                    f" {_num(leak.get('n_shared'))} {_e(leak.get('level', 'patient'))}(s) in more than one split"
                    if "n_shared" in leak else ""))], raw=True)
    rows = [[_e(s), _num(d.splits[s].get("n_patients")), _num(d.splits[s].get("n_studies"))] for s in splits]
    body += "<h3>Split sizes</h3>" + _table(("Split", "Patients", "Studies"), rows)
    columns: list[str] = []
    for s in splits:
        columns += [c for c, v in d.splits[s].items() if isinstance(v, Mapping) and c not in columns]
    for column in columns:
        values: list[str] = []
        for s in splits:
            values += [str(v) for v in d.splits[s].get(column, {}) if str(v) not in values]
        exact = column == "label"  # label totals per split are not quasi-identifiers
        counts = {s: {str(k): n for k, n in d.splits[s].get(column, {}).items()} for s in splits}
        table_rows = [[_e(v)] + [_num(counts[s].get(v, 0)) if exact or not _hidden(counts[s], v, k_min)
                                 else _HIDDEN.format(k=k_min) for s in splits] for v in values]
        note = "" if exact else (f' <span class="muted">(* = fewer than {k_min} studies, or withheld so that such '
                                 'a count cannot be recovered by subtraction)</span>')
        body += f"<h3>{_e(column)} by split{note}</h3>" + _table([column, *splits], table_rows, cls="compact")
    return _section("partitions", body)


def _k_min(x: ReportInputs) -> int:
    """Smallest count shown exactly (the manifest's k, else one more than the audit's suppression limit)."""
    k_min = x.data.k_anonymity.get("k_min")  # None when the manifest came without its sidecar
    return int(k_min) if k_min is not None else _suppression_limit(x) + 1


def _model(x: ReportInputs) -> str:
    m = x.model
    lr = m.load_report
    body = _kv([("Encoder", m.encoder), ("Spatial dimensions", f"{m.spatial_dims}D"), ("Head", m.head or "n/a"),
                ("Transfer strategy", m.strategy),
                ("Frozen layers", "; ".join(map(str, m.frozen_layers)) if m.frozen_layers else "none (all trainable)")])
    body += "<h3>Pretrained weights (CLAIM 24)</h3>" + _kv(m.weights.items())
    load = [(key, f"{len(v)}: {_display(list(v))}" if isinstance(v, list | tuple) and v else
             ("0" if isinstance(v, list | tuple) else v)) for key, v in lr.items()]
    body += "<h3>Weight load report</h3>" + _kv(load)
    body += "<h3>Preprocessing (CLAIM 9)</h3>" + _kv(m.preprocessing.items())
    body += "<h3>Training hyperparameters (CLAIM 25)</h3>" + _kv(m.hyperparameters.items())
    body += "<h3>Library versions (CLAIM 23)</h3>" + _kv(m.library_versions.items())
    return _section("model", body)


def _methods(x: ReportInputs) -> str:
    me = x.methods
    rule = me.threshold_rule + (f" (target {me.threshold_target:g})" if me.threshold_target is not None
                                and me.threshold_rule != "youden" else "")
    pairs = [("Test data", me.test_description), ("Metrics", ", ".join(_metric_name(m) for m in me.metrics))]
    if x.identification.task == "classification":
        positive = me.positive_class
        if positive is not None:
            pairs.append(("Positive class", f"{positive} (sensitivity, specificity, FNR and the audit's "
                                            "subgroup gaps refer to it)"))
        pairs += [("Threshold rule", rule + ", chosen on the validation split"),
                  ("Operating threshold", _num(me.threshold) if me.threshold is not None else "n/a")]
    pairs += [("Confidence intervals", f"{me.ci_level:.0%} {me.ci_method}"),
              ("Bootstrap replicates", f"{me.n_boot:,}"),
              ("Group suppression", f"groups of at most {_suppression_limit(x)} patients are not reported"),
              ("Gap CIs", "paired bootstrap; a difference gap's CI is that of its worst and best group, the same "
                          "two groups in every replicate; groups with too few events for a metric stay out of its "
                          "gaps (audit notes); " + _correction_text(x.audit)),
              ("Gap tolerances", ", ".join(f"{_metric_name(k)} {v:g}" for k, v in _tolerances(x).items()) or "n/a"),
              ("External validation", "yes" if me.external_validation else "no")]
    return _section("methods", _kv(pairs))


def _correction_text(audit: Mapping[str, Any]) -> str:
    correction = audit.get("correction") or {}
    level, tested = correction.get("ci_level"), correction.get("tested")
    if correction.get("method") == "bonferroni" and _is_number(level) and tested:
        return f"tested gaps at the Bonferroni level over all {tested} tested gaps ({level:.2%} CIs)"
    return "tested gaps without a multiplicity correction"


def _results(x: ReportInputs) -> str:
    r = x.results
    rows = [[_e(_metric_name(k)), _estimate(v)] for k, v in r.metrics.items() if _overall(k)]
    body = _kv([("Test cases", _num(r.n_cases)), ("Test patients", _num(r.n_patients))])
    body += "<h3>Overall metrics</h3>" + _table(("Metric", f"Estimate [{x.methods.ci_level:.0%} CI]"), rows)
    body += _test_sets(x)
    figures = rp.classification_figures(r.curves, r.metrics, x.methods.threshold) if r.curves else []
    seg = _segmentation_rows(r.metrics)
    if seg:
        families = [f for f in reversed(_SEG_FAMILIES) if any(f in m for m in seg.values())]
        body += "<h3>Per-class segmentation metrics</h3>" + _table(
            ["Class", *(_METRIC_NAMES[f] for f in families)],
            [[_e(c)] + [_estimate(m.get(f)) if f in m else "n/a" for f in families] for c, m in seg.items()])
    if r.dice_per_case:
        figures.append((rp.dice_plot(r.dice_per_case), "Per-case Dice by class: violin (density) with box "
                        "(median, quartiles, whiskers to 1.5 IQR); cases are not listed."))
    if x.transfer_benefit:
        name = _metric_name(x.transfer_benefit_metric)
        figures.append((rp.data_efficiency_plot(x.transfer_benefit, metric=name),
                        f"Data efficiency: test {name} by fraction of training data, mean over runs; the band "
                        "is the 95 % CI over seeds where the study gives one, else ± sd (as the figure says)."))
    if figures:
        body += '<div class="figures">' + "".join(_figure(p, c) for p, c in figures) + "</div>"
    return _section("results", body)


def _overall(key: str) -> bool:
    """Whether a metric is an overall one (per-class segmentation metrics have their own table)."""
    return not any(key.startswith(f + "_") for f in _SEG_FAMILIES) or key in _METRIC_NAMES


def _test_sets(x: ReportInputs) -> str:
    """The run's test set beside the old test set (continual) or the domains' test sets (adaptation)."""
    sets = x.results.test_sets
    columns: list[tuple[str, Mapping[str, Any]]] = []
    notes = []
    if "old_test" in sets:
        columns += [("New test", {"metrics": x.results.metrics, "n_cases": x.results.n_cases}),
                    ("Old test", sets["old_test"])]
        notes.append("The old test set is the registered starting version's, scored by this model with a threshold "
                     "from the old validation split: a drop from that version's own figures is forgetting.")
    if "source_test" in sets or "target_test" in sets:
        columns += [(label, sets[name]) for name, label in (("source_test", "Source test"),
                                                            ("target_test", "Target-site test")) if name in sets]
        notes.append("The target-site test holds the test studies of the adaptation target domain and the source "
                     "test the other domains': the target column shows how far adaptation carried the model to "
                     "the new site.")
    if not columns:
        return ""
    metrics: list[str] = []
    for _, block in columns:
        metrics += [k for k in block.get("metrics", {}) if _overall(k) and k not in metrics]
    headers = ["Metric"] + [label + (f" (n = {block['n_cases']:,})" if block.get("n_cases") else "")
                            for label, block in columns]
    rows = [[_e(_metric_name(k))] + [_estimate(block["metrics"][k]) if k in block.get("metrics", {}) else "n/a"
                                     for _, block in columns] for k in metrics]
    return (f'<h3 id="test-sets">Test sets side by side</h3><p>{_e(" ".join(notes))} Estimates with '
            f'{x.methods.ci_level:.0%} CI; n is the number of test cases.</p>' + _table(headers, rows, cls="compact"))


def _segmentation_rows(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        family = next((f for f in _SEG_FAMILIES if key.startswith(f + "_")), None)
        if family and key not in _METRIC_NAMES:
            rows.setdefault(key[len(family) + 1:], {})[family] = value
    return rows


def _audit_trail(x: ReportInputs, stamp: str) -> str:
    ident = x.identification
    pairs = [("Code version", _e(ident.code_version)), ("MLflow run id", f"<code>{_e(ident.run_id)}</code>"),
             ("Registered model", _e(f"{ident.model_name} v{ident.model_version}" if ident.model_version
                                     else f"{ident.model_name} (not registered)")),
             ("Manifest SHA-256", f"<code>{_e(x.data.manifest_sha256)}</code>"),
             ("Weights SHA-256", f"<code>{_e(x.model.weights.get('sha256', 'n/a'))}</code>"),
             ("Audit result", _status_badge(x.audit)), ("Report generated", _e(stamp))]
    verify = ("<p class=\"muted\">The report hash below covers this file without its own line: delete the line "
              f"containing <code>{_e(_HASH_ATTRIBUTE)}</code> and compute the SHA-256 of the rest, or call "
              "<code>medtl.evaluation.report.verify_report_hash(path)</code>.</p>")
    # The section is closed by _page after the hash line, so that line stays inside it.
    return _section("audit-trail", _kv(pairs, raw=True) + verify).removesuffix("</section>")


def _signoff(x: ReportInputs) -> str:
    lines = "".join(f'<tr><th>{_e(k)}</th><td class="blank"></td></tr>'
                    for k in ("Reviewer name", "Role", "Date", "Signature"))
    boxes = "".join(f'<span class="box"></span> {_e(d)}&emsp;' for d in
                    ("Approved", "Approved with conditions", "Not approved"))
    body = (f'<p>To be completed by hand on the printed report (run <code>{_e(x.identification.run_id)}</code>).</p>'
            f'<table class="kv signoff">{lines}<tr><th>Decision</th><td>{boxes}</td></tr>'
            '<tr><th>Conditions / comments</th><td class="blank tall"></td></tr></table>')
    return _section("sign-off", body)


def _css() -> str:
    # Kept as a file so designers can edit it; read once per render (a few kB).
    return (Path(__file__).parent / "templates" / "report.css").read_text(encoding="utf-8")


def _without_hash_line(page: str) -> str:
    return page.replace(_HASH_PLACEHOLDER + "\n", "", 1)


def _page(x: ReportInputs, stamp: str) -> str:
    ident = x.identification
    title = f"Evaluation report: {ident.model_name}" + (f" v{ident.model_version}" if ident.model_version else "")
    toc = "".join(f'<li><a href="#{sid}">{_e(_SECTIONS[sid][0])}</a></li>' for sid in SECTION_IDS)
    parts = [_identification(x), _data(x), _partitions(x), _model(x), _methods(x), _results(x),
             _section("subgroups", _subgroups(x)), _section("amplification", _amplification(x)),
             _section("limitations", _limitations(x))]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_css()}</style></head><body><main>",
        f'<header><p class="kicker">medtl audited evaluation report</p><h1>{_e(title)}</h1>'
        f'<p class="sub">{_e(ident.task)} · run {_e(ident.run_id)} · '
        f'generated <span id="generated-at">{_e(stamp)}</span></p></header>',
        f'<nav id="contents"><h2>Contents</h2><ol>{toc}</ol></nav>',
        *parts,
        _audit_trail(x, stamp),
        _HASH_PLACEHOLDER,
        "</section>",
        _signoff(x),
        '<footer>Generated by medtl. Contains aggregate statistics only: no patient identifiers, '
        "no per-patient rows.</footer>",
        "</main></body></html>",
        "",
    ])
