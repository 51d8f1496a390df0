"""`medtl run`: one workflow end to end, recorded in MLflow, registered, audited and reported.

Order: manifest -> train (epoch metrics to MLflow) -> predictions on val/test -> test metrics with
patient-level bootstrap CIs -> bias audit -> model + registry version (alias `candidate`) ->
audit verdict on the version -> HTML report -> PHI scan of everything the run logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medtl import __version__
from medtl.config import WorkflowConfig
from medtl.engine.runtime import barrier, cleanup_distributed, init_distributed
from medtl.errors import MedtlError
from medtl.evaluation.audit import BiasAudit
from medtl.evaluation.audit_types import AuditConfig
from medtl.evaluation.bootstrap import bootstrap_binary
from medtl.evaluation.metrics import choose_threshold, classification_report_data, multiclass_metrics
from medtl.evaluation.report import render_report
from medtl.evaluation.segmentation import segmentation_case_metrics
from medtl.report_inputs import build_report_inputs, inputs_from_json, inputs_to_json
from medtl.tracking import phi_guard, registry, run_records, store
from medtl.tracking.torch_model import log_torch_model
from medtl.workflow import (
    PreparedData,
    TrainedModel,
    config_dict,
    patient_ids,
    predictions_table,
    prepare_data,
    train_model,
    write_outputs,
)

logger = logging.getLogger(__name__)


class PHILeakError(MedtlError):
    """Something identifying reached the MLflow run; the run is marked and the version withheld."""


@dataclass(frozen=True)
class RunOutputs:
    """Where a workflow run left its results."""

    run_id: str
    output_dir: Path
    metrics: dict
    audit_passed: bool | None
    model_name: str
    model_version: str
    report_path: Path | None


def evaluate(cfg: WorkflowConfig, data: PreparedData, predictions: pd.DataFrame) -> dict:
    """Test metrics with CIs (and report data) from the val/test predictions table.

    Binary classification: threshold chosen on validation patients by the configured rule and
    re-derived inside each bootstrap replicate. Segmentation: per-case Dice / HD95 / surface Dice
    (MONAI metrics) with patient-level bootstrap CIs of the means.
    """
    val = predictions[predictions["split"] == "val"]
    test = predictions[predictions["split"] == "test"]
    ev = cfg.evaluation
    target = ev.threshold_target if ev.threshold_rule != "youden" else None
    if cfg.task == "segmentation":
        return _evaluate_segmentation(cfg, data, predictions)
    if len(data.classes) == 2:
        estimates = bootstrap_binary(
            test["y_true"].to_numpy(), test["y_score"].to_numpy(), patient_ids(data, test["id"]),
            validation=(val["y_true"].to_numpy(), val["y_score"].to_numpy(), patient_ids(data, val["id"])),
            rule=ev.threshold_rule, target=target, n_boot=ev.n_boot, seed=cfg.seed,
        )
        threshold = choose_threshold(val["y_true"], val["y_score"], ev.threshold_rule, target)
        curves = classification_report_data(test["y_true"], test["y_score"], threshold)
        test_metrics = {k: e.to_dict() for k, e in estimates.items()}
        val_auroc = _auroc(val["y_true"], val["y_score"])
        return {"test": test_metrics, "val": {"auroc": {"value": val_auroc, "ci": None}},
                "threshold": float(threshold), "curves": curves}
    columns = [f"y_score_{c}" for c in data.classes]
    point = multiclass_metrics(test["y_true"].map(lambda i: data.classes[int(i)]), test[columns].to_numpy(),
                               data.classes)
    metrics = {k: {"value": float(v), "ci": None} for k, v in point.items() if isinstance(v, int | float)}
    curves = classification_report_data(test["y_true"].map(lambda i: data.classes[int(i)]), test[columns].to_numpy(),
                                        classes=data.classes)
    return {"test": metrics, "val": {}, "threshold": None, "curves": curves}


def _auroc(y: pd.Series, s: pd.Series) -> float | None:
    from sklearn.metrics import roc_auc_score

    try:
        return float(roc_auc_score(y, s))
    except ValueError:
        return None


def _evaluate_segmentation(cfg: WorkflowConfig, data: PreparedData, predictions: pd.DataFrame) -> dict:
    cases = segmentation_case_metrics(
        list(predictions["_pred"]), list(predictions["_true"]), num_classes=cfg.model.num_classes,
        ids=list(predictions["id"]),
    )
    table = predictions.drop(columns=["_pred", "_true"]).merge(cases, on="id", how="left")
    rng = np.random.default_rng(cfg.seed)
    out: dict = {}
    for split in ("val", "test"):
        part = table[table["split"] == split]
        patients = patient_ids(data, part["id"])
        metrics = {}
        for column in [c for c in cases.columns if c != "id"]:
            values = part[column].to_numpy(dtype=float)
            metrics[column] = _patient_bootstrap_mean(values, patients, cfg.evaluation.n_boot, rng)
        out[split] = metrics
    out["cases"] = table
    out["threshold"] = None
    return out


def _patient_bootstrap_mean(values: np.ndarray, patients: np.ndarray, n_boot: int, rng) -> dict:
    # Mean of per-case values with patients (not cases) resampled; NaN cases (empty reference) are ignored.
    ok = np.isfinite(values)
    if not ok.any():
        return {"value": None, "ci": None}
    values, patients = values[ok], patients[ok]
    uniq, inverse = np.unique(patients, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq)).astype(float)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": float(values.mean()), "ci": [float(lo), float(hi)]}


def run_audit(cfg: WorkflowConfig, data: PreparedData, table: pd.DataFrame, *, progress: bool = True,
              reference: pd.DataFrame | None = None) -> BiasAudit:
    """Per-subgroup bias audit of the val/test predictions (threshold from validation)."""
    attributes = [a for a in cfg.audit.attributes if a in table.columns]
    settings = {"alpha": cfg.audit.alpha, "correction": cfg.audit.correction,
                "fail_on_flagged": cfg.audit.fail_on_flagged}
    if cfg.audit.tolerances:
        settings["tolerances"] = dict(cfg.audit.tolerances)
    ev = cfg.evaluation
    audit = BiasAudit(
        attributes,
        intersections=cfg.audit.intersections,
        config=AuditConfig.from_mapping(settings),
        task=cfg.task,
        threshold_rule=ev.threshold_rule,
        threshold_target=ev.threshold_target if ev.threshold_rule != "youden" else None,
        n_boot=ev.n_boot,
        seed=cfg.seed,
        min_group_size=cfg.audit.min_group_size,
        progress=progress,
    )
    return audit.run(table, patient_ids(data, table["id"]), reference_predictions=reference)


def _flat_metrics(evaluation: dict) -> dict[str, float]:
    flat = {}
    for split in ("val", "test"):
        for name, est in evaluation.get(split, {}).items():
            if isinstance(est, dict) and est.get("value") is not None and np.isfinite(est["value"]):
                flat[f"{split}.{name}"] = float(est["value"])
                if est.get("ci"):
                    flat[f"{split}.{name}.ci_lo"], flat[f"{split}.{name}.ci_hi"] = map(float, est["ci"])
    return flat


def run_workflow(
    cfg: WorkflowConfig,
    output_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    extra_forbidden: dict[str, str] | None = None,
) -> RunOutputs:
    """Run a workflow end to end; see the module docstring for the order of steps.

    Args:
        cfg: the validated workflow config.
        output_dir: gets metrics.json, predictions.csv, audit.json, report.html, checkpoints/.
        resume: continue training from output_dir/checkpoints/last.pt.
        progress: progress bars.
        extra_forbidden: more identifying strings the PHI scan of the run must not find.

    Returns:
        The run id, metrics, audit verdict and registry version.

    Raises:
        PHILeakError: when the scan of the MLflow run finds an identifying value or a data path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Under torchrun every rank runs this function: rank 0 builds the manifest, owns the MLflow
    # run and evaluates; the others read the manifest it wrote and only join training (DDP).
    dist_info = init_distributed()
    main_rank = dist_info.rank == 0
    if main_rank:
        data = prepare_data(cfg, output_dir, progress=progress)
    barrier(dist_info)
    if not main_rank:
        built = cfg.data.manifest or cfg.data.manifest_out or str(output_dir / "manifest.csv")
        data = prepare_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=built)),
                            output_dir, progress=False)
    timings["manifest_seconds"] = time.perf_counter() - start
    store.tracking_uri()
    name = cfg.tracking.registered_model or cfg.name
    if not main_rank:
        train_model(cfg, data, output_dir=output_dir, resume=resume, progress=False)
        cleanup_distributed()
        return RunOutputs(run_id="", output_dir=output_dir, metrics={}, audit_passed=None,
                          model_name=name, model_version="", report_path=None)
    with store.start_run(cfg.tracking.experiment, run_name=cfg.name, tags={"medtl.workflow": cfg.name}) as run:
        run_id = run.info.run_id
        run_records.log_config(config_dict(cfg))
        run_records.log_environment()
        run_records.log_manifest(data.manifest, data.manifest_sha256)
        trained, sets = train_model(
            cfg, data, output_dir=output_dir, resume=resume, progress=progress,
            on_epoch_end=lambda epoch, record: run_records.log_epoch_metrics(
                {k: v for k, v in record.items() if k != "epoch"}, epoch),
        )
        cleanup_distributed()
        timings["train_seconds"] = float(trained.fit.total_train_seconds)
        timings["time_to_best_seconds"] = float(trained.fit.time_to_best_seconds)
        bundle = trained.bundle
        report = bundle.load_report
        run_records.log_weights(bundle.weights.as_dict(), report.as_dict() if report is not None else None)
        t0 = time.perf_counter()
        predictions = predictions_table(cfg, data, trained, sets, progress=progress)
        evaluation = evaluate(cfg, data, predictions)
        table = evaluation.pop("cases") if cfg.task == "segmentation" else predictions
        timings["evaluate_seconds"] = time.perf_counter() - t0
        audit = run_audit(cfg, data, table, progress=progress)
        audit_dict = audit.to_dict()
        passed = bool(audit.result_.passed)
        (output_dir / "audit.json").write_text(json.dumps(audit_dict, indent=2, default=float))
        metrics = {
            "test": {k: v["value"] for k, v in evaluation["test"].items()},
            "test_ci": {k: v["ci"] for k, v in evaluation["test"].items()},
            "val": {k: v["value"] for k, v in evaluation.get("val", {}).items()},
            "threshold": evaluation.get("threshold"),
            "best_epoch": trained.fit.best_epoch,
            "epochs_run": trained.fit.epochs_run,
            "timings": timings,
            "run_id": run_id,
            "audit_passed": passed,
        }
        write_outputs(output_dir, table, metrics)
        flat = _flat_metrics(evaluation)
        flat["audit.passed"] = float(passed)
        run_records.log_final_metrics(flat)
        for artifact in ("metrics.json", "predictions.csv", "audit.json"):
            run_records.log_artifact(output_dir / artifact)
        model_uri = log_torch_model(bundle.model, (cfg.model.in_channels, *cfg.data.image_size))
        version = ""
        if cfg.tracking.register:
            tags = {
                "task": cfg.task, "encoder": cfg.model.encoder, "weights_origin": bundle.weights.origin,
                "weights_source": bundle.weights.source, "strategy": cfg.train.strategy,
                "manifest_sha256": data.manifest_sha256, "run_id": run_id,
            }
            key_metrics = {f"test.{k}": v for k, v in metrics["test"].items()
                           if k in ("auroc", "auprc", "accuracy", "dice") and v is not None}
            version = registry.register_model(model_uri, name, tags, key_metrics)
            registry.set_audit_status(name, version, "passed" if passed else "failed",
                                      {"flagged_gaps": sum(1 for g in audit_dict.get("gaps", []) if g.get("flagged"))})
        inputs = build_report_inputs(cfg, data, trained, evaluation, audit_dict, run_id=run_id,
                                     model_version=version, code_version=__version__)
        report_path = output_dir / "report.html"
        digest = render_report(inputs, report_path)
        (output_dir / "report_inputs.json").write_text(inputs_to_json(inputs))
        run_records.log_artifact(report_path)
        run_records.log_artifact(output_dir / "report_inputs.json")
        store.client().set_tag(run_id, "medtl.report_sha256", digest)
        if version:
            store.client().set_model_version_tag(name, version, "report_sha256", digest)
            store.client().set_model_version_tag(name, version, "report_artifact", f"runs:/{run_id}/report.html")
    forbidden = dict(data.forbidden)
    forbidden.update(extra_forbidden or {})
    findings = phi_guard.scan_run(run_id, forbidden.keys(), [data.root.resolve()])
    if findings:
        if version:
            registry.set_audit_status(name, version, "failed", {"phi_findings": len(findings)})
        raise PHILeakError(
            f"the MLflow run {run_id} holds {len(findings)} identifying value(s) or data path(s): "
            + "; ".join(findings[:5]) + "; the version was marked failed — report this as a bug"
        )
    return RunOutputs(run_id=run_id, output_dir=output_dir, metrics=metrics, audit_passed=passed,
                      model_name=name, model_version=version, report_path=report_path)


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


__all__ = [
    "rerender_report","RunOutputs", "PHILeakError", "evaluate", "run_audit", "run_workflow", "TrainedModel"]
