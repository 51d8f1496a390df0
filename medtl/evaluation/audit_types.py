"""The bias audit's records: pass/fail configuration, per-group results, the audit.json document.

Kept apart from the estimator (medtl/evaluation/audit.py) so the report and the registry can
read the schema without the computation. `AuditResult.to_dict()` is audit.json; docs/audit.md
describes every key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pandas as pd

from medtl.errors import ConfigError, did_you_mean
from medtl.evaluation.bootstrap import Estimate
from medtl.evaluation.gaps import CORRECTIONS, EQUALIZED_ODDS, Gap
from medtl.evaluation.metrics import BINARY_METRICS
from medtl.evaluation.segmentation import SEGMENTATION_METRICS, segmentation_family
from medtl.vocabulary import AUDIT_STATUSES

#: Gap tolerances used when the workflow config names none (metric units, max - min).
DEFAULT_TOLERANCES: Mapping[str, float] = MappingProxyType(
    {"auroc": 0.05, "fnr": 0.1, EQUALIZED_ODDS: 0.1, "dice": 0.05}
)
DEFAULT_GAP_METRICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "classification": (
            "auroc",
            "auprc",
            "accuracy",
            "tpr",
            "fpr",
            "fnr",
            "ppv",
            "npv",
            "brier",
            "ece",
            EQUALIZED_ODDS,
        ),
        "segmentation": SEGMENTATION_METRICS,
    }
)


def gap_metric_applies(metric: str, task: str) -> bool:
    """Whether a gap metric belongs to the task ("classification" or "segmentation")."""
    is_classification = metric in BINARY_METRICS or metric == EQUALIZED_ODDS
    return is_classification == (task == "classification")


def known_gap_metric(name: str) -> bool:
    """Whether `name` is a metric a gap can be computed (and a tolerance set) for."""
    return name in BINARY_METRICS or name == EQUALIZED_ODDS or segmentation_family(name) is not None


@dataclass(frozen=True)
class AuditRules:
    """Pass/fail rules of the audit: the part of the workflow config's `audit` section the audit applies.

    Attributes:
        tolerances: largest acceptable between-group difference (max - min) per gap metric,
            in the metric's units, e.g. {"auroc": 0.05, "equalized_odds": 0.1}.
        alpha: family-wise error rate; group CIs are at 1 - alpha.
        correction: "bonferroni" (tested gaps' CIs at 1 - alpha/m) or "none".
        fail_on_flagged: whether a flagged gap fails the audit (else flags only inform).
    """

    tolerances: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    alpha: float = 0.05
    correction: str = "bonferroni"
    fail_on_flagged: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.tolerances, Mapping):
            raise ConfigError(
                f"audit.tolerances must be a mapping metric -> number, not {type(self.tolerances).__name__}"
            )
        for key, value in self.tolerances.items():
            if not known_gap_metric(str(key)):
                options = [*BINARY_METRICS, EQUALIZED_ODDS, *SEGMENTATION_METRICS]
                raise ConfigError(
                    f"audit.tolerances.{key} must name a gap metric, not {key!r}; {did_you_mean(key, options)}"
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 <= float(value) < math.inf
            ):
                raise ConfigError(f"audit.tolerances.{key} must be a number >= 0, not {value!r}; e.g. 0.05")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not 0.0 < self.alpha < 1.0
        ):
            raise ConfigError(f"audit.alpha must be between 0 and 1 (e.g. 0.05), not {self.alpha!r}")
        if self.correction not in CORRECTIONS:
            raise ConfigError(
                f"audit.correction must be one of {', '.join(CORRECTIONS)}, not {self.correction!r}"
            )
        if not isinstance(self.fail_on_flagged, bool):
            raise ConfigError(f"audit.fail_on_flagged must be true or false, not {self.fail_on_flagged!r}")
        frozen = MappingProxyType({str(k): float(v) for k, v in self.tolerances.items()})
        object.__setattr__(self, "tolerances", frozen)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> AuditRules:
        """Build from the YAML `audit` section; missing keys take the defaults.

        Raises:
            ConfigError: naming an unknown or invalid key.
        """
        mapping = dict(mapping or {})
        allowed = ("tolerances", "alpha", "correction", "fail_on_flagged")
        for key in mapping:
            if key not in allowed:
                raise ConfigError(f"audit.{key} must be one of audit.{', audit.'.join(allowed)}, not {key!r}; "
                                  f"{did_you_mean(key, allowed, prefix='audit.')}")
        return cls(**mapping)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "tolerances": dict(self.tolerances),
            "alpha": self.alpha,
            "correction": self.correction,
            "fail_on_flagged": self.fail_on_flagged,
        }


@dataclass(frozen=True)
class GroupResult:
    """One subgroup (or the whole test set). Suppressed groups carry no numbers at all."""

    attribute: str
    group: str
    n: int | None
    n_patients: int | None
    n_positive: int | None
    n_negative: int | None
    suppressed: bool
    imprecise: bool | None
    metrics: Mapping[str, Estimate]
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The audit.json form."""
        return {
            "attribute": self.attribute,
            "group": self.group,
            "n": self.n,
            "n_patients": self.n_patients,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "suppressed": self.suppressed,
            "imprecise": self.imprecise,
            "note": self.note,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
        }


@dataclass(frozen=True)
class AuditResult:
    """Everything the audit found; `to_dict()` is audit.json.

    `status` is the verdict, one of `medtl.vocabulary.AUDIT_STATUSES`: "inconclusive" when no
    attribute was evaluated (an attribute is evaluated when at least one of its tested gaps was
    decided: flagged, or within its tolerance; a CI that contains the tolerance decides nothing);
    else "failed" when a gap is flagged and the config fails on flags; else "passed". `passed`
    is true only for "passed". `unevaluated_attributes` lists the audited attributes that were
    not evaluated, each as {"attribute", "reason", "remedy"}, whatever the status;
    `left_out_intersections` the intersections not audited because one of their attributes has
    a single value (their groups repeat the other attribute's), each as {"attribute", "reason"}.
    """

    passed: bool
    status: str
    task: str
    reference: dict[str, Any] | None
    overall: GroupResult
    groups: tuple[GroupResult, ...]
    gaps: tuple[Gap, ...]
    amplification: tuple[dict[str, Any], ...]
    thresholds: dict[str, Any] | None
    config: AuditRules
    correction: dict[str, Any]
    settings: dict[str, Any]
    notes: tuple[str, ...]
    evaluated_attributes: tuple[str, ...] = ()
    unevaluated_attributes: tuple[Mapping[str, str], ...] = ()
    left_out_intersections: tuple[Mapping[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.status not in AUDIT_STATUSES:
            raise ValueError(f"audit status must be one of {', '.join(AUDIT_STATUSES)}, not {self.status!r}")
        if self.passed != (self.status == "passed"):
            raise ValueError(f"passed must be {self.status == 'passed'} for status {self.status!r}, not {self.passed}")

    def to_dict(self) -> dict[str, Any]:
        """The audit.json document: passed, status, reference, groups, gaps, and the extra keys of docs/audit.md."""
        return {
            "passed": self.passed,
            "status": self.status,
            "task": self.task,
            "reference": self.reference,
            "overall": self.overall.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "gaps": [g.to_dict() for g in self.gaps],
            "amplification": list(self.amplification),
            "thresholds": self.thresholds,
            "tolerance": {
                k: v for k, v in self.config.tolerances.items() if gap_metric_applies(k, self.task)
            },
            "correction": self.correction,
            "fail_on_flagged": self.config.fail_on_flagged,
            "settings": self.settings,
            "evaluated_attributes": list(self.evaluated_attributes),
            "unevaluated_attributes": [dict(u) for u in self.unevaluated_attributes],
            "left_out_intersections": [dict(u) for u in self.left_out_intersections],
            "notes": list(self.notes),
        }

    def groups_frame(self) -> pd.DataFrame:
        """Tidy table for the report: one row per (attribute, group, metric); suppressed groups keep one row."""
        rows = []
        for g in (self.overall, *self.groups):
            base = {
                "attribute": g.attribute,
                "group": g.group,
                "n": g.n,
                "n_patients": g.n_patients,
                "suppressed": g.suppressed,
                "imprecise": g.imprecise,
            }
            if not g.metrics:
                rows.append({**base, "metric": None, "value": None, "ci_low": None, "ci_high": None})
            for name, est in g.metrics.items():
                lo, hi = est.ci if est.ci else (None, None)
                rows.append(
                    {**base, "metric": name, "value": est.to_dict()["value"], "ci_low": lo, "ci_high": hi}
                )
        return pd.DataFrame(rows)
