"""Step 3 of a run: predictions on val/test, test metrics with patient-level CIs, the bias audit.

The audit's reference (the current champion, or a from-scratch twin trained here) is built here
too, and the evaluations beside `test` (adaptation domains, a continual run's old test set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtl.data.dataset import class_names
from medtl.engine.inference import predict, tta_flips
from medtl.errors import ConfigError
from medtl.evaluation.audit import BiasAudit
from medtl.evaluation.audit_types import AuditRules
from medtl.evaluation.bootstrap import Estimate, bootstrap_binary, bootstrap_case_means, bootstrap_multiclass
from medtl.evaluation.metrics import binary_auroc, classification_report_data
from medtl.evaluation.segmentation import segmentation_case_metrics
from medtl.models.multitask import MultiTaskModel, split_outputs
from medtl.tracking import registry
from medtl.workflow.config import ContinualConfig, WorkflowConfig
from medtl.workflow.prepare import SUBGROUP_COLUMNS, PreparedData
from medtl.workflow.train import TrainedModel


def predictions_table(cfg: WorkflowConfig, data: PreparedData, trained: TrainedModel, sets: dict, *,
                      progress: bool = True) -> pd.DataFrame:
    """predictions.csv for val and test: id, split, y_true, y_score(s), y_pred, subgroup columns.

    Segmentation rows carry the predicted and reference masks (`_pred`, `_true`); a multi-task
    model adds its class head's y_true (-1 = no label), y_score(s) and y_pred.
    """
    frames = []
    model = trained.bundle.model
    multitask = isinstance(model, MultiTaskModel)
    head_classes = multitask_classes(data) if multitask else data.classes
    roi = tuple(cfg.data.image_size) if trained.prep.patch else None
    activation = "none" if multitask else "softmax"  # config validation refuses model.multi_label
    # A multi-task output holds segmentation and class logits in one tensor: not averaged over flips.
    flips = () if multitask else tta_flips(cfg.evaluation.tta, cfg.model.spatial_dims, cfg.data.flip_axes)
    by_id = data.manifest.set_index("id")
    index = {name: i for i, name in enumerate(head_classes)}
    for split in ("val", "test"):
        outputs = predict(model, sets[split], activation=activation, roi_size=roi,
                          batch_size=8 if roi is None else 1, progress=progress, flips=flips)
        rows = []
        for out in outputs:
            row: dict = {"id": out["id"], "split": split}
            output = out["output"]
            if multitask:
                segmentation, logits = split_outputs(output[None], model.num_seg_classes)
                output = segmentation[0]
                row["y_true"] = index.get(str(by_id.at[out["id"], "label"]).strip(), -1)
                row.update(_score_columns(torch.softmax(logits[0], 0).numpy(), head_classes))
            if cfg.task == "segmentation":
                row["_pred"] = output.argmax(0).numpy().astype(np.uint8)
                row["_true"] = out["label"][0].numpy().astype(np.uint8)
            else:
                row["y_true"] = int(out["label"])
                row.update(_score_columns(output.numpy(), head_classes))
            rows.append(row)
        frames.append(pd.DataFrame(rows))
    table = pd.concat(frames, ignore_index=True)
    for column in data.subgroups:
        table[column] = by_id.loc[table["id"], column].to_numpy()
    return table


def _score_columns(probs: np.ndarray, classes: list[str]) -> dict:
    scores = {"y_score": float(probs[1])} if len(classes) == 2 else {
        f"y_score_{c}": float(p) for c, p in zip(classes, probs, strict=True)}
    return {**scores, "y_pred": int(np.argmax(probs))}


def at_operating_threshold(predictions: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """`y_pred` as the class at the operating threshold (`y_score >= threshold`) for binary tables.

    The table is built before the threshold is chosen (on validation), so `y_pred` starts as the
    argmax (a 0.5 cut); once chosen, the threshold decides, as in metrics.json. Multi-class tables
    (no `y_score` column) and runs without a threshold keep the argmax.
    """
    if threshold is None or "y_score" not in predictions.columns:
        return predictions
    out = predictions.copy()
    out["y_pred"] = (out["y_score"].to_numpy() >= threshold).astype(int)
    return out


def multitask_classes(data: PreparedData) -> list[str]:
    """Class names of a multi-task model's class head: the manifest labels of the segmentation rows."""
    return class_names(data.manifest["label"])


def patient_ids(data: PreparedData, ids: pd.Series) -> np.ndarray:
    """Patient pseudonyms for prediction rows (joined on the manifest `id`)."""
    return data.manifest.set_index("id").loc[ids, "patient"].to_numpy()


def write_outputs(output_dir: Path, predictions: pd.DataFrame, metrics: dict) -> None:
    """metrics.json and predictions.csv (no per-voxel arrays, only pseudonymous ids).

    metrics.json is strict JSON: an undefined metric (NaN) and an infinite threshold are null.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = [c for c in predictions.columns if not c.startswith("_")]
    predictions[columns].to_csv(output_dir / "predictions.csv", index=False)
    text = json.dumps(strict_json(metrics), indent=2, sort_keys=True, allow_nan=False)
    (output_dir / "metrics.json").write_text(text)


def strict_json(value: Any) -> Any:
    """`value` as strict JSON data, recursively: NaN and infinities become None, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


logger = logging.getLogger(__name__)


def evaluate(cfg: WorkflowConfig, data: PreparedData, predictions: pd.DataFrame, *,
             threshold: float | None = None) -> dict:
    """Test metrics with CIs (and report data) from the val/test predictions table.

    Binary classification: threshold chosen on validation patients by the configured rule and
    re-derived inside each bootstrap replicate, or the given frozen `threshold` (external
    validation: never re-derived on the new data). Segmentation: per-case Dice / HD95 / surface
    Dice (MONAI metrics) with patient-level bootstrap CIs of the means.
    """
    val = predictions[predictions["split"] == "val"]
    test = predictions[predictions["split"] == "test"]
    ev = cfg.evaluation
    target = ev.threshold_target if ev.threshold_rule != "youden" else None
    if cfg.task == "segmentation":
        return _evaluate_segmentation(cfg, data, predictions)
    if len(data.classes) == 2:
        validation = None if threshold is not None else (
            val["y_true"].to_numpy(), val["y_score"].to_numpy(), patient_ids(data, val["id"]))
        estimates = bootstrap_binary(
            test["y_true"].to_numpy(), test["y_score"].to_numpy(), patient_ids(data, test["id"]),
            threshold=threshold, validation=validation, rule=ev.threshold_rule, target=target, n_boot=ev.n_boot,
            seed=cfg.seed,
        )
        threshold = estimates["threshold"].value  # chosen on the validation patients, or the frozen one
        curves = classification_report_data(test["y_true"], test["y_score"], threshold)
        return {"test": {k: e.to_dict() for k, e in estimates.items()}, "val": _val_auroc(val),
                "threshold": threshold, "curves": curves}
    columns = [f"y_score_{c}" for c in data.classes]
    labels = test["y_true"].map(lambda i: data.classes[int(i)])
    estimates = bootstrap_multiclass(labels, test[columns].to_numpy(), data.classes, patient_ids(data, test["id"]),
                                     n_boot=ev.n_boot, seed=cfg.seed)
    curves = classification_report_data(labels, test[columns].to_numpy(), classes=data.classes)
    return {"test": {k: e.to_dict() for k, e in estimates.items()}, "val": {}, "threshold": None, "curves": curves}


def _val_auroc(val: pd.DataFrame) -> dict[str, dict]:
    # NaN when the validation studies hold one class; Estimate.to_dict writes it as null.
    return {"auroc": Estimate(binary_auroc(val["y_true"].to_numpy(), val["y_score"].to_numpy()), None).to_dict()}


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
        out["val"].update(_val_auroc(val))
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
              reference_label: str | None = None, threshold: float | None = None) -> BiasAudit:
    """Per-subgroup bias audit of the val/test predictions (threshold from validation).

    Args:
        cfg: the workflow config (its `audit` and `evaluation` sections).
        data: the run's prepared manifest (patients, subgroups, classes).
        table: the predictions (classification) or per-case metrics (segmentation) of val and test.
        progress: progress bar over attributes.
        reference: a reference model's table on the same ids (paired bias amplification).
        reference_audit: instead, a reference's audit.json (e.g. the champion's; unpaired).
        reference_label: the reference's name in audit.json.
        threshold: a frozen operating threshold (external validation); None chooses it on `val`.
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
        config=AuditRules.from_mapping(settings),
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
    return audit.run(_class_labels(cfg, data, table), patient_ids(data, table["id"]), threshold=threshold,
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
                "(a version becomes champion with `medtl registry promote` once its audit passed; or set "
                "audit.reference: scratch)"))
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


def audit_document(audit: BiasAudit, reference: AuditReference) -> dict:
    """audit.json: the audit's document with the reference's kind (and test metrics) and the reason for none."""
    document = audit.to_dict()
    if document.get("reference") is not None:
        document["reference"] = {**document["reference"], "kind": reference.kind,
                                 **({"test": reference.test} if reference.test is not None else {})}
    if reference.note:
        document["notes"] = [*document.get("notes", []), reference.note]
    return document


def gap_metrics(document: dict) -> dict[str, float]:
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
