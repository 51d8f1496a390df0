"""`medtl evaluate`: external (or temporal) validation of a registered model on new labelled studies.

The model's frozen preprocessing, class names and decision threshold are used as they were at
training (never re-derived on the new data), with the same project key. The external studies
get a privacy-aware manifest like any other; studies of patients the model was trained on (same
pseudonym under the key, or identical pixels) are left out and counted, because external
validation needs patients the model never saw. The training manifest is read locally (its
location remembered on this machine, or `--train-manifest`) and checked against the sha256
frozen with the model; MLflow never holds its rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd

from medtl.data.inventory import file_sha256
from medtl.data.manifest import build_manifest
from medtl.data.verify import resolve_study
from medtl.errors import ConfigError, InputError
from medtl.evaluation.report_external import render_external_report
from medtl.evaluation.shift import build_profile, compare_profiles
from medtl.tracking import registry, run_records, store
from medtl.workflow.apply import decide, score_columns, score_studies
from medtl.workflow.config import WorkflowConfig, load_config
from medtl.workflow.evaluate import evaluate as evaluate_predictions
from medtl.workflow.evaluate import run_audit, strict_json
from medtl.workflow.package import ModelPackage, fetch_package, remembered_manifest
from medtl.workflow.predict import check_key, fitting_rows
from medtl.workflow.prepare import PreparedData
from medtl.workflow.record import flat_estimates, scan_files_or_raise
from medtl.workflow.steps import set_step

EXTERNAL_TAG = "external_validations"  # on the model version: the validation runs, comma-separated
OVERRIDABLE = ("evaluation.", "audit.", "seed")  # what `--set` may change; the rest is frozen with the model


@dataclass
class ExternalOutputs:
    """What `run_external_validation` wrote and recorded."""

    output_dir: Path
    run_id: str
    metrics: dict
    left_out: dict[str, int] = field(default_factory=dict)
    report_path: Path | None = None


def run_external_validation(model_ref: str, root: Path, labels: Path, output_dir: Path, *,
                            train_manifest: Path | None = None, overrides: list[str] | None = None,
                            key_file: Path | None = None, progress: bool = True) -> ExternalOutputs:
    """Validate a registered model on `root`/`labels`; write metrics.json, predictions.csv, audit.json, report.html.

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or the training run's id.
        root: The external data folder.
        labels: Its labels CSV (same format as for training).
        output_dir: Where the outputs go (created).
        train_manifest: The model's training manifest, when this machine did not record where it is.
        overrides: `--set key=value` items for the evaluation/audit settings (e.g. `evaluation.n_boot=500`).
        key_file: The project key; it must be the model's.
        progress: Show progress bars.
    """
    set_step("loading the model")
    package, network, resolved = fetch_package(model_ref, progress=progress)
    if package.task != "classification":
        raise InputError("medtl evaluate must be given a classification model, not a segmentation model (not "
                         "supported yet); run `medtl predict` on the external studies and compare its masks")
    check_key(package, key_file)
    cfg = external_config(package, root, labels, overrides or [])
    output_dir.mkdir(parents=True, exist_ok=True)
    set_step("building the manifest")
    built = build_manifest(root, labels, output_dir / "manifest.csv", key_file=key_file, seed=cfg.seed,
                           subgroup_columns=cfg.data.subgroups, progress=progress)
    manifest = pd.read_csv(built.manifest_csv, dtype=str, keep_default_na=False)
    training = training_manifest(package, train_manifest)
    manifest, left_out = leave_out_training_patients(manifest, training)
    rows, skipped = fitting_rows(manifest, package)
    rows, unlabelled = _labelled(rows, package)
    left_out.update(skipped)
    if unlabelled:
        left_out["no label"] = unlabelled
    data = _prepared(rows, package, built, root, key_file, cfg, left_out)
    set_step("predicting")
    table, intensities = _predictions(package, network, data, progress=progress)
    return _evaluate_and_record(package, resolved, cfg, data, table, intensities, left_out, output_dir,
                                forbidden=dict(built.forbidden), progress=progress)


def external_config(package: ModelPackage, root: Path, labels: Path, overrides: list[str]) -> WorkflowConfig:
    """The training run's evaluation and audit settings (from the package), on the external data."""
    base = json.loads(json.dumps(package.workflow_config))
    if not base:
        raise InputError("the model package must record its workflow settings, not lack them; it was logged by an "
                         "older medtl: run the workflow again")
    base["data"] = {**base["data"], "root": str(root), "labels": str(labels)}
    frozen = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(OVERRIDABLE)]
    if frozen:
        raise ConfigError(f"--set may change evaluation.*, audit.* or seed only, not {frozen[0].split('=', 1)[0]!r}: "
                          "the model's data and model settings are frozen at training")
    return load_config(None, overrides, base=base)


def training_manifest(package: ModelPackage, given: Path | None) -> pd.DataFrame:
    """The model's training manifest, checked against the sha256 frozen with the model.

    Raises:
        InputError: when it cannot be found or is not the manifest the model was trained on.
    """
    path = Path(given) if given is not None else remembered_manifest(package.run_id)
    if path is None or not path.is_file():
        raise InputError("the model's training manifest must be readable here, not unknown; pass "
                         "--train-manifest OUTPUT/manifest.csv of the training run")
    sidecar = path.with_suffix(".json")
    recorded = json.loads(sidecar.read_text()).get("manifest_sha256") if sidecar.is_file() else None
    if package.manifest_sha256 not in (recorded, file_sha256(path)):
        raise InputError(f"--train-manifest must be the manifest the model was trained on, not another one "
                         f"({path.name} does not have the sha256 recorded with the model); use the training run's "
                         f"OUTPUT/manifest.csv")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def leave_out_training_patients(manifest: pd.DataFrame, training: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows whose patient pseudonym or pixel hash occurs in the training manifest, left out and counted."""
    same_patient = manifest["patient"].isin(set(training["patient"]))
    same_pixels = manifest["sha256"].isin(set(training["sha256"])) & ~same_patient
    left = {}
    if same_patient.any():
        left["patient in the training manifest"] = int(same_patient.sum())
    if same_pixels.any():
        left["pixels identical to a training study"] = int(same_pixels.sum())
    return manifest[~(same_patient | same_pixels)].reset_index(drop=True), left


def _labelled(rows: list[dict], package: ModelPackage) -> tuple[list[dict], int]:
    """Rows with a label of the model's classes; rows without a label are counted; others refused."""
    kept = [r for r in rows if str(r.get("label", "")).strip()]
    unknown = sorted({str(r["label"]) for r in kept} - set(package.classes))
    if unknown:
        n = sum(str(r["label"]) in unknown for r in kept)
        raise InputError(f"the labels CSV's labels must be the model's classes {package.classes}, not "
                         f"{len(unknown)} other value(s) on {n} rows; map them to the model's class names")
    return kept, len(rows) - len(kept)


def _prepared(rows: list[dict], package: ModelPackage, built, root: Path, key_file: Path | None,
              cfg: WorkflowConfig, left_out: dict[str, int]) -> PreparedData:
    if not rows:
        reasons = "; ".join(f"{n} studies: {reason}" for reason, n in left_out.items()) or "no studies found"
        raise InputError(f"the external data must hold labelled studies the model can take, not none ({reasons}); "
                         "external validation needs patients the model was not trained on: check --root and --labels")
    manifest = pd.DataFrame(rows).assign(split="test")
    subgroups = [c for c in ("sex", "age_band", "site", "scanner", *cfg.data.subgroups) if c in manifest.columns]
    return PreparedData(manifest=manifest, manifest_path=built.manifest_csv,
                        manifest_sha256=file_sha256(built.manifest_csv), sidecar={}, root=Path(root).resolve(),
                        key_file=key_file, classes=list(package.classes), subgroups=subgroups,
                        forbidden=dict(built.forbidden))


def _predictions(package: ModelPackage, network, data: PreparedData, *, progress: bool):
    """predictions.csv's rows (the layout of `medtl run`) and each study's raw intensity statistics."""
    rows = data.manifest.to_dict("records")
    studies = [(r["id"], resolve_study(r, data.root, key_file=data.key_file).files, r["modality"]) for r in rows]
    scored = score_studies(package, network, studies, progress=progress)
    index = {name: i for i, name in enumerate(package.classes)}
    table = []
    for row, result in zip(rows, scored, strict=True):
        out = {"id": row["id"], "split": "test", "y_true": index[str(row["label"])],
               **score_columns(package, result.probs), "y_pred": decide(package, result.probs)}
        table.append({**out, **{c: row.get(c, "") for c in data.subgroups}})
    return pd.DataFrame(table), [s.intensity for s in scored]


def _evaluate_and_record(package: ModelPackage, resolved: str, cfg: WorkflowConfig, data: PreparedData,
                         table: pd.DataFrame, intensities: list, left_out: dict[str, int], output_dir: Path, *,
                         forbidden: dict[str, str], progress: bool) -> ExternalOutputs:
    set_step("evaluating")
    evaluation = evaluate_predictions(cfg, data, table, threshold=package.threshold)
    audit = run_audit(cfg, data, table, progress=progress, threshold=package.threshold).to_dict()
    shift = None
    if package.profile:
        scores = table["y_score"].tolist() if "y_score" in table.columns else None
        try:
            shift = compare_profiles(package.profile, build_profile(data.manifest, intensities, scores))
        except InputError as err:  # fewer external studies than an aggregate may describe
            shift = None
            left_out.setdefault(f"shift not measured ({err})", 0)
    metrics = _metrics_document(package, resolved, evaluation, table, data, left_out, shift)
    (output_dir / "audit.json").write_text(json.dumps(strict_json(audit), indent=2))
    table.to_csv(output_dir / "predictions.csv", index=False)
    (output_dir / "metrics.json").write_text(json.dumps(strict_json(metrics), indent=2, sort_keys=True))
    return _record(package, resolved, cfg, evaluation, audit, metrics, shift, output_dir, forbidden, data)


def _metrics_document(package, resolved, evaluation, table, data, left_out, shift) -> dict:
    return {
        "external_validation": True, "model": resolved or package.run_id, "training_run_id": package.run_id,
        "threshold": package.threshold, "positive_class": package.positive_class,
        "test": {k: v["value"] for k, v in evaluation["test"].items()},
        "test_ci": {k: v["ci"] for k, v in evaluation["test"].items()},
        "counts": {"studies": int(len(table)), "patients": int(data.manifest["patient"].nunique()),
                   "left_out": left_out},
        "shift": {"shifted": shift["shifted"], "flagged": shift["flagged"]} if shift else None,
    }


def internal_metrics(run_id: str) -> dict:
    """The training run's test metrics with CIs (its metrics.json artifact), or {} when unavailable."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="metrics.json")
    except Exception:  # noqa: BLE001 - an older or pruned run: the report shows n/a
        return {}
    document = json.loads(Path(local).read_text())
    cis = document.get("test_ci", {})
    return {k: {"value": v, "ci": cis.get(k)} for k, v in document.get("test", {}).items()}


def _record(package, resolved, cfg, evaluation, audit, metrics, shift, output_dir, forbidden, data) -> ExternalOutputs:
    """An MLflow run linked to the model version, the report, PHI scans before anything is logged."""
    set_step("recording in MLflow")
    name = resolved.split("/")[0] if resolved else package.workflow_config.get("name", "model")
    tags = {"medtl.external_validation": "true", "medtl.validates": resolved or package.run_id}
    with store.start_run(cfg.tracking.experiment, run_name=f"{name}-external", tags=tags) as active:
        run_id = active.info.run_id
        inputs = {"model": {"name": resolved or name, "run_id": package.run_id}, "run_id": run_id,
                  "task": package.task, "threshold": package.threshold, "internal": internal_metrics(package.run_id),
                  "external": evaluation["test"], "curves": evaluation.get("curves") or {}, "audit": audit,
                  "shift": shift, "counts": metrics["counts"]}
        report = output_dir / "report.html"
        render_external_report(inputs, report)
        outputs = [output_dir / n for n in ("metrics.json", "predictions.csv", "audit.json", "report.html")]
        scan_files_or_raise(outputs, forbidden, [data.root], run_id=run_id, name=name, version="",
                            output_dir=output_dir)
        run_records.log_config({"model": resolved or package.run_id, "studies": metrics["counts"]["studies"]},
                               "external")
        run_records.log_final_metrics(flat_estimates("external_test", evaluation["test"]))
        for path in outputs:
            run_records.log_artifact(path)
    for version in [resolved] if resolved else _versions_of_run(package.run_id):
        _tag_version(version, run_id)
    return ExternalOutputs(output_dir, run_id, metrics, metrics["counts"]["left_out"], report)


def _versions_of_run(training_run_id: str) -> list[str]:
    """`NAME/VERSION` of every registered version made from a training run (MODEL given as a run id)."""
    found = store.client().search_model_versions(f"run_id = '{training_run_id}'")
    return [f"{v.name}/{v.version}" for v in found]


def _tag_version(resolved: str, run_id: str) -> None:
    """Append this validation run to the version's `external_validations` tag."""
    name, version = resolved.split("/")
    current = registry.get_model_version(name, version).tags.get(EXTERNAL_TAG, "")
    runs = [r for r in current.split(",") if r] + [run_id]
    store.client().set_model_version_tag(name, version, EXTERNAL_TAG, ",".join(runs))

