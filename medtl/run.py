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

import contextlib
import contextvars
import dataclasses
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import RunStatus

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
from medtl.tracking.values import flatten, safe_key, safe_text
from medtl.workflow import (
    PreparedData,
    TrainedModel,
    config_dict,
    patient_ids,
    positive_class,
    predictions_table,
    preflight,
    prepare_data,
    publish_manifest,
    staged_manifest,
    write_outputs,
)

logger = logging.getLogger(__name__)

#: Run tag holding the audit's verdict ("passed", "failed" or "inconclusive"); the metric
#: `audit.passed` alone cannot tell a failed audit from one that measured nothing.
AUDIT_STATUS_TAG = "medtl.audit_status"


class PHILeakError(MedtlError):
    """Something identifying reached the MLflow run; the run is marked and the version withheld."""


# The step a run is in, for the CLI's one-line report of an unexpected error ("... while training").
# A context variable, not a `with` block: a failing step must stay named after the exception left it.
_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("medtl_step", default=None)


def set_step(name: str | None) -> None:
    """Name the step now running (e.g. "training"); None when no run step is running.

    A run step begins only if no Ctrl-C is pending (see `_interrupts_kept`).
    """
    if name is not None:
        _stop_if_interrupted()
    _STEP.set(name)


# Set by the SIGINT handler of a running workflow: Python raises KeyboardInterrupt wherever the
# main thread happens to be, and where that is a library's garbage-collection callback (SQLAlchemy,
# under MLflow) the exception is printed and ignored, so the run would go on to the end. The flag
# keeps the request: the next epoch end or step raises it again.
_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def _interrupts_kept() -> Iterator[None]:
    """Within a run, Ctrl-C raises KeyboardInterrupt and is also kept until the run stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):  # noqa: ARG001 - the signal module's handler signature
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    _INTERRUPTED.clear()
    try:
        yield
    finally:
        # None: the previous handler was not set from Python; Python's own is the closest match.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        _INTERRUPTED.clear()


def _stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt when a Ctrl-C of this run was swallowed where it landed."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def current_step() -> str | None:
    """The step named last by `set_step` (the one an exception came from, if one did)."""
    return _STEP.get()


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
        PHILeakError: when the scan of the MLflow run finds an identifying value or a data path:
            before training (nothing trained; the message names the field and how to fix it), or
            after it (results kept on disk; the message says how to record them again).
        KeyboardInterrupt: on Ctrl-C (SIGINT); the MLflow run, if open, ends KILLED.
    """
    with _interrupts_kept():
        return _run_steps(cfg, Path(output_dir), resume=resume, progress=progress,
                          extra_forbidden=extra_forbidden, synthetic=synthetic, source=source)


def _run_steps(cfg: WorkflowConfig, output_dir: Path, *, resume: bool, progress: bool,
               extra_forbidden: dict[str, str] | None, synthetic: bool, source: str) -> RunOutputs:
    """The steps of `run_workflow`, in order."""
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    set_step("checking the configuration")
    preflight(cfg)  # every rank, before any work: a bad key stops all ranks alike, and nothing is built
    set_step("building the manifest")
    # Under torchrun every rank runs this function: rank 0 builds the manifest, owns the MLflow
    # run and evaluates; the others read the manifest it staged and only join training (DDP).
    dist_info = init_distributed()
    main_rank = dist_info.rank == 0
    if main_rank:
        _say_what_happens_to_the_output_folder(output_dir, resume=resume)
        data = prepare_data(cfg, output_dir, progress=progress, checked=True)
    barrier(dist_info)
    if not main_rank:
        built = str(staged_manifest(cfg, output_dir))
        data = prepare_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=built)),
                            output_dir, progress=False, checked=True)
    check_audit_setup(cfg, data)  # before training, not after it; on every rank, so all of them stop
    timings["manifest_seconds"] = time.perf_counter() - start
    store.tracking_uri()
    name = cfg.tracking.registered_model or cfg.name
    registered = _registered_start(cfg)
    initial = registered.state if registered is not None else None
    if not main_rank:
        set_step("training")
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
    forbidden = {**data.forbidden, **(extra_forbidden or {})}
    roots = [data.root.resolve()] + ([old.root.resolve()] if old is not None else [])
    params = config_dict(cfg)
    # The names, params and tags are checked before MLflow stores any of them: a refused value
    # must not sit in mlflow.db (a deleted run keeps its params until `mlflow gc`).
    _scan_before_logging(cfg, params, run_tags, forbidden, roots, run_name=cfg.name,
                         model_name=name if cfg.tracking.register else None)
    set_step("recording in MLflow")
    with store.start_run(cfg.tracking.experiment, run_name=cfg.name, tags=run_tags) as run, \
            _killed_on_interrupt():
        run_id = run.info.run_id
        run_records.log_config(params)
        environment = run_records.log_environment()
        run_records.log_manifest(data.manifest, data.manifest_sha256)
        run_records.log_config({"rows_left_out": {r.replace(" ", "_"): n for r, n in data.dropped.items()},
                                "rows_kept_without_modality": data.kept_without_modality}, "data")
        # What MLflow added by itself is in the run now too: read everything back before hours of
        # training, not after.
        _scan_before_training(run_id, forbidden, roots)
        set_step("training")
        logged_epochs: set[int] = set()
        trained, sets, method_info = train_for_config(
            cfg, data, output_dir=output_dir, resume=resume, progress=progress, initial_state=initial,
            on_epoch_end=lambda epoch, record: _log_epoch(epoch, record, logged_epochs),
        )
        _log_earlier_epochs(trained.fit.history, logged_epochs)
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
        set_step("evaluating")
        predictions = predictions_table(cfg, data, trained, sets, progress=progress)
        evaluation = evaluate(cfg, data, predictions)
        table = evaluation.pop("cases") if cfg.task == "segmentation" else predictions
        extra, old_table = _extra_evaluations(cfg, data, predictions, trained, old, progress=progress)
        timings["evaluate_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        set_step("auditing")
        reference = audit_reference(cfg, data, name=name, scratch=scratch, progress=progress)
        audit = run_audit(cfg, data, table, progress=progress, reference=reference.table,
                          reference_audit=reference.audit, reference_label=reference.label)
        timings["audit_seconds"] = time.perf_counter() - t0
        audit_dict = audit_document(audit, reference)
        passed, status = bool(audit.result_.passed), audit.result_.status
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
            "audit_status": status,
            "positive_class": positive_class(cfg, data),
        }
        for key, ev in extra.items():
            metrics[key] = {k: v["value"] for k, v in ev["test"].items()}
            metrics[f"{key}_ci"] = {k: v["ci"] for k, v in ev["test"].items()}
        metrics.update(_method_facts(cfg, method_info, registered, old))
        write_outputs(output_dir, table, metrics)
        set_step("recording in MLflow")
        flat = _flat_metrics(evaluation)
        for key, ev in extra.items():
            flat.update(_flat_estimates(key, ev["test"]))
        flat.update({f"adaptation.{k}": float(v) for k, v in method_info.items()})
        if reference.test is not None:
            flat.update(_flat_estimates("reference_test", reference.test))
        flat["audit.passed"] = float(passed)
        flat["audit.evaluated_attributes"] = float(len(audit_dict.get("evaluated_attributes", [])))
        flat.update(gap_metrics(audit_dict))
        run_records.log_final_metrics(flat)
        store.client().set_tag(run_id, AUDIT_STATUS_TAG, status)
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
            registry.set_audit_status(name, version, status, {
                "flagged_gaps": sum(1 for g in audit_dict.get("gaps", []) if g.get("flagged")),
                "evaluated_attributes": len(audit_dict.get("evaluated_attributes", []))})
        # Everything but the report is in the run now: scan it, so the report can state the result
        # truthfully; the report itself is scanned before it is logged.
        set_step("checking the MLflow run for identifying values")
        _scan_or_raise(run_id, forbidden, roots, name=name, version=version, output_dir=output_dir)
        set_step("writing the report")
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
                                 name=name, version=version, output_dir=output_dir)
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
    set_step("publishing the manifest")
    publish_manifest(data, cfg)  # only now: a run that failed anywhere before leaves data.manifest_out as it was
    set_step(None)
    return RunOutputs(run_id=run_id, output_dir=output_dir, metrics=metrics, audit_passed=passed,
                      model_name=name, model_version=version, report_path=report_path, audit_status=status)


def _log_epoch(epoch: int, record: dict, logged: set[int]) -> None:
    run_records.log_epoch_metrics({k: v for k, v in record.items() if k != "epoch"}, epoch)
    logged.add(int(epoch))
    _stop_if_interrupted()  # after the epoch's checkpoint: a resume continues with the next epoch


def _log_earlier_epochs(history: Sequence[dict], logged: set[int]) -> None:
    """Epochs a resumed run did not train again (they are in its checkpoint): log them to this run too.

    Without this a run re-recorded with --resume after its last epoch would have no training curve.
    """
    for record in history:
        epoch = int(record.get("epoch", -1))
        if epoch >= 0 and epoch not in logged:
            _log_epoch(epoch, record, logged)


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


def _scan_before_logging(cfg: WorkflowConfig, params: dict, tags: dict[str, str], forbidden: dict[str, str],
                         roots: list[Path], *, run_name: str, model_name: str | None) -> None:
    """Check the experiment, run and model names, the tags and the params before MLflow stores any.

    The params are checked as `run_records.log_config` will log them (flattened, paths removed).

    Raises:
        PHILeakError: naming each field (never its value) and how to fix it; nothing was recorded.
    """
    groups: list[tuple[str, dict]] = [
        ("experiment", {"name": cfg.tracking.experiment}),
        ("run", {"name": run_name}),
        ("run tag", tags),
        ("run param", {safe_key(k): safe_text(v) for k, v in flatten(params).items()}),
    ]
    if model_name is not None:
        groups.append(("registered model", {"name": model_name}))
    findings = [finding for where, fields in groups
                for finding in phi_guard.scan_fields(fields, forbidden.keys(), roots, where=where)]
    if findings:
        raise PHILeakError(
            f"the names, tags and params of the MLflow run must hold no identifying value or data path, not "
            f"{len(findings)} finding(s): "
            + "; ".join(findings[:5]) + ". Nothing was recorded in MLflow and nothing was trained. "
            + _fixes(findings) + "; then run again"
        )


@contextlib.contextmanager
def _killed_on_interrupt() -> Iterator[None]:
    """End the active MLflow run as KILLED, not FAILED, when the user interrupts it (Ctrl-C)."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise


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


def _scan_before_training(run_id: str, forbidden: dict[str, str], roots: list[Path]) -> None:
    """Scan what the run holds before training (names, params, tags, dataset input); stop on a finding."""
    findings = phi_guard.scan_run(run_id, forbidden.keys(), roots)
    if findings:
        raise PHILeakError(
            f"the MLflow run {run_id} must hold no identifying value or data path, not {len(findings)} finding(s): "
            + "; ".join(findings[:5]) + ". Nothing was trained. " + _fixes(findings)
            + f"; then run again. Delete run {run_id}, which holds the value: `mlflow runs delete --run-id "
            f"{run_id}` (then `mlflow gc` removes it for good)"
        )


def _scan_files_or_raise(paths: list[Path], forbidden: dict[str, str], roots: list[Path], *, run_id: str,
                         name: str, version: str, output_dir: Path | None = None) -> None:
    findings = phi_guard.scan_files(paths, forbidden.keys(), roots)
    _raise_findings(findings, run_id, name=name, version=version, output_dir=output_dir)


def _scan_or_raise(run_id: str, forbidden: dict[str, str], roots: list[Path], *, name: str, version: str,
                   output_dir: Path | None = None) -> None:
    _raise_findings(phi_guard.scan_run(run_id, forbidden.keys(), roots), run_id, name=name, version=version,
                    output_dir=output_dir)


def _raise_findings(findings: list[str], run_id: str, *, name: str, version: str,
                    output_dir: Path | None = None) -> None:
    """Stop a run whose MLflow record or report holds a finding, saying how to fix and record it again.

    `--resume` re-records a run without training only while its manifest is unchanged (checkpoints
    are tied to the manifest's SHA-256): it is offered when the fix is a name (a config key, a file
    or folder name, the user or a path), never when the fix is in the labels CSV.
    """
    if not findings:
        return
    if version:
        registry.set_audit_status(name, version, "failed", {"phi_findings": len(findings)})
    message = (f"the MLflow run {run_id} or its report must hold no identifying value or data path, not "
               f"{len(findings)} finding(s): " + "; ".join(findings[:5])
               + (f"; version {version} of {name} was marked failed" if version else "") + ". ")
    if output_dir is None:  # a study's run: nothing to resume
        raise PHILeakError(message + _fixes(findings) + "; then run again")
    if any(_fix(finding)[1] for finding in findings):
        again = ("; then run again (training starts over: a changed labels CSV changes the manifest, whose "
                 "checkpoints --resume would refuse): `medtl run <workflow> --output <the same output folder>`")
    else:
        again = ("; then re-record the run without training again: `medtl run <workflow> --resume --output <the "
                 "same output folder>`")
    raise PHILeakError(
        message + f"The results on disk are kept (metrics.json, predictions.csv, audit.json and checkpoints/ in "
        f"output folder '{output_dir.name}'); no report was kept. " + _fixes(findings) + again
        + f". Delete run {run_id}, which holds the value: `mlflow runs delete --run-id {run_id}`"
    )


# How to fix a finding, by where it is. Params are the flattened workflow config (config keys);
# data.* params hold only the name of the file or folder the key points to.
_FILE_KEYS = ("data.root", "data.labels", "data.manifest", "data.manifest_out", "data.key_file",
              "continual.old_manifest", "continual.old_root")


def _is_path_finding(finding: str) -> bool:
    kind = finding.rsplit(": ", 1)[-1]
    return kind in ("home directory", "OS user name") or kind.startswith("forbidden path")


def _fixes(findings: Sequence[str]) -> str:
    """One "how to fix" per kind of finding, naming the config key or field, never the value."""
    fixes = list(dict.fromkeys(_fix(finding)[0] for finding in findings))
    return "To fix: " + "; ".join(fixes)


def _fix(finding: str) -> tuple[str, bool]:
    """How to fix one finding, and whether that fix changes the labels CSV (hence the manifest)."""
    # Findings read "<where> '<key>': <kind>" or "<where> #<n> (...): <kind>" (phi_guard).
    head = finding.split(": ", 1)[0]
    where = re.split(r" '| #| \(", head, maxsplit=1)[0]
    key = head.split("'")[1] if head.count("'") >= 2 else ""
    if where == "run param" and key in _FILE_KEYS:
        return f"rename the file or folder that {key} points to (its name is recorded as param {key!r})", False
    if where == "run param" and key:
        return f"change config key {key!r}", False
    if where == "experiment":
        return "set tracking.experiment to a neutral name", False
    if where in ("run", "run tag") and key in ("name", "medtl.workflow"):
        return "set the workflow's name to a neutral one", False
    if where.startswith("run dataset input"):
        return "rename the manifest file (data.manifest / data.manifest_out)", False
    if where.startswith(("registered model", "model version")):
        return "set tracking.registered_model to a neutral name", False
    if ("artifact" in where or where == "file") and _is_path_finding(finding):
        return "a local path reached a file medtl wrote: report a medtl bug", False
    if "artifact" in where or where == "file":
        return ("remove identifying text from the labels CSV (class names, extra subgroup values); if there is "
                "none, report a medtl bug"), True
    return "remove the identifying value from that field; if medtl wrote it, report a medtl bug", False


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
    forbidden = {**data.forbidden, **(extra_forbidden or {})}
    params = config_dict(cfg)
    _scan_before_logging(cfg, params, tags, forbidden, [data.root.resolve()], run_name=f"{cfg.name}-few-shot",
                         model_name=None)
    with store.start_run(cfg.tracking.experiment, run_name=f"{cfg.name}-few-shot", tags=tags) as run, \
            _killed_on_interrupt():
        run_records.log_config(params)
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
    _scan_or_raise(result["run_id"], forbidden, [data.root.resolve()], name="", version="")
    publish_manifest(data, cfg)  # only after the study succeeded
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


__all__ = ["AUDIT_STATUS_TAG", "rerender_report", "RunOutputs", "PHILeakError", "current_step", "run_few_shot",
           "run_workflow", "set_step"]
