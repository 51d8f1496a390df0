"""The orchestration layer: manifest -> model -> training -> evaluation -> audit -> MLflow -> report.

This is the only module (with `medtl.cli` and `medtl.studies`) that imports every layer. Each step
is a plain function so studies (transfer benefit, few-shot, ...) can reuse them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medtl.config import WorkflowConfig, to_dict
from medtl.data.dataset import Preprocessing, class_names, make_dataset, manifest_items
from medtl.data.manifest import build_manifest
from medtl.data.splits import check_leakage
from medtl.engine.config import FitResult, TrainConfig
from medtl.engine.inference import predict
from medtl.engine.loop import fit
from medtl.errors import ConfigError, InputError
from medtl.models.factory import ModelBundle, create_model
from medtl.models.strategies import make_transfer_plan

logger = logging.getLogger(__name__)

SUBGROUP_COLUMNS = ("sex", "age_band", "site", "scanner")


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


@dataclass
class TrainedModel:
    """A trained model with what it was built and trained with."""

    bundle: ModelBundle
    prep: Preprocessing
    fit: FitResult
    train_config: TrainConfig
    plan_groups: list[str]
    frozen_parameters: int


def _sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_data(cfg: WorkflowConfig, output_dir: Path, *, progress: bool = True) -> PreparedData:
    """Build the manifest (or read the given one), check leakage and keep the task's rows.

    Raises:
        InputError: when the manifest has no usable rows for the task, or a split is empty.
        LeakageError: when a patient appears in two splits.
    """
    root = Path(cfg.data.root)
    key_file = Path(cfg.data.key_file) if cfg.data.key_file else None
    forbidden: dict[str, str] = {}
    if cfg.data.manifest:
        manifest_path = Path(cfg.data.manifest)
        if not manifest_path.is_file():
            raise InputError(f"data.manifest {manifest_path} does not exist; build it with `medtl manifest build`")
    else:
        manifest_path = Path(cfg.data.manifest_out) if cfg.data.manifest_out else output_dir / "manifest.csv"
        built = build_manifest(
            root,
            Path(cfg.data.labels),
            manifest_path,
            key_file=key_file,
            seed=cfg.seed,
            subgroup_columns=cfg.data.subgroups,
            fractions=cfg.data.fractions,
            progress=progress,
        )
        forbidden = dict(built.forbidden)
    sidecar_path = manifest_path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    check_leakage(manifest, source=manifest_path.name)
    dropped: dict[str, int] = {}
    if cfg.data.modalities:
        keep = manifest["modality"].str.upper().isin([m.upper() for m in cfg.data.modalities])
        dropped["other modality"] = int((~keep).sum())
        manifest = manifest[keep]
    if cfg.task == "segmentation":
        keep = manifest["mask"].str.strip() != ""
        dropped["no mask"] = int((~keep).sum())
        manifest = manifest[keep]
    else:
        keep = manifest["label"].str.strip() != ""
        dropped["no label"] = int((~keep).sum())
        manifest = manifest[keep]
    manifest = manifest.reset_index(drop=True)
    for split in ("train", "val", "test"):
        if not (manifest["split"] == split).any():
            raise InputError(
                f"manifest {manifest_path.name} has no '{split}' rows for task {cfg.task} "
                f"(modalities {list(cfg.data.modalities) or 'all'}); add studies or adjust data.fractions"
            )
    classes = class_names(manifest["label"]) if cfg.task == "classification" else []
    if cfg.task == "classification" and len(classes) != cfg.model.num_classes:
        raise ConfigError(
            f"config key 'model.num_classes' must match the manifest's {len(classes)} classes {classes}, "
            f"not {cfg.model.num_classes}"
        )
    extra = [c for c in cfg.data.subgroups if c in manifest.columns]
    subgroups = [c for c in (*SUBGROUP_COLUMNS, *extra) if c in manifest.columns]
    return PreparedData(
        manifest=manifest,
        manifest_path=manifest_path,
        manifest_sha256=sidecar.get("manifest_sha256") or _sha256_file(manifest_path),
        sidecar=sidecar,
        root=root,
        key_file=key_file,
        classes=classes,
        subgroups=subgroups,
        dropped={k: v for k, v in dropped.items() if v},
        forbidden=forbidden,
    )


def preprocessing_for(cfg: WorkflowConfig, bundle: ModelBundle) -> Preprocessing:
    """Network-input settings that match the encoder's weight record."""
    record = bundle.weights
    return Preprocessing(
        spatial_dims=cfg.model.spatial_dims,
        image_size=tuple(cfg.data.image_size),
        spacing=tuple(cfg.data.spacing),
        intensity=cfg.data.intensity,
        ct_window=tuple(cfg.data.ct_window),  # type: ignore[arg-type]
        normalization=record.normalization,
        mean=tuple(record.mean or (0.0,)),
        std=tuple(record.std or (1.0,)),
        in_channels=cfg.model.in_channels,
        patch=cfg.model.spatial_dims == 3 and cfg.task == "segmentation",
    )


def build_model(cfg: WorkflowConfig, *, weights: str | None = None) -> ModelBundle:
    """The task model of a workflow (weights override for from-scratch arms)."""
    return create_model(
        cfg.task,
        cfg.model.encoder,
        spatial_dims=cfg.model.spatial_dims,
        in_channels=cfg.model.in_channels,
        num_classes=cfg.model.num_classes,
        weights=weights or cfg.model.weights,
        multi_label=cfg.model.multi_label,
        dropout=cfg.model.dropout,
    )


def datasets_for(cfg: WorkflowConfig, data: PreparedData, prep: Preprocessing, *, progress: bool = True,
                 train_ids: set[str] | None = None) -> dict:
    """train/val/test MONAI datasets (train optionally restricted to `train_ids`)."""
    out = {}
    for split in ("train", "val", "test"):
        items = manifest_items(data.manifest, split, cfg.task, data.classes)
        if split == "train" and train_ids is not None:
            items = [item for item in items if item["id"] in train_ids]
        out[split] = make_dataset(
            items,
            prep,
            data.root,
            key_file=data.key_file,
            train=split == "train",
            augment=cfg.data.augment,
            cache=cfg.data.cache if cfg.data.cache != "disk" else "memory",
            progress=progress,
        )
    return out


def _loss_and_metric(cfg: WorkflowConfig, class_weights: torch.Tensor | None) -> tuple[Callable, Callable, str]:
    if cfg.task == "segmentation":
        from monai.losses import DiceCELoss
        from monai.metrics import DiceMetric

        loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def dice(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
            num = outputs.shape[1]
            pred = torch.nn.functional.one_hot(outputs.argmax(1), num).movedim(-1, 1)
            ref = torch.nn.functional.one_hot(targets[:, 0].long(), num).movedim(-1, 1)
            metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
            value = metric(pred, ref).nanmean().item()
            return {"dice": float(value) if np.isfinite(value) else 0.0}

        return loss, dice, "dice"

    from sklearn.metrics import roc_auc_score

    if cfg.model.multi_label:
        bce = torch.nn.BCEWithLogitsLoss()
        return (lambda o, t: bce(o, t.float())), (lambda o, t: {"auroc": _safe_auroc(t.numpy(), torch.sigmoid(o).numpy())}), "auroc"
    ce = torch.nn.CrossEntropyLoss(weight=class_weights)

    def auroc(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        probs = torch.softmax(outputs.float(), dim=1).numpy()
        y = targets.long().numpy()
        if probs.shape[1] == 2:
            return {"auroc": _safe_auroc(y, probs[:, 1])}
        try:
            return {"auroc": float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))}
        except ValueError:
            return {"auroc": 0.5}

    return (lambda o, t: ce(o, t.long())), auroc, "auroc"


def _safe_auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    try:
        return float(roc_auc_score(y, s))
    except ValueError:  # a single class in a tiny validation split
        return 0.5


def train_config_for(cfg: WorkflowConfig, *, progress: bool, monitor: str, epochs: int | None = None) -> TrainConfig:
    """The engine's config from the workflow's `train` section."""
    t = cfg.train
    val_roi = tuple(cfg.data.image_size) if (cfg.model.spatial_dims == 3 and cfg.task == "segmentation") else None
    return TrainConfig(
        epochs=epochs or t.epochs,
        batch_size=t.batch_size,
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_epochs=float(t.warmup_epochs),
        early_stopping_patience=t.early_stopping_patience,
        monitor=monitor,
        mode="max",
        amp=t.amp,
        compile=t.compile,
        deterministic=t.deterministic,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        balance="sampler" if t.balance == "sampler" else "none",
        val_roi_size=val_roi,
        progress=progress,
        drop_last=False,
    )


def train_model(
    cfg: WorkflowConfig,
    data: PreparedData,
    *,
    output_dir: Path,
    weights: str | None = None,
    strategy: str | None = None,
    train_ids: set[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> tuple[TrainedModel, dict]:
    """Build, adapt and train the workflow's model; returns it with its datasets."""
    torch.manual_seed(cfg.seed)
    bundle = build_model(cfg, weights=weights)
    prep = preprocessing_for(cfg, bundle)
    sets = datasets_for(cfg, data, prep, progress=progress, train_ids=train_ids)
    class_weights = None
    if cfg.task == "classification" and cfg.train.balance == "loss":
        counts = np.bincount([item["label"] for item in sets["train"].data], minlength=cfg.model.num_classes)
        class_weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32)
    loss_fn, metric_fn, monitor = _loss_and_metric(cfg, class_weights)
    plan = make_transfer_plan(
        bundle.model,
        strategy or cfg.train.strategy,
        lr=cfg.train.lr,
        layer_decay=cfg.train.layer_decay or None,
        bn=cfg.train.bn,
    )
    tcfg = train_config_for(cfg, progress=progress, monitor=monitor)
    result = fit(
        bundle.model,
        sets["train"],
        sets["val"],
        loss_fn=loss_fn,
        cfg=tcfg,
        val_metric_fn=metric_fn,
        plan=plan,
        checkpoint_dir=output_dir / "checkpoints",
        resume=resume,
        manifest_sha256=data.manifest_sha256,
        on_epoch_end=on_epoch_end,
    )
    frozen = sum(p.numel() for p in bundle.model.parameters() if not p.requires_grad)
    trained = TrainedModel(
        bundle=bundle,
        prep=prep,
        fit=result,
        train_config=tcfg,
        plan_groups=[g["name"] for g in plan.param_groups],
        frozen_parameters=int(frozen),
    )
    return trained, sets


def predictions_table(cfg: WorkflowConfig, data: PreparedData, trained: TrainedModel, sets: dict, *,
                      progress: bool = True) -> pd.DataFrame:
    """predictions.csv for val and test: id, split, y_true, y_score(s), y_pred, subgroup columns."""
    frames = []
    roi = tuple(cfg.data.image_size) if trained.prep.patch else None
    activation = "sigmoid" if cfg.model.multi_label else "softmax"
    by_id = data.manifest.set_index("id")
    for split in ("val", "test"):
        outputs = predict(trained.bundle.model, sets[split], activation=activation, roi_size=roi,
                          batch_size=8 if roi is None else 1, progress=progress)
        rows = []
        for out in outputs:
            row: dict = {"id": out["id"], "split": split}
            if cfg.task == "segmentation":
                row["_pred"] = out["output"].argmax(0).numpy().astype(np.uint8)
                row["_true"] = out["label"][0].numpy().astype(np.uint8)
            else:
                probs = out["output"].numpy()
                row["y_true"] = int(out["label"])
                if len(data.classes) == 2:
                    row["y_score"] = float(probs[1])
                else:
                    row.update({f"y_score_{c}": float(p) for c, p in zip(data.classes, probs, strict=True)})
                row["y_pred"] = int(np.argmax(probs))
            rows.append(row)
        frames.append(pd.DataFrame(rows))
    table = pd.concat(frames, ignore_index=True)
    for column in data.subgroups:
        table[column] = by_id.loc[table["id"], column].to_numpy()
    return table


def patient_ids(data: PreparedData, ids: pd.Series) -> np.ndarray:
    """Patient pseudonyms for prediction rows (joined on the manifest `id`)."""
    return data.manifest.set_index("id").loc[ids, "patient"].to_numpy()


def write_outputs(output_dir: Path, predictions: pd.DataFrame, metrics: dict) -> None:
    """metrics.json and predictions.csv (no per-voxel arrays, only pseudonymous ids)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = [c for c in predictions.columns if not c.startswith("_")]
    predictions[columns].to_csv(output_dir / "predictions.csv", index=False)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))


def config_dict(cfg: WorkflowConfig) -> dict:
    """The config for logging (paths reduced to their names: absolute data paths never leave)."""
    raw = to_dict(cfg)
    for key in ("root", "labels", "manifest", "manifest_out", "key_file"):
        value = raw["data"].get(key)
        if value:
            raw["data"][key] = Path(value).name
    return raw


def timed(func: Callable, *args, **kwargs) -> tuple[object, float]:
    """Call `func` and return (result, seconds)."""
    start = time.perf_counter()
    value = func(*args, **kwargs)
    return value, time.perf_counter() - start


__all__ = [
    "PreparedData",
    "TrainedModel",
    "prepare_data",
    "build_model",
    "preprocessing_for",
    "datasets_for",
    "train_config_for",
    "train_model",
    "predictions_table",
    "patient_ids",
    "write_outputs",
    "config_dict",
]
