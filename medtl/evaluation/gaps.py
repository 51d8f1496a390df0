"""Between-group gaps, their flags, and bias amplification against a reference model.

A gap summarises one metric over the groups of one attribute (suppressed groups never enter):

- `difference`: best minus worst group (max - min), as fairlearn's `difference()`;
- `ratio`: min / max, as fairlearn's `ratio()` (not for calibration slope/intercept);
- `worst_vs_overall`: how much worse the worst group is than the whole test set
  (positive = worse), in the metric's units;
- `equalized_odds` (metric) / `difference` (kind): max(TPR difference, FPR difference), as
  fairlearn's `equalized_odds_difference`.

Gap CIs come from the same paired replicates as the group metrics (every group resampled
together), so the gap's sampling correlation is kept. A `difference` gap with a configured
tolerance is tested: flagged when its whole CI lies above the tolerance, with the CI level
Bonferroni-corrected over all tested gaps.

The CI of a `difference` gap (of a metric with a direction, and of equalized odds) is the CI of
the difference between the two groups at its ends, worst and best on the test set, held fixed
in every replicate. Why not the percentile CI of max - min over the replicates: resampling adds
noise to every group, and the max - min of noisy groups is larger than the true spread, so that
CI sits above the truth. With many small groups (age bands of 10-20 patients) it lay above a
0.1 tolerance in most simulated data sets without any gap (tests/evaluation/test_gaps.py
measures the false-flag rate). The fixed pair does not re-select the extremes in each replicate.
It still inherits the selection of the pair on the test set, which the Bonferroni level and the
suppression of small groups keep in check.

`evaluability` tells which attributes the audit's verdict rests on: those with a decided tested
gap (flagged or within), and for the others why not and what would help.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtl.errors import InputError
from medtl.evaluation.bootstrap import percentile_ci
from medtl.evaluation.metrics import CALIBRATION_IDEAL, METRIC_DIRECTION
from medtl.evaluation.predictions import MISSING
from medtl.evaluation.segmentation import SEGMENTATION_DIRECTION, segmentation_family

GAP_KINDS: tuple[str, ...] = ("difference", "ratio", "worst_vs_overall")
#: Statuses of a tested gap that decide it: its whole CI lies on one side of the tolerance.
DECIDED: tuple[str, ...] = ("flagged", "within")
#: The gap metric built from TPR and FPR together.
EQUALIZED_ODDS = "equalized_odds"
CORRECTIONS: tuple[str, ...] = ("bonferroni", "none")


@dataclass(frozen=True)
class GapDraft:
    """A gap before flagging: point value, paired replicates, and the groups at both ends."""

    attribute: str
    metric: str
    kind: str
    value: float
    replicates: np.ndarray
    worst_group: str | None
    best_group: str | None


@dataclass(frozen=True)
class Gap:
    """One reported gap. `status` is flagged / within / inconclusive / not_tested / not_estimable."""

    attribute: str
    metric: str
    kind: str
    value: float
    ci: tuple[float, float] | None
    ci_level: float
    tolerance: float | None
    flagged: bool
    status: str
    worst_group: str | None
    best_group: str | None

    def to_dict(self) -> dict[str, Any]:
        """The audit.json form of the gap (NaN becomes None)."""
        return {
            "attribute": self.attribute,
            "metric": self.metric,
            "kind": self.kind,
            "value": _json_float(self.value),
            "ci": list(self.ci) if self.ci is not None else None,
            "ci_level": self.ci_level,
            "tolerance": self.tolerance,
            "flagged": self.flagged,
            "status": self.status,
            "worst_group": self.worst_group,
            "best_group": self.best_group,
        }


def _json_float(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def metric_direction(metric: str) -> int | None:
    """+1 if higher is better, -1 if lower is better, None for ideal-value (calibration) metrics."""
    if metric in METRIC_DIRECTION:
        return METRIC_DIRECTION[metric]
    family = segmentation_family(metric)
    return SEGMENTATION_DIRECTION[family] if family else None


def _badness(metric: str, values: np.ndarray) -> np.ndarray:
    """A transform of the metric where larger is worse (distance from the ideal for calibration)."""
    direction = metric_direction(metric)
    if direction is None:
        return np.abs(values - CALIBRATION_IDEAL[metric])
    return -direction * values


def gap_values(metric: str, groups: np.ndarray, overall: np.ndarray) -> dict[str, np.ndarray]:
    """Every gap kind of one metric; NaN groups are skipped, fewer than two defined give NaN.

    Args:
        metric: the metric's name (decides what "worst" means).
        groups: values of shape (..., g), one column per reported group.
        overall: values of shape (...,) on all rows of the test set.

    Returns:
        Dict kind -> array of shape (...,). Calibration metrics have no ratio.
    """
    defined = np.isfinite(groups).sum(axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        hi, lo = np.nanmax(groups, axis=-1), np.nanmin(groups, axis=-1)
        worst = np.nanmax(_badness(metric, groups), axis=-1)
        out = {
            "difference": np.where(defined >= 2, hi - lo, np.nan),
            "ratio": np.where((defined >= 2) & (hi > 0), lo / np.where(hi > 0, hi, 1.0), np.nan),
            "worst_vs_overall": np.where(defined >= 2, worst - _badness(metric, overall), np.nan),
        }
    if metric in CALIBRATION_IDEAL:
        del out["ratio"]
    return out


def _extreme_indices(metric: str, values: np.ndarray) -> tuple[int, int] | None:
    """Column indices of the worst and the best group by point estimate (None when undefined)."""
    values = np.asarray(values, dtype=np.float64)
    if np.isfinite(values).sum() < 2:
        return None
    bad = np.where(np.isfinite(values), _badness(metric, values), np.nan)
    return int(np.nanargmax(bad)), int(np.nanargmin(bad))


def extreme_groups(metric: str, names: Sequence[str], values: np.ndarray) -> tuple[str | None, str | None]:
    """Names of the worst and the best group by point estimate (None when undefined)."""
    ends = _extreme_indices(metric, values)
    return (None, None) if ends is None else (names[ends[0]], names[ends[1]])


def pair_difference(metric: str, point: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Replicates of the worst-vs-best difference, the two groups fixed by the point estimates.

    For a metric with a direction this is `max - min` on the point estimates (the `difference`
    gap) and, in each replicate, the same two groups' difference (see the module docstring).

    Args:
        metric: a metric with a direction (`metric_direction` is not None).
        point: point values per group, shape (g,).
        replicates: paired replicates, shape (b, g).

    Returns:
        Shape (b,); all NaN when fewer than two groups have a value.
    """
    ends = _extreme_indices(metric, point)
    replicates = np.asarray(replicates, dtype=np.float64)
    if ends is None:
        return np.full(replicates.shape[0], np.nan)
    worst, best = ends
    return _badness(metric, replicates[:, worst]) - _badness(metric, replicates[:, best])


def draft_gaps(
    attribute: str,
    names: Sequence[str],
    point: Mapping[str, np.ndarray],
    replicates: Mapping[str, np.ndarray],
    overall_point: Mapping[str, float],
    overall_replicates: Mapping[str, np.ndarray],
    metrics: Sequence[str],
) -> list[GapDraft]:
    """All gap drafts of one attribute.

    Args:
        attribute: attribute name ("sex", "sex&age_band").
        names: reported (non-suppressed) group names, in column order.
        point: metric -> point values per group, shape (g,).
        replicates: metric -> paired replicates, shape (b, g).
        overall_point: metric -> point value on the whole test set.
        overall_replicates: metric -> replicates on the whole test set from the same draws, (b,).
        metrics: gap metrics; "equalized_odds" needs "tpr" and "fpr" in point/replicates.

    Returns:
        One draft per metric and kind.
    """
    drafts = []
    for metric in metrics:
        if metric == EQUALIZED_ODDS:
            # np.maximum, not max(): a NaN in either rate must give NaN, whichever comes first.
            tpr_gap = gap_values("tpr", point["tpr"], np.nan)["difference"]
            fpr_gap = gap_values("fpr", point["fpr"], np.nan)["difference"]
            pt = np.maximum(tpr_gap, fpr_gap)
            reps = np.maximum(
                pair_difference("tpr", point["tpr"], replicates["tpr"]),
                pair_difference("fpr", point["fpr"], replicates["fpr"]),
            )
            # The groups at the ends are those of the larger of the two rate gaps.
            component = "fpr" if np.isfinite(fpr_gap) and not fpr_gap <= tpr_gap else "tpr"
            worst, best = extreme_groups(component, names, point[component])
            drafts.append(GapDraft(attribute, metric, "difference", float(pt), reps, worst, best))
            continue
        worst, best = extreme_groups(metric, names, point[metric])
        pts = gap_values(metric, point[metric], np.asarray(overall_point[metric]))
        reps = gap_values(metric, replicates[metric], overall_replicates[metric])
        if metric_direction(metric) is not None:
            reps["difference"] = pair_difference(metric, point[metric], replicates[metric])
        for kind, value in pts.items():
            drafts.append(GapDraft(attribute, metric, kind, float(value), reps[kind], worst, best))
    return drafts


def flag_gaps(
    drafts: Sequence[GapDraft], tolerances: Mapping[str, float], alpha: float, correction: str
) -> tuple[list[Gap], int]:
    """Attach CIs and flags. Only `difference` gaps with a tolerance and a value are tested.

    Args:
        drafts: gap drafts of every attribute.
        tolerances: metric -> largest acceptable difference.
        alpha: family-wise error rate (0.05 gives 95% CIs for untested gaps).
        correction: "bonferroni" (CI level 1 - alpha/m over the m tested gaps) or "none".

    Returns:
        `(gaps, m)`: the gaps in draft order and the number tested.
    """

    def tested(d: GapDraft) -> bool:
        return d.kind == "difference" and d.metric in tolerances and math.isfinite(d.value)

    m = sum(tested(d) for d in drafts)
    test_level = 1.0 - alpha / m if correction == "bonferroni" and m else 1.0 - alpha
    gaps = []
    for d in drafts:
        is_tested = tested(d)
        level = test_level if is_tested else 1.0 - alpha
        ci = percentile_ci(d.replicates, level)
        tol = float(tolerances[d.metric]) if d.kind == "difference" and d.metric in tolerances else None
        if tol is None:
            status = "not_tested"
        elif not is_tested or ci is None:
            status = "not_estimable"
        elif ci[0] > tol:
            status = "flagged"
        elif ci[1] <= tol:
            status = "within"
        else:
            status = "inconclusive"
        gaps.append(
            Gap(
                d.attribute,
                d.metric,
                d.kind,
                d.value,
                ci,
                level,
                tol,
                status == "flagged",
                status,
                d.worst_group,
                d.best_group,
            )
        )
    return gaps, m


def _direction(kind: str, delta: float, lo: float, hi: float) -> str:
    """widened / narrowed / unchanged; for ratios a smaller value is a wider gap."""
    sign = -1.0 if kind == "ratio" else 1.0
    lo, hi = sorted((sign * lo, sign * hi))
    if not math.isfinite(delta):
        return "unchanged"
    return "widened" if lo > 0 else "narrowed" if hi < 0 else "unchanged"


def paired_amplification(
    model: Sequence[GapDraft], reference: Sequence[GapDraft], level: float
) -> list[dict[str, Any]]:
    """Bias amplification from replicates of both models on the same resampled patients.

    A gap widened (narrowed) when the CI of model-minus-reference excludes zero upwards
    (downwards); otherwise it is "unchanged" (no detectable change).

    Returns:
        One dict per gap: attribute, metric, kind, model, reference, delta, ci, direction.
    """
    ref = {(d.attribute, d.metric, d.kind): d for d in reference}
    out = []
    for d in model:
        r = ref.get((d.attribute, d.metric, d.kind))
        if r is None or not (math.isfinite(d.value) and math.isfinite(r.value)):
            continue  # as compare_gaps: only gaps defined for both models are compared
        delta = d.value - r.value
        ci = percentile_ci(d.replicates - r.replicates, level)
        direction = _direction(d.kind, delta, *(ci if ci else (math.nan, math.nan)))
        out.append(
            {
                "attribute": d.attribute,
                "metric": d.metric,
                "kind": d.kind,
                "model": _json_float(d.value),
                "reference": _json_float(r.value),
                "delta": _json_float(delta),
                "ci": list(ci) if ci else None,
                "direction": direction,
            }
        )
    return out


def compare_gaps(
    audit_model: Mapping[str, Any], audit_reference: Mapping[str, Any], *, min_change: float = 0.01
) -> list[dict[str, Any]]:
    """Bias amplification from two audit.json documents (no shared replicates, so no CI).

    Use the paired comparison of `BiasAudit.run(..., reference_predictions=...)` when both
    models' predictions on the same patients are at hand; this unpaired version suits a
    reference that only left its audit.json (e.g. the current champion).

    Args:
        audit_model: the transfer-learned model's audit.json, parsed.
        audit_reference: the reference model's audit.json, parsed.
        min_change: changes of at most this size (metric units) count as "unchanged".

    Returns:
        For every gap present with a value in both: attribute, metric, kind, model,
        reference, delta (model - reference) and direction "widened" / "narrowed" /
        "unchanged" (for ratios a lower value is a wider gap).

    Raises:
        InputError: when a document has no "gaps" list.

    Example:
        >>> compare_gaps(json.load(open("audit.json")), json.load(open("champion_audit.json")))  # doctest: +SKIP
    """
    for name, doc in (("audit_model", audit_model), ("audit_reference", audit_reference)):
        if not isinstance(doc, Mapping) or not isinstance(doc.get("gaps"), list):
            raise InputError(
                f"{name} must be a parsed audit.json with a 'gaps' list, not {type(doc).__name__}; json.load it"
            )
    ref = {(g["attribute"], g["metric"], g.get("kind", "difference")): g for g in audit_reference["gaps"]}
    out = []
    for g in audit_model["gaps"]:
        key = (g["attribute"], g["metric"], g.get("kind", "difference"))
        r = ref.get(key)
        if r is None or g.get("value") is None or r.get("value") is None:
            continue
        delta = float(g["value"]) - float(r["value"])
        direction = _direction(key[2], delta, delta - min_change, delta + min_change)
        out.append(
            {
                "attribute": key[0],
                "metric": key[1],
                "kind": key[2],
                "model": float(g["value"]),
                "reference": float(r["value"]),
                "delta": delta,
                "direction": direction,
            }
        )
    return out


def evaluability(
    attributes: Sequence[str],
    groups: Sequence[Any],
    gaps: Sequence[Gap],
    tested_metrics: Sequence[str],
    *,
    split: str,
    min_group_size: int,
    min_gap_events: int,
) -> tuple[list[str], list[dict[str, str]]]:
    """(evaluated attributes, unevaluated ones with the reason and the remedy), in audit order.

    An attribute is evaluated when at least one of its tested gaps (a `difference` gap of a
    metric with a tolerance) was decided (`DECIDED`): `flagged` (its whole CI above the
    tolerance) or `within` (its whole CI at or below it). A CI that contains the tolerance
    (`inconclusive`) decides nothing. A decision needs two reported (not suppressed) groups with
    a value of the metric and, for classification rates, enough events, and enough patients for
    a CI narrow enough to lie on one side of the tolerance.

    Args:
        attributes: the audited attributes and intersections, in audit order.
        groups: their `GroupResult`s (attribute, group, suppressed are read).
        gaps: the flagged gaps (`flag_gaps`).
        tested_metrics: the gap metrics that have a tolerance.
        split: the audited split, for the messages ("test").
        min_group_size: groups with at most this many patients were suppressed.
        min_gap_events: a group enters a metric's gaps with at least this many of its events.

    Returns:
        The evaluated attribute names, and {"attribute", "reason", "remedy"} for each other one.
    """
    evaluated, unevaluated = [], []
    for attribute in attributes:
        members = [g for g in groups if g.attribute == attribute]
        tested = [g for g in gaps if g.attribute == attribute and g.tolerance is not None]
        if any(g.status in DECIDED for g in tested):
            evaluated.append(attribute)
            continue
        reason, remedy = _why_unevaluated(attribute, members, tested, tested_metrics, split=split,
                                          min_group_size=min_group_size, min_gap_events=min_gap_events)
        unevaluated.append({"attribute": attribute, "reason": reason, "remedy": remedy})
    return evaluated, unevaluated


def _why_unevaluated(
    attribute: str, members: Sequence[Any], tested: Sequence[Gap], tested_metrics: Sequence[str], *, split: str,
    min_group_size: int, min_gap_events: int,
) -> tuple[str, str]:
    """(reason, remedy) for an attribute none of whose tested gaps was decided; the first cause that applies."""
    k = min_group_size
    reported = [g for g in members if not g.suppressed]
    if len(members) < 2 and members and str(members[0].group).casefold() in _UNKNOWN_LABELS:
        return (f"it is unknown for every {split} patient (every row reads {members[0].group!r}), so "
                "there are no groups to compare",
                f"provide it: {_SOURCES.get(attribute, f'a filled {attribute} column in the labels CSV')}"
                "; then build the manifest and run again, or leave it out of audit.attributes")
    if len(members) < 2:
        return (f"only one group in the {split} split: there is nothing to compare it with",
                f"add {split} patients from the attribute's other groups, or leave it out of audit.attributes")
    if len(reported) < 2:
        hidden = (f"all {len(members)} of its groups were" if not reported
                  else f"{len(members) - 1} of its {len(members)} groups were")
        return (f"{hidden} suppressed (at most {k} patients each), so fewer than two groups have "
                "numbers and no gap can be measured",
                f"more {split} patients per group (more than {k} in at least two groups), or a lower "
                "audit.min_group_size (smaller groups' numbers are then shown: weigh the "
                "re-identification risk)")
    if not tested_metrics:
        return ("no audited gap metric has a tolerance, so no gap is tested",
                "set a tolerance for a gap metric, e.g. audit.tolerances.auroc: 0.05")
    if not any(math.isfinite(g.value) for g in tested):
        return (f"fewer than two of its reported groups have a value of the tested metrics "
                f"({', '.join(tested_metrics)}) with at least {min_gap_events} of the events each "
                "metric counts (positives, negatives)",
                f"more {split} patients with and without the finding per group, or a lower audit.min_gap_events")
    if not any(g.status == "inconclusive" for g in tested):
        return ("its tested gaps have no confidence interval (undefined in most bootstrap replicates)",
                f"more {split} patients per group, with and without the finding")
    n = sum(g.status == "inconclusive" for g in tested)
    return (f"the confidence intervals of its {n} measured gap(s) all contain the tolerance, so the "
            f"{split} split cannot tell whether its groups differ by more than tolerated",
            f"more {split} patients per group (narrower intervals); fewer tested gaps (attributes, "
            "intersections, tolerances) also narrow them through a milder multiple-testing correction")


#: Group labels that mean "not recorded": medtl's manifest writes U (sex) and unknown (age band,
#: site, scanner); an empty cell is the group MISSING. Case-folded.
_UNKNOWN_LABELS = frozenset({"u", "unknown", MISSING})
#: Where the manifest takes each subgroup from: what to provide when it is unknown for everyone.
_SOURCES: Mapping[str, str] = {
    "sex": "a sex column (M, F) in the labels CSV, or DICOM files whose headers carry PatientSex",
    "age_band": ("an age column (years) in the labels CSV, or DICOM files whose headers carry PatientAge or "
                 "PatientBirthDate"),
    "site": "a site column in the labels CSV, or DICOM files whose headers carry InstitutionName",
    "scanner": ("a scanner column in the labels CSV, or DICOM files whose headers carry Manufacturer and "
                "ManufacturerModelName"),
}
