"""The encoder contract and the task models, over every registered encoder x {2D, 3D} x task."""

from __future__ import annotations

import copy

import pytest
import torch

from medtl.models import ModelBundle, create_model, get_encoder_spec, list_encoders, make_transfer_plan
from medtl.vocabulary import TASKS

# Deep 3D networks take seconds to build and step on one CPU thread.
HEAVY = {("medicalnet_resnet101", 3), ("medicalnet_resnet152", 3), ("medicalnet_resnet200", 3),
         ("resnet50", 3), ("densenet121", 3)}


def _cases(tasks: tuple[str, ...]) -> list:
    cases = []
    for name in list_encoders():
        for dims in get_encoder_spec(name).spatial_dims:
            marks = [pytest.mark.slow] if (name, dims) in HEAVY else []
            cases += [pytest.param((name, dims, task), marks=marks, id=f"{name}-{dims}d-{task}") for task in tasks]
    return cases


def _input(name: str, dims: int) -> torch.Tensor:
    """Batch of 2, sizes divisible by the encoder's total reduction (32; MedicalNet 8)."""
    if dims == 2:
        size = (64, 32)
    else:
        size = (16, 24, 16) if name.startswith("medicalnet") else (32, 32, 32)
    return torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=_cases(TASKS))
def built(request) -> tuple[str, int, str, ModelBundle]:
    """One scratch model per (encoder, dims, task); pytest groups the tests by it, so each is built once."""
    name, dims, task = request.param
    torch.manual_seed(0)
    return name, dims, task, create_model(task, name, spatial_dims=dims, in_channels=1, num_classes=3, weights="none")


def _fresh(bundle: ModelBundle) -> torch.nn.Module:
    return copy.deepcopy(bundle.model)


def _loss(model: torch.nn.Module, task: str, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if task == "classification":
        return torch.nn.functional.cross_entropy(out, torch.tensor([0, 2]))
    return torch.nn.functional.cross_entropy(out, torch.zeros(out.shape[:1] + out.shape[2:], dtype=torch.long))


def _encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def test_encoder_pyramid_has_declared_channels_and_reductions(built):
    name, dims, _, bundle = built
    model = _fresh(bundle).eval()
    encoder = model.encoder
    x = _input(name, dims)
    with torch.no_grad():
        pyramid = encoder.forward_pyramid(x)
        deepest = encoder.forward_features(x)
    assert len(pyramid) == len(encoder.feature_channels) == len(encoder.feature_reductions)
    in_weight_order = x.shape[2:][::-1]
    for feature, channels, reduction in zip(pyramid, encoder.feature_channels, encoder.feature_reductions, strict=True):
        assert feature.shape[:2] == (2, channels)
        assert tuple(feature.shape[2:]) == tuple(s // reduction for s in in_weight_order)
    assert deepest.shape == pyramid[-1].shape and deepest.shape[1] == encoder.num_features
    assert encoder.spatial_dims == dims and encoder.in_channels == 1


@pytest.mark.parametrize("case", _cases(("classification",)))
def test_reset_classifier_changes_the_number_of_logits(case):
    name, dims, _ = case
    model = create_model("classification", name, spatial_dims=dims, in_channels=1, num_classes=3, weights="none").model
    model.eval()
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(_input(name, dims)).shape == (2, 5)
    assert model.num_classes == 5


def test_output_shape_and_one_finetune_step_changes_the_encoder(built):
    name, dims, task, bundle = built
    model = _fresh(bundle).train()
    x = _input(name, dims)
    plan = make_transfer_plan(model, "finetune", lr=0.1)
    plan.on_epoch_start(model, 0)
    before = _encoder_state(model)
    optimizer = torch.optim.SGD(plan.param_groups, lr=0.1)
    out = model(x)
    expected = (2, 3) if task == "classification" else (2, 3, *x.shape[2:])
    assert out.shape == expected
    loss = _loss(model, task, x)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = model.encoder.state_dict()
    assert not torch.equal(before[f"net.{_first_conv(model)}.weight"], after[f"net.{_first_conv(model)}.weight"])


def _first_conv(model: torch.nn.Module) -> str:
    return model.encoder.first_conv


def test_linear_probe_leaves_encoder_weights_and_statistics_unchanged(built):
    name, dims, task, bundle = built
    model = _fresh(bundle)
    x = _input(name, dims)
    plan = make_transfer_plan(model, "linear_probe", lr=0.1)
    assert [g["name"] for g in plan.param_groups] == ["head"]
    before = _encoder_state(model)
    head_before = [p.clone() for p in plan.param_groups[0]["params"]]
    optimizer = torch.optim.AdamW(plan.param_groups, lr=0.1)
    model.train()
    plan.on_epoch_start(model, 0)
    _loss(model, task, x).backward()
    optimizer.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "encoder changed under linear_probe"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, plan.param_groups[0]["params"], strict=True))


def test_gradual_unfreeze_opens_head_then_stages_from_deepest_to_stem(built):
    _, _, _, bundle = built
    model = _fresh(bundle)
    plan = make_transfer_plan(model, "gradual_unfreeze", lr=1e-3, unfreeze_every=2)
    stages = model.encoder.stage_modules()
    count = len(stages)
    assert {g["name"] for g in plan.param_groups} == {"head"} | {f"encoder.stage{i}" for i in range(count)}
    for epoch in range(2 * count + 2):
        model.train()
        plan.on_epoch_start(model, epoch)
        open_stages = [i for i, mods in enumerate(stages) if all(p.requires_grad for m in mods for p in m.parameters())]
        closed = [i for i, mods in enumerate(stages) if not any(p.requires_grad for m in mods for p in m.parameters())]
        expected_open = list(range(count - min(epoch // 2, count), count))
        assert open_stages == expected_open, f"epoch {epoch}"
        assert sorted(open_stages + closed) == list(range(count))
        head = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
        assert head and all(p.requires_grad for p in head)
        frozen_bn = [m for i in closed for mod in stages[i] for m in mod.modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert all(not m.training for m in frozen_bn)
