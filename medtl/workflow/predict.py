"""`medtl predict`: a registered model on new, unlabelled studies.

Every study under the root that fits the model (its modalities and dimensionality) gets one row
in `OUT/predictions.csv`: the row pseudonym (the same key gives the same pseudonym as in any
manifest), the class probabilities, the class at the frozen threshold and whether the study lies
within the training distribution. Segmentation models write one NIfTI mask per study on the
input's grid and affine (`OUT/masks/<id>.nii.gz`) and, for DICOM inputs, a DICOM SEG over the
source series (`OUT/dicom_seg/<id>.dcm`). A SEG carries the source's patient and study
identifiers (DICOM requires them): it is a local-only output, never logged or quoted.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medtl.data.discover import discover
from medtl.data.manifest import ManifestResult, build_manifest
from medtl.data.privacy import load_key
from medtl.data.verify import resolve_study
from medtl.errors import InputError
from medtl.evaluation.shift import within_distribution
from medtl.tracking import phi_guard
from medtl.workflow.apply import Scored, decide, score_columns, score_studies
from medtl.workflow.package import ModelPackage, fetch_package
from medtl.workflow.prepare import fitting_studies

logger = logging.getLogger(__name__)


@dataclass
class PredictOutputs:
    """Where `run_predict` wrote what, and what it left out (counts by reason)."""

    output_dir: Path
    predictions_csv: Path
    predicted: int
    skipped: dict[str, int] = field(default_factory=dict)
    masks: int = 0
    dicom_segs: int = 0
    skipped_segs: int = 0  # DICOM inputs whose SEG could not be written (their NIfTI mask was)


def run_predict(model_ref: str, root: Path, output_dir: Path, *, labels: Path | None = None,
                key_file: Path | None = None, progress: bool = True) -> PredictOutputs:
    """Predict every fitting study under `root` (or the `path`s of `labels`) with a registered model.

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or an MLflow run id.
        root: The data folder.
        output_dir: Where predictions.csv (and masks/, dicom_seg/) go.
        labels: Optional CSV whose `path` column picks the studies.
        key_file: The project key (default as for manifests); it must be the model's.
        progress: Show progress bars.
    """
    package, network, _ = fetch_package(model_ref, progress=progress)
    check_key(package, key_file)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest, built = intake_manifest(root, labels, output_dir / "manifest.csv", key_file=key_file, progress=progress)
    rows, skipped = fitting_rows(manifest, package)
    studies = [(row["id"], resolve_study(row, root, key_file=key_file).files, row["modality"]) for row in rows]
    scored = score_studies(package, network, studies, progress=progress)
    out = PredictOutputs(output_dir, output_dir / "predictions.csv", len(scored), skipped)
    table = []
    for row, result in zip(rows, scored, strict=True):
        table.append(_prediction_row(package, row, result))
        if result.mask is not None:
            out.masks += 1
            written = _write_masks(package, row, result, output_dir, root, key_file)
            out.dicom_segs += written
            out.skipped_segs += int(str(row.get("kind", "")).startswith("dicom") and not written)
    pd.DataFrame(table).to_csv(out.predictions_csv, index=False)
    findings = phi_guard.scan_files([out.predictions_csv], dict(built.forbidden).keys(), [Path(root).resolve()])
    if findings:  # only pseudonyms and numbers are written: a finding is a medtl bug, never shown with its value
        out.predictions_csv.unlink()
        raise InputError(f"predictions.csv must hold no identifying value, not {len(findings)} finding(s); it was "
                         "deleted: report a medtl bug (no values are shown here)")
    return out


def check_key(package: ModelPackage, key_file: Path | None) -> None:
    """The project key must be the one the model was trained with (same key, same pseudonyms)."""
    key = load_key(key_file)
    if package.key_id and key.key_id != package.key_id:
        raise InputError(f"the project key must be the model's (key id {package.key_id}), not key id {key.key_id}; "
                         "set MEDTL_KEY_FILE (or --key-file) to the key the model was trained with")


def intake_manifest(root: Path, labels: Path | None, out_csv: Path, *, key_file: Path | None,
                    progress: bool) -> tuple[pd.DataFrame, ManifestResult]:
    """A privacy-aware manifest of the studies to predict: all under `root`, or the `path`s of `labels`.

    Every intake rule of `medtl manifest build` applies. Without a labels CSV one is made from
    `discover` in a temporary folder (it holds original paths, so it never lands in the output).
    """
    with tempfile.TemporaryDirectory(prefix="medtl-predict-") as tmp:
        # Messages name this file and its rows: the user's own file name, rows in the user's order.
        listing = Path(tmp) / (Path(labels).name if labels is not None else "studies found under the root.csv")
        if labels is None:
            paths = study_paths(root, progress=progress)
            if not paths:
                raise InputError("the data root must hold studies medtl can read, not none; check --root")
            pd.DataFrame({"path": paths, "label": ""}).to_csv(listing, index=False)
        else:
            table = pd.read_csv(labels, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            table.columns = [str(c).strip().lower() for c in table.columns]
            if "path" not in table.columns:
                raise InputError(f"{Path(labels).name} must have a 'path' column, not only {list(table.columns)}; "
                                 "add it (relative to the data root)")
            table[["path"]].assign(label="").to_csv(listing, index=False)
        result = build_manifest(root, listing, out_csv, key_file=key_file, progress=progress)
    return pd.read_csv(out_csv, dtype=str, keep_default_na=False), result


def study_paths(root: Path, *, progress: bool) -> list[str]:
    """Every study `discover` finds under `root`, as a labels CSV `path` (a series by its first file)."""
    root = Path(root).resolve()
    found, _ = discover(root, progress=progress)
    paths = []
    for study in found:
        # Any file of a series names the whole series (the manifest maps every file to its study);
        # its folder could also hold other studies, so the first file names it.
        rel = study.files[0].relative_to(root).as_posix()
        if rel not in paths:
            paths.append(rel)
    return paths


def fitting_rows(manifest: pd.DataFrame, package: ModelPackage) -> tuple[list[dict], dict[str, int]]:
    """The rows the model takes, by the rule of training (`prepare.fitting_studies`: its modalities,
    exports without a DICOM modality of its dimensionality), and counts of the others by reason."""
    kept, dropped, _ = fitting_studies(manifest, package.modalities, package.spatial_dims)
    skipped = {reason: n for reason, n in dropped.items() if n}
    for reason, n in skipped.items():
        logger.warning("%d studies left out: %s (the model takes %dD studies%s)", n, reason, package.spatial_dims,
                       f" of {', '.join(package.modalities)} or without a DICOM modality" if package.modalities else "")
    return kept.to_dict("records"), skipped


def _prediction_row(package: ModelPackage, row: dict, result: Scored) -> dict:
    """One predictions.csv row: id, scores, y_pred, the distribution flag and its reasons."""
    out: dict = {"id": row["id"]}
    score = None
    if result.probs is not None:
        out.update(score_columns(package, result.probs))
        out["y_pred"] = decide(package, result.probs)
        score = float(result.probs[1]) if len(package.classes) == 2 else None
    within, reasons = (True, [])
    if package.profile:
        within, reasons = within_distribution(package.profile, row, result.intensity or {}, score)
    out["within_training_distribution"] = bool(within)
    out["distribution_notes"] = "; ".join(reasons)
    return out


def _write_masks(package: ModelPackage, row: dict, result: Scored, output_dir: Path, root: Path,
                 key_file: Path | None) -> int:
    """The NIfTI mask (always) and, for DICOM inputs, the DICOM SEG; returns the number of SEGs written."""
    masks = output_dir / "masks"
    masks.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(result.mask.astype(np.uint8), result.affine), masks / f"{row['id']}.nii.gz")
    if not str(row.get("kind", "")).startswith("dicom"):
        return 0
    from medtl.data.seg_out import write_dicom_seg

    study = resolve_study(row, root, key_file=key_file)
    names = [f"label {k}" for k in range(1, package.num_classes)]
    try:
        write_dicom_seg(result.mask, result.affine, study.files, output_dir / "dicom_seg" / f"{row['id']}.dcm", names)
    except InputError as err:  # one study's SEG must not cost every prediction: the mask is written, say why
        logger.warning("row %s: DICOM SEG not written (%s); its NIfTI mask is in masks/", row["id"], err)
        return 0
    return 1
