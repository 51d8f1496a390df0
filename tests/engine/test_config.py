"""TrainConfig validation, the learning-rate schedule (timm's) and AMP resolution."""

from __future__ import annotations

import math

import pytest
import torch

from medtl.engine import TrainConfig, build_optimizer, build_scheduler, resolve_amp
from medtl.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("batch_size", -2),
        ("optimizer", "adam"),
        ("lr", 0.0),
        ("amp", "fp8"),
        ("mode", "up"),
        ("balance", "oversample"),
        ("val_roi_size", (8,)),
        ("sw_overlap", 1.0),
        ("early_stopping_patience", 0),
        ("scheduler", "step"),
        ("grad_clip", -1.0),
        ("epochs", True),
    ],
)
def test_invalid_config_value_raises_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key} must be"):
        TrainConfig(**{key: value})


def test_from_dict_rejects_unknown_keys_and_turns_roi_lists_into_tuples():
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    cfg = TrainConfig.from_dict({"val_roi_size": [16, 16, 8], "epochs": 3})
    assert cfg.val_roi_size == (16, 16, 8) and cfg.epochs == 3
    hash(cfg)  # frozen and hashable after list -> tuple


def _learning_rates(cfg: TrainConfig, steps_per_epoch: int, groups: list[dict]) -> list[list[float]]:
    """Each group's lr at every optimizer update of a run, stepped as the engine steps it."""
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    seen = []
    for update in range(cfg.epochs * steps_per_epoch):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step_update(update + 1)
    return seen


def _one_group() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "all"}]


def test_schedule_warms_up_linearly_from_a_wth_of_the_peak_then_follows_cosine_to_min_ratio():
    # 4 updates an epoch: warm-up W = 4 updates, 20 in all, so the cosine spans 16 updates.
    cfg = TrainConfig(epochs=5, lr=1.0, warmup_epochs=1, min_lr_ratio=0.1, optimizer="sgd", momentum=0.0)
    lrs = [group[0] for group in _learning_rates(cfg, 4, _one_group())]
    assert lrs[:5] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0])  # 1/W + t (1 - 1/W) / W, peak at W
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16)) for t in range(4, 20)]
    assert lrs[4:] == pytest.approx(cosine, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_constant_schedule_holds_the_peak_after_warm_up():
    cfg = TrainConfig(epochs=3, lr=0.5, warmup_epochs=0.5, scheduler="constant", optimizer="sgd", momentum=0.0)
    lrs = [group[0] for group in _learning_rates(cfg, 4, _one_group())]
    assert lrs[:2] == pytest.approx([0.25, 0.375])
    assert lrs[2:] == [0.5] * 10


def test_scheduler_scales_each_param_group_from_its_own_lr_per_step():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(epochs=3, lr=1.0, warmup_epochs=1, min_lr_ratio=0.2, optimizer="sgd", momentum=0.0)
    seen = _learning_rates(cfg, 2, [{"params": [a], "lr": 0.1, "name": "enc"}, {"params": [b], "name": "head"}])
    assert seen[0] == pytest.approx([0.05, 0.5])  # warm-up update 1 of 2; the group without "lr" took cfg.lr
    assert seen[2] == pytest.approx([0.1, 1.0])  # peak
    assert seen[4][1] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(enc / head == pytest.approx(0.1) for enc, head in seen)  # warm-up, decay and floor alike


def test_resolve_amp_keeps_cpu_in_fp32_by_default_and_refuses_fp16_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        resolve_amp("fp16", cpu)
