"""TrainConfig validation, the learning-rate schedule and AMP resolution."""

from __future__ import annotations

import math

import pytest
import torch

from medtl.engine import TrainConfig, build_optimizer, build_scheduler, lr_factor, resolve_amp
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


def test_lr_factor_warms_up_linearly_then_follows_cosine_to_min_ratio():
    kw = {"warmup_steps": 4, "total_steps": 20, "scheduler": "cosine", "min_lr_ratio": 0.1}
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kw) == pytest.approx(1.0)
    assert lr_factor(12, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(20, **kw) == pytest.approx(0.1)
    values = [lr_factor(s, **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_factor(15, **{**kw, "scheduler": "constant"}) == 1.0


def test_scheduler_scales_each_param_group_from_its_own_lr_per_step():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(epochs=2, lr=1.0, warmup_epochs=1, optimizer="sgd", momentum=0.0)
    opt = build_optimizer([{"params": [a], "lr": 0.1, "name": "enc"}, {"params": [b], "name": "head"}], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=2)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([0.05, 0.5])  # warm-up step 1 of 2
    assert seen[1] == pytest.approx([0.1, 1.0])  # peak; the group without "lr" took cfg.lr
    assert seen[3][1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_resolve_amp_keeps_cpu_in_fp32_by_default_and_refuses_fp16_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        resolve_amp("fp16", cpu)
