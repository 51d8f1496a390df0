"""The model package: what a trained model needs to run on new studies, frozen at training.

Every run logs it as the artifact folder `package/` of its MLflow run (and the registered pyfunc
model carries the same files):

- `medtl_model.json`: the task, the encoder and its shape, the class names and positive class,
  the **decision threshold chosen on validation** (never re-derived later), the preprocessing
  (`Preprocessing` as JSON), the modalities the model was trained on, the project key's id and
  the training manifest's sha256;
- `weights.safetensors`: the state dict (loading it runs no pickled code);
- `reference_profile.json`: aggregates of the training data and validation scores (no rows) for
  the dataset-shift checks of `medtl evaluate` and `medtl predict`.

The training manifest never goes to MLflow; where it lies is remembered on this machine only
(`<config dir>/runs/<run id>.json`), so `medtl evaluate` can find it to leave out training
patients.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from medtl.data.dataset import Preprocessing
from medtl.data.privacy import config_dir
from medtl.engine.inference import tta_flips
from medtl.errors import InputError
from medtl.models.factory import create_model

if TYPE_CHECKING:
    import pandas as pd

    from medtl.workflow.config import WorkflowConfig
    from medtl.workflow.prepare import PreparedData

PACKAGE_DIR = "package"
PACKAGE_FILE = "medtl_model.json"
WEIGHTS_FILE = "weights.safetensors"
PROFILE_FILE = "reference_profile.json"
SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPackage:
    """What was frozen at training; `medtl_model.json` holds exactly these fields."""

    task: str
    encoder: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    classes: list[str]
    positive_class: str | None
    threshold: float | None  # binary classification: predicted positive when score >= threshold
    preprocessing: dict[str, Any]
    modalities: list[str]  # [] = any (the workflow's data.modalities)
    key_id: str
    manifest_sha256: str
    run_id: str = ""
    multi_label: bool = False
    dropout: float = 0.2
    input_skip: int = 0  # model.input_skip (0 in packages written before it existed)
    deep_supervision: int = 0  # model.deep_supervision: the training-only heads, kept so the weights fit
    tta: str = "none"  # test-time augmentation (evaluation.tta), applied wherever the model scores
    # The settings `medtl evaluate` reuses (task, model, evaluation, audit, seed, experiment,
    # data's intensity/size keys and subgroups): no path, no data value.
    workflow_config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    profile: dict[str, Any] = field(default_factory=dict, repr=False)  # reference_profile.json

    def prep(self) -> Preprocessing:
        """The frozen preprocessing as the data layer's `Preprocessing`."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocessing.items()}
        return Preprocessing(**values)

    def flips(self) -> tuple[int, ...]:
        """The spatial axes `predict` mirrors for the frozen test-time augmentation."""
        return tta_flips(self.tta, self.spatial_dims, self.workflow_config.get("data", {}).get("flip_axes", ()))

    def input_shape(self) -> tuple[int, ...]:
        """One network input without the batch axis, `(channels, *spatial)`."""
        return (self.in_channels, *self.prep().image_size)


def build_network(package: ModelPackage) -> torch.nn.Module:
    """The package's network with freshly initialised weights (no download: weights "none")."""
    return create_model(package.task, package.encoder, spatial_dims=package.spatial_dims,
                        in_channels=package.in_channels, num_classes=package.num_classes, weights="none",
                        multi_label=package.multi_label, dropout=package.dropout,
                        input_skip=package.input_skip, deep_supervision=package.deep_supervision).model


def packable(package: ModelPackage, model: torch.nn.Module) -> bool:
    """Whether `model` is the plain network `build_network` makes (multi-task and adversarial
    domain-adaptation wrappers are not packaged: their extra heads need their method's code)."""
    return set(build_network(package).state_dict()) == set(model.state_dict())


def write_package(package: ModelPackage, model: torch.nn.Module, folder: Path) -> Path:
    """Write `medtl_model.json`, `weights.safetensors` and `reference_profile.json` into `folder`."""
    from safetensors.torch import save_model  # handles tied tensors, unlike save_file

    folder.mkdir(parents=True, exist_ok=True)
    document = {k: v for k, v in dataclasses.asdict(package).items() if k != "profile"}
    (folder / PACKAGE_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    (folder / PROFILE_FILE).write_text(json.dumps(package.profile, indent=2, sort_keys=True))
    save_model(copy.deepcopy(model).to("cpu"), str(folder / WEIGHTS_FILE))  # the caller's model stays put
    return folder


def read_package(folder: Path) -> tuple[ModelPackage, torch.nn.Module]:
    """The package in `folder` and its network with the trained weights, in eval mode.

    Raises:
        InputError: when a file is missing, of another schema version, or the weights do not fit.
    """
    from safetensors.torch import load_model

    for name in (PACKAGE_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise InputError(f"a medtl model package must hold {name}, not lack it; the model was logged before "
                             "medtl packaged models: run the workflow again to log one")
    document = json.loads((folder / PACKAGE_FILE).read_text())
    if document.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{PACKAGE_FILE} must have schema_version {SCHEMA_VERSION}, not "
                         f"{document.get('schema_version')!r}; use the medtl version that trained the model")
    profile = json.loads((folder / PROFILE_FILE).read_text()) if (folder / PROFILE_FILE).is_file() else {}
    package = ModelPackage(**document, profile=profile)
    network = build_network(package)
    try:
        load_model(network, str(folder / WEIGHTS_FILE))
    except RuntimeError as err:
        raise InputError("the package's weights must fit its network, not differ in their tensors; the package is "
                         "damaged or was edited: download it again") from err
    return package, network.eval()


def fetch_package(model_ref: str, *, progress: bool = True) -> tuple[ModelPackage, torch.nn.Module, str]:
    """Download and read the package of a registered version or a run.

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or an MLflow run id.

    Returns:
        The package, its network and the `NAME/VERSION` it resolved to ("" for a run id).
    """
    import mlflow

    from medtl.tracking import registry, store

    store.client()
    resolved, version = ("", None)
    run_id = model_ref
    if model_ref.startswith("models:/"):
        resolved, version = registry.resolve_model_uri(model_ref, what="MODEL")
        if version is None:
            raise InputError(f"MODEL must be a registered version or a run id, not the logged model {model_ref!r}; "
                             "use models:/<name>@<alias> or models:/<name>/<version>")
        run_id = str(version.run_id)
    with tempfile.TemporaryDirectory(prefix="medtl-package-") as tmp, _download_bar(progress):
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PACKAGE_DIR, dst_path=tmp)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types for a missing run/artifact
            raise InputError(f"MODEL must name a run that logged a medtl model package, not {model_ref!r} "
                             f"({type(err).__name__}); check the run id or the version in the MLflow UI") from err
        package, network = read_package(Path(local))
    return package, network, resolved


PROFILE_SAMPLE = 200  # training studies loaded for the intensity profile (seeded sample beyond this)


def package_for_run(cfg: WorkflowConfig, data: PreparedData, prep: Preprocessing, threshold: float | None,
                    table: pd.DataFrame, *, run_id: str, progress: bool = True) -> ModelPackage:
    """The package of a finished run: frozen settings and the reference profile of its data.

    Args:
        cfg: The run's workflow config.
        data: Its prepared manifest.
        prep: The preprocessing the network was trained with.
        threshold: The operating threshold chosen on validation (None when none applies).
        table: The run's predictions (classification: validation scores enter the profile).
        run_id: The MLflow run.
        progress: Show a progress bar while the training studies' intensities are read.
    """
    from medtl.workflow.prepare import positive_class

    return ModelPackage(
        task=cfg.task, encoder=cfg.model.encoder, spatial_dims=cfg.model.spatial_dims,
        in_channels=cfg.model.in_channels, num_classes=cfg.model.num_classes, classes=list(data.classes),
        positive_class=positive_class(cfg, data), threshold=None if threshold is None else float(threshold),
        preprocessing=json.loads(json.dumps(dataclasses.asdict(prep))), modalities=list(cfg.data.modalities),
        key_id=str(data.manifest["key_id"].iloc[0]) if len(data.manifest) else "",
        manifest_sha256=data.manifest_sha256, run_id=run_id, multi_label=cfg.model.multi_label,
        dropout=cfg.model.dropout, input_skip=cfg.model.input_skip,
        deep_supervision=cfg.model.deep_supervision, tta=cfg.evaluation.tta, workflow_config=reusable_config(cfg), profile=training_profile(data, table, seed=cfg.seed, progress=progress),
    )


# flip_axes: the axes evaluation.tta mirror averages over (`ModelPackage.flips`).
REUSED_DATA_KEYS = ("subgroups", "modalities", "image_size", "spacing", "intensity", "ct_window", "cache", "flip_axes")


def reusable_config(cfg: WorkflowConfig) -> dict[str, Any]:
    """The part of a run's config an external validation runs with again (no path key)."""
    from medtl.workflow.config import to_dict

    raw = to_dict(cfg)
    kept = {k: raw[k] for k in ("name", "task", "seed", "model", "evaluation", "audit")}
    kept["data"] = {k: raw["data"][k] for k in REUSED_DATA_KEYS}
    kept["model"]["weights"] = "none"  # the package holds the trained weights; a checkpoint path never leaves
    kept["tracking"] = {"experiment": raw["tracking"]["experiment"], "register": False}
    return json.loads(json.dumps(kept))


def training_profile(data: PreparedData, table: pd.DataFrame, *, seed: int = 0, progress: bool = True) -> dict:
    """The reference profile (aggregates only) of the training rows and the validation scores."""
    from medtl.data.discover import load_study
    from medtl.data.verify import resolve_study
    from medtl.evaluation.shift import build_profile, intensity_stats

    train = data.manifest[data.manifest["split"] == "train"]
    sample = train if len(train) <= PROFILE_SAMPLE else train.sample(PROFILE_SAMPLE, random_state=seed)
    intensities = []
    for row in tqdm(sample.to_dict("records"), desc="reference profile", unit="study", disable=not progress):
        study = resolve_study(row, data.root, key_file=data.key_file)
        intensities.append(intensity_stats(load_study(study).array))
    scores = None
    if "y_score" in table.columns:
        scores = table.loc[table["split"] == "val", "y_score"].astype(float).tolist()
    try:
        return build_profile(train, intensities, scores)
    except InputError as err:  # e.g. fewer training studies than any aggregate may describe
        logger.warning("no reference profile recorded (%s): shift checks will be skipped for this model", err)
        return {}


@contextlib.contextmanager
def _download_bar(progress: bool):
    """MLflow's artifact download bar only when progress bars are wanted (`medtl -q` hides it)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(name)
    if not progress:
        os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --- where the training manifest lies: this machine only -----------------------------------------------------


def remember_run(run_id: str, manifest_csv: Path) -> Path:
    """Record, on this machine only, where a run's training manifest lies (never sent to MLflow)."""
    folder = config_dir() / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.json"
    path.write_text(json.dumps({"manifest": str(Path(manifest_csv).resolve())}))
    return path


def remembered_manifest(run_id: str) -> Path | None:
    """The training manifest this machine recorded for a run, if it still exists."""
    path = config_dir() / "runs" / f"{run_id}.json"
    if not path.is_file():
        return None
    manifest = Path(json.loads(path.read_text())["manifest"])
    return manifest if manifest.is_file() else None
