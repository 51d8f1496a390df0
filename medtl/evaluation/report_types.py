"""The report's inputs: plain, JSON-ready data that `medtl.evaluation.report.render_report` shows.

The orchestration layer fills them from a finished run (`medtl.workflow.report`); the report reads
named fields only, so anything else a caller leaves in a mapping is never shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


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
    positive_class: str | None = None  # two classes: the one sensitivity, FNR and the audit's gaps refer to


@dataclass(frozen=True)
class Results:
    """Test-set results: metric -> {"value", "ci"} plus the data of the figures.

    `curves` is `metrics.classification_report_data(...)` (binary or multi-class); ROC/PR curves
    may carry `tpr_lo`/`tpr_hi` and `precision_lo`/`precision_hi` bands. For segmentation,
    `metrics` holds `dice`, `hd95`, ... and per class `dice_<class>`, ...; `dice_per_case`
    maps class -> per-case Dice, drawn only as a distribution.

    `test_sets` holds the test sets a run scores beside `metrics`, under their metrics.json
    keys: `old_test` (continual fine-tuning: the registered version's old test split),
    `target_test` and `source_test` (domain adaptation: the test split cut by domain). Each is
    {"metrics": metric -> {"value", "ci"}, "n_cases": int, "n_patients": int}; the counts may
    be missing. Empty for a plain run.
    """

    metrics: Mapping[str, Mapping[str, Any]]
    n_cases: int = 0
    n_patients: int = 0
    curves: Mapping[str, Any] | None = None
    dice_per_case: Mapping[str, Sequence[float]] | None = None
    test_sets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
