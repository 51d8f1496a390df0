"""What the training engine is told (`TrainConfig`), what it hands back (`FitResult`), and the
shape of the transfer plan it consumes (`TransferPlanLike`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from medtl.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
BALANCE_MODES = ("none", "sampler", "loss")
MONITOR_MODES = ("max", "min")


@runtime_checkable
class TransferPlanLike(Protocol):
    """What the engine needs from `medtl.models`' `TransferPlan` (kept structural so the engine
    does not depend on when or how the plan class is written).

    Attributes:
        param_groups: torch optimizer groups; every parameter that is trainable at some epoch is
            in a group from the start; each group has "params", "name" and usually "lr".
    """

    param_groups: list[dict[str, Any]]

    def on_epoch_start(self, model: torch.nn.Module, epoch: int) -> None:
        """Called right after `model.train()` at the start of every (0-based) epoch."""
        ...


def _choice(key: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        raise ConfigError(f"train.{key} must be one of {list(options)}, not {value!r}; pick one of those")


def _positive(key: str, value: Any, *, allow_zero: bool = False, integer: bool = True) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok or (not integer and not math.isfinite(value)):
        what = ("a non-negative " if allow_zero else "a positive ") + ("integer" if integer else "number")
        raise ConfigError(f"train.{key} must be {what}, not {value!r}; fix it in the training config")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and runtime switches of one training run (validated on creation).

    Epochs are counted from 0 everywhere in the engine (history, callbacks, `on_epoch_start`).

    Attributes:
        epochs: maximum number of epochs.
        batch_size: samples per optimizer step *per process* (global batch = this x world size).
        val_batch_size: validation batch size; None = `batch_size` (1 when `val_roi_size` is set).
        optimizer: "adamw" or "sgd".
        lr: learning rate of parameter groups that do not set their own "lr".
        weight_decay: default weight decay (groups may override it).
        momentum: SGD momentum (ignored by AdamW).
        warmup_epochs: linear warm-up length in epochs (fractions allowed), stepped per batch.
        min_steps: the run's smallest number of optimizer steps: when `epochs` passes over the
            training set make fewer, every epoch goes over it several times (the same number
            each epoch, so warm-up, patience and the schedule keep their meaning); 0 = off.
        scheduler: "cosine" (decay to `min_lr_ratio` x lr after warm-up) or "constant".
        min_lr_ratio: final learning rate of the cosine schedule as a fraction of each group's lr.
        early_stopping_patience: stop after this many epochs without improvement; None = never.
        min_delta: smallest change of the monitored value that counts as an improvement.
        monitor: validation metric that picks the best epoch ("val_loss" or a key returned by
            `val_metric_fn`).
        mode: "max" or "min": whether a larger or smaller `monitor` is better.
        amp: "auto" (bf16 on GPUs that support it, else fp16; off on CPU), "bf16", "fp16" (CUDA
            only; uses a GradScaler) or "off".
        channels_last: use channels-last memory format on CUDA (ignored on CPU, where it rarely helps).
        compile: wrap the training module in `torch.compile`.
        sync_bn: convert BatchNorm to SyncBatchNorm when training on several GPUs.
        find_unused_parameters: passed to DistributedDataParallel (models with unused branches).
        deterministic: deterministic algorithms and cuDNN; needed for bit-exact resume.
        seed: base seed (the process rank is added, the epoch seeds shuffling).
        num_workers: DataLoader worker processes per process.
        num_threads: CPU intra-op threads; None = OMP_NUM_THREADS when set, else measured by
            `runtime.pick_cpu_threads` (at the start of every epoch, or once per run when
            `deterministic`, since float reductions depend on the thread count; a resumed
            deterministic run reuses the count of the run it resumes).
        balance: "none", "sampler" (WeightedRandomSampler from label counts) or "loss" (the
            caller builds its loss with `class_weights(train_ds)`; the engine samples plainly).
        grad_clip: clip the global gradient norm to this value; None = no clipping.
        ema_decay: keep an exponential moving average of the weights (timm `ModelEmaV3`, with its
            warm-up, so the decay grows from 0 towards this value over the first updates) and
            validate, select and return the averaged weights; 0 = off.
        drop_last: drop the last incomplete training batch (when at least one full batch exists).
        val_roi_size: patch size for sliding-window validation of volumes larger than the patch.
        sw_batch_size: patches per forward pass in sliding-window inference.
        sw_overlap: overlap of neighbouring sliding-window patches (0 <= overlap < 1).
        progress: show tqdm progress bars (rank 0 only).
    """

    epochs: int = 20
    batch_size: int = 32
    val_batch_size: int | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_steps: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    early_stopping_patience: int | None = 10
    min_delta: float = 0.0
    monitor: str = "val_loss"
    mode: str = "min"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    find_unused_parameters: bool = False
    deterministic: bool = False
    seed: int = 0
    num_workers: int = 2
    num_threads: int | None = None
    balance: str = "none"
    grad_clip: float | None = None
    ema_decay: float = 0.0
    drop_last: bool = True
    val_roi_size: tuple[int, ...] | None = None
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    progress: bool = True

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        if self.val_batch_size is not None:
            _positive("val_batch_size", self.val_batch_size)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("lr", self.lr, integer=False)
        _positive("weight_decay", self.weight_decay, allow_zero=True, integer=False)
        _positive("momentum", self.momentum, allow_zero=True, integer=False)
        _positive("warmup_epochs", self.warmup_epochs, allow_zero=True, integer=False)
        _positive("min_steps", self.min_steps, allow_zero=True)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _positive("min_lr_ratio", self.min_lr_ratio, allow_zero=True, integer=False)
        if self.min_lr_ratio > 1:
            raise ConfigError(f"train.min_lr_ratio must be <= 1, not {self.min_lr_ratio!r}; use e.g. 0.01")
        if self.early_stopping_patience is not None:
            _positive("early_stopping_patience", self.early_stopping_patience)
        _positive("min_delta", self.min_delta, allow_zero=True, integer=False)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ConfigError(f"train.monitor must be a metric name, not {self.monitor!r}; e.g. 'val_loss'")
        _choice("mode", self.mode, MONITOR_MODES)
        _choice("amp", self.amp, AMP_MODES)
        _positive("seed", self.seed, allow_zero=True)
        _positive("num_workers", self.num_workers, allow_zero=True)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        _choice("balance", self.balance, BALANCE_MODES)
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip, integer=False)
        if not isinstance(self.ema_decay, int | float) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), not {self.ema_decay!r}; e.g. 0.999, or 0 for off")
        if self.val_roi_size is not None:
            roi = tuple(self.val_roi_size) if isinstance(self.val_roi_size, Sequence) else None
            if roi is None or len(roi) not in (2, 3):
                raise ConfigError(
                    f"train.val_roi_size must be 2 or 3 patch sizes, not {self.val_roi_size!r}; e.g. [96, 96, 96]"
                )
            for size in roi:
                _positive("val_roi_size", size)
            object.__setattr__(self, "val_roi_size", roi)  # YAML gives lists; keep the frozen value hashable
        _positive("sw_batch_size", self.sw_batch_size)
        if not isinstance(self.sw_overlap, int | float) or not 0 <= self.sw_overlap < 1:
            raise ConfigError(f"train.sw_overlap must be in [0, 1), not {self.sw_overlap!r}; e.g. 0.25")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from a plain mapping (e.g. the `train:` block of a YAML file).

        Raises:
            ConfigError: on unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"train keys must be among {sorted(known)}, not {unknown}; remove or rename them"
            )
        return cls(**values)


@dataclass(frozen=True)
class FitResult:
    """What `fit` hands back; the model passed to `fit` holds the best epoch's weights.

    Attributes:
        history: one record per epoch run (0-based "epoch", "train_loss", "val_loss", the
            validation metrics, "lr" (first group; "lr_<name>" per group when there are several),
            "epoch_seconds", "train_seconds", "samples_per_s", "num_threads" (CPU intra-op threads).
        best_epoch: epoch whose weights were kept.
        best_metric: value of `monitor` at `best_epoch`.
        monitor: name of the monitored metric.
        epochs_run: number of epochs completed (across resumes).
        stopped_early: whether early stopping ended the run.
        total_train_seconds: wall time of all epochs (training + validation), across resumes.
        time_to_best_seconds: wall time until the end of `best_epoch`.
        best_checkpoint: file with the best weights, or None without a checkpoint folder.
        passes_per_epoch: times each epoch went over the training set (above 1 when
            `min_steps` asked for more steps than `epochs` passes make).
    """

    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    monitor: str
    epochs_run: int
    stopped_early: bool
    total_train_seconds: float
    time_to_best_seconds: float
    best_checkpoint: Path | None = field(default=None)
    passes_per_epoch: int = 1
