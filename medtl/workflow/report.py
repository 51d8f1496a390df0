"""Step 5 of a run: the audited evaluation report's inputs, from a run's results; re-rendering a run's report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
from collections import Counter
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from medtl.evaluation.report import render_report
from medtl.evaluation.report_types import (
    DataProvenance,
    EvaluationMethods,
    Identification,
    ModelTransfer,
    ReportInputs,
    Results,
)
from medtl.evaluation.suppression import nesting_relations, protect
from medtl.tracking import store
from medtl.workflow.config import WorkflowConfig
from medtl.workflow.prepare import positive_class


def rerender_report(run_id: str, out_path: Path, *, pdf: bool = False) -> Path:
    """Render the report of an MLflow run again from its `report_inputs.json` artifact.

    Raises:
        InputError: when the run has no report inputs (it was not made by `medtl run`).
    """
    import tempfile

    import mlflow

    from medtl.errors import InputError
    from medtl.evaluation.report import write_pdf

    store.tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report_inputs.json", dst_path=tmp)
        except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing run/artifact
            raise InputError(
                f"run {run_id} must have a report_inputs.json artifact (written by `medtl run`); "
                f"check the run id in the MLflow UI ({type(err).__name__})"
            ) from err
        inputs = inputs_from_json(Path(local).read_text())
    out_path = Path(out_path)
    render_report(inputs, out_path)
    if pdf:
        write_pdf(out_path, out_path.with_suffix(".pdf"))
    return out_path


INTENDED_USE = {
    "classification": (
        "Research use: estimate the probability of the labelled finding on studies like those in the "
        "manifest (same modalities, sites and population). Not for clinical decisions."
    ),
    "segmentation": (
        "Research use: delineate the labelled structures on studies like those in the manifest. "
        "Not for clinical decisions."
    ),
}


def library_versions() -> dict[str, str]:
    """Versions of the libraries a reviewer needs to reproduce the run."""
    out = {"python": platform.python_version()}
    for name in ("medtl", "torch", "monai", "timm", "mlflow", "pydicom", "scikit-learn", "fairlearn", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _protected_splits(data, audit: Mapping, *, k_min: int) -> dict[str, dict]:
    """Studies per split and per subgroup value, with small counts (and what would reveal them) as None.

    Counts below k_min are hidden; so are the test split's counts of groups the audit suppressed or
    whose counts it withheld (the same studies); then `protect` withholds more until no hidden
    count follows from a split's total or from nested subgroups (scanners within sites). Label
    counts stay exact: they are no quasi-identifier.
    """
    manifest = data.manifest
    splits: dict[str, dict] = {}
    sizes: dict[tuple[str, str, str], int] = {}
    hidden: set[tuple[str, str, str]] = set()
    relations = []
    audit_hidden = {(str(g.get("attribute")), str(g.get("group"))) for g in audit.get("groups", [])
                    if g.get("suppressed") or g.get("n") is None}
    columns = [c for c in data.subgroups if c in manifest.columns]
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split]
        info: dict = {"n_studies": int(len(part)), "n_patients": int(part["patient"].nunique())}
        if "label" in part.columns:
            info["label"] = {str(v): int(n) for v, n in part["label"].value_counts().sort_index().items()}
        for column in columns:
            counts = {str(v): int(n) for v, n in part[column].value_counts().sort_index().items()}
            info[column] = counts
            for value, n in counts.items():
                sizes[(split, column, value)] = n
                if 0 < n < k_min or (split == "test" and (column, value) in audit_hidden):
                    hidden.add((split, column, value))
            relations.append((None, [(split, column, v) for v in counts]))
        relations += nesting_relations({c: part[c].astype(str).to_numpy() for c in columns},
                                       lambda column, value, split=split: (split, column, value))
        splits[split] = info
    for split, column, value in protect(sizes, hidden, relations):
        splits[split][column][value] = None
    return splits


def _provenance(data, audit: Mapping, phi_scan: Mapping[str, object] | None) -> DataProvenance:
    sidecar = data.sidecar
    counts = sidecar.get("counts", {})
    manifest = data.manifest
    rejected = sidecar.get("files_not_used", [])
    quarantined = Counter(r.get("reason", "") for r in rejected if r.get("status") == "quarantined")
    skipped = Counter(r.get("reason", "") for r in rejected if r.get("status") == "skipped")
    k = sidecar.get("k_anonymity", {})
    splits = _protected_splits(data, audit, k_min=int(k.get("k_min") or 11))
    return DataProvenance(
        n_files=int(counts.get("files_seen", 0)),
        n_studies=int(len(manifest)),
        n_patients=int(manifest["patient"].nunique()),
        manifest_sha256=data.manifest_sha256,
        modalities={str(m): int(n) for m, n in manifest["modality"].value_counts().items()},
        sites={str(s): int(n) for s, n in manifest["site"].value_counts().items()} if "site" in manifest else {},
        quarantined=dict(quarantined),
        skipped=dict(skipped),
        deid_profile=sidecar.get("deidentification", ""),
        key_id=sidecar.get("key_id", ""),
        k_anonymity={
            "k": k.get("k"), "k_min": k.get("k_min"), "quasi_identifiers": k.get("quasi_identifiers", []),
            "passed": k.get("ok"),
        },
        phi_scan=dict(phi_scan or {}),
        splits=splits,
        # prepare_data raises LeakageError before a run starts, so a report only exists for a clean check.
        leakage={"passed": True, "level": "patient", "n_shared": 0},
        years=_years(sidecar.get("study_years") or {}),
    )


def _years(info: Mapping[str, object]) -> str:
    """"2014-2019 (412 studies dated, 3 without a date)" from the sidecar's study_years."""
    first, last = info.get("first"), info.get("last")
    if first is None:
        return ""
    span = str(first) if first == last else f"{first}-{last}"
    undated = info.get("undated") or 0
    return f"{span} ({info.get('dated', 0)} studies dated" + (f", {undated} without a date)" if undated else ")")


def build_report_inputs(cfg: WorkflowConfig, data, trained, evaluation: dict, audit: dict, *, run_id: str,
                        model_version: str, code_version: str, source: str = "",
                        synthetic: bool = False, test_sets: Mapping[str, Mapping] | None = None,
                        phi_scan: Mapping[str, object] | None = None) -> ReportInputs:
    """The report's inputs for a finished workflow run.

    Args:
        phi_scan: the result of the run's PHI scan ({"passed", "n_findings", "scope"}); None when
            no scan was made (the report then says "not recorded").
        test_sets: the evaluations beside `test` (`old_test`, `target_test`, `source_test`), as
            `medtl.workflow.run` computes them: name -> {"test": metrics, "n_cases", "n_patients", ...}.
            Only the metrics and the counts are carried into the report.
    """
    bundle = trained.bundle
    load_report = dataclasses.asdict(bundle.load_report) if bundle.load_report is not None else {}
    results_metrics = evaluation["test"]
    curves = _named_curves(evaluation.get("curves"), data.classes)
    dice_per_case = None
    n_cases = int((data.manifest["split"] == "test").sum())
    if cfg.task == "segmentation" and "cases" in evaluation:
        cases = evaluation["cases"]
        test_cases = cases[cases["split"] == "test"]
        dice_per_case = {c.removeprefix("dice_"): [float(v) for v in test_cases[c].dropna()]
                         for c in test_cases.columns if c.startswith("dice_")}
    return ReportInputs(
        identification=Identification(
            model_name=cfg.tracking.registered_model or cfg.name,
            task=cfg.task,
            intended_use=INTENDED_USE[cfg.task],
            run_id=run_id,
            created=dt.date.today().isoformat(),
            code_version=code_version,
            model_version=str(model_version),
            out_of_scope="Clinical diagnosis; studies from modalities, sites or populations absent from the manifest.",
        ),
        data=dataclasses.replace(_provenance(data, audit, phi_scan), source=source, synthetic=synthetic),
        model=ModelTransfer(
            encoder=cfg.model.encoder,
            strategy=trained.strategy,
            weights=bundle.weights.as_dict(),
            load_report=load_report,
            frozen_layers=list(trained.frozen_schedule),
            preprocessing=dataclasses.asdict(trained.prep),
            hyperparameters={**{k: v for k, v in dataclasses.asdict(trained.train_config).items() if k != "progress"},
                             "passes_per_epoch": trained.fit.passes_per_epoch},
            library_versions=library_versions(),
            head="classification head (pooling, dropout, linear)" if cfg.task == "classification"
            else "U-Net-style decoder on the encoder's multi-scale features",
            spatial_dims=cfg.model.spatial_dims,
        ),
        methods=EvaluationMethods(
            metrics=list(results_metrics),
            threshold_rule=cfg.evaluation.threshold_rule,
            ci_method="percentile bootstrap resampling patients, stratified by label",
            n_boot=cfg.evaluation.n_boot,
            threshold=evaluation.get("threshold"),
            threshold_target=cfg.evaluation.threshold_target if cfg.evaluation.threshold_rule != "youden" else None,
            tolerances=dict(audit.get("tolerance") or {}) if isinstance(audit.get("tolerance"), dict) else {},
            min_group_size=cfg.audit.min_group_size,
            positive_class=positive_class(cfg, data),
        ),
        results=Results(
            metrics=results_metrics,
            n_cases=n_cases,
            n_patients=int(data.manifest.loc[data.manifest["split"] == "test", "patient"].nunique()),
            curves=curves,
            dice_per_case=dice_per_case,
            test_sets=_test_sets(test_sets or {}),
        ),
        audit=audit,
    )


def _named_curves(curves: Mapping | None, classes: list[str]) -> dict | None:
    """The curves with the class names: for two classes, `classes` [negative, positive] and the
    confusion matrix labelled by name."""
    if curves is None:
        return None
    named = dict(curves)
    if len(classes) == 2 and "per_class" not in named:
        named["classes"] = list(classes)
        if isinstance(named.get("confusion_matrix"), Mapping):
            named["confusion_matrix"] = {**named["confusion_matrix"], "labels": list(classes)}
    return named


def _test_sets(evaluations: Mapping[str, Mapping]) -> dict[str, dict]:
    out = {}
    for name, evaluation in evaluations.items():
        block: dict = {"metrics": dict(evaluation.get("test", {}))}
        for count in ("n_cases", "n_patients"):
            if evaluation.get(count) is not None:
                block[count] = int(evaluation[count])
        out[name] = block
    return out


def inputs_to_json(inputs: ReportInputs) -> str:
    """Serialise report inputs (aggregates only) so `medtl report RUN_ID` can re-render later."""
    import json

    return json.dumps(dataclasses.asdict(inputs), default=_jsonable, sort_keys=True)


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return str(value)


def inputs_from_json(text: str) -> ReportInputs:
    """The inverse of `inputs_to_json`."""
    import json

    raw = json.loads(text)
    return ReportInputs(
        identification=Identification(**raw["identification"]),
        data=DataProvenance(**raw["data"]),
        model=ModelTransfer(**raw["model"]),
        methods=EvaluationMethods(**raw["methods"]),
        results=Results(**raw["results"]),
        audit=raw["audit"],
        amplification=raw.get("amplification"),
        limitations=tuple(raw.get("limitations") or ()),
        transfer_benefit=raw.get("transfer_benefit"),
        transfer_benefit_metric=raw.get("transfer_benefit_metric", "auroc"),
    )
