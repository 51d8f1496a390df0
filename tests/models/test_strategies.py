"""Transfer strategies: optimizer groups, learning rates, LP-FT switch, BatchNorm handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.errors import ConfigError
from medtl.models import create_model, make_transfer_plan
from medtl.vocabulary import STRATEGIES


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("classification", "resnet18", in_channels=1, num_classes=2, weights="none").model


def _all_params(groups) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "linear_probe"])
def test_every_parameter_is_in_exactly_one_named_group_from_the_start(model, strategy):
    plan = make_transfer_plan(model, strategy, lr=1e-3)
    params = _all_params(plan.param_groups)
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert all({"params", "lr", "name"} <= set(g) for g in plan.param_groups)
    torch.optim.AdamW(plan.param_groups)  # the engine can build its optimizer from them


def test_layer_decay_gives_deeper_stages_larger_learning_rates(model):
    plan = make_transfer_plan(model, "finetune", lr=1.0, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in plan.param_groups}
    assert lrs == {"head": 1.0, "encoder.stage4": 0.5, "encoder.stage3": 0.25, "encoder.stage2": 0.125,
                   "encoder.stage1": 0.0625, "encoder.stage0": 0.03125}


def test_discriminative_strategy_decays_by_default_and_finetune_does_not(model):
    discriminative = {g["name"]: g["lr"] for g in make_transfer_plan(model, "discriminative", lr=1.0).param_groups}
    finetune = {g["name"]: g["lr"] for g in make_transfer_plan(model, "finetune", lr=1.0).param_groups}
    assert discriminative["encoder.stage0"] < discriminative["encoder.stage4"] < discriminative["head"] == 1.0
    assert set(finetune.values()) == {1.0}


def _trainable_encoder(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.encoder.parameters())


def test_lp_ft_probes_for_probe_epochs_then_trains_everything(model):
    plan = make_transfer_plan(model, "lp_ft", lr=1e-3, probe_epochs=2)
    seen = []
    for epoch in range(4):
        model.train()
        plan.on_epoch_start(model, epoch)
        seen.append(_trainable_encoder(model))
        assert all(p.requires_grad for p in model.head.parameters())
    assert seen == [False, False, True, True]
    assert plan.trainable_groups(1) == ("head",)


def test_bn_freeze_keeps_running_statistics_while_the_encoder_trains(model):
    plan = make_transfer_plan(model, "finetune", lr=1e-3, bn="freeze")
    model.train()
    plan.on_epoch_start(model, 0)
    stats = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    model(torch.randn(2, 1, 32, 32) * 3 + 1)
    after = model.encoder.state_dict()
    assert all(torch.equal(stats[k], after[k]) for k in stats)
    assert _trainable_encoder(model)


def test_bn_adapt_updates_running_statistics_of_trainable_stages(model):
    plan = make_transfer_plan(model, "finetune", lr=1e-3, bn="adapt")
    model.train()
    plan.on_epoch_start(model, 0)
    before = model.encoder.net.bn1.running_mean.clone()
    model(torch.randn(2, 1, 32, 32) * 3 + 1)
    assert not torch.equal(before, model.encoder.net.bn1.running_mean)


def test_plan_hook_reaches_the_model_inside_a_ddp_like_wrapper(model):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    plan = make_transfer_plan(Wrapper(model), "linear_probe", lr=1e-3)
    plan.on_epoch_start(Wrapper(model), 0)
    assert not _trainable_encoder(model)


def test_segmentation_head_group_holds_decoder_and_head():
    bundle = create_model("segmentation", "resnet18", in_channels=1, num_classes=2, weights="none")
    plan = make_transfer_plan(bundle.model, "linear_probe", lr=1e-3)
    head_ids = {id(p) for p in plan.param_groups[0]["params"]}
    expected = [*bundle.model.decoder.parameters(), *bundle.model.head.parameters()]
    assert head_ids == {id(p) for p in expected}


def test_unknown_strategy_names_the_close_one(model):
    with pytest.raises(ConfigError, match="did you mean 'lp_ft'"):
        make_transfer_plan(model, "lpft", lr=1e-3)


@pytest.mark.parametrize(("kwargs", "key"), [({"lr": 0}, "lr"), ({"lr": 1e-3, "layer_decay": 1.5}, "layer_decay"),
                                            ({"lr": 1e-3, "bn": "frozen"}, "bn"),
                                            ({"lr": 1e-3, "unfreeze_every": 0}, "unfreeze_every")])
def test_invalid_plan_values_are_config_errors_naming_the_key(model, kwargs, key):
    with pytest.raises(ConfigError, match=f"transfer.{key} must"):
        make_transfer_plan(model, "gradual_unfreeze", **kwargs)


def test_frozen_schedule_names_the_groups_each_strategy_keeps_frozen_by_epoch(model):
    from medtl.workflow.train import frozen_schedule

    assert frozen_schedule(make_transfer_plan(model, "finetune", lr=1e-3), 3) == []
    plan = make_transfer_plan(model, "gradual_unfreeze", lr=1e-3)
    stages = [g["name"] for g in plan.param_groups if g["name"] != "head"]
    # A probe's frozen encoder has no optimizer group, yet every stage is reported frozen.
    probe = frozen_schedule(make_transfer_plan(model, "linear_probe", lr=1e-3), 2)
    assert probe == ["epochs 1-2: " + ", ".join(sorted(stages))]
    schedule = frozen_schedule(plan, plan.unfreeze_every * len(stages) + 1)
    assert schedule[0] == ("epoch 1" if plan.unfreeze_every == 1 else f"epochs 1-{plan.unfreeze_every}") + \
        ": " + ", ".join(stages)
    assert len(schedule) == len(stages)  # one span per unfreezing step, none once all train
    assert stages[-1] not in schedule[1]  # the deepest stage unfreezes first
