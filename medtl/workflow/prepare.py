"""Step 1 of a run: check everything checkable, build (or read) the manifest, keep the task's rows.

`preflight` runs before any work; `prepare_data` builds the manifest into the run's output
folder and returns the rows the task can use (`PreparedData`); `publish_manifest` copies it to
`data.manifest_out` once the run succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medtl.data.dataset import class_names
from medtl.data.inventory import file_sha256
from medtl.data.manifest import build_manifest
from medtl.data.output_guard import replace_atomically
from medtl.data.splits import SPLITS, check_leakage, normalise_split
from medtl.errors import ConfigError, InputError, WeightsError
from medtl.models.factory import WEIGHT_CHOICES, check_input_size, create_model
from medtl.models.registry import get_encoder_spec
from medtl.workflow.config import WorkflowConfig
from medtl.workflow.train import train_config_for

logger = logging.getLogger(__name__)


SUBGROUP_COLUMNS = ("sex", "age_band", "site", "scanner")


# Manifest modality of studies that carry none (NIfTI, PNG/JPEG/TIFF exports); "" for older manifests.
NO_MODALITY = ("", "UNKNOWN")


# Class names that say "nothing found": of two classes, the other one is the positive class
# (compared case-insensitively, separators ignored: "No_Finding" is "no finding").
NEGATIVE_CLASS_NAMES = ("normal", "negative", "healthy", "benign", "no finding", "none", "control", "absent")


@dataclass
class PreparedData:
    """The manifest of a run, filtered to the rows the task can use (in memory)."""

    manifest: pd.DataFrame
    manifest_path: Path
    manifest_sha256: str
    sidecar: dict
    root: Path
    key_file: Path | None
    classes: list[str]
    subgroups: list[str]
    dropped: dict[str, int] = field(default_factory=dict)
    # identifying value -> kind, from the manifest build (in memory only): what the PHI scan of
    # the MLflow run must not find.
    forbidden: dict[str, str] = field(default_factory=dict, repr=False)
    # Rows without a DICOM modality that data.modalities could not filter and the run kept.
    kept_without_modality: int = 0
    # Folder of the `data.cache: disk` files (the run's OUTPUT/cache).
    cache_dir: Path | None = None


def preflight(cfg: WorkflowConfig) -> None:
    """Check everything a run can check before its first minute of work, cheaply.

    Runs before the manifest build and before any MLflow run: the folders and files the config
    names exist; `model.encoder` is registered (unknown names get "did you mean") and takes
    `model.spatial_dims`; `model.weights` resolves (`imagenet`/`medicalnet` files are available
    locally, a checkpoint file exists, loads with `torch.load(weights_only=True)` and fits the
    encoder tensor by tensor); `data.image_size` passes through the encoder; the training keys
    satisfy the engine. The model is built on the meta device (no memory, no values): only
    reading the checkpoint costs time. Numeric ranges of single keys are `config.validate`'s.

    Args:
        cfg: the validated workflow config.

    Raises:
        ConfigError: naming the key (a missing path, an unknown encoder, a too small image size...).
        WeightsError: naming `model.weights` (missing offline, with where to put the file;
            unreadable, unsafe or not fitting).

    Example:
        >>> preflight(load_config(Path("workflows/classify_2d.yaml"), ["model.weights=missing.pth"]))
        Traceback (most recent call last):
        medtl.errors.WeightsError: config key 'model.weights' file missing.pth must be an existing ...
    """
    _check_paths(cfg)
    m = cfg.model
    spec = get_encoder_spec(m.encoder, key="config key 'model.encoder'")
    if m.spatial_dims not in spec.spatial_dims:
        raise ConfigError(f"config key 'model.spatial_dims' must be {' or '.join(map(str, spec.spatial_dims))} for "
                          f"encoder '{m.encoder}', not {m.spatial_dims}; pick a {m.spatial_dims}D encoder from "
                          f"medtl.models.list_encoders(spatial_dims={m.spatial_dims})")
    try:
        bundle = create_model(cfg.task, m.encoder, spatial_dims=m.spatial_dims, in_channels=m.in_channels,
                              num_classes=m.num_classes, weights=m.weights, multi_label=m.multi_label,
                              dropout=m.dropout, input_skip=m.input_skip,
                              deep_supervision=m.deep_supervision, meta=True)
    except (ConfigError, WeightsError) as err:
        raise type(err)(_weights_message(m.weights, str(err))) from err
    if cfg.data.image_size:  # else chosen from the data, after the manifest build
        check_input_size(bundle, cfg.data.image_size, name="config key 'data.image_size'")
    train_config_for(cfg, progress=False, monitor="val_loss")  # the engine's own checks of the train keys


def _weights_message(weights: str, message: str) -> str:
    """A model error worded for its config key (a weights path is shown by its file name only)."""
    named = re.match(r"model\.(\w+)", message)  # the factory names its argument: make it the config key
    if named:
        return f"config key '{named.group(0)}'{message[named.end():]}"
    shown = weights if weights in WEIGHT_CHOICES else Path(weights).name
    return f"config key 'model.weights' ({shown}): {message}"


def _check_paths(cfg: WorkflowConfig) -> None:
    """The files and folders the config names exist (shown by name: folders may identify someone)."""
    d, c = cfg.data, cfg.continual
    wanted = [("data.root", d.root, "folder", "set it to the folder that holds the studies")]
    if d.manifest:
        wanted.append(("data.manifest", d.manifest, "file", "build it with `medtl manifest build`, or set "
                                                            "data.root and data.labels instead"))
    else:
        wanted.append(("data.labels", d.labels, "file", "set it to the labels CSV (path,label[,split,...]; "
                                                        "see docs/data.md)"))
    if d.key_file:
        wanted.append(("data.key_file", d.key_file, "file", "an explicit key must exist (a typo would start a new "
                                                            "pseudonym space); unset it to use the default key"))
    if c.old_manifest:
        wanted.append(("continual.old_manifest", c.old_manifest, "file", "set it to the manifest CSV whose test "
                                                                          "split is the old test set"))
    if c.old_root:
        wanted.append(("continual.old_root", c.old_root, "folder", "set it to the data root of "
                                                                   "continual.old_manifest"))
    for key, value, kind, hint in wanted:
        path = Path(value).expanduser()
        if not (path.is_dir() if kind == "folder" else path.is_file()):
            found = "a file" if path.is_file() else "a folder" if path.is_dir() else "missing"
            raise ConfigError(f"config key '{key}' must name an existing {kind}, not {found} ({path.name or value}); "
                              f"{hint}")


def staged_manifest(cfg: WorkflowConfig, output_dir: Path) -> Path:
    """The manifest a run reads: `data.manifest` when given, else the one it builds in `OUTPUT/manifest.csv`.

    Non-zero torchrun ranks read this path once rank 0 has built it (after the barrier).
    """
    return Path(cfg.data.manifest) if cfg.data.manifest else Path(output_dir) / "manifest.csv"


def prepare_data(cfg: WorkflowConfig, output_dir: Path, *, progress: bool = True,
                 checked: bool = False) -> PreparedData:
    """Build the manifest (or read the given one), check leakage and keep the task's rows.

    A built manifest is staged in the run's output folder (`staged_manifest`): `data.manifest_out`
    only receives it from `publish_manifest` once the run succeeded, so a failed run never replaces
    a good manifest. Rows are kept when their DICOM modality is in `data.modalities` (studies
    without one, i.e. non-DICOM exports, cannot be filtered by it) and their number of axes equals
    `model.spatial_dims`; `dropped` counts the others by reason.

    Args:
        cfg: the validated workflow config.
        output_dir: the run's output folder (gets manifest.csv/.json when built, and cache/).
        progress: progress bars.
        checked: the caller already ran `preflight(cfg)`; otherwise it runs first.

    Raises:
        ConfigError, WeightsError: from `preflight`, before anything is built.
        InputError: when the manifest has no usable rows for the task, or a split is empty.
        LeakageError: when a patient appears in two splits.
    """
    if not checked:
        preflight(cfg)
    manifest_path, forbidden = _manifest(cfg, output_dir, progress=progress)
    source = manifest_path.name
    sidecar_path = manifest_path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    whole = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)  # every split, every row
    check_leakage(whole, source=source)
    check_mask_labels(cfg, sidecar, source=source)
    check_segment_map(cfg, sidecar, source=source)
    manifest, dropped, kept_without_modality = _task_rows(cfg, whole, source=source)
    for split in SPLITS:
        if not (manifest["split"] == split).any():
            raise InputError(_empty_split_message(cfg, split, whole, dropped, source=source))
    classes = _classes(cfg, manifest)
    _warn_ct_intensity(cfg, manifest, source=source)
    extra = [c for c in cfg.data.subgroups if c in manifest.columns]
    left_out = ", ".join(f"{n} ({reason})" for reason, n in dropped.items() if n)
    if left_out:
        logger.warning("manifest %s: rows left out of this %s run: %s", source, cfg.task, left_out)
    return PreparedData(
        manifest=manifest, manifest_path=manifest_path,
        manifest_sha256=sidecar.get("manifest_sha256") or file_sha256(manifest_path), sidecar=sidecar,
        root=Path(cfg.data.root), key_file=Path(cfg.data.key_file) if cfg.data.key_file else None,
        classes=classes, subgroups=[c for c in (*SUBGROUP_COLUMNS, *extra) if c in manifest.columns],
        dropped={k: v for k, v in dropped.items() if v}, forbidden=forbidden,
        kept_without_modality=kept_without_modality, cache_dir=Path(output_dir) / "cache",
    )


def _manifest(cfg: WorkflowConfig, output_dir: Path, *, progress: bool) -> tuple[Path, dict[str, str]]:
    """The manifest a run reads (given, or built into the output folder) and the values its scans look for."""
    manifest_path = staged_manifest(cfg, output_dir)
    if cfg.data.manifest:
        if not manifest_path.is_file():
            raise InputError(f"data.manifest {manifest_path.name} must be an existing file, not missing; build it "
                             f"with `medtl manifest build`")
        return manifest_path, {}
    built = build_manifest(
        Path(cfg.data.root), Path(cfg.data.labels), manifest_path,
        key_file=Path(cfg.data.key_file) if cfg.data.key_file else None, seed=cfg.seed,
        subgroup_columns=cfg.data.subgroups, fractions=cfg.data.fractions, progress=progress,
        exclude=_published_paths(cfg), segment_map=cfg.data.segment_map, masks_from_dicom=cfg.data.masks_from_dicom,
    )
    return manifest_path, dict(built.forbidden)


def _task_rows(cfg: WorkflowConfig, manifest: pd.DataFrame, *, source: str):
    """The rows the task can use (modality, dimensionality, target), the counts left out by reason,
    and how many rows without a modality were kept."""
    manifest, dropped, kept_without_modality = _task_studies(cfg, manifest, source=source)
    # Domain adaptation learns from the target domain's training studies without their labels
    # (masks), so those rows stay even when unlabelled; everywhere else a row needs its target.
    unlabelled_ok = (target_domain_rows(cfg, manifest, source=source) & (manifest["split"] == "train")
                     if cfg.adaptation.method != "none" else np.zeros(len(manifest), dtype=bool))
    column, reason = ("mask", "no mask") if cfg.task == "segmentation" else ("label", "no label")
    keep = (manifest[column].str.strip() != "") | unlabelled_ok
    dropped[reason] = int((~keep).sum())
    return manifest[keep].reset_index(drop=True), dropped, kept_without_modality


def _classes(cfg: WorkflowConfig, manifest: pd.DataFrame) -> list[str]:
    """The class names, the positive class of two at index 1; they must match model.num_classes."""
    if cfg.task != "classification":
        return []
    classes = class_names(manifest["label"])
    if len(classes) != cfg.model.num_classes:
        raise ConfigError(
            f"config key 'model.num_classes' must match the manifest's {len(classes)} classes {classes}, "
            f"not {cfg.model.num_classes}"
        )
    return binary_class_order(classes, cfg.audit.positive_class)


def _task_studies(cfg: WorkflowConfig, manifest: pd.DataFrame, *,
                  source: str) -> tuple[pd.DataFrame, dict[str, int], int]:
    """The rows of the configured modalities and dimensionality, the counts left out, and how
    many rows without a modality were kept.

    `data.modalities` filters DICOM studies by their Modality. Non-DICOM exports have none
    (`unknown`), so the filter cannot judge them: they are kept when their number of axes (of the
    manifest's `shape`) equals `model.spatial_dims`. Every row of another dimensionality is left
    out, since the network could not take it.
    """
    manifest, dropped, kept = fitting_studies(manifest, cfg.data.modalities, cfg.model.spatial_dims)
    if kept:
        logger.warning(
            "manifest %s: %d studies have no DICOM modality (PNG/JPEG/TIFF/NIfTI exports), so data.modalities %s "
            "cannot filter them; they were kept because they are %dD like model.spatial_dims",
            source, kept, list(cfg.data.modalities), cfg.model.spatial_dims)
    return manifest, dropped, kept


def fitting_studies(manifest: pd.DataFrame, modalities: Sequence[str],
                    spatial_dims: int) -> tuple[pd.DataFrame, dict[str, int], int]:
    """The rows a model of these modalities and dimensionality takes; training, `medtl predict` and
    `medtl evaluate` all use this one rule.

    Returns:
        The kept rows, the counts left out ("other modality", "other dimensionality") and how many
        kept rows have no DICOM modality (exports: the modality filter cannot judge them).
    """
    dropped: dict[str, int] = {}
    modality = manifest["modality"].astype(str).str.strip().str.upper()
    no_modality = modality.isin(NO_MODALITY)
    if modalities:
        keep = modality.isin({m.strip().upper() for m in modalities}) | no_modality
        dropped["other modality"] = int((~keep).sum())
        manifest, no_modality = manifest[keep], no_modality[keep]
    axes = manifest["shape"].astype(str).map(lambda s: len(s.split("x")) if s.strip() else 0) \
        if "shape" in manifest.columns else pd.Series(0, index=manifest.index)
    fits = (axes == spatial_dims) | (axes == 0)  # an unknown shape is left for the loader to judge
    dropped["other dimensionality"] = int((~fits).sum())
    kept = int((no_modality & fits).sum()) if modalities else 0
    return manifest[fits].reset_index(drop=True), dropped, kept


def _published_paths(cfg: WorkflowConfig) -> list[Path]:
    """Where `publish_manifest` puts the manifest and sidecar: not data, should they lie in the root."""
    if cfg.data.manifest or not cfg.data.manifest_out:
        return []
    target = Path(cfg.data.manifest_out)
    return [target, target.with_suffix(".json")]


def binary_class_order(classes: list[str], positive_class: str = "") -> list[str]:
    """Two classes as [negative, positive]: the positive class gets index 1, the one TPR, FNR and
    the audit's underdiagnosis gaps refer to. Other class counts are returned as they are.

    The positive class is `positive_class` (config `audit.positive_class`) when given; else the
    larger of two integer labels (1 of 0/1); else, of two word labels, the one that is not a
    negative-sounding name (`NEGATIVE_CLASS_NAMES`: normal, negative, healthy, benign, no finding,
    none, control, absent).

    Args:
        classes: the class names of the manifest (as `class_names` sorts them).
        positive_class: the configured positive class, or "".

    Returns:
        The classes, the positive one last when there are two.

    Raises:
        ConfigError: naming `audit.positive_class` when it is none of the classes, or when
            neither or both of two word labels sound negative.

    Example:
        >>> binary_class_order(["abnormal", "normal"])
        ['normal', 'abnormal']
    """
    if len(classes) != 2:
        return classes
    if positive_class:
        if positive_class not in classes:
            raise ConfigError(f"config key 'audit.positive_class' must be one of the manifest's classes {classes}, "
                              f"not {positive_class!r}; e.g. --set audit.positive_class={classes[1]}")
        return [c for c in classes if c != positive_class] + [positive_class]
    if all(c.lstrip("-").isdigit() for c in classes):
        return sorted(classes, key=int)
    negative = [c for c in classes if _negative_name(c)]
    if len(negative) != 1:
        which = "both sound negative" if negative else "neither sounds negative"
        raise ConfigError(
            f"config key 'audit.positive_class' must name the positive class of the two classes {classes}, not be "
            f"empty: {which} ({', '.join(NEGATIVE_CLASS_NAMES)}), so medtl cannot tell which one TPR, FNR and the "
            f"audit's subgroup gaps refer to; e.g. --set audit.positive_class={classes[1]}")
    return [negative[0], next(c for c in classes if c != negative[0])]


def _negative_name(name: str) -> bool:
    letters = re.sub(r"[\W_]+", "", name.casefold())  # "No_Finding", "no finding", "NoFinding" alike
    return letters in {n.replace(" ", "") for n in NEGATIVE_CLASS_NAMES}


def positive_class(cfg: WorkflowConfig, data: PreparedData) -> str | None:
    """The class TPR, FNR and the audit's underdiagnosis gaps refer to (None without a class label).

    Index 1 of two classes (`binary_class_order`), `audit.positive_class` of more.
    """
    if cfg.task != "classification":
        return None
    if len(data.classes) == 2:
        return data.classes[1]
    return cfg.audit.positive_class or None


#: A patch chosen from the data is a multiple of this on every axis (the encoder's pooling halves it
#: four times), between these bounds: CPU training stays practical, and small volumes are padded.
PATCH_MULTIPLE = 16
PATCH_BOUNDS = (16, 96)
_RAS_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def input_size_from_data(cfg: WorkflowConfig, data: PreparedData) -> WorkflowConfig:
    """`cfg` with `data.image_size` chosen from the data when it is [] (3D models).

    3D segmentation trains on patches of this size; 3D classification resizes each whole volume to it.
    As nnU-Net sizes its patch from the data: the median shape of the training volumes at the run's
    spacing (`data.spacing`, else each volume's own), in the RAS axis order training uses, each axis
    rounded to the nearest multiple of `PATCH_MULTIPLE` within `PATCH_BOUNDS`. A patch about the size
    of the typical volume sees the whole structure and its context; a smaller one (a fixed default)
    sees a part. The demo's CT series (about 26 x 26 x 14 voxels at 1.5 x 1.5 x 2.5 mm) get
    [32, 32, 16]; the hippocampus crops (35 x 51 x 35 at 1 mm) [32, 48, 32]. A classifier's size,
    given or chosen, is checked by `warn_if_batchnorm_starves`.

    Raises:
        InputError: When no training row has a readable shape, spacing and orientation.
    """
    if cfg.data.image_size:
        warn_if_batchnorm_starves(cfg)
        return cfg
    rows = data.manifest[data.manifest["split"] == "train"]
    shapes = [s for s in (_ras_shape(r, cfg.data.spacing) for r in rows.to_dict("records")) if s is not None]
    if not shapes:
        raise InputError(f"manifest {data.manifest_path.name} must give the shape, spacing and orientation of its "
                         f"training volumes, not lack them, for data.image_size [] to choose the patch; set "
                         f"data.image_size (e.g. [32, 32, 16])")
    low, high = PATCH_BOUNDS
    median = np.median(np.asarray(shapes, dtype=float), axis=0)
    size = tuple(int(min(max(PATCH_MULTIPLE * round(m / PATCH_MULTIPLE), low), high)) for m in median)
    logger.info("data.image_size from the data: %s (the median training volume is %s voxels)", list(size),
                "x".join(f"{m:g}" for m in median))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    warn_if_batchnorm_starves(cfg)
    return cfg


#: Fewer values than this per channel in the encoder's last BatchNorm (batch x last-stage voxels)
#: and classification training fails (see `warn_if_batchnorm_starves`).
MIN_LAST_STAGE_VALUES = 16


def warn_if_batchnorm_starves(cfg: WorkflowConfig) -> None:
    """Warn when a classifier's last stage is too small for BatchNorm.

    The encoders downsample 32 times (ImageNet) or 8 (MedicalNet): [32, 32, 16] leaves an
    EfficientNet a last stage of one voxel, where BatchNorm normalises each channel over the batch
    alone (4 values at batch size 4). Then training cannot fit: the inflated EfficientNet-Lite0
    could not fit 32 demo CT series in 30 epochs, and classify_3d at [32, 32, 16] tested at chance
    on 375 series. At [64, 64, 32] (2 x 2 x 1 voxels, 16 values) it reached test AUROC 0.997
    (docs/benchmarks.md). Segmentation is not checked: its decoder works at finer stages.
    """
    if cfg.task != "classification" or not cfg.data.image_size:
        return
    reduction = last_stage_reduction(cfg.model.encoder)
    voxels = int(np.prod([-(-int(s) // reduction) for s in cfg.data.image_size]))
    if voxels * cfg.train.batch_size >= MIN_LAST_STAGE_VALUES:
        return
    larger = [int(s) * 2 for s in cfg.data.image_size]
    logger.warning("data.image_size %s leaves encoder '%s' a last stage of %d voxel(s) (its input is reduced %d "
                   "times per axis): with train.batch_size %d its BatchNorm sees only %d values per channel, and "
                   "classification then barely trains; use a larger data.image_size (e.g. %s) or train.batch_size",
                   list(cfg.data.image_size), cfg.model.encoder, voxels, reduction, cfg.train.batch_size,
                   voxels * cfg.train.batch_size, larger)


def last_stage_reduction(encoder: str) -> int:
    """How many times an encoder downsamples its input by its last stage (built without memory)."""
    with torch.device("meta"):
        built = get_encoder_spec(encoder, key="config key 'model.encoder'").build(1)
    return int(built.feature_reductions[-1])


def _ras_shape(row: Mapping, spacing: Sequence[float]) -> tuple[float, float, float] | None:
    """A manifest row's volume shape in RAS axis order, at `spacing` (mm) when given."""
    try:
        shape = [int(v) for v in str(row["shape"]).split("x")]
        own = [float(v) for v in str(row["spacing"]).split("x")]
        axes = [_RAS_AXIS[c] for c in str(row["orientation"]).upper()]
    except (KeyError, ValueError):
        return None
    if not (len(shape) == len(own) == len(axes) == 3) or sorted(axes) != [0, 1, 2]:
        return None
    ras = [0.0, 0.0, 0.0]
    for n, mm, axis in zip(shape, own, axes, strict=True):
        ras[axis] = n * mm / float(spacing[axis]) if spacing else float(n)
    return ras[0], ras[1], ras[2]


def check_mask_labels(cfg: WorkflowConfig, sidecar: Mapping, *, source: str) -> None:
    """A segmentation model must have a class for every label value its masks hold (sidecar `mask_labels`).

    Without this check a mask label >= `model.num_classes` fails only during training (an index
    out of bounds in the one-hot encoding of the loss).

    Raises:
        ConfigError: naming `model.num_classes` and the smallest value that fits.
    """
    labels = sorted(int(v) for v in sidecar.get("mask_labels") or [])
    if cfg.task != "segmentation" or not labels or labels[-1] < cfg.model.num_classes:
        return
    top = labels[-1]
    shown = f"{labels[0]}-{top}" if labels == list(range(labels[0], top + 1)) else ", ".join(map(str, labels))
    raise ConfigError(
        f"the masks of manifest {source} hold labels {shown}, so config key 'model.num_classes' must be at least "
        f"{top + 1}, not {cfg.model.num_classes}; set --set model.num_classes={top + 1} (background 0 is a class)")


def check_segment_map(cfg: WorkflowConfig, sidecar: Mapping, *, source: str) -> None:
    """A run trains on the classes its manifest's DICOM masks were hashed with (the sidecar's
    `segment_map`); a `data.segment_map` that differs would train on other label maps.

    Raises:
        ConfigError: naming `data.segment_map` and the manifest.
    """
    built = {" ".join(str(k).split()).casefold(): int(v) for k, v in (sidecar.get("segment_map") or {}).items()}
    given = {" ".join(str(k).split()).casefold(): int(v) for k, v in cfg.data.segment_map.items()}
    if given and built != given:
        raise ConfigError(
            f"config key 'data.segment_map' must equal the segment map manifest {source} was built with, not "
            f"differ; rebuild the manifest with this map or drop data.segment_map to use the manifest's")


def _empty_split_message(cfg: WorkflowConfig, split: str, whole: pd.DataFrame, dropped: Mapping[str, int], *,
                         source: str) -> str:
    """Why the run has no rows of `split`, and the fix that applies (not every key that might)."""
    head = f"manifest {source} must have '{split}' rows for task {cfg.task}, not none"
    present = int((whole["split"] == split).sum())
    if present:
        fixes = {"other modality": "adjust data.modalities ([] keeps every modality)",
                 "other dimensionality": f"set model.spatial_dims to the studies' dimensionality (now "
                                         f"{cfg.model.spatial_dims})",
                 "no label": "give those rows a label in the labels CSV",
                 "no mask": "give those rows a mask in the labels CSV"}
        left_out = ", ".join(f"{n} ({reason})" for reason, n in dropped.items() if n)
        how = "; ".join(fix for reason, fix in fixes.items() if dropped.get(reason))
        return f"{head}: all {present} '{split}' rows were left out of this run ({left_out}); {how or 'add studies'}"
    if cfg.data.manifest:
        return (f"{head}: its split column names no '{split}' row; rebuild it with `medtl manifest build` so that "
                f"every split has patients (a split column in the labels CSV, or --fractions)")
    given = _given_splits(Path(cfg.data.labels))
    if given:
        counts = ", ".join(f"{s} {given.get(s, 0)}" for s in SPLITS)
        if split == "val" and cfg.data.fractions[1] == 0:
            return (f"{head}: the labels CSV's split column gives no row the split val ({counts} rows), and "
                    f"data.fractions gives val a share of 0, so no val patients were set aside from the given train "
                    f"rows; give some rows the split val, or set data.fractions with a val share, e.g. [0.7, 0.15, "
                    f"0.15]")
        if split == "val":
            return (f"{head}: the labels CSV's split column gives no row the split val ({counts} rows), and its "
                    f"train patients were too few to set val patients aside; give some rows the split val")
        return (f"{head}: the labels CSV's split column gives no row the split {split} ({counts} rows); give some "
                f"rows the split {split}, or empty the split column so that medtl splits the patients by "
                f"data.fractions")
    share = cfg.data.fractions[SPLITS.index(split)]
    if share == 0:
        return f"{head}: data.fractions gives {split} a share of 0; set e.g. data.fractions=[0.7, 0.15, 0.15]"
    patients = int(whole["patient"].nunique()) if "patient" in whole.columns else len(whole)
    return (f"{head}: its {patients} patients (split groups) are too few for data.fractions "
            f"{list(cfg.data.fractions)}, none was drawn for {split}; add patients, or give {split} a larger share")


def _given_splits(labels_csv: Path) -> Counter:
    """Rows per split named by the labels CSV's split column (empty when it has none); counts only."""
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return Counter()
    column = next((c for c in table.columns if str(c).strip().lower() == "split"), None)
    given: Counter = Counter()
    for value in table[column] if column is not None else []:
        try:
            split = normalise_split(value)
        except ValueError:
            continue
        if split:
            given[split] += 1
    return given


def _warn_ct_intensity(cfg: WorkflowConfig, manifest: pd.DataFrame, *, source: str) -> None:
    """Warn once when studies without a DICOM modality will be read as CT (`data.intensity: ct`).

    NIfTI volumes carry no modality, so an MR collection passes a CT workflow's filter and would
    be windowed in Hounsfield units and resampled to CT spacing without a word.
    """
    if cfg.data.intensity != "ct":
        return
    unknown = int(manifest["modality"].astype(str).str.strip().str.upper().isin(NO_MODALITY).sum())
    if not unknown:
        return
    spacing = (f" and resampled to data.spacing {list(cfg.data.spacing)} mm" if cfg.data.spacing else "")
    logger.warning(
        "manifest %s: %d of %d studies have no DICOM modality (NIfTI/PNG/JPEG/TIFF exports) and data.intensity is "
        "ct: they are read as CT, windowed to data.ct_window %s HU%s. If they are MR, set --set data.intensity=mr "
        "--set data.spacing=[] (see 'MR NIfTI' in workflows/README.md)",
        source, unknown, len(manifest), list(cfg.data.ct_window), spacing)


def publish_manifest(data: PreparedData, cfg: WorkflowConfig) -> Path | None:
    """Copy a successful run's manifest (CSV and sidecar) to `data.manifest_out`, atomically.

    Call it only after the run succeeded: until then `data.manifest_out` keeps whatever good
    manifest it held. Each file is written with `output_guard.replace_atomically` (a temporary
    file beside the target, flushed to disk, then renamed over it), so a reader or a crash never
    sees a half-written file; the CSV comes first, its sidecar right after.

    Args:
        data: the run's prepared data (its `manifest_path` is the staged manifest).
        cfg: the run's config.

    Returns:
        The published CSV, or None when there is nothing to publish (`data.manifest` was given,
        or `data.manifest_out` is unset, so the run's own OUTPUT/manifest.csv is the manifest).

    Example:
        >>> data = prepare_data(cfg, output_dir)
        >>> ...  # train, evaluate, record
        >>> publish_manifest(data, cfg)
        PosixPath('data_manifests/classify_2d.csv')
    """
    if cfg.data.manifest or not cfg.data.manifest_out:
        return None
    target = Path(cfg.data.manifest_out)
    if target.resolve() == data.manifest_path.resolve():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(data.manifest_path, target)]
    if data.manifest_path.with_suffix(".json").is_file():
        pairs.append((data.manifest_path.with_suffix(".json"), target.with_suffix(".json")))
    for source, destination in pairs:
        replace_atomically(destination, source.read_bytes(), mode_of=source)
    return target


def target_domain_rows(cfg: WorkflowConfig, manifest: pd.DataFrame, *, source: str = "the manifest") -> np.ndarray:
    """Which manifest rows belong to the adaptation target domain (`adaptation.target`).

    Raises:
        ConfigError: when `adaptation.domain_column` is not a manifest column or no row holds the target.
    """
    a = cfg.adaptation
    if a.domain_column not in manifest.columns:
        raise ConfigError(f"config key 'adaptation.domain_column' must name a column of {source}, not "
                          f"{a.domain_column!r}; e.g. site or scanner")
    values = manifest[a.domain_column].astype(str).str.strip()
    rows = (values == a.target.strip()).to_numpy()
    if not rows.any():
        known = sorted(v for v in set(values) if v)
        raise ConfigError(f"config key 'adaptation.target' must be a value of column '{a.domain_column}' in {source}, "
                          f"not {a.target!r}; choose one of {', '.join(known[:20])}")
    return rows
