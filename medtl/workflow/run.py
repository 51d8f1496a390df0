"""`medtl run`: one workflow end to end, as a short sequence of its steps.

prepare (`prepare.py`) -> train (`train.py`, `methods.py`) -> evaluate and audit (`evaluate.py`)
-> record in MLflow and the registry (`record.py`) -> report (`report.py`). Under torchrun every
rank runs it: rank 0 builds the manifest, records and evaluates; the others only join training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medtl.data.dataset import preprocessing_record
from medtl.engine.runtime import barrier, cleanup_distributed, init_distributed
from medtl.evaluation.report import render_report
from medtl.tracking import registry, run_records, store
from medtl.tracking.torch_model import log_torch_model
from medtl.workflow.config import WorkflowConfig
from medtl.workflow.evaluate import (
    at_operating_threshold,
    audit_document,
    audit_reference,
    check_audit_setup,
    evaluate,
    gap_metrics,
    predictions_table,
    run_audit,
    write_outputs,
)
from medtl.workflow.methods import (
    RegisteredWeights,
    check_old_test_unseen,
    check_registered_fits,
    extra_evaluations,
    load_registered_weights,
    prepare_old_data,
    train_for_config,
    train_scratch_reference,
)
from medtl.workflow.package import (
    PACKAGE_DIR,
    PROFILE_FILE,
    packable,
    package_for_run,
    remember_run,
    write_package,
)
from medtl.workflow.prepare import (
    PreparedData,
    input_size_from_data,
    positive_class,
    preflight,
    prepare_data,
    publish_manifest,
    staged_manifest,
)
from medtl.workflow.record import (
    AUDIT_STATUS_TAG,
    PHILeakError,
    code_version,
    config_dict,
    flat_estimates,
    flat_metrics,
    key_metrics,
    log_earlier_epochs,
    log_epoch,
    scan_before_logging,
    scan_before_training,
    scan_files_or_raise,
    scan_or_raise,
    version_tags,
)
from medtl.workflow.report import build_report_inputs, inputs_to_json
from medtl.workflow.steps import interrupts_kept, killed_on_interrupt, set_step
from medtl.workflow.train import TrainedModel, training_augmentation

logger = logging.getLogger(__name__)

SERVE_MODULE = "medtl.workflow.serve"  # the pyfunc loader module of registered models






@dataclass(frozen=True)
class RunOutputs:
    """Where a workflow run left its results.

    `audit_status` is the audit's verdict ("passed", "failed" or "inconclusive"; None on a non-zero
    torchrun rank); `audit_passed` is true only for "passed".
    """

    run_id: str
    output_dir: Path
    metrics: dict
    audit_passed: bool | None
    model_name: str
    model_version: str
    report_path: Path | None
    audit_status: str | None = None


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
        PHILeakError: when the scan of the MLflow run finds an identifying value or a data path:
            before training (nothing trained; the message names the field and how to fix it), or
            after it (results kept on disk; the message says how to record them again).
        KeyboardInterrupt: on Ctrl-C (SIGINT); the MLflow run, if open, ends KILLED.
    """
    with interrupts_kept():
        return _run_steps(cfg, Path(output_dir), resume=resume, progress=progress,
                          extra_forbidden=extra_forbidden, synthetic=synthetic, source=source)


@dataclass
class _Run:
    """What the steps of one run share: the config, the data and where the records go."""

    cfg: WorkflowConfig
    output_dir: Path
    data: PreparedData
    name: str  # the registered model's name
    registered: RegisteredWeights | None = None
    old: PreparedData | None = None  # a continual run's old test set
    forbidden: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    roots: list[Path] = dataclasses.field(default_factory=list, repr=False)
    run_id: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    package_dir: Path | None = None  # OUTPUT/package once written


def _run_steps(cfg: WorkflowConfig, output_dir: Path, *, resume: bool, progress: bool,
               extra_forbidden: dict[str, str] | None, synthetic: bool, source: str) -> RunOutputs:
    """The steps of `run_workflow`, in order."""
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    set_step("checking the configuration")
    preflight(cfg)  # every rank, before any work: a bad key stops all ranks alike, and nothing is built
    set_step("building the manifest")
    # Under torchrun every rank runs this function: rank 0 builds the manifest, owns the MLflow
    # run and evaluates; the others read the manifest it staged and only join training (DDP).
    dist_info = init_distributed()
    data = _prepare(cfg, output_dir, main_rank=dist_info.rank == 0, resume=resume, progress=progress,
                    dist_info=dist_info)
    cfg = input_size_from_data(cfg, data)  # data.image_size [] (3D): from the manifest, on every rank
    check_audit_setup(cfg, data)  # before training, not after it; on every rank, so all of them stop
    store.tracking_uri()
    run = _Run(cfg, output_dir, data, name=cfg.tracking.registered_model or cfg.name, registered=_registered_start(cfg))
    run.timings["manifest_seconds"] = time.perf_counter() - start
    if dist_info.rank != 0:
        return _train_beside_rank_zero(run, resume=resume)
    _check_before_recording(run, extra_forbidden, progress=progress)
    with store.start_run(cfg.tracking.experiment, run_name=cfg.name, tags=_run_tags(run)) as active, \
            killed_on_interrupt():
        run.run_id = active.info.run_id
        environment = _record_inputs(run)
        trained, sets, method_info, scratch = _train(run, resume=resume, progress=progress)
        evaluation, table, extra, old_table = _evaluate(run, trained, sets, progress=progress)
        audit_dict, reference = _audit(run, table, scratch, progress=progress)
        metrics = _write_results(run, trained, evaluation, extra, method_info, audit_dict, table)
        _package(run, trained, evaluation, table, progress=progress)
        version = _record_results(run, trained, evaluation, extra, method_info, reference, audit_dict, metrics,
                                  old_table)
        report_path = _report(run, trained, evaluation, audit_dict, extra, version=version, environment=environment,
                              synthetic=synthetic, source=source)
    set_step("publishing the manifest")
    publish_manifest(data, cfg)  # only now: a run that failed anywhere before leaves data.manifest_out as it was
    set_step(None)
    return RunOutputs(run_id=run.run_id, output_dir=output_dir, metrics=metrics,
                      audit_passed=metrics["audit_passed"], model_name=run.name, model_version=version,
                      report_path=report_path, audit_status=metrics["audit_status"])


def _prepare(cfg: WorkflowConfig, output_dir: Path, *, main_rank: bool, resume: bool, progress: bool,
             dist_info) -> PreparedData:
    """Rank 0 builds (stages) the manifest; the other ranks read it once rank 0 is done."""
    if main_rank:
        _say_what_happens_to_the_output_folder(output_dir, resume=resume)
        data = prepare_data(cfg, output_dir, progress=progress, checked=True)
    barrier(dist_info)
    if not main_rank:
        built = str(staged_manifest(cfg, output_dir))
        data = prepare_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=built)),
                            output_dir, progress=False, checked=True)
    return data


def _train_beside_rank_zero(run: _Run, *, resume: bool) -> RunOutputs:
    """A non-zero torchrun rank: join both trainings (DDP); rank 0 evaluates and records."""
    set_step("training")
    initial = run.registered.state if run.registered is not None else None
    train_for_config(run.cfg, run.data, output_dir=run.output_dir, resume=resume, progress=False,
                     initial_state=initial)
    train_scratch_reference(run.cfg, run.data, output_dir=run.output_dir, resume=resume, progress=False)
    cleanup_distributed()
    return RunOutputs(run_id="", output_dir=run.output_dir, metrics={}, audit_passed=None, model_name=run.name,
                      model_version="", report_path=None)


def _run_tags(run: _Run) -> dict[str, str]:
    tags = {"medtl.workflow": run.cfg.name}
    if run.registered is not None:
        tags["medtl.continual_from"] = run.registered.reference
    return tags


def _check_before_recording(run: _Run, extra_forbidden: dict[str, str] | None, *, progress: bool) -> None:
    """The old test set of a continual run, and the PHI check of names, params and tags.

    The names, params and tags are checked before MLflow stores any of them: a refused value must
    not sit in mlflow.db (a deleted run keeps its params until `mlflow gc`).
    """
    cfg = run.cfg
    if run.registered is not None:
        run.old = prepare_old_data(cfg, run.output_dir / "old", progress=progress)
        check_old_test_unseen(run.data, run.old)
    run.forbidden = {**run.data.forbidden, **(extra_forbidden or {})}
    run.roots = [run.data.root.resolve()] + ([run.old.root.resolve()] if run.old is not None else [])
    scan_before_logging(cfg, config_dict(cfg), _run_tags(run), run.forbidden, run.roots, run_name=cfg.name,
                        model_name=run.name if cfg.tracking.register else None)


def _record_inputs(run: _Run) -> dict[str, str]:
    """Params, environment and the manifest as dataset inputs; then the run is read back and scanned."""
    set_step("recording in MLflow")
    data = run.data
    run_records.log_config(config_dict(run.cfg))
    environment = run_records.log_environment()
    run_records.log_manifest(data.manifest, data.manifest_sha256)
    run_records.log_config({"rows_left_out": {r.replace(" ", "_"): n for r, n in data.dropped.items()},
                            "rows_kept_without_modality": data.kept_without_modality}, "data")
    # What MLflow added by itself is in the run now too: read everything back before hours of
    # training, not after.
    scan_before_training(run.run_id, run.forbidden, run.roots)
    return environment


def _train(run: _Run, *, resume: bool, progress: bool):
    """The model (its transfer method) and, with `audit.reference: scratch`, its from-scratch twin."""
    set_step("training")
    logged_epochs: set[int] = set()
    initial = run.registered.state if run.registered is not None else None
    trained, sets, method_info = train_for_config(
        run.cfg, run.data, output_dir=run.output_dir, resume=resume, progress=progress, initial_state=initial,
        on_epoch_end=lambda epoch, record: log_epoch(epoch, record, logged_epochs),
    )
    log_earlier_epochs(trained.fit.history, logged_epochs)
    scratch = train_scratch_reference(run.cfg, run.data, output_dir=run.output_dir, resume=resume, progress=progress)
    cleanup_distributed()
    run.timings["train_seconds"] = float(trained.fit.total_train_seconds)
    if scratch is not None:
        run.timings["reference_train_seconds"] = float(scratch[0].fit.total_train_seconds)
    run.timings["time_to_best_seconds"] = float(trained.fit.time_to_best_seconds)
    report = trained.bundle.load_report
    run_records.log_weights(trained.bundle.weights.as_dict(), report.as_dict() if report is not None else None)
    # What the network saw: every preprocessing and augmentation setting, so a run can be redone.
    run_records.log_config(preprocessing_record(trained.prep, training_augmentation(run.cfg)))
    return trained, sets, method_info, scratch


def _evaluate(run: _Run, trained: TrainedModel, sets: dict, *, progress: bool):
    """Predictions on val/test, test metrics with CIs, and the method's other test sets."""
    set_step("evaluating")
    t0 = time.perf_counter()
    predictions = predictions_table(run.cfg, run.data, trained, sets, progress=progress)
    evaluation = evaluate(run.cfg, run.data, predictions)
    if run.cfg.task != "segmentation":
        predictions = at_operating_threshold(predictions, evaluation.get("threshold"))
    table = evaluation.pop("cases") if run.cfg.task == "segmentation" else predictions
    extra, old_table = extra_evaluations(run.cfg, run.data, predictions, trained, run.old, progress=progress)
    run.timings["evaluate_seconds"] = time.perf_counter() - t0
    return evaluation, table, extra, old_table


def _audit(run: _Run, table, scratch, *, progress: bool):
    """The bias audit against its reference (the champion or the scratch twin); writes audit.json."""
    set_step("auditing")
    t0 = time.perf_counter()
    reference = audit_reference(run.cfg, run.data, name=run.name, scratch=scratch, progress=progress)
    audit = run_audit(run.cfg, run.data, table, progress=progress, reference=reference.table,
                      reference_audit=reference.audit, reference_label=reference.label)
    run.timings["audit_seconds"] = time.perf_counter() - t0
    audit_dict = audit_document(audit, reference)
    (run.output_dir / "audit.json").write_text(json.dumps(audit_dict, indent=2, default=float))
    return audit_dict, reference


def _write_results(run: _Run, trained: TrainedModel, evaluation: dict, extra: dict, method_info: dict,
                   audit_dict: dict, table) -> dict:
    """metrics.json and predictions.csv."""
    status = audit_dict["status"]
    metrics = {
        "test": {k: v["value"] for k, v in evaluation["test"].items()},
        "test_ci": {k: v["ci"] for k, v in evaluation["test"].items()},
        "val": {k: v["value"] for k, v in evaluation.get("val", {}).items()},
        "threshold": evaluation.get("threshold"),
        "best_epoch": trained.fit.best_epoch,
        "epochs_run": trained.fit.epochs_run,
        "passes_per_epoch": trained.fit.passes_per_epoch,
        "strategy": trained.strategy,
        "timings": run.timings,
        "run_id": run.run_id,
        "audit_passed": status == "passed",
        "audit_status": status,
        "positive_class": positive_class(run.cfg, run.data),
    }
    for key, ev in extra.items():
        metrics[key] = {k: v["value"] for k, v in ev["test"].items()}
        metrics[f"{key}_ci"] = {k: v["ci"] for k, v in ev["test"].items()}
    metrics.update(_method_facts(run.cfg, method_info, run.registered, run.old))
    write_outputs(run.output_dir, table, metrics)
    return metrics


def _package(run: _Run, trained: TrainedModel, evaluation: dict, table, *, progress: bool) -> None:
    """OUTPUT/package (frozen settings, weights, reference profile), logged to the run's `package/`;
    where the training manifest lies is remembered on this machine only."""
    set_step("packaging the model")
    package = package_for_run(run.cfg, run.data, trained.prep, evaluation.get("threshold"), table,
                              run_id=run.run_id, progress=progress)
    if not packable(package, trained.bundle.model):
        logger.warning("the model is not packaged for `medtl predict`/`medtl evaluate`: its method adds heads "
                       "that only its training code builds (multi-task or DANN)")
        run_records.log_json(package.profile, f"{PACKAGE_DIR}/{PROFILE_FILE}")  # the profile still goes with the run
        return
    folder = write_package(package, trained.bundle.model, run.output_dir / PACKAGE_DIR)
    for path in sorted(folder.iterdir()):
        run_records.log_artifact(path, PACKAGE_DIR)
    remember_run(run.run_id, run.data.manifest_path)
    run.package_dir = folder


def _record_results(run: _Run, trained: TrainedModel, evaluation: dict, extra: dict, method_info: dict, reference,
                    audit_dict: dict, metrics: dict, old_table) -> str:
    """Metrics, artifacts, the model and its registry version (with the audit's verdict); then a scan.

    Returns:
        The registered version ("" when `tracking.register` is off).
    """
    set_step("recording in MLflow")
    cfg, status = run.cfg, metrics["audit_status"]
    flat = flat_metrics(evaluation)
    for key, ev in extra.items():
        flat.update(flat_estimates(key, ev["test"]))
    flat.update({f"adaptation.{k}": float(v) for k, v in method_info.items()})
    if reference.test is not None:
        flat.update(flat_estimates("reference_test", reference.test))
    flat["train.passes_per_epoch"] = float(metrics["passes_per_epoch"])  # train.min_steps' choice for this data
    flat["audit.passed"] = float(metrics["audit_passed"])
    flat["audit.evaluated_attributes"] = float(len(audit_dict.get("evaluated_attributes", [])))
    flat.update(gap_metrics(audit_dict))
    run_records.log_final_metrics(flat)
    store.client().set_tag(run.run_id, AUDIT_STATUS_TAG, status)
    _log_artifacts(run, old_table)
    # With a package, the model's python_function flavor takes raw images (medtl.workflow.serve).
    pyfunc = (SERVE_MODULE, run.package_dir) if run.package_dir is not None else None
    model_uri = log_torch_model(trained.bundle.model, (cfg.model.in_channels, *cfg.data.image_size), pyfunc=pyfunc)
    version = ""
    if cfg.tracking.register:
        version = registry.register_model(model_uri, run.name, version_tags(cfg, run.data, trained, run.run_id,
                                                                             run.registered), key_metrics(metrics))
        registry.set_audit_status(run.name, version, status, {
            "flagged_gaps": sum(1 for g in audit_dict.get("gaps", []) if g.get("flagged")),
            "evaluated_attributes": len(audit_dict.get("evaluated_attributes", []))})
    # Everything but the report is in the run now: scan it, so the report can state the result
    # truthfully; the report itself is scanned before it is logged.
    set_step("checking the MLflow run for identifying values")
    scan_or_raise(run.run_id, run.forbidden, run.roots, name=run.name, version=version, output_dir=run.output_dir)
    return version


def _log_artifacts(run: _Run, old_table) -> None:
    artifacts = ["metrics.json", "predictions.csv", "audit.json"]
    if old_table is not None:
        old_table[[c for c in old_table.columns if not c.startswith("_")]].to_csv(
            run.output_dir / "old_predictions.csv", index=False)
        artifacts.append("old_predictions.csv")
    for artifact in artifacts:
        run_records.log_artifact(run.output_dir / artifact)


def _report(run: _Run, trained: TrainedModel, evaluation: dict, audit_dict: dict, extra: dict, *, version: str,
            environment: dict[str, str], synthetic: bool, source: str) -> Path:
    """report.html and report_inputs.json, scanned before they are logged; hashes on run and version."""
    set_step("writing the report")
    inputs = build_report_inputs(run.cfg, run.data, trained, evaluation, audit_dict, run_id=run.run_id,
                                 model_version=version, code_version=code_version(environment),
                                 test_sets=extra, synthetic=synthetic, source=source,
                                 phi_scan={"passed": True, "n_findings": 0,
                                           "scope": "the MLflow run, its artifacts and model, and this report"})
    report_path, inputs_path = run.output_dir / "report.html", run.output_dir / "report_inputs.json"
    digest = render_report(inputs, report_path)
    inputs_path.write_text(inputs_to_json(inputs))
    try:
        scan_files_or_raise([report_path, inputs_path], run.forbidden, run.roots, run_id=run.run_id,
                            name=run.name, version=version, output_dir=run.output_dir)
    except PHILeakError:
        # The report claims a clean scan; it must not stay on disk when it is itself the leak.
        report_path.unlink(missing_ok=True)
        inputs_path.unlink(missing_ok=True)
        raise
    run_records.log_artifact(report_path)
    run_records.log_artifact(inputs_path)
    store.client().set_tag(run.run_id, "medtl.report_sha256", digest)
    if version:
        store.client().set_model_version_tag(run.name, version, "report_sha256", digest)
        store.client().set_model_version_tag(run.name, version, "report_artifact",
                                             f"runs:/{run.run_id}/report.html")
    return report_path


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




# Files a finished run leaves in its output folder.
_FINISHED_OUTPUTS = ("metrics.json", "predictions.csv", "audit.json", "report.html")


def _say_what_happens_to_the_output_folder(output_dir: Path, *, resume: bool) -> None:
    """Warn before a run replaces an earlier run's outputs, or resumes from a checkpoint that is not there."""
    checkpoint = output_dir / "checkpoints" / "last.pt"
    if resume:
        if not checkpoint.is_file():
            logger.warning("--resume: no checkpoint in %s/checkpoints: training starts from the first epoch",
                           output_dir.name)
        return
    finished = [name for name in _FINISHED_OUTPUTS if (output_dir / name).is_file()]
    if finished:
        logger.warning("output folder %s already holds a finished run's outputs (%s): this run replaces them and "
                       "its checkpoints; use another --output to keep them", output_dir.name, ", ".join(finished))
    elif checkpoint.is_file():
        logger.warning("output folder %s holds the checkpoints of an unfinished run: this run starts over and "
                       "replaces them; add --resume to continue that run instead", output_dir.name)
