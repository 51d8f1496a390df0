"""Step 2 of a run: the model, its preprocessing, datasets, loss and the engine's training loop.

Each piece is a plain function so the transfer methods (`medtl.workflow.methods`) and the studies
(`medtl.studies`) reuse them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medtl.data.dataset import Augmentation, Preprocessing, make_dataset, manifest_items
from medtl.engine.config import FitResult, TrainConfig, TransferPlanLike
from medtl.engine.loop import fit
from medtl.engine.runtime import init_distributed, seed_everything
from medtl.engine.sampling import class_weights, passes_per_epoch
from medtl.errors import ConfigError, InputError
from medtl.models.factory import ModelBundle, create_model
from medtl.models.strategies import TransferPlan, make_transfer_plan, stage_group_name
from medtl.workflow.config import WorkflowConfig

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # prepare imports train (its preflight checks the train keys)
    from medtl.workflow.prepare import PreparedData


@dataclass
class TrainedModel:
    """A trained model with what it was built and trained with."""

    bundle: ModelBundle
    prep: Preprocessing
    fit: FitResult
    train_config: TrainConfig
    plan_groups: list[str]
    frozen_parameters: int
    # Which optimizer groups were frozen in which epochs, e.g. ["epochs 1-2: encoder.stage0, ..."].
    frozen_schedule: list[str] = field(default_factory=list)
    # The transfer strategy trained with (train.small_data_strategy may replace train.strategy).
    strategy: str = ""


def preprocessing_for(cfg: WorkflowConfig, bundle: ModelBundle) -> Preprocessing:
    """Network-input settings that match the encoder's weight record.

    Raises:
        ConfigError: If `data.image_size` is still [] (`prepare.input_size_from_data` chooses it).
    """
    if not cfg.data.image_size:
        raise ConfigError("data.image_size must be chosen before training, not left []; call "
                          "medtl.workflow.prepare.input_size_from_data(cfg, data) after prepare_data (medtl run does)")
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
        input_skip=cfg.model.input_skip,
        deep_supervision=cfg.model.deep_supervision,
    )


def training_augmentation(cfg: WorkflowConfig) -> Augmentation | None:
    """The random transforms of training the config asks for; None with `data.augment: false`."""
    return Augmentation(flip_axes=tuple(cfg.data.flip_axes)) if cfg.data.augment else None


def datasets_for(cfg: WorkflowConfig, data: PreparedData, prep: Preprocessing, *, progress: bool = True,
                 train_ids: set[str] | None = None, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """MONAI datasets of the given splits (train optionally restricted to `train_ids`)."""
    out = {}
    for split in splits:
        items = manifest_items(data.manifest, split, cfg.task, data.classes, data.sidecar.get("segment_map"))
        if split == "train" and train_ids is not None:
            items = [item for item in items if item["id"] in train_ids]
        out[split] = make_dataset(
            items,
            prep,
            data.root,
            key_file=data.key_file,
            train=split == "train",
            augment=cfg.data.augment,
            augmentation=training_augmentation(cfg),
            cache=cfg.data.cache,
            cache_dir=data.cache_dir,
            progress=progress,
        )
    return out


def loss_and_metric(cfg: WorkflowConfig, weights: torch.Tensor | None) -> tuple[Callable, Callable, str]:
    """The task's loss (classification: cross-entropy with class `weights`), validation metric function and
    the metric that picks the best epoch."""
    if cfg.task == "segmentation":
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        loss = DiceCELoss(to_onehot_y=True, softmax=True, label_smoothing=cfg.train.label_smoothing)
        # Deep supervision: the coarser heads' losses on nearest-downsampled masks, weighted 1/2, 1/4, ... (nnU-Net's).
        return (DeepSupervisionLoss(loss) if cfg.model.deep_supervision else loss), validation_dice, "dice"

    ce = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing)
    return (lambda o, t: ce(o, t.long())), class_auroc, "auroc"


def validation_dice(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Validation Dice of segmentation logits, as `medtl.evaluation.segmentation` computes test Dice.

    MONAI's `DiceMetric` on one-hot maps: per case the mean over the foreground classes present in
    the reference (an empty reference class is NaN, `ignore_empty`), then the mean over cases; NaN
    when no case holds any foreground (the engine then treats the epoch as no information).

    Args:
        outputs: (B, K, *spatial) logits.
        targets: (B, 1, *spatial) label maps.

    Returns:
        {"dice": value}.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    num_classes = outputs.shape[1]
    metric = DiceMetric(include_background=False, reduction="mean", get_not_nans=True)
    metric(one_hot(outputs.argmax(1, keepdim=True), num_classes), one_hot(targets.long(), num_classes))
    value, cases = metric.aggregate()
    return {"dice": float(value) if int(cases) > 0 else math.nan}


def class_auroc(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Validation AUROC of single-label class logits, as `medtl.evaluation.metrics` computes test AUROC.

    Two classes: the AUROC of the second class's probability; more: the macro one-vs-rest AUROC
    over the classes present. NaN where AUROC is undefined (one class in a small validation split):
    the engine then treats the epoch as no information, never as an improvement or a bad epoch.

    Args:
        outputs: (N, K) logits.
        targets: (N,) class indices.

    Returns:
        {"auroc": value}.
    """
    from medtl.evaluation.metrics import binary_metrics, multiclass_metrics

    probs = torch.softmax(outputs.float(), dim=1).numpy()
    y = targets.long().numpy()
    if probs.shape[1] < 2 or not np.isfinite(probs).all():
        return {"auroc": math.nan}
    if probs.shape[1] == 2:
        return {"auroc": binary_metrics(y, probs[:, 1], 0.5, metrics=("auroc",))["auroc"]}
    return {"auroc": multiclass_metrics(y, probs, list(range(probs.shape[1])))["auroc_macro"]}


# Keys of the workflow's `train` section that shape the transfer plan, not the engine.
TRANSFER_PLAN_KEYS = ("strategy", "layer_decay", "bn")

# Engine settings (`TrainConfig` fields) that no key of the `train` section names, and where each
# comes from. Every other engine setting is the `train` key of the same name.
ENGINE_SETTINGS_FROM_WORKFLOW: dict[str, str] = {
    "seed": "the config's seed",
    "num_workers": "data.num_workers",
    "val_roi_size": "data.image_size for 3D segmentation (patch-trained, validated by sliding windows), else none",
    "monitor": "the task's validation metric (loss_and_metric)",
    "mode": "the monitor: min for val_loss, max for every validation metric (auroc, dice, dice_auroc)",
    "progress": "the caller (the command line's --quiet)",
}

# Engine settings fixed for every workflow run: (value, why).
FIXED_ENGINE_SETTINGS: dict[str, tuple[Any, str]] = {
    "drop_last": (False, "every training sample counts in every epoch (fit_model drops a last batch of one)"),
    "val_batch_size": (None, "train.batch_size, or 1 for whole volumes validated by sliding windows"),
    "momentum": (0.9, "SGD's usual momentum (train.optimizer: sgd)"),
    "scheduler": ("cosine", "linear warm-up over train.warmup_epochs, then cosine"),
    "min_lr_ratio": (0.0, "the cosine decays to zero"),
    "min_delta": (0.0, "any improvement of the monitored metric counts"),
    "channels_last": (True, "faster convolutions on CUDA (ignored on CPU)"),
    "sync_bn": (False, "BatchNorm statistics per process under torchrun, as nnU-Net and MONAI's recipes do"),
    "find_unused_parameters": (False, "the engine re-wraps DDP whenever the strategy (un)freezes layers"),
    "grad_clip": (None, "no gradient clipping"),
    "sw_batch_size": (4, "patches per sliding-window forward pass"),
    "sw_overlap": (0.25, "overlap of neighbouring sliding-window patches"),
}

# How a `train` value becomes the engine's: 0 threads means "measure" (the engine's None).
_TO_ENGINE: dict[str, Callable[[Any], Any]] = {"num_threads": lambda n: n or None, "warmup_epochs": float}


def train_config_for(cfg: WorkflowConfig, *, progress: bool, monitor: str, epochs: int | None = None) -> TrainConfig:
    """The engine's config: the `train` keys of the engine's names, then `ENGINE_SETTINGS_FROM_WORKFLOW`
    and `FIXED_ENGINE_SETTINGS` (`epochs` overrides `train.epochs`).

    Raises:
        ConfigError: when the engine refuses a value (its message names the `train.` key).
    """
    engine_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    section = _section_values(cfg.train)
    values = {k: _TO_ENGINE.get(k, _unchanged)(v) for k, v in section.items() if k in engine_keys}
    values.update({k: value for k, (value, _) in FIXED_ENGINE_SETTINGS.items()})
    patches = cfg.model.spatial_dims == 3 and cfg.task == "segmentation"
    values.update(
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        # [] (not chosen yet, in preflight): the engine's checks need no patch size.
        val_roi_size=(tuple(cfg.data.image_size) or None) if patches else None,
        monitor=monitor,
        mode="min" if monitor == "val_loss" else "max",
        progress=progress,
    )
    if epochs:
        values["epochs"] = epochs
    return TrainConfig(**values)


def _section_values(section: Any) -> dict[str, Any]:
    """A config section's values by key (a dataclass or a pydantic model)."""
    dump = getattr(section, "model_dump", None)
    return dump() if callable(dump) else dataclasses.asdict(section)


def _unchanged(value: Any) -> Any:
    return value


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
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[TrainedModel, dict]:
    """Build, adapt and train the workflow's model; returns it with its datasets.

    `initial_state` (e.g. a registered version's weights, for continual fine-tuning) replaces the
    built model's weights before training.
    """
    seed_everything(cfg.seed)
    bundle = build_model(cfg, weights=weights)
    load_initial_state(bundle.model, initial_state)
    prep = preprocessing_for(cfg, bundle)
    sets = datasets_for(cfg, data, prep, progress=progress, train_ids=train_ids)
    loss_fn, metric_fn, monitor = loss_and_metric(cfg, loss_class_weights(cfg, sets["train"].data))
    strategy = training_strategy(cfg, bundle, len(sets["train"]), strategy)
    trained = fit_model(
        cfg, data, bundle, prep, model=bundle.model, train_set=sets["train"], val_set=sets["val"],
        loss_fn=loss_fn, metric_fn=metric_fn, monitor=monitor, plan=transfer_plan_for(cfg, bundle.model, strategy),
        output_dir=output_dir, resume=resume, progress=progress, on_epoch_end=on_epoch_end,
    )
    return trained, sets


def training_strategy(cfg: WorkflowConfig, bundle: ModelBundle, n_train: int, strategy: str | None = None) -> str:
    """The transfer strategy to train with: `strategy` (default `train.strategy`), or
    `train.small_data_strategy` when pretrained weights are fine-tuned on a training set too small for
    `train.min_steps` in `train.epochs` passes (the engine then passes over it several times an epoch).
    """
    chosen = strategy or cfg.train.strategy
    if chosen != "finetune" or bundle.weights.source == "none":
        return chosen  # another strategy was asked for, or random weights: nothing to probe
    world = init_distributed().world_size
    passes = passes_per_epoch(math.ceil(n_train / world), cfg.train.batch_size, cfg.train.epochs, cfg.train.min_steps)
    if passes > 1 and cfg.train.small_data_strategy != chosen:
        logger.info("a small training set (%d studies): train.small_data_strategy %s instead of finetune",
                    n_train, cfg.train.small_data_strategy)
        return cfg.train.small_data_strategy
    return chosen


def load_initial_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None) -> None:
    """Load starting weights into a freshly built model (every key must match).

    A multi-task model may start from a plain segmenter's weights: only its class head is then new.

    Raises:
        InputError: when the weights do not fit the model built from the config.
    """
    if state is None:
        return
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not (k.startswith("cls_head.") and hasattr(model, "cls_head"))]
    if missing or result.unexpected_keys:
        raise InputError(
            f"the starting weights must fit the model of this workflow, not miss {len(missing)} and add "
            f"{len(result.unexpected_keys)} tensors (e.g. {(missing or result.unexpected_keys)[0]}); use a version "
            f"trained with the same model.encoder, task and num_classes"
        )


def loss_class_weights(cfg: WorkflowConfig, items: list[dict]) -> torch.Tensor | None:
    """Balanced class weights of the training items for `train.balance: loss` (else None).

    The engine's `class_weights` (scikit-learn's "balanced", N / (C x n_c)); unlabelled items
    (label -1, e.g. DANN's target studies) do not count.

    Raises:
        InputError: when a class has no labelled training item.
    """
    if cfg.task != "classification" or cfg.train.balance != "loss":
        return None
    labels = torch.as_tensor([item["label"] for item in items if item["label"] >= 0], dtype=torch.long)
    return class_weights(labels, cfg.model.num_classes)


def transfer_plan_for(cfg: WorkflowConfig, model: torch.nn.Module, strategy: str | None = None) -> TransferPlan:
    """The transfer strategy's plan for `model` (the workflow's `train.strategy` unless given)."""
    return make_transfer_plan(model, strategy or cfg.train.strategy, lr=cfg.train.lr,
                              layer_decay=cfg.train.layer_decay or None, bn=cfg.train.bn)


def fit_model(
    cfg: WorkflowConfig,
    data: PreparedData,
    bundle: ModelBundle,
    prep: Preprocessing,
    *,
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    loss_fn: Callable,
    metric_fn: Callable,
    monitor: str,
    plan: TransferPlanLike,
    output_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> TrainedModel:
    """Run the engine on prepared pieces (the model may wrap `bundle.model`, e.g. for DANN).

    Returns:
        The trained model; `bundle.model` holds the best epoch's weights.
    """
    tcfg = train_config_for(cfg, progress=progress, monitor=monitor)
    if len(train_set) % tcfg.batch_size == 1:  # type: ignore[arg-type]
        # A last batch of one sample fails in BatchNorm layers whose input is 1 x 1 (train mode
        # needs two values per channel), as in small 3D patches: drop that one sample per epoch.
        tcfg = dataclasses.replace(tcfg, drop_last=True)
    result = fit(
        model,
        train_set,
        val_set,
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
    return TrainedModel(
        bundle=bundle,
        prep=prep,
        fit=result,
        train_config=tcfg,
        plan_groups=[g["name"] for g in plan.param_groups],
        frozen_parameters=int(frozen),
        frozen_schedule=frozen_schedule(plan, result.epochs_run),
        strategy=getattr(getattr(plan, "base", plan), "strategy", cfg.train.strategy),  # DANN wraps the plan
    )


def frozen_schedule(plan: TransferPlanLike, epochs: int) -> list[str]:
    """The groups a plan kept frozen, as runs of epochs (1-based), e.g. "epochs 1-3: encoder.stage0".

    Epochs in which every group trains are left out; an empty list means nothing was ever frozen.
    """
    base = getattr(plan, "base", plan)  # DANN wraps the strategy's plan
    if not isinstance(base, TransferPlan):
        return []
    # Every encoder stage, not only the optimizer's groups: a linear probe's encoder has no group.
    names = ["head", *(stage_group_name(i) for i in range(base.num_stages))]
    spans: list[tuple[int, int, tuple[str, ...]]] = []
    for epoch in range(epochs):
        trainable = set(base.trainable_groups(epoch))
        frozen = tuple(n for n in names if n not in trainable)
        if spans and spans[-1][2] == frozen:
            spans[-1] = (spans[-1][0], epoch, frozen)
        else:
            spans.append((epoch, epoch, frozen))
    return [(f"epoch {a + 1}" if a == b else f"epochs {a + 1}-{b + 1}") + ": " + ", ".join(frozen)
            for a, b, frozen in spans if frozen]


def timed(func: Callable, *args, **kwargs) -> tuple[object, float]:
    """Call `func` and return (result, seconds)."""
    start = time.perf_counter()
    value = func(*args, **kwargs)
    return value, time.perf_counter() - start
