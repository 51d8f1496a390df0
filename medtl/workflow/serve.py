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
            scored = score_studies(self.package, self.network, [_study(str(i), p) for i, p in enumerate(frame["path"])],
                                   progress=False)
        elif "image" in frame.columns:
            modalities = frame["modality"] if "modality" in frame.columns else [""] * len(frame)
            items = [loaded_array(str(i), np.asarray(image), str(m or ""), self.package)
                     for i, (image, m) in enumerate(zip(frame["image"], modalities, strict=True))]
            scored = score_loaded(self.package, self.network, items, total=len(items), progress=False)
        else:
            raise InputError(f"the input must have a 'path' or an 'image' column, not only {list(frame.columns)}; "
                             "send one study per row")
        return pd.DataFrame([self._row(s) for s in scored])

    def _row(self, scored) -> dict:
        if scored.mask is not None:
            return {"mask": scored.mask.tolist()}
        return {**score_columns(self.package, scored.probs), "y_pred": decide(self.package, scored.probs)}


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
