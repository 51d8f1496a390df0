"""Optimizer and per-step learning-rate schedule (linear warm-up, then cosine or constant)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from medtl.engine.config import TrainConfig
from medtl.errors import ConfigError


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


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, scheduler: str, min_lr_ratio: float
) -> float:
    """Multiplier of every group's base lr after `step` optimizer steps.

    Args:
        step: optimizer steps taken so far.
        warmup_steps: steps of linear warm-up (first step at 1 / warmup_steps).
        total_steps: steps of the whole run (cosine reaches `min_lr_ratio` here).
        scheduler: "cosine" or "constant".
        min_lr_ratio: final multiplier of the cosine schedule.

    Returns:
        The multiplier in (0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-step LambdaLR: linear warm-up over `cfg.warmup_epochs`, then cosine or constant.

    Args:
        optimizer: the optimizer (each group's initial lr is its peak lr).
        cfg: the training config.
        steps_per_epoch: optimizer steps per epoch on one process.

    Returns:
        The scheduler; call `step()` after every optimizer step.
    """
    factor = functools.partial(
        lr_factor,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        total_steps=cfg.epochs * steps_per_epoch,
        scheduler=cfg.scheduler,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    return LambdaLR(optimizer, factor)
