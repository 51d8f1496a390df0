"""`medtl run`: one workflow end to end, recorded in MLflow, registered, audited and reported.

Order: manifest -> train (epoch metrics to MLflow) -> predictions on val/test -> test metrics with
patient-level bootstrap CIs -> bias audit -> model + registry version (alias `candidate`) ->
audit verdict on the version -> HTML report -> PHI scan of everything the run logged.

The training step follows the config's transfer method (`medtl.adaptation`): domain adaptation
adds `target_test`/`source_test` metrics, continual fine-tuning adds `old_test` (the registered
version's old test set), multi-task adds the class head's metrics to `test`. `run_few_shot` is
the few-shot study, recorded as its own run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medtl import __version__
from medtl.adaptation import (
    RegisteredWeights,
    check_old_test_unseen,
    check_registered_fits,
    domain_test_sets,
    few_shot_study,
    load_registered_weights,
    old_test_predictions,
    prepare_old_data,
    train_for_config,
)
from medtl.config import WorkflowConfig, validate
from medtl.engine.runtime import barrier, cleanup_distributed, init_distributed
from medtl.errors import MedtlError
from medtl.evaluation.report import render_report
from medtl.models.fewshot import flatten_results
from medtl.report_inputs import build_report_inputs, inputs_from_json, inputs_to_json
from medtl.run_evaluation import (
    audit_document,
    audit_reference,
    check_audit_setup,
    evaluate,
    gap_metrics,
    run_audit,
    train_scratch_reference,
)
from medtl.tracking import phi_guard, registry, run_records, store
from medtl.tracking.torch_model import log_torch_model
from medtl.workflow import (
    PreparedData,
    TrainedModel,
    config_dict,
    patient_ids,
    predictions_table,
    prepare_data,
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


def _flat_metrics(evaluation: dict) -> dict[str, float]:
    flat = {}
    for split in ("val", "test"):
        flat.update(_flat_estimates(split, evaluation.get(split, {})))
    return flat


def _flat_estimates(prefix: str, estimates: dict) -> dict[str, float]:
    flat = {}
    for name, est in estimates.items():
        if isinstance(est, dict) and est.get("value") is not None and np.isfinite(est["value"]):
            flat[f"{prefix}.{name}"] = float(est["value"])
            if est.get("ci"):
                flat[f"{prefix}.{name}.ci_lo"], flat[f"{prefix}.{name}.ci_hi"] = map(float, est["ci"])
    return flat


def _extra_evaluations(cfg: WorkflowConfig, data: PreparedData, predictions: pd.DataFrame, trained: TrainedModel,
                       old: PreparedData | None, *, progress: bool) -> tuple[dict[str, dict], pd.DataFrame | None]:
    """Test metrics beside `test`: per adaptation domain, and on the old test set of a continual run.

    The old test set is evaluated like the registered version was (threshold from the old
    manifest's validation split), so its numbers compare with that version's test metrics.
    Each evaluation also gets the test `n_cases` and `n_patients` it was computed on (for the report).
    """
    extra: dict[str, dict] = {}
    if cfg.adaptation.method != "none":
        for name, subset in domain_test_sets(cfg, data, predictions).items():
            extra[name] = {**evaluate(cfg, data, subset), **_test_counts(data, subset)}
    old_table = None
    if old is not None:
        old_predictions = old_test_predictions(cfg, old, trained, progress=progress)
        extra["old_test"] = {**evaluate(cfg, old, old_predictions), **_test_counts(old, old_predictions)}
        old_table = extra["old_test"].get("cases", old_predictions)
    for evaluation in extra.values():
        evaluation.pop("cases", None)
    return extra, old_table


def _test_counts(data: PreparedData, predictions: pd.DataFrame) -> dict[str, int]:
    test = predictions[predictions["split"] == "test"]
    return {"n_cases": int(len(test)), "n_patients": int(len(set(patient_ids(data, test["id"]))))}


def run_workflow(
    cfg: WorkflowConfig,
    output_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    extra_forbidden: dict[str, str] | None = None,
    synthetic: bool = False,
    source: str = "",
) -> RunOutputs:
    """Run a workflow end to end; see the module docstring for the order of steps.

    Args:
        cfg: the validated workflow config.
        output_dir: gets metrics.json, predictions.csv, audit.json, report.html, checkpoints/.
        resume: continue training from output_dir/checkpoints/last.pt.
        progress: progress bars.
        extra_forbidden: more identifying strings the PHI scan of the run must not find.
        synthetic: the studies are synthetic (said in the report's data section and limitations).
        source: a short description of where the studies come from, for the report.

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
    check_audit_setup(cfg, data)  # before training, not after it; on every rank, so all of them stop
    timings["manifest_seconds"] = time.perf_counter() - start
    store.tracking_uri()
    name = cfg.tracking.registered_model or cfg.name
    registered = _registered_start(cfg)
    initial = registered.state if registered is not None else None
    if not main_rank:
        train_for_config(cfg, data, output_dir=output_dir, resume=resume, progress=False, initial_state=initial)
        train_scratch_reference(cfg, data, output_dir=output_dir, resume=resume, progress=False)
        cleanup_distributed()
        return RunOutputs(run_id="", output_dir=output_dir, metrics={}, audit_passed=None,
                          model_name=name, model_version="", report_path=None)
    old = None
    if registered is not None:
        old = prepare_old_data(cfg, output_dir / "old", progress=progress)
        check_old_test_unseen(data, old)
    run_tags = {"medtl.workflow": cfg.name}
    if registered is not None:
        run_tags["medtl.continual_from"] = registered.reference
    with store.start_run(cfg.tracking.experiment, run_name=cfg.name, tags=run_tags) as run:
        run_id = run.info.run_id
        run_records.log_config(config_dict(cfg))
        environment = run_records.log_environment()
        run_records.log_manifest(data.manifest, data.manifest_sha256)
        run_records.log_config({"rows_left_out": {r.replace(" ", "_"): n for r, n in data.dropped.items()}}, "data")
        trained, sets, method_info = train_for_config(
            cfg, data, output_dir=output_dir, resume=resume, progress=progress, initial_state=initial,
            on_epoch_end=lambda epoch, record: run_records.log_epoch_metrics(
                {k: v for k, v in record.items() if k != "epoch"}, epoch),
        )
        scratch = train_scratch_reference(cfg, data, output_dir=output_dir, resume=resume, progress=progress)
        cleanup_distributed()
        timings["train_seconds"] = float(trained.fit.total_train_seconds)
        if scratch is not None:
            timings["reference_train_seconds"] = float(scratch[0].fit.total_train_seconds)
        timings["time_to_best_seconds"] = float(trained.fit.time_to_best_seconds)
        bundle = trained.bundle
        report = bundle.load_report
        run_records.log_weights(bundle.weights.as_dict(), report.as_dict() if report is not None else None)
        t0 = time.perf_counter()
        predictions = predictions_table(cfg, data, trained, sets, progress=progress)
        evaluation = evaluate(cfg, data, predictions)
        table = evaluation.pop("cases") if cfg.task == "segmentation" else predictions
        extra, old_table = _extra_evaluations(cfg, data, predictions, trained, old, progress=progress)
        timings["evaluate_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference = audit_reference(cfg, data, name=name, scratch=scratch, progress=progress)
        audit = run_audit(cfg, data, table, progress=progress, reference=reference.table,
                          reference_audit=reference.audit, reference_label=reference.label)
        timings["audit_seconds"] = time.perf_counter() - t0
        audit_dict = audit_document(audit, reference)
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
        for key, ev in extra.items():
            metrics[key] = {k: v["value"] for k, v in ev["test"].items()}
            metrics[f"{key}_ci"] = {k: v["ci"] for k, v in ev["test"].items()}
        metrics.update(_method_facts(cfg, method_info, registered, old))
        write_outputs(output_dir, table, metrics)
        flat = _flat_metrics(evaluation)
        for key, ev in extra.items():
            flat.update(_flat_estimates(key, ev["test"]))
        flat.update({f"adaptation.{k}": float(v) for k, v in method_info.items()})
        if reference.test is not None:
            flat.update(_flat_estimates("reference_test", reference.test))
        flat["audit.passed"] = float(passed)
        flat.update(gap_metrics(audit_dict))
        run_records.log_final_metrics(flat)
        artifacts = ["metrics.json", "predictions.csv", "audit.json"]
        if old_table is not None:
            old_table[[c for c in old_table.columns if not c.startswith("_")]].to_csv(
                output_dir / "old_predictions.csv", index=False)
            artifacts.append("old_predictions.csv")
        for artifact in artifacts:
            run_records.log_artifact(output_dir / artifact)
        model_uri = log_torch_model(bundle.model, (cfg.model.in_channels, *cfg.data.image_size))
        version = ""
        if cfg.tracking.register:
            version = registry.register_model(model_uri, name, _version_tags(cfg, data, trained, run_id, registered),
                                              _key_metrics(metrics))
            registry.set_audit_status(name, version, "passed" if passed else "failed",
                                      {"flagged_gaps": sum(1 for g in audit_dict.get("gaps", []) if g.get("flagged"))})
        forbidden = {**data.forbidden, **(extra_forbidden or {})}
        roots = [data.root.resolve()] + ([old.root.resolve()] if old is not None else [])
        # Everything but the report is in the run now: scan it, so the report can state the result
        # truthfully; the report itself is scanned before it is logged.
        _scan_or_raise(run_id, forbidden, roots, name=name, version=version)
        inputs = build_report_inputs(cfg, data, trained, evaluation, audit_dict, run_id=run_id,
                                     model_version=version, code_version=_code_version(environment),
                                     test_sets=extra, synthetic=synthetic, source=source,
                                     phi_scan={"passed": True, "n_findings": 0,
                                               "scope": "the MLflow run, its artifacts and model, and this report"})
        report_path = output_dir / "report.html"
        digest = render_report(inputs, report_path)
        (output_dir / "report_inputs.json").write_text(inputs_to_json(inputs))
        try:
            _scan_files_or_raise([report_path, output_dir / "report_inputs.json"], forbidden, roots, run_id=run_id,
                                 name=name, version=version)
        except PHILeakError:
            # The report claims a clean scan; it must not stay on disk when it is itself the leak.
            report_path.unlink(missing_ok=True)
            (output_dir / "report_inputs.json").unlink(missing_ok=True)
            raise
        run_records.log_artifact(report_path)
        run_records.log_artifact(output_dir / "report_inputs.json")
        store.client().set_tag(run_id, "medtl.report_sha256", digest)
        if version:
            store.client().set_model_version_tag(name, version, "report_sha256", digest)
            store.client().set_model_version_tag(name, version, "report_artifact", f"runs:/{run_id}/report.html")
    return RunOutputs(run_id=run_id, output_dir=output_dir, metrics=metrics, audit_passed=passed,
                      model_name=name, model_version=version, report_path=report_path)


def _registered_start(cfg: WorkflowConfig) -> RegisteredWeights | None:
    """The registered version a continual run starts from (checked against the config), or None."""
    if not cfg.continual.from_model:
        return None
    registered = load_registered_weights(cfg.continual.from_model)
    check_registered_fits(cfg, registered)
    return registered


def _method_facts(cfg: WorkflowConfig, method_info: dict, registered: RegisteredWeights | None,
                  old: PreparedData | None) -> dict:
    """metrics.json entries that say how an adapted or continual run was made."""
    facts: dict = {}
    a = cfg.adaptation
    if a.method != "none":
        facts["adaptation"] = {"method": a.method, "domain_column": a.domain_column, "target": a.target,
                               **method_info}
    if registered is not None and old is not None:
        facts["continual"] = {"from_model": registered.reference, "old_manifest_sha256": old.manifest_sha256,
                              "old_test_studies": int((old.manifest["split"] == "test").sum())}
    if cfg.multitask.enabled:
        facts["multitask"] = {"cls_weight": cfg.multitask.cls_weight, "seg_weight": cfg.multitask.seg_weight}
    return facts


def _version_tags(cfg: WorkflowConfig, data: PreparedData, trained: TrainedModel, run_id: str,
                  registered: RegisteredWeights | None) -> dict[str, str]:
    bundle = trained.bundle
    tags = {
        "task": cfg.task, "encoder": cfg.model.encoder, "weights_origin": bundle.weights.origin,
        "weights_source": bundle.weights.source, "strategy": cfg.train.strategy,
        "manifest_sha256": data.manifest_sha256, "run_id": run_id,
    }
    if cfg.adaptation.method != "none":
        tags["adaptation"] = f"{cfg.adaptation.method} to {cfg.adaptation.domain_column}={cfg.adaptation.target}"
    if cfg.multitask.enabled:
        # The logged model returns S segmentation maps then the K class logits repeated over space.
        tags["multitask"] = f"outputs {bundle.model.num_seg_classes} segmentation + {bundle.model.num_classes} class"
    if registered is not None:
        tags["continual_from"] = registered.reference
    return tags


def _key_metrics(metrics: dict) -> dict[str, float]:
    return {f"{split}.{k}": v for split in ("test", "target_test", "old_test") for k, v in metrics.get(split, {}).items()
            if k in ("auroc", "auprc", "accuracy", "dice") and v is not None}


def _code_version(environment: dict[str, str]) -> str:
    """"medtl 0.1.0, git 1a2b3c4" (with "+ local changes" when the checkout is dirty), or the version."""
    commit = environment.get("medtl.git_commit")
    if not commit:
        return f"medtl {__version__}"
    dirty = " + local changes" if environment.get("medtl.git_dirty") == "true" else ""
    return f"medtl {__version__}, git {commit[:12]}{dirty}"


def _scan_files_or_raise(paths: list[Path], forbidden: dict[str, str], roots: list[Path], *, run_id: str,
                         name: str, version: str) -> None:
    findings = phi_guard.scan_files(paths, forbidden.keys(), roots)
    _raise_findings(findings, run_id, name=name, version=version)


def _scan_or_raise(run_id: str, forbidden: dict[str, str], roots: list[Path], *, name: str, version: str) -> None:
    _raise_findings(phi_guard.scan_run(run_id, forbidden.keys(), roots), run_id, name=name, version=version)


def _raise_findings(findings: list[str], run_id: str, *, name: str, version: str) -> None:
    if findings:
        if version:
            registry.set_audit_status(name, version, "failed", {"phi_findings": len(findings)})
        raise PHILeakError(
            f"the MLflow run {run_id} or its report holds {len(findings)} identifying value(s) or data path(s): "
            + "; ".join(findings[:5]) + ("; the version was marked failed" if version else "")
            + " — report this as a bug"
        )


def run_few_shot(
    cfg: WorkflowConfig,
    output_dir: Path,
    *,
    ks: Sequence[int] | None = None,
    draws: int | None = None,
    progress: bool = True,
    extra_forbidden: dict[str, str] | None = None,
) -> dict:
    """The few-shot study of a classification workflow, recorded as one MLflow run.

    Frozen pretrained encoder (no fine-tuning): prototype classifier and linear probe fitted on k
    training patients per class, scored on the test split, `draws` random draws per k.

    Args:
        cfg: the validated workflow config (its `fewshot` section gives the defaults).
        output_dir: gets few_shot.json (and the manifest when it is built).
        ks: support sizes, overriding `fewshot.ks`.
        draws: draws per k, overriding `fewshot.draws`.
        progress: progress bars.
        extra_forbidden: more identifying strings the PHI scan of the run must not find.

    Returns:
        The content of few_shot.json: settings, sizes, "skipped_ks", "run_id" and
        "results" = {method: {k: {"auroc_mean", "auroc_sd", "accuracy_mean", "accuracy_sd",
        "auroc", "accuracy" (per draw), "n_support"}}} (NaN written as null).

    Raises:
        ConfigError: for a segmentation workflow or invalid ks/draws.
        PHILeakError: when the scan of the MLflow run finds an identifying value or a data path.

    Example:
        >>> result = run_few_shot(load_config(Path("workflows/classify_2d.yaml")), Path("outputs/few_shot"),
        ...                       ks=[1, 5, 10], draws=5)
    """
    fewshot = dataclasses.replace(cfg.fewshot, ks=tuple(ks) if ks is not None else cfg.fewshot.ks,
                                  draws=draws if draws is not None else cfg.fewshot.draws)
    cfg = validate(dataclasses.replace(cfg, fewshot=fewshot))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, output_dir, progress=progress)
    store.tracking_uri()
    tags = {"medtl.workflow": cfg.name, "medtl.study": "few-shot"}
    with store.start_run(cfg.tracking.experiment, run_name=f"{cfg.name}-few-shot", tags=tags) as run:
        run_records.log_config(config_dict(cfg))
        run_records.log_environment()
        run_records.log_manifest(data.manifest, data.manifest_sha256)
        result, bundle = few_shot_study(cfg, data, progress=progress)
        report = bundle.load_report
        run_records.log_weights(bundle.weights.as_dict(), report.as_dict() if report is not None else None)
        result["run_id"] = run.info.run_id
        numbers = flatten_results({m: {int(k): e for k, e in by_k.items()} for m, by_k in result["results"].items()})
        run_records.log_final_metrics({k: v for k, v in numbers.items() if np.isfinite(v)})
        path = output_dir / "few_shot.json"
        path.write_text(json.dumps(_json_safe(result), indent=2, sort_keys=True))
        run_records.log_artifact(path)
    forbidden = {**data.forbidden, **(extra_forbidden or {})}
    _scan_or_raise(result["run_id"], forbidden, [data.root.resolve()], name="", version="")
    return _json_safe(result)


def _json_safe(value):
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


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


__all__ = ["rerender_report", "RunOutputs", "PHILeakError", "run_few_shot", "run_workflow"]
