"""Small HTML building blocks of the evaluation report: escaping, numbers, tables, badges, figures.

Internal helpers shared by `medtl.evaluation.report` and `medtl.evaluation.report_audit`. Every
string goes through `_e` (HTML-escaped) unless a helper says its input is already HTML.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medtl.evaluation import report_plots as rp
from medtl.vocabulary import AUDIT_STATUSES

_METRIC_NAMES = {
    "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
    "tpr": "Sensitivity (TPR)", "tnr": "Specificity (TNR)", "fpr": "False positive rate", "fnr": "False negative rate",
    "ppv": "PPV (precision)", "npv": "NPV", "brier": "Brier score", "ece": "ECE",
    "calibration_slope": "Calibration slope", "calibration_intercept": "Calibration intercept",
    "auroc_macro": "AUROC (macro)", "auprc_macro": "AUPRC (macro)", "dice": "Dice", "hd95": "HD95 (mm)",
    "surface_dice": "Surface Dice", "f1": "F1", "equalized_odds": "Equalized odds",
}
_SEG_FAMILIES = ("surface_dice", "hd95", "dice")
_LIST_PREVIEW = 8


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


def _audit_status(audit: Mapping[str, Any]) -> str | None:
    """audit.json's "status"; for documents written before it existed, from "passed" (None if neither)."""
    status = audit.get("status")
    if status in AUDIT_STATUSES:
        return str(status)
    passed = audit.get("passed")
    return None if passed is None else "passed" if passed else "failed"


def _status_badge(audit: Mapping[str, Any]) -> str:
    """The audit verdict as a badge: passed green, failed red, inconclusive amber (never green)."""
    status = _audit_status(audit)
    if status is None:
        return _badge("not recorded", "muted")
    return _badge(status, {"passed": "ok", "failed": "bad", "inconclusive": "warn"}[status])

