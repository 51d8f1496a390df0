"""The registered model's `python_function` flavor: raw images in, medtl's preprocessing inside.

MLflow loads it through this loader module (`_load_pyfunc`), with the model package's files
(`medtl_model.json`, `weights.safetensors`, `reference_profile.json`) as its data: no pickled
code is unpickled. So `mlflow.pyfunc.load_model("models:/NAME/VERSION")` and
`mlflow models serve -m models:/NAME@champion --env-manager local` take a DataFrame with

- a `path` column: local DICOM/NIfTI/PNG files or DICOM series folders (on the serving machine),
  each one study; or
- an `image` column: 2D (or 3D) arrays in MONAI's axis order, with an optional `modality` column
  (picks the intensity scheme as at training: "CT" windowing, "MR" percentiles, else X-ray),

and return one row per input: `y_score` (two classes) or `y_score_<class>`, and `y_pred` at the
frozen threshold; segmentation models return the label map as nested lists under `mask`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtl.data.discover import discover
from medtl.errors import InputError
from medtl.evaluation.shift import within_distribution
from medtl.workflow.apply import decide, loaded_array, score_columns, score_loaded, score_studies
from medtl.workflow.package import ModelPackage, read_package


class MedtlModel:
    """What `_load_pyfunc` returns: `predict(DataFrame) -> DataFrame`."""

    def __init__(self, package: ModelPackage, network: torch.nn.Module) -> None:
        self.package, self.network = package, network

    def predict(self, model_input: Any, params: dict | None = None) -> pd.DataFrame:  # noqa: ARG002 - MLflow's API
        """Score every row of `model_input` (see the module docstring)."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "path" in frame.columns:
            studies = [_study(str(i), p) for i, p in enumerate(frame["path"])]
            scored = score_studies(self.package, self.network, studies, progress=False)
            modalities = [modality for _, _, modality in studies]
        elif "image" in frame.columns:
            modalities = [str(m or "") for m in (frame["modality"] if "modality" in frame.columns else [""] * len(frame))]
            items = [loaded_array(str(i), np.asarray(image), m, self.package)
                     for i, (image, m) in enumerate(zip(frame["image"], modalities, strict=True))]
            scored = score_loaded(self.package, self.network, items, total=len(items), progress=False)
        else:
            raise InputError(f"the input must have a 'path' or an 'image' column, not only {list(frame.columns)}; "
                             "send one study per row")
        return pd.DataFrame([self._row(s, {"modality": m or "unknown", "shape": _shape(s)})
                             for s, m in zip(scored, modalities, strict=True)])

    def _row(self, scored, facts: dict[str, str]) -> dict:
        """The scores (or mask) and the training-distribution check of `medtl predict` (without the
        scanner, whose pseudonym needs the project key)."""
        out = {"mask": scored.mask.tolist()} if scored.mask is not None else {
            **score_columns(self.package, scored.probs), "y_pred": decide(self.package, scored.probs)}
        within, reasons = True, []
        if self.package.profile:
            score = float(scored.probs[1]) if scored.probs is not None and len(self.package.classes) == 2 else None
            within, reasons = within_distribution(self.package.profile, facts, scored.intensity, score)
        return {**out, "within_training_distribution": bool(within), "distribution_notes": "; ".join(reasons)}


def _shape(scored) -> str:
    """The manifest's `shape` text of a scored study ("128x128"), from what was loaded."""
    return "x".join(str(n) for n in scored.input_shape) if scored.input_shape else ""


def _study(index: str, path: str) -> tuple[str, tuple[Path, ...], str]:
    """The one study a `path` names (a file, or a series folder), as `score_studies` takes it."""
    target = Path(path)
    if not target.exists():
        raise InputError(f"row {index}: path must exist on the serving machine, not be missing; send a local path")
    found, _ = discover(target if target.is_dir() else target.parent, progress=False)
    if target.is_file():
        found = [s for s in found if target.resolve() in {f.resolve() for f in s.files}]
    if len(found) != 1:
        raise InputError(f"row {index}: path must name one study, not {len(found)}; name one file or one series folder")
    return index, found[0].files, found[0].modality


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> MedtlModel:  # noqa: ARG001 - MLflow's API
    """MLflow's entry point for the `python_function` flavor: the package folder in, the model out."""
    package, network = read_package(Path(data_path))
    return MedtlModel(package, network)
