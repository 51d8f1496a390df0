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
from medtl.config import ContinualConfig, WorkflowConfig, validate
from medtl.engine.runtime import barrier, cleanup_distributed, init_distributed
from medtl.errors import ConfigError, MedtlError
from medtl.evaluation.audit import BiasAudit
from medtl.evaluation.audit_types import AuditConfig
from medtl.evaluation.bootstrap import bootstrap_binary, bootstrap_case_means, bootstrap_multiclass
from medtl.evaluation.metrics import choose_threshold, classification_report_data
from medtl.evaluation.report import render_report
from medtl.evaluation.segmentation import segmentation_case_metrics
from medtl.models.fewshot import flatten_results
from medtl.report_inputs import build_report_inputs, inputs_from_json, inputs_to_json
from medtl.tracking import phi_guard, registry, run_records, store
from medtl.tracking.torch_model import log_torch_model
from medtl.workflow import (
    SUBGROUP_COLUMNS,
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
    labels = test["y_true"].map(lambda i: data.classes[int(i)])
    estimates = bootstrap_multiclass(labels, test[columns].to_numpy(), data.classes, patient_ids(data, test["id"]),
                                     n_boot=ev.n_boot, seed=cfg.seed)
    curves = classification_report_data(labels, test[columns].to_numpy(), classes=data.classes)
    return {"test": {k: e.to_dict() for k, e in estimates.items()}, "val": {}, "threshold": None, "curves": curves}


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
    out: dict = {}
    for split in ("val", "test"):
        part = table[table["split"] == split]
        estimates = bootstrap_case_means(part[[c for c in cases.columns if c != "id"]], patient_ids(data, part["id"]),
                                         n_boot=cfg.evaluation.n_boot, seed=cfg.seed)
        out[split] = {k: e.to_dict() for k, e in estimates.items()}
    out["cases"] = table
    out["threshold"] = None
    if "y_true" in table.columns:  # a multi-task model's class head
        _add_class_head_metrics(cfg, data, table, out)
    return out


def _add_class_head_metrics(cfg: WorkflowConfig, data: PreparedData, table: pd.DataFrame, out: dict) -> None:
    # Studies without a class label (y_true -1) count for the masks only.
    labelled = table[table["y_true"] >= 0]
    val, test = labelled[labelled["split"] == "val"], labelled[labelled["split"] == "test"]
    if test.empty or val.empty:
        logger.warning("no class-head metrics: the val or test split has no study with a class label")
        return
    ev = cfg.evaluation
    if "y_score" in table.columns:
        # The class head is secondary here: a validation split with one labelled class (few masks
        # carry labels) gets a fixed 0.5 threshold instead of failing the segmentation run.
        one_class = val["y_true"].nunique() < 2
        if one_class:
            logger.warning("class-head threshold fixed at 0.5: the validation studies hold one class label")
        estimates = bootstrap_binary(
            test["y_true"].to_numpy(), test["y_score"].to_numpy(), patient_ids(data, test["id"]),
            threshold=0.5 if one_class else None,
            validation=None if one_class else (val["y_true"].to_numpy(), val["y_score"].to_numpy(),
                                               patient_ids(data, val["id"])),
            rule=ev.threshold_rule, target=ev.threshold_target if ev.threshold_rule != "youden" else None,
            n_boot=ev.n_boot, seed=cfg.seed,
        )
        out["threshold"] = estimates.pop("threshold").value
        out["test"].update({k: e.to_dict() for k, e in estimates.items()})
        out["val"]["auroc"] = {"value": _auroc(val["y_true"], val["y_score"]), "ci": None}
        return
    classes = [c.removeprefix("y_score_") for c in table.columns if c.startswith("y_score_")]
    estimates = bootstrap_multiclass(test["y_true"].map(lambda i: classes[int(i)]),
                                     test[[f"y_score_{c}" for c in classes]].to_numpy(), classes,
                                     patient_ids(data, test["id"]), n_boot=ev.n_boot, seed=cfg.seed)
    out["test"].update({k: e.to_dict() for k, e in estimates.items()})


def audit_attributes(cfg: WorkflowConfig, data: PreparedData) -> list[str]:
    """The subgroup columns a run audits: `audit.attributes`, then the declared `data.subgroups`.

    Raises:
        ConfigError: when an attribute is not a subgroup column of the manifest.
    """
    unknown = [a for a in cfg.audit.attributes if a not in data.subgroups]
    if unknown:
        raise ConfigError(
            f"config key 'audit.attributes' must name subgroup columns of manifest {data.manifest_path.name} "
            f"({', '.join(data.subgroups)}), not {unknown}; declare extra columns in data.subgroups")
    declared = [c for c in data.subgroups if c not in SUBGROUP_COLUMNS]
    return list(dict.fromkeys([*cfg.audit.attributes, *declared]))


def check_audit_setup(cfg: WorkflowConfig, data: PreparedData) -> None:
    """Audit settings that would otherwise fail only after training: attributes and positive class.

    Raises:
        ConfigError: an unknown attribute, or a multi-class model without a valid `audit.positive_class`.
    """
    audit_attributes(cfg, data)
    if cfg.task == "classification" and len(data.classes) > 2 and cfg.audit.positive_class not in data.classes:
        raise ConfigError(
            f"config key 'audit.positive_class' must name the class the audit checks one-vs-rest for this "
            f"{len(data.classes)}-class model, one of {data.classes}, not {cfg.audit.positive_class!r}; "
            f"e.g. --set audit.positive_class={data.classes[-1]}")


def _class_labels(cfg: WorkflowConfig, data: PreparedData, table: pd.DataFrame | None) -> pd.DataFrame | None:
    # The audit reads a multi-class y_true as class labels (predictions.csv keeps class indices).
    if table is None or cfg.task != "classification" or len(data.classes) <= 2:
        return table
    return table.assign(y_true=table["y_true"].map(lambda i: data.classes[int(i)]))


def run_audit(cfg: WorkflowConfig, data: PreparedData, table: pd.DataFrame, *, progress: bool = True,
              reference: pd.DataFrame | None = None, reference_audit: dict | None = None,
              reference_label: str | None = None) -> BiasAudit:
    """Per-subgroup bias audit of the val/test predictions (threshold from validation).

    Args:
        cfg: the workflow config (its `audit` and `evaluation` sections).
        data: the run's prepared manifest (patients, subgroups, classes).
        table: the predictions (classification) or per-case metrics (segmentation) of val and test.
        progress: progress bar over attributes.
        reference: a reference model's table on the same ids (paired bias amplification).
        reference_audit: instead, a reference's audit.json (e.g. the champion's; unpaired).
        reference_label: the reference's name in audit.json.
    """
    attributes = audit_attributes(cfg, data)
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
        min_gap_events=cfg.audit.min_gap_events,
        positive_class=cfg.audit.positive_class if cfg.task == "classification" and len(data.classes) > 2 else None,
        progress=progress,
    )
    return audit.run(_class_labels(cfg, data, table), patient_ids(data, table["id"]),
                     reference_predictions=_class_labels(cfg, data, reference), reference_audit=reference_audit,
                     reference_label=reference_label)


@dataclass(frozen=True)
class AuditReference:
    """The model whose subgroup gaps the audited model's are compared with (bias amplification).

    Attributes:
        kind: "champion", "scratch" or "none" (`audit.reference`).
        label: its name in audit.json and the report; None when there is no reference.
        table: scratch: its val/test predictions (or per-case metrics) for a paired comparison.
        audit: champion: its audit.json, for an unpaired comparison.
        test: scratch: its test metrics with CIs.
        note: why no comparison was made, for the audit notes.
    """

    kind: str
    label: str | None = None
    table: pd.DataFrame | None = None
    audit: dict | None = None
    test: dict | None = None
    note: str = ""


def scratch_reference_config(cfg: WorkflowConfig) -> WorkflowConfig:
    """The workflow as its from-scratch twin: random weights, every layer trained, same data and budget."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="none"),
                               train=dataclasses.replace(cfg.train, strategy="finetune"),
                               continual=ContinualConfig())


def train_scratch_reference(cfg: WorkflowConfig, data: PreparedData, *, output_dir: Path, resume: bool = False,
                            progress: bool = True) -> tuple[TrainedModel, dict] | None:
    """Train the from-scratch twin when `audit.reference` is scratch (else None).

    Every rank calls this right after the workflow's own training, so under torchrun the twin
    trains with DistributedDataParallel too. None as well when the model itself starts from random
    weights (`model.weights: none`): its twin would be the same model again.
    """
    if cfg.audit.reference != "scratch" or cfg.model.weights == "none":
        return None
    logger.info("bias-amplification reference: training the same model from scratch")
    trained, sets, _ = train_for_config(scratch_reference_config(cfg), data, output_dir=output_dir / "reference_scratch",
                                        resume=resume, progress=progress)
    return trained, sets


def audit_reference(cfg: WorkflowConfig, data: PreparedData, *, name: str,
                    scratch: tuple[TrainedModel, dict] | None = None, progress: bool = True) -> AuditReference:
    """The bias-amplification reference that `audit.reference` asks for.

    champion: the registered model's current @champion (its run's audit.json; none on a first
    run). scratch: the twin from `train_scratch_reference`, scored on the same val/test studies.
    """
    kind = cfg.audit.reference
    if kind == "none":
        return AuditReference(kind, note="bias amplification: not computed (audit.reference is none)")
    if kind == "champion":
        found = registry.champion_audit(name)
        if found is None:
            return AuditReference(kind, note=(
                f"bias amplification: not computed, model '{name}' has no champion version with an audit.json yet "
                "(promote one with `medtl registry promote`, or set audit.reference: scratch)"))
        version, document = found
        return AuditReference(kind, label=f"champion (version {version})", audit=document)
    if scratch is None:
        return AuditReference(kind, note="bias amplification: not computed, the model itself is trained from "
                                         "scratch (model.weights: none), so it is its own from-scratch reference")
    twin = scratch_reference_config(cfg)
    predictions = predictions_table(twin, data, *scratch, progress=progress)
    evaluation = evaluate(twin, data, predictions)
    table = evaluation.pop("cases") if cfg.task == "segmentation" else predictions
    return AuditReference(kind, label="from scratch (same architecture, data and training budget)", table=table,
                          test=evaluation["test"])


def _audit_document(audit: BiasAudit, reference: AuditReference) -> dict:
    """audit.json: the audit's document with the reference's kind (and test metrics) and the reason for none."""
    document = audit.to_dict()
    if document.get("reference") is not None:
        document["reference"] = {**document["reference"], "kind": reference.kind,
                                 **({"test": reference.test} if reference.test is not None else {})}
    if reference.note:
        document["notes"] = [*document.get("notes", []), reference.note]
    return document


def _gap_metrics(document: dict) -> dict[str, float]:
    """MLflow metrics of the tested gaps: audit.gap.<attribute>.<metric>.<kind> with ci_lo / ci_hi."""
    flat: dict[str, float] = {}
    for gap in document.get("gaps", []):
        if gap.get("tolerance") is None or gap.get("value") is None:
            continue
        key = f"audit.gap.{gap['attribute']}.{gap['metric']}.{gap.get('kind', 'difference')}"
        flat[key] = float(gap["value"])
        if gap.get("ci"):
            flat[f"{key}.ci_lo"], flat[f"{key}.ci_hi"] = map(float, gap["ci"])
    flat["audit.flagged_gaps"] = float(sum(1 for g in document.get("gaps", []) if g.get("flagged")))
    return flat


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
        audit_dict = _audit_document(audit, reference)
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
        flat.update(_gap_metrics(audit_dict))
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


__all__ = [
    "rerender_report", "RunOutputs", "PHILeakError", "evaluate", "run_audit", "run_few_shot", "run_workflow",
    "TrainedModel"]
