"""Per-subgroup bias audit of a predictions table: group metrics with CIs, gaps, pass/fail.

`BiasAudit` follows scikit-learn's estimator contract: `__init__` only stores its arguments,
`run()` validates them and does the work, and the outcome is the learned attribute
`result_` (an `AuditResult`), whose `to_dict()` is the stable audit.json document (see
docs/audit.md). Only the audited split's rows are scored; validation rows choose the
operating threshold. Patient pseudonyms come in as an argument and never leave this module:
audit.json holds counts, category labels and numbers only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medtl.errors import ConfigError, InputError
from medtl.evaluation.audit_types import (
    DEFAULT_GAP_METRICS,
    AuditResult,
    AuditRules,
    GroupResult,
    gap_metric_applies,
    known_gap_metric,
)
from medtl.evaluation.bootstrap import (
    Estimate,
    Replicates,
    check_bootstrap_settings,
    check_disjoint_patients,
    encode_patients,
    iter_bootstrap_counts,
    make_rng,
    patient_strata,
    percentile_ci,
    weighted_thresholds,
)
from medtl.evaluation.gaps import (
    EQUALIZED_ODDS,
    GapDraft,
    compare_gaps,
    draft_gaps,
    evaluability,
    flag_gaps,
    paired_amplification,
)
from medtl.evaluation.metrics import check_threshold_rule, choose_threshold
from medtl.evaluation.predictions import (
    MAX_GROUPS,
    MISSING,
    Scores,
    align_reference,
    attribute_specs,
    column,
    read_scores,
    without_repeating_intersections,
)
from medtl.evaluation.suppression import WITHHELD_NOTE, audit_suppression
from medtl.vocabulary import TASKS

# Bootstrap stream of the whole test set; starred so no subgroup column can share its name.
_OVERALL = "*overall*"


class BiasAudit:
    """Per-subgroup audit of a model's predictions with patient-level bootstrap CIs.

    Args:
        attributes: subgroup columns to audit; None takes every non-reserved column of the
            predictions (sex, age_band, site, scanner and any declared extra).
        intersections: True for all pairs of attributes, False for none, or a list of tuples
            of attribute names (e.g. [("sex", "age_band")]).
        config: pass/fail rules (AuditRules); None for the defaults.
        task: "classification" (columns y_true and y_score or y_score_<class>) or
            "segmentation" (per-case columns dice_<c>, hd95_<c>, surface_dice_<c>, dice, ...).
        positive_class: the class audited one-vs-rest when predictions have y_score_<class>
            columns (multi-class: y_true holds labels; multi-label: y_true_<class> columns).
        gap_metrics: metrics whose gaps are computed; None for DEFAULT_GAP_METRICS[task].
        threshold_rule: "youden", "sensitivity" or "fpr" (chosen on the validation split).
        threshold_target: the rule's target rate (e.g. 0.9 sensitivity, 0.1 FPR).
        n_boot: bootstrap replicates (patients resampled, stratified by label and group).
        seed: random seed; the same seed and data give the same audit.
        min_group_size: groups with at most this many patients (hence images) are suppressed.
        min_events: estimates with fewer positives or negatives (segmentation: cases) are
            labelled imprecise.
        min_gap_events: a group enters the gaps of a metric only with at least this many of
            the events the metric counts (positives for TPR/FNR, negatives for FPR/TNR, both
            for AUROC/AUPRC); it is still reported with its CI. Why: with three negatives the
            bootstrap resamples the same three cases and its interval is far too narrow, so a
            gap against such a group would be flagged on noise.
        split: the split audited (validation rows only choose the threshold).
        progress: show a progress bar over attributes.

    Example:
        >>> audit = BiasAudit(["sex", "age_band"], seed=0).run(predictions, patient_ids)  # doctest: +SKIP
        >>> audit.result_.status  # "passed", "failed" or "inconclusive"  # doctest: +SKIP
        >>> Path("audit.json").write_text(audit.to_json())  # doctest: +SKIP
    """

    def __init__(
        self,
        attributes: Sequence[str] | None = None,
        *,
        intersections: bool | Sequence[Sequence[str]] = True,
        config: AuditRules | None = None,
        task: str = "classification",
        positive_class: Any = None,
        gap_metrics: Sequence[str] | None = None,
        threshold_rule: str = "youden",
        threshold_target: float | None = None,
        n_boot: int = 2000,
        seed: int = 0,
        min_group_size: int = 10,
        min_events: int = 100,
        min_gap_events: int = 10,
        split: str = "test",
        progress: bool = True,
    ) -> None:
        self.attributes = attributes
        self.intersections = intersections
        self.config = config
        self.task = task
        self.positive_class = positive_class
        self.gap_metrics = gap_metrics
        self.threshold_rule = threshold_rule
        self.threshold_target = threshold_target
        self.n_boot = n_boot
        self.seed = seed
        self.min_group_size = min_group_size
        self.min_events = min_events
        self.min_gap_events = min_gap_events
        self.split = split
        self.progress = progress

    def run(
        self, predictions: pd.DataFrame, patient_ids: Any, *, threshold: float | None = None,
        reference_predictions: pd.DataFrame | None = None, reference_audit: Mapping[str, Any] | None = None,
        reference_label: str | None = None,
    ) -> BiasAudit:
        """Audit `predictions` and store the outcome in `result_`.

        Args:
            predictions: predictions.csv as a DataFrame (id, split, y_true, y_score..., subgroups).
            patient_ids: patient pseudonym per row of `predictions`, in row order.
            threshold: a fixed operating threshold; None chooses it on the validation rows
                with `threshold_rule` and re-derives it in every replicate.
            reference_predictions: the reference model's predictions (e.g. from scratch) for
                the same ids: gaps are compared replicate by replicate (paired CIs).
            reference_audit: instead, a reference's parsed audit.json (e.g. the champion's):
                gaps are compared without CIs (compare_gaps).
            reference_label: a name for the reference in audit.json, e.g. "from-scratch".

        Returns:
            self, with `result_` (an AuditResult) set.

        Raises:
            ConfigError: invalid settings.
            InputError: missing columns, bad values, patient ids not aligned with the rows.
            LeakageError: a patient in both the validation and the audited split.
        """
        config = self._checked_rules(reference_predictions, reference_audit)
        ctx, specs, left_out = self._context(predictions, patient_ids, threshold, reference_predictions, config)
        overall = self._audit_attribute(ctx, "overall", np.full(ctx.patient.size, "all", dtype=object), name=_OVERALL)
        found = self._audit_attributes(ctx, specs, left_out)
        gaps, m = flag_gaps(found.drafts, config.tolerances, config.alpha, config.correction)
        status, evaluated, unevaluated = self._verdict([a for a, _ in specs], found, gaps, m, config)
        paired = ctx.ref is not None
        self.result_ = AuditResult(
            passed=status == "passed", status=status, task=self.task,
            reference={"label": reference_label, "paired": paired} if paired or reference_audit is not None else None,
            overall=overall.groups[0], groups=tuple(found.groups), gaps=tuple(gaps),
            amplification=tuple(paired_amplification(found.drafts, found.ref_drafts, ctx.level) if paired else ()),
            thresholds=ctx.threshold_json, config=config, correction=_correction(config, m), settings=self._settings(),
            notes=tuple(found.notes), evaluated_attributes=tuple(evaluated),
            unevaluated_attributes=tuple(unevaluated), left_out_intersections=tuple(left_out),
        )
        if reference_audit is not None:
            amplification = tuple(compare_gaps(self.result_.to_dict(), reference_audit))
            self.result_ = dataclasses.replace(self.result_, amplification=amplification)
        return self

    def to_dict(self) -> dict[str, Any]:
        """audit.json as a dict (after `run`).

        Raises:
            InputError: when called before `run`.
        """
        if not hasattr(self, "result_"):
            raise InputError(
                "BiasAudit must be run before export, not exported unrun; call run(predictions, patient_ids)"
            )
        return self.result_.to_dict()

    def to_json(self) -> str:
        """audit.json as text: strict JSON (no NaN/Infinity), indented."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    # -- settings and inputs ----------------------------------------------------------------

    def _check_settings(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        check_bootstrap_settings(self.n_boot, 0.95)
        for key in ("min_group_size", "min_events", "min_gap_events", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, not {value!r}")
        if self.task == "classification":
            check_threshold_rule(self.threshold_rule, self.threshold_target)
        for metric in self._gap_metrics():
            if not known_gap_metric(metric) or not gap_metric_applies(metric, self.task):
                options = DEFAULT_GAP_METRICS[self.task]
                raise ConfigError(
                    f"gap metric for {self.task} must be one of {', '.join(options)}, not {metric!r}"
                )

    def _checked_rules(
        self, reference_predictions: pd.DataFrame | None, reference_audit: Mapping[str, Any] | None
    ) -> AuditRules:
        """The pass/fail rules, after every setting is checked (before any data is read)."""
        config = self.config if self.config is not None else AuditRules()
        if not isinstance(config, AuditRules):
            raise ConfigError(
                f"config must be an AuditRules, not {type(config).__name__}; use AuditRules.from_mapping"
            )
        if reference_predictions is not None and reference_audit is not None:
            raise ConfigError(
                "reference must be reference_predictions or reference_audit, not both; pass one"
            )
        self._check_settings()
        return config

    def _context(
        self, predictions: pd.DataFrame, patient_ids: Any, threshold: float | None,
        reference_predictions: pd.DataFrame | None, config: AuditRules,
    ) -> tuple[_Context, list[tuple[str, np.ndarray]], list[dict[str, str]]]:
        """The audited rows in numeric form with their thresholds, the attributes, and the intersections left out."""
        split = column(predictions, "split").astype(str).to_numpy()
        rows, val_rows = np.flatnonzero(split == self.split), np.flatnonzero(split == "val")
        if rows.size == 0:
            raise InputError(
                f"predictions must have rows with split == {self.split!r}, not none; check the split column"
            )
        encode_patients(patient_ids, len(predictions))  # length and completeness, before anything else
        patients = np.asarray(patient_ids, dtype=object)
        specs = attribute_specs(predictions, rows, self.attributes, self.intersections)
        specs, left_out = without_repeating_intersections(predictions, rows, specs, self.split)
        scores = self._read(predictions, rows, val_rows)
        ref = (
            self._read(align_reference(reference_predictions, predictions), rows, val_rows)
            if reference_predictions is not None
            else None
        )
        if ref is not None and scores.y is not None and not np.array_equal(ref.y, scores.y):
            raise InputError(
                "reference_predictions y_true must equal the model's for the same ids, not differ; "
                "predict the reference on the same manifest"
            )
        ctx = _Context(scores, ref, *encode_patients(patients[rows], rows.size), level=1.0 - config.alpha)
        self._thresholds(ctx, threshold, patients, rows, val_rows)
        return ctx, specs, left_out

    def _verdict(
        self, attributes: list[str], found: _Findings, gaps: list, m: int, config: AuditRules
    ) -> tuple[str, list[str], list[dict[str, str]]]:
        """The status, and the evaluated and unevaluated attributes; notes what the status rests on."""
        if not m:
            found.notes.append("no gap was tested: no tolerance applies or no attribute has two reported groups")
        if any(g.status == "not_estimable" for g in gaps):
            found.notes.append(
                "some gaps with a tolerance could not be estimated (undefined in most replicates); not flagged"
            )
        evaluated, unevaluated = evaluability(
            attributes, found.groups, gaps, [m for m in self._gap_metrics() if m in config.tolerances],
            split=self.split, min_group_size=self.min_group_size, min_gap_events=self.min_gap_events)
        if not evaluated:
            found.notes.append("audit inconclusive: no attribute could be evaluated (no tested gap was decided: "
                               "none was shown within its tolerance or beyond it); see unevaluated_attributes for "
                               "why and what would make them evaluable")
            return "inconclusive", evaluated, unevaluated
        status = "failed" if config.fail_on_flagged and any(g.flagged for g in gaps) else "passed"
        return status, evaluated, unevaluated

    def _read(self, df: pd.DataFrame, rows: np.ndarray, val_rows: np.ndarray) -> Scores:
        required = self._gap_metrics() if self.task == "segmentation" else ()
        return read_scores(
            df, rows, val_rows, task=self.task, positive_class=self.positive_class, required=required
        )

    def _gap_metrics(self) -> tuple[str, ...]:
        return tuple(self.gap_metrics) if self.gap_metrics is not None else DEFAULT_GAP_METRICS[self.task]

    def _settings(self) -> dict[str, Any]:
        return {
            "n_boot": self.n_boot,
            "seed": self.seed,
            "min_group_size": self.min_group_size,
            "min_events": self.min_events,
            "min_gap_events": self.min_gap_events,
            "split": self.split,
            "positive_class": _json_label(self.positive_class),
            "gap_metrics": list(self._gap_metrics()),
        }

    def _thresholds(self, ctx: _Context, threshold: float | None, patients, rows, val_rows) -> None:
        """Set the operating thresholds on ctx, and what re-deriving them per replicate needs."""
        if self.task == "segmentation":
            return
        if threshold is not None:
            t = float(threshold)
            ctx.threshold, ctx.ref_threshold = t, t
            ctx.threshold_json = {"source": "fixed", "rule": None, "target": None, "value": _finite(t), "ci": None}
            return
        if ctx.scores.y_val is None:
            raise InputError(
                "predictions must have rows with split == 'val' to choose the operating threshold, not "
                "none; include validation predictions or pass threshold=<number>"
            )
        check_disjoint_patients(patients[val_rows], patients[rows], f"the validation and {self.split} splits")
        rule, target = self.threshold_rule, self.threshold_target
        ctx.threshold = choose_threshold(ctx.scores.y_val, ctx.scores.s_val, rule, target)
        if ctx.ref is not None:
            ctx.ref_threshold = choose_threshold(ctx.ref.y_val, ctx.ref.s_val, rule, target)
        ctx.val_patient, n_val = encode_patients(patients[val_rows], val_rows.size)
        ctx.val_strata = patient_strata(ctx.val_patient, n_val, ctx.scores.y_val)
        ctx.threshold_json = {"source": "validation", "rule": rule, "target": target, "value": _finite(ctx.threshold),
                              "ci": None, "reference_value": _finite(ctx.ref_threshold)}

    # -- computation ------------------------------------------------------------------------

    def _describe(self, ctx: _Context, rows: np.ndarray, note: str | None = None) -> dict[str, Any]:
        """Counts of a group (kept internally even when withheld from audit.json), or its suppression."""
        if note is not None and note != WITHHELD_NOTE:  # at most min_group_size patients (audit_suppression)
            return {"suppressed": True, "note": note}
        n, n_patients = int(rows.size), int(np.unique(ctx.patient[rows]).size)
        k = self.min_group_size
        if n_patients <= k:  # patients <= images, so this also covers n <= k
            return {
                "suppressed": True,
                "note": f"suppressed, n <= {k}" if n <= k else f"suppressed, patients <= {k}",
            }
        if ctx.scores.y is None:
            return {
                "suppressed": False,
                "n": n,
                "n_patients": n_patients,
                "n_positive": None,
                "n_negative": None,
                "imprecise": n < self.min_events,
            }
        pos = int(ctx.scores.y[rows].sum())
        return {
            "suppressed": False,
            "n": n,
            "n_patients": n_patients,
            "n_positive": pos,
            "n_negative": n - pos,
            "imprecise": min(pos, n - pos) < self.min_events,
        }

    def _audit_attributes(
        self, ctx: _Context, specs: list[tuple[str, np.ndarray]], left_out: list[dict[str, str]]
    ) -> _Findings:
        """Every audited attribute's findings, with the suppression and withholding of small groups applied."""
        found = _Findings(notes=[f"{u['attribute']}: not audited, {u['reason']}" for u in left_out])
        hidden = audit_suppression(specs, ctx.patient, self.min_group_size)
        for attribute, labels in tqdm(specs, disable=not self.progress, desc="bias audit"):
            found.extend(self._audit_attribute(ctx, attribute, labels, hidden=hidden.get(attribute, {})))
        return found

    def _audit_attribute(
        self, ctx: _Context, attribute: str, labels: np.ndarray, name: str | None = None,
        hidden: Mapping[str, str] | None = None,
    ) -> _Findings:
        """Group results, gap drafts (model, reference) and notes for one attribute.

        `hidden` maps the groups to suppress, or whose counts to withhold, to their note (from
        audit_suppression). A withheld group keeps its metrics and gaps; its counts stay in
        `facts` (the gap-event rule needs them) but not in the result.
        """
        names = sorted(set(labels.tolist()), key=lambda g: (g == MISSING, g))
        if len(names) > MAX_GROUPS:
            raise InputError(
                f"attribute {attribute} must be categorical (at most {MAX_GROUPS} groups), not "
                f"{len(names)} distinct values; bin it first (e.g. age -> age_band)"
            )
        hidden = hidden or {}
        rows_of = {g: np.flatnonzero(labels == g) for g in names}
        facts = {g: self._describe(ctx, rows_of[g], hidden.get(str(g))) for g in names}
        shown = [g for g in names if not facts[g]["suppressed"]]
        gap_metrics = self._gap_metrics() if name is None else ()
        needed = [m for m in gap_metrics if m != EQUALIZED_ODDS]
        needed += [m for m in ("tpr", "fpr") if EQUALIZED_ODDS in gap_metrics and m not in needed]
        reps = Replicates(shown, needed, with_ref=ctx.ref is not None and bool(needed))
        if shown:
            codes = pd.factorize(labels)[0]
            keys = (ctx.scores.y, codes) if ctx.scores.y is not None else (codes,)  # strata: label and group
            self._bootstrap(ctx, name or attribute, patient_strata(ctx.patient, ctx.n_patients, *keys), rows_of, reps)
        point = {g: ctx.scores.point(rows_of[g], ctx.threshold, ctx.scores.columns) for g in shown}
        withheld = [g for g in shown if hidden.get(str(g)) == WITHHELD_NOTE]
        found = _Findings(groups=[self._group_result(ctx, attribute, g, facts[g], point.get(g), reps, g in withheld)
                                  for g in names])
        if len(shown) < len(names):
            found.notes.append(
                f"{attribute}: {len(names) - len(shown)} group(s) suppressed (patients <= {self.min_group_size})"
            )
        if withheld:
            found.notes.append(f"{attribute}: counts of {len(withheld)} group(s) withheld, so that no suppressed "
                               "group's size follows by subtraction (their metrics are shown)")
        if needed and len(shown) < 2:
            found.notes.append(f"{attribute}: fewer than two reported groups, no gaps")
        elif needed:
            self._draft_gaps(ctx, attribute, facts, rows_of, point, reps, gap_metrics, found)
        return found

    def _group_result(
        self, ctx: _Context, attribute: str, group: str, facts: dict[str, Any], point: dict[str, float] | None,
        reps: Replicates, withheld: bool,
    ) -> GroupResult:
        """One group's audit.json entry: no numbers when suppressed, no counts when withheld."""
        if facts["suppressed"]:
            return GroupResult(attribute, group, None, None, None, None, True, None, {}, facts["note"])
        metrics = {m: Estimate(point[m], percentile_ci(reps.get(group, m), ctx.level)) for m in ctx.scores.columns}
        counts = (None,) * 4 if withheld else (facts["n"], facts["n_patients"], facts["n_positive"],
                                               facts["n_negative"])
        return GroupResult(attribute, group, *counts, False, facts["imprecise"], metrics,
                           WITHHELD_NOTE if withheld else None)

    def _draft_gaps(
        self, ctx: _Context, attribute: str, facts: Mapping[str, dict], rows_of: dict, point: dict,
        reps: Replicates, gap_metrics: Sequence[str], found: _Findings,
    ) -> None:
        """Add the gap drafts of the model (and the reference) over the reported groups to `found`."""
        shown, needed = reps.groups, reps.needed
        few = self._few_events(facts, shown, needed)
        for metric, groups_out in few.items():
            found.notes.append(f"{attribute}: {', '.join(map(str, groups_out))} left out of the {metric} gaps "
                               f"(fewer than {self.min_gap_events} {_EVENTS[metric]})")
        all_rows = np.arange(ctx.patient.size)

        def drafts(scores: Scores, threshold: float | None, group_point: dict, ref: bool) -> list:
            return draft_gaps(
                attribute,
                shown,
                {m: _masked(np.array([group_point[g][m] for g in shown]), shown, few.get(m)) for m in needed},
                {m: _masked(reps.stack(m, ref=ref), shown, few.get(m)) for m in needed},
                scores.point(all_rows, threshold, needed),
                {m: reps.get("*overall*", m, ref=ref) for m in needed},
                gap_metrics,
            )

        found.drafts += drafts(ctx.scores, ctx.threshold, point, False)
        if ctx.ref is not None:
            ref_point = {g: ctx.ref.point(rows_of[g], ctx.ref_threshold, needed) for g in shown}
            found.ref_drafts += drafts(ctx.ref, ctx.ref_threshold, ref_point, True)

    def _few_events(self, facts: Mapping[str, dict], shown: Sequence[str], needed: Sequence[str]) -> dict:
        """Metric -> reported groups with too few of the metric's events to enter its gaps."""
        out: dict[str, list[str]] = {}
        for metric in needed:
            kind = _EVENTS.get(metric)
            if kind is None:
                continue
            for g in shown:
                pos, neg = facts[g]["n_positive"], facts[g]["n_negative"]
                if pos is None:
                    continue
                counts = {"positives": (pos,), "negatives": (neg,), "positives or negatives": (pos, neg)}[kind]
                if min(counts) < self.min_gap_events:
                    out.setdefault(metric, []).append(g)
        return out

    def _bootstrap(
        self, ctx: _Context, name: str, strata: np.ndarray, rows_of: dict, reps: Replicates
    ) -> None:
        """Fill `reps` block by block: every group, the whole set and the reference, from the same draws."""
        blocks = iter_bootstrap_counts(strata, self.n_boot, make_rng(self.seed, name))
        val_blocks = None
        if ctx.val_patient is not None:
            val_blocks = iter_bootstrap_counts(
                ctx.val_strata, self.n_boot, make_rng(self.seed, f"{name}/validation")
            )
        all_rows = np.arange(ctx.patient.size)
        for counts in blocks:
            w = counts[:, ctx.patient].astype(np.float64)
            t, t_ref = ctx.threshold, ctx.ref_threshold
            if val_blocks is not None:
                vw = next(val_blocks)[:, ctx.val_patient].astype(np.float64)
                rule, target = self.threshold_rule, self.threshold_target
                t = weighted_thresholds(ctx.scores.y_val, ctx.scores.s_val, vw, rule, target)
                if reps.with_ref:
                    t_ref = weighted_thresholds(ctx.ref.y_val, ctx.ref.s_val, vw, rule, target)
                if name == _OVERALL:
                    reps.add("*threshold*", {"threshold": t})
            for g in reps.groups:
                reps.add(g, ctx.scores.replicates(rows_of[g], w[:, rows_of[g]], t, ctx.scores.columns))
            if reps.needed:
                reps.add("*overall*", ctx.scores.replicates(all_rows, w, t, reps.needed))
            if reps.with_ref:
                reps.add("*overall*", ctx.ref.replicates(all_rows, w, t_ref, reps.needed), ref=True)
                for g in reps.groups:
                    reps.add(
                        g, ctx.ref.replicates(rows_of[g], w[:, rows_of[g]], t_ref, reps.needed), ref=True
                    )
        if (
            name == _OVERALL
            and ctx.threshold_json is not None
            and ctx.threshold_json["source"] == "validation"
        ):
            ctx.threshold_json["ci"] = _list_or_none(
                percentile_ci(reps.get("*threshold*", "threshold"), ctx.level)
            )


@dataclass
class _Context:
    """Per-run state shared by the attribute audits (mutable: thresholds are set after construction)."""

    scores: Scores
    ref: Scores | None
    patient: np.ndarray
    n_patients: int
    level: float
    threshold: float | None = None
    ref_threshold: float | None = None
    val_patient: np.ndarray | None = None
    val_strata: np.ndarray | None = None
    threshold_json: dict[str, Any] | None = None


@dataclass
class _Findings:
    """What the attribute audits found: group results, gap drafts of the model and the reference, notes."""

    groups: list[GroupResult] = field(default_factory=list)
    drafts: list[GapDraft] = field(default_factory=list)
    ref_drafts: list[GapDraft] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: _Findings) -> None:
        """Append another attribute's findings."""
        self.groups += other.groups
        self.drafts += other.drafts
        self.ref_drafts += other.ref_drafts
        self.notes += other.notes


#: Which events a metric's estimate rests on (see `BiasAudit.min_gap_events`).
_EVENTS: Mapping[str, str] = {
    "tpr": "positives", "fnr": "positives", "fpr": "negatives", "tnr": "negatives",
    "auroc": "positives or negatives", "auprc": "positives or negatives",
}


def _masked(values: np.ndarray, shown: Sequence[str], out: Sequence[str] | None) -> np.ndarray:
    """`values` (last axis: one column per shown group) with the columns of `out` set to NaN."""
    if not out:
        return values
    values = np.array(values, dtype=np.float64)
    values[..., [shown.index(g) for g in out]] = np.nan
    return values


def _correction(config: AuditRules, m: int) -> dict[str, Any]:
    """audit.json's "correction": the method, alpha, the number of tested gaps and their CI level."""
    level = 1.0 - config.alpha / m if m and config.correction == "bonferroni" else 1.0 - config.alpha
    return {"method": config.correction, "alpha": config.alpha, "tested": m, "ci_level": level}


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _list_or_none(ci: tuple[float, float] | None) -> list[float] | None:
    return list(ci) if ci is not None else None


def _json_label(value: Any) -> Any:
    return value if value is None or isinstance(value, int | float | str | bool) else str(value)
