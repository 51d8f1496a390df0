"""Optimizer and per-update learning-rate schedule (timm: linear warm-up, then cosine or constant)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from medtl.engine.config import TrainConfig
from medtl.errors import ConfigError

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with decay, biases and norm parameters (1-D) without.

    Same rule as timm's `param_groups_weight_decay`; written here because importing `timm.optim`
    costs seconds in every worker process.

    Args:
        model: the model; parameters with requires_grad=False are left out.
        weight_decay: decay of the first group.

    Returns:
        Optimizer parameter groups named "decay" and "no_decay".
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "name": "decay", "weight_decay": weight_decay},
        {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the given groups; a group's own "lr"/"weight_decay" win over `cfg`.

    Args:
        param_groups: torch optimizer groups (e.g. `TransferPlan.param_groups`).
        cfg: the training config.

    Returns:
        The optimizer.

    Raises:
        ConfigError: when the groups hold no parameter.
    """
    groups = [dict(group, params=list(group["params"])) for group in param_groups]
    if not any(group["params"] for group in groups):
        raise ConfigError(
            "the transfer plan's param_groups must hold parameters, not be empty; check the strategy"
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Scheduler:
    """timm's per-update schedule: linear warm-up over `cfg.warmup_epochs`, then cosine or constant.

    timm schedules one multiplier (1 at the peak, `cfg.min_lr_ratio` at the end of the cosine) and
    scales it per group by the group's `lr_scale`, set here to the group's own learning rate, so
    every group keeps its ratio to the others through warm-up and decay (a transfer plan's
    layer-wise rates). Warm-up starts at 1/W of the peak (W = warm-up updates) and reaches it at
    update W; the cosine then runs over the remaining updates of `cfg.epochs`.

    Args:
        optimizer: the optimizer (each group's current lr is its peak lr).
        cfg: the training config.
        steps_per_epoch: optimizer steps per epoch on one process.

    Returns:
        The scheduler; after the n-th optimizer update of the run (n from 1, counted across
        epochs and resumes) call `scheduler.step_update(n)`.

    Example:
        >>> scheduler = build_scheduler(optimizer, TrainConfig(epochs=10, warmup_epochs=1), steps_per_epoch=50)
        >>> scheduler.step_update(1)  # after the first update
    """
    from timm.scheduler import CosineLRScheduler, StepLRScheduler  # seconds-long import of timm

    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    for group in optimizer.param_groups:
        group["lr_scale"] = group["lr"]
        group["initial_lr"] = 1.0  # the multiplier's peak (timm's base value)
    common = {
        "warmup_t": warmup,
        "warmup_lr_init": 1.0 / warmup if warmup else 0.0,
        "warmup_prefix": True,  # the cosine starts after the warm-up, not under it
        "t_in_epochs": False,
    }
    if cfg.scheduler == "constant":
        return StepLRScheduler(optimizer, decay_t=max(1, total), decay_rate=1.0, **common)
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # it warns about a one-update cosine: only a short run, nothing to fix
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr_ratio, **common)
    finally:
        timm_log.setLevel(level)
