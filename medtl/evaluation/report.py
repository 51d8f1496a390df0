"""The audited evaluation report: one self-contained HTML file rendered from plain data.

The report is a model card (Mitchell et al. 2019) laid out along the CLAIM (2020) and
TRIPOD+AI (2024) items that apply to a transfer-learned imaging model. Each section has a
stable id (`identification`, `data`, `partitions`, `model`, `methods`, `results`, `subgroups`,
`amplification`, `limitations`, `audit-trail`, `sign-off`) so tests and reviewers can find it.
Figures are inline PNGs (see `report_plots`); there is no script, stylesheet, font or URL
to fetch, so the file opens offline, prints to PDF and can be archived as it is.

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
import html
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtl.errors import InputError, MedtlError
from medtl.evaluation import report_plots as rp

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
_METRIC_NAMES = {
    "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
    "tpr": "Sensitivity (TPR)", "tnr": "Specificity (TNR)", "fpr": "False positive rate", "fnr": "False negative rate",
    "ppv": "PPV (precision)", "npv": "NPV", "brier": "Brier score", "ece": "ECE",
    "calibration_slope": "Calibration slope", "calibration_intercept": "Calibration intercept",
    "auroc_macro": "AUROC (macro)", "auprc_macro": "AUPRC (macro)", "dice": "Dice", "hd95": "HD95 (mm)",
    "surface_dice": "Surface Dice", "f1": "F1", "equalized_odds": "Equalized odds",
}
_SEG_FAMILIES = ("surface_dice", "hd95", "dice")
_AMP = {"widened": "bad", "amplified": "bad", "narrowed": "ok", "reduced": "ok", "unchanged": "muted"}
_LIST_PREVIEW = 8


@dataclass(frozen=True)
class Identification:
    """Who and what the model is (model card "model details" and "intended use")."""

    model_name: str
    task: str  # classification | segmentation
    intended_use: str
    run_id: str
    created: str  # ISO date of the run
    code_version: str  # git commit or package version
    model_version: str = ""  # registry version; "" when not registered
    out_of_scope: str = ""  # uses the model is not meant for
    developers: str = ""


@dataclass(frozen=True)
class DataProvenance:
    """Aggregate facts about the data, from the manifest and its sidecar (no rows)."""

    n_files: int
    n_studies: int
    n_patients: int
    manifest_sha256: str
    source: str = ""  # free-text description of the studies' origin
    synthetic: bool = False
    modalities: Mapping[str, int] = field(default_factory=dict)
    sites: Mapping[str, int] = field(default_factory=dict)  # site code -> studies
    years: str = ""  # acquisition years only, e.g. "2014-2019"
    quarantined: Mapping[str, int] = field(default_factory=dict)  # reason -> files held back
    skipped: Mapping[str, int] = field(default_factory=dict)  # reason -> files not used
    deid_profile: str = ""
    key_id: str = ""  # id of the pseudonym key (never the key)
    k_anonymity: Mapping[str, Any] = field(default_factory=dict)  # k, k_min, quasi_identifiers, passed
    phi_scan: Mapping[str, Any] = field(default_factory=dict)  # passed, n_findings
    # split -> {"n_studies": int, "n_patients": int, "<column>": {value: count}, ...}
    splits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    split_level: str = "patient"
    leakage: Mapping[str, Any] = field(default_factory=dict)  # passed, level, n_shared


@dataclass(frozen=True)
class ModelTransfer:
    """The encoder, where its weights come from and how they were adapted and trained."""

    encoder: str
    strategy: str
    weights: Mapping[str, Any] = field(default_factory=dict)  # origin, licence, sha256, mean/std, ...
    load_report: Mapping[str, Any] = field(default_factory=dict)  # matched/missing/unexpected/adapted
    frozen_layers: Sequence[str] = ()
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    library_versions: Mapping[str, str] = field(default_factory=dict)
    head: str = ""
    spatial_dims: int = 2


@dataclass(frozen=True)
class EvaluationMethods:
    """How the numbers were computed."""

    metrics: Sequence[str]
    threshold_rule: str
    ci_method: str
    n_boot: int
    threshold: float | None = None
    threshold_target: float | None = None
    ci_level: float = 0.95
    tolerances: Mapping[str, float] = field(default_factory=dict)  # metric -> allowed gap
    min_group_size: int = 10  # groups with at most this many patients are suppressed (audit setting)
    test_description: str = "held-out test split of the same sources (internal validation)"
    external_validation: bool = False


@dataclass(frozen=True)
class Results:
    """Test-set results: metric -> {"value", "ci"} plus the data of the figures.

    `curves` is `metrics.classification_report_data(...)` (binary or multi-class); ROC/PR curves
    may carry `tpr_lo`/`tpr_hi` and `precision_lo`/`precision_hi` bands. For segmentation,
    `metrics` holds `dice`, `hd95`, ... and per class `dice_<class>`, ...; `dice_per_case`
    maps class -> per-case Dice, drawn only as a distribution.
    """

    metrics: Mapping[str, Mapping[str, Any]]
    n_cases: int = 0
    n_patients: int = 0
    curves: Mapping[str, Any] | None = None
    dice_per_case: Mapping[str, Sequence[float]] | None = None


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, as plain data (JSON-ready mappings and numbers).

    `audit` is audit.json; `amplification` defaults to `audit["amplification"]`; `limitations`
    come first in their section, followed by those the report derives from the data;
    `transfer_benefit` maps arm -> training fraction -> {"mean", "sd"} of `transfer_benefit_metric`.
    """

    identification: Identification
    data: DataProvenance
    model: ModelTransfer
    methods: EvaluationMethods
    results: Results
    audit: Mapping[str, Any]
    amplification: Sequence[Mapping[str, Any]] | None = None
    limitations: Sequence[str] = ()
    transfer_benefit: Mapping[str, Mapping[Any, Mapping[str, float]]] | None = None
    transfer_benefit_metric: str = "auroc"


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


# ---------------------------------------------------------------- small HTML helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (_is_number(value) and not math.isfinite(float(value))):
        return "n/a"
    if not _is_number(value):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{1 if abs(value) >= 100 else 2 if abs(value) >= 10 else digits}f}"


def _ci(ci: Any) -> str:
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        return ""
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def _estimate(entry: Any) -> str:
    """`0.912 [0.881, 0.940]` from a {"value", "ci"} mapping (or a bare number)."""
    if isinstance(entry, Mapping):
        ci = _ci(entry.get("ci"))
        return _num(entry.get("value")) + (f' <span class="ci">{ci}</span>' if ci else "")
    return _num(entry)


def _metric_name(key: str) -> str:
    for family in _SEG_FAMILIES:
        if key.startswith(family + "_") and key not in _METRIC_NAMES:
            return f"{_METRIC_NAMES[family]}: {key[len(family) + 1:]}"
    return _METRIC_NAMES.get(key, key)


def _display(value: Any) -> str:
    """A config value as text; absolute paths shrink to their file name (folders can name people)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_display(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        items = [_display(v) for v in value]
        more = f" … and {len(items) - _LIST_PREVIEW} more" if len(items) > _LIST_PREVIEW else ""
        return ", ".join(items[:_LIST_PREVIEW]) + more
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return "…/" + re.split(r"[\\/]", text.rstrip("/\\"))[-1]
    return text


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "",
           row_classes: Sequence[str] | None = None) -> str:
    """A table; headers are escaped here, cells must already be HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        rc = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    if not body:
        return '<p class="muted">None recorded.</p>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _kv(pairs: Iterable[tuple[str, Any]], *, raw: bool = False) -> str:
    """A two-column key/value table; values are escaped unless `raw`."""
    rows = [f"<tr><th>{_e(k)}</th><td>{v if raw else _e(_display(v))}</td></tr>" for k, v in pairs]
    return f'<table class="kv">{"".join(rows)}</table>' if rows else '<p class="muted">None recorded.</p>'


def _figure(plot: rp.Plot, caption: str) -> str:
    return (f'<figure><img src="{plot.uri}" alt="{_e(plot.alt)}" width="{plot.width}" height="{plot.height}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _cross(name: Any) -> str:
    """Intersections are stored as "sex&age_band" / "F&80-89"; shown as "sex × age_band"."""
    return str(name).replace("&", " × ")


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{_e(text)}</span>'


def _passfail(passed: Any) -> str:
    if passed is None:
        return _badge("not recorded", "muted")
    return _badge("passed", "ok") if passed else _badge("failed", "bad")


def _count(n: Any, k_min: int) -> str:
    """A small-cell-safe count: 1..k_min-1 is shown as "< k_min"."""
    if _is_number(n) and 0 < n < k_min:
        return f'<span class="suppressed">&lt; {k_min}</span>'
    return _num(n)


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
                    f'{_passfail(x.audit.get("passed"))}</span></div>'
                    f'<div><span class="label">Flagged gaps</span><span class="big">'
                    f'{sum(1 for g in x.audit.get("gaps", []) if g.get("flagged"))}</span></div></div>')
    use = f"<h3>Intended use</h3><p>{_e(ident.intended_use)}</p>"
    if ident.out_of_scope:
        use += f"<h3>Out of scope</h3><p>{_e(ident.out_of_scope)}</p>"
    return _section("identification", headline + _kv(pairs) + use)


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
                                    ("Modalities", _display(dict(d.modalities)) or "not recorded"),
                                    ("Sites", f"{len(d.sites)}: " + _display(dict(d.sites)) if d.sites else "not recorded")]
    body = _kv(pairs)
    deid = [("De-identification profile", _e(d.deid_profile or "not recorded")),
            ("Pseudonym key id", _e(d.key_id or "not recorded")),
            ("k-anonymity", _e(f"k = {k.get('k', 'n/a')} (required ≥ {_k_min(x)})")
             + " " + _passfail(k.get("passed")) if k else _e("not recorded")),
            ("Quasi-identifiers", _e(_display(k.get("quasi_identifiers", [])) or "not recorded")),
            ("PHI scan of outputs", _passfail(d.phi_scan.get("passed")) + (
                f" {_num(d.phi_scan.get('n_findings'))} finding(s)" if "n_findings" in d.phi_scan else "")
             if d.phi_scan else _e("not recorded")),
            ("Manifest SHA-256", f"<code>{_e(d.manifest_sha256)}</code>")]
    body += "<h3>De-identification (CLAIM 12)</h3>" + _kv(deid, raw=True)
    reasons = [(_e(reason), "quarantined", _num(n)) for reason, n in d.quarantined.items()]
    reasons += [(_e(reason), "skipped", _num(n)) for reason, n in d.skipped.items()]
    body += "<h3>Files not used, by reason</h3>" + _table(("Reason", "Outcome", "Files"), reasons)
    return _section("data", body)


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
        table_rows = [[_e(v)] + [_num(counts[s].get(v, 0)) if exact else _count(counts[s].get(v, 0), k_min)
                                 for s in splits] for v in values]
        note = "" if exact else f' <span class="muted">(counts below {k_min} suppressed)</span>'
        body += f"<h3>{_e(column)} by split{note}</h3>" + _table([column, *splits], table_rows, cls="compact")
    return _section("partitions", body)


def _k_min(x: ReportInputs) -> int:
    """Smallest count shown exactly (the manifest's k, else one more than the audit's suppression limit)."""
    return int(x.data.k_anonymity.get("k_min", _suppression_limit(x) + 1))


def _model(x: ReportInputs) -> str:
    m = x.model
    lr = m.load_report
    body = _kv([("Encoder", m.encoder), ("Spatial dimensions", f"{m.spatial_dims}D"), ("Head", m.head or "n/a"),
                ("Transfer strategy", m.strategy),
                ("Frozen layers", _display(list(m.frozen_layers)) if m.frozen_layers else "none (all trainable)")])
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
        pairs += [("Threshold rule", rule + ", chosen on the validation split"),
                  ("Operating threshold", _num(me.threshold) if me.threshold is not None else "n/a")]
    pairs += [("Confidence intervals", f"{me.ci_level:.0%} {me.ci_method}"),
              ("Bootstrap replicates", f"{me.n_boot:,}"),
              ("Group suppression", f"groups of at most {_suppression_limit(x)} patients are not reported"),
              ("Gap tolerances", ", ".join(f"{_metric_name(k)} {v:g}" for k, v in _tolerances(x).items()) or "n/a"),
              ("External validation", "yes" if me.external_validation else "no")]
    return _section("methods", _kv(pairs))


def _results(x: ReportInputs) -> str:
    r = x.results
    rows = [[_e(_metric_name(k)), _estimate(v)] for k, v in r.metrics.items()
            if not any(k.startswith(f + "_") for f in _SEG_FAMILIES) or k in _METRIC_NAMES]
    body = _kv([("Test cases", _num(r.n_cases)), ("Test patients", _num(r.n_patients))])
    body += "<h3>Overall metrics</h3>" + _table(("Metric", f"Estimate [{x.methods.ci_level:.0%} CI]"), rows)
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
                        f"Data efficiency: test {name} by fraction of training data, mean ± sd over runs."))
    if figures:
        body += '<div class="figures">' + "".join(_figure(p, c) for p, c in figures) + "</div>"
    return _section("results", body)


def _segmentation_rows(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        family = next((f for f in _SEG_FAMILIES if key.startswith(f + "_")), None)
        if family and key not in _METRIC_NAMES:
            rows.setdefault(key[len(family) + 1:], {})[family] = value
    return rows


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
    for g in groups:
        name = str(g.get("group"))
        label = _e(_cross(name)) + (" " + _badge("imprecise", "warn") if (attribute, name, "*") in imprecise else "")
        if g.get("suppressed"):  # the audit's numbers, if any were left, are never read
            rows.append([label, f"&le; {limit}", "—", *([f"suppressed, n &le; {limit}"] + [""] * (len(metrics) - 1))])
            classes.append("suppressed")
            continue
        if g.get("note"):
            label += f' <span class="ci">{_e(g["note"])}</span>'
        cells = []
        for m in metrics:
            entry = (g.get("metrics") or {}).get(m)
            flag = " " + _badge("imprecise", "warn") if (attribute, name, m) in imprecise else ""
            cells.append(_estimate(entry) + flag if entry is not None else "n/a")
        rows.append([label, _num(g.get("n")), _num(g.get("n_patients")), *cells])
        classes.append("")
    return _table(["Group", "Cases", "Patients", *(_metric_name(m) for m in metrics)], rows, cls="groups",
                  row_classes=classes)


def _subgroups(x: ReportInputs) -> str:
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
    body = _kv([("Audit result", _passfail(audit.get("passed"))),
                ("Reference model", _e(_reference(audit.get("reference")))),
                ("Groups", _e(f"{len(groups) - n_suppressed} reported, {n_suppressed} suppressed "
                              f"(at most {_suppression_limit(x)} patients)")),
                ("Gaps tested", _e(f"{len(tested)}; {sum(1 for g in tested if g.get('flagged'))} flagged"
                                   + (f"; multiple-testing correction: {correction.get('method')}"
                                      if correction.get("method") else ""))),
                ("Tolerances", _e(", ".join(f"{_metric_name(k)} {v:g}" for k, v in tolerances.items()) or "none"))],
               raw=True)
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
            plot, "Between-group differences (max − min) with CIs, one panel per metric; dashed lines mark the "
            "tolerance; flagged gaps (vermillion diamonds) have their whole CI above it; hollow = inconclusive."
        ) + "</div>"
    body += "<h3>Gaps tested against a tolerance</h3>" + _gap_table(tested, x.methods)
    if rest:
        body += "<h3>Descriptive gaps (not tested)</h3>" + _gap_table(rest, x.methods)
    notes = [n for n in audit.get("notes", []) if isinstance(n, str)]
    if notes:
        body += "<h3>Audit notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return _section("subgroups", body)


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
    items = x.amplification if x.amplification is not None else x.audit.get("amplification")
    items = [a for a in (items or []) if isinstance(a, Mapping)]
    intro = ("<p>Does the transfer-learned model widen or narrow the between-group gaps of a reference model "
             "(e.g. the current champion or a from-scratch baseline)? Delta = model gap − reference gap; "
             "a gap is widened or narrowed only when the change is distinguishable from zero.</p>")
    rows = [[_e(_cross(a.get("attribute"))), _e(_metric_name(str(a.get("metric")))),
             _e(str(a.get("kind", "difference")).replace("_", " ")), _num(a.get("reference")), _num(a.get("model")),
             _estimate({"value": a.get("delta"), "ci": a.get("ci")}), _badge(str(a.get("direction", "n/a")), _AMP.get(
                 str(a.get("direction")), "muted"))] for a in items]
    body = intro + _table(("Attribute", "Metric", "Kind", "Reference gap", "Model gap", "Delta [CI]", "Direction"),
                          rows, cls="compact", row_classes=["flagged" if a.get("direction") in ("widened", "amplified")
                                                            else "" for a in items])
    return _section("amplification", body)


def _derived_limitations(x: ReportInputs) -> list[str]:
    out = []
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
    items = [*x.limitations, *_derived_limitations(x)]
    body = "<ul>" + "".join(f"<li>{_e(t)}</li>" for t in items) + "</ul>" if items else "<p>None recorded.</p>"
    return _section("limitations", body)


def _audit_trail(x: ReportInputs, stamp: str) -> str:
    ident = x.identification
    pairs = [("Code version", _e(ident.code_version)), ("MLflow run id", f"<code>{_e(ident.run_id)}</code>"),
             ("Registered model", _e(f"{ident.model_name} v{ident.model_version}" if ident.model_version
                                     else f"{ident.model_name} (not registered)")),
             ("Manifest SHA-256", f"<code>{_e(x.data.manifest_sha256)}</code>"),
             ("Weights SHA-256", f"<code>{_e(x.model.weights.get('sha256', 'n/a'))}</code>"),
             ("Audit result", _passfail(x.audit.get("passed"))), ("Report generated", _e(stamp))]
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
             _subgroups(x), _amplification(x), _limitations(x)]
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
