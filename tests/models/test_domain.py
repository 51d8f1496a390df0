"""Domain adaptation: AdaBN statistics, gradient reversal, the DANN model, loss, plan and data."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medtl.engine import TrainConfig, fit, predict
from medtl.errors import ConfigError, InputError
from medtl.models import Classifier, Encoder, create_model, make_transfer_plan
from medtl.models.domain import (
    DANNModel,
    DANNPlan,
    DomainLabelDataset,
    adapt_batchnorm,
    dann_lambda,
    dann_loss,
    domain_labels,
    grad_reverse,
)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """`fit` switches process-wide determinism settings: put them back for the other tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def tiny_classifier(num_classes: int = 2, seed: int = 0) -> Classifier:
    """Two conv+BN stages: small enough for exact checks, a real medtl Encoder all the same."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    encoder = Encoder(net, [["0", "1", "2"], ["3", "4", "5"]], [8, 16], [1, 2], spatial_dims=2, in_channels=1,
                      first_conv="0")
    return Classifier(encoder, num_classes, dropout=0.5)


class _WithExtraBuffer(nn.Module):
    """Dropout -> BN on the input, a BN kept in eval mode, and a non-BN buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn_in = nn.BatchNorm2d(3, momentum=0.3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_frozen = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_frozen(self.conv(self.bn_in(self.drop(x)))) * self.scale[None, :, None, None]


def _target_images(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(n, 3, 8, 8, generator=g) + torch.tensor([0.0, 1.0, -1.0])[None, :, None, None]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adabn_changes_only_bn_running_statistics_and_restores_modes():
    model = _WithExtraBuffer()
    model.train()
    model.bn_frozen.eval()  # as a frozen-BN strategy leaves it
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}

    count = adapt_batchnorm(model, _target_images(), batch_size=4, progress=False)

    assert count == 2
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]), name
    assert torch.equal(model.scale, before["scale"])  # the non-BN buffer
    for layer in ("bn_in", "bn_frozen"):
        for stat in ("running_mean", "running_var"):
            assert not torch.equal(getattr(getattr(model, layer), stat), before[f"{layer}.{stat}"]), (layer, stat)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.bn_in.momentum == 0.3 and model.bn_frozen.momentum == 0.1


def test_adabn_sets_running_statistics_to_the_target_statistics_with_dropout_off():
    model = _WithExtraBuffer()
    images = _target_images(n=16)

    adapt_batchnorm(model, images, batch_size=16, progress=False)  # one batch: exact unbiased variance
    torch.testing.assert_close(model.bn_in.running_mean, images.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.bn_in.running_var, images.var(dim=(0, 2, 3), unbiased=True))

    adapt_batchnorm(model, images, batch_size=4, progress=False)  # equal batches: mean of batch means
    torch.testing.assert_close(model.bn_in.running_mean, images.mean(dim=(0, 2, 3)))
    per_batch = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in images.split(4)]).mean(0)
    torch.testing.assert_close(model.bn_in.running_var, per_batch)


def test_adabn_on_a_registered_encoder_reads_dict_batches_and_keeps_every_weight():
    model = create_model("classification", "efficientnet_lite0", weights="none").model
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    before = _snapshot(model)
    g = torch.Generator().manual_seed(0)
    items = [{"image": 0.5 + torch.rand(1, 32, 32, generator=g), "label": 0, "id": f"r{i}"} for i in range(8)]

    count = adapt_batchnorm(model, DataLoader(items, batch_size=4), progress=False)

    assert count == len(bn_names) > 10
    after = model.state_dict()
    for key, value in after.items():
        is_stat = key.rsplit(".", 1)[0] in bn_names and key.rsplit(".", 1)[1] in ("running_mean", "running_var")
        if is_stat:
            assert not torch.equal(value, before[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, before[key]), key


def test_adabn_rejects_empty_target_data_without_touching_statistics():
    model = _WithExtraBuffer()
    before = _snapshot(model)
    with pytest.raises(InputError, match="at least one target-domain image"):
        adapt_batchnorm(model, torch.empty(0, 3, 8, 8), progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * weights)


def test_dann_lambda_follows_ganins_schedule():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(0.5, gamma=4.0) == pytest.approx(2 / (1 + math.exp(-2)) - 1)
    values = [dann_lambda(p / 10) for p in range(11)]
    assert values == sorted(values) and dann_lambda(2.0) == dann_lambda(1.0)


def test_dann_model_returns_domain_logits_in_train_mode_only():
    model = DANNModel(tiny_classifier(num_classes=3), num_domains=2)
    x = torch.randn(4, 1, 16, 16)
    assert model.train()(x).shape == (4, 5)
    assert model.eval()(x).shape == (4, 3)
    classifier = tiny_classifier(num_classes=3)
    classifier.load_state_dict(model.classifier_state_dict())  # strict: exactly a Classifier's keys
    torch.testing.assert_close(classifier.eval()(x), model(x))


def test_dann_reverses_the_domain_gradient_that_reaches_the_encoder():
    model = DANNModel(tiny_classifier(), lambda_=0.7).eval()  # eval: no dropout, same BN both passes
    x, domains = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 0, 1, 1, 0])
    stem = model.encoder.net[0].weight

    _, domain_logits = model.forward_with_domain(x)
    torch.nn.functional.cross_entropy(domain_logits, domains).backward()
    reversed_grad, head_grad = stem.grad.clone(), model.domain_head[0].weight.grad.clone()
    model.zero_grad()
    pooled = model.encoder.forward_features(x).flatten(2).mean(-1)
    torch.nn.functional.cross_entropy(model.domain_head(pooled), domains).backward()

    torch.testing.assert_close(reversed_grad, -0.7 * stem.grad)
    torch.testing.assert_close(head_grad, model.domain_head[0].weight.grad)  # the domain head learns normally


def test_dann_loss_ignores_unlabelled_rows_and_adds_the_weighted_domain_term():
    loss = dann_loss(num_classes=2, domain_weight=0.5)
    outputs = torch.randn(4, 4)
    labels = torch.tensor([[1, 0], [-1, 1], [0, 0], [-1, 1]])
    class_part = torch.nn.functional.cross_entropy(outputs[[0, 2], :2], torch.tensor([1, 0]))
    domain_part = torch.nn.functional.cross_entropy(outputs[:, 2:], labels[:, 1])
    torch.testing.assert_close(loss(outputs, labels), class_part + 0.5 * domain_part)

    changed = outputs.clone()
    changed[[1, 3], :2] += 5.0  # class logits of unlabelled target rows must not matter
    torch.testing.assert_close(loss(changed, labels), loss(outputs, labels))
    only_target = loss(outputs, torch.tensor([[-1, 1]] * 4))
    assert torch.isfinite(only_target)
    # validation: class logits only, plain class labels
    torch.testing.assert_close(loss(outputs[:, :2], labels[:, 0].clamp(min=0)),
                               torch.nn.functional.cross_entropy(outputs[:, :2], labels[:, 0].clamp(min=0)))
    with pytest.raises(InputError, match="DomainLabelDataset"):
        loss(outputs, labels[:, 0])


def test_dann_plan_runs_the_base_plan_and_sets_lambda_per_epoch():
    model = DANNModel(tiny_classifier())
    plan = DANNPlan(make_transfer_plan(model, "linear_probe", lr=1e-3), epochs=4)
    assert [g["name"] for g in plan.param_groups] == ["head"]
    domain_params = {id(p) for p in model.domain_head.parameters()}
    assert domain_params <= {id(p) for p in plan.param_groups[0]["params"]}
    for epoch in range(4):
        plan.on_epoch_start(model.train(), epoch)
        assert model.grl.lambda_ == pytest.approx(dann_lambda(epoch / 4))
        assert not any(p.requires_grad for p in model.encoder.parameters())  # the base plan's rule
    with pytest.raises(ConfigError, match="train.epochs"):
        DANNPlan(plan.base, epochs=0)


def test_domain_labels_are_binary_with_a_target_and_per_value_without():
    sites = ["A", "B", "A", "C"]
    index, names = domain_labels(sites, target="B")
    assert index.tolist() == [0, 1, 0, 0] and names == ["source", "B"]
    index, names = domain_labels(sites)
    assert index.tolist() == [0, 1, 0, 2] and names == ["A", "B", "C"]
    with pytest.raises(ConfigError, match="adaptation.target"):
        domain_labels(sites, target="Z")


def _toy_items(n: int, seed: int, shift: float = 0.0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = i % 2
        image = torch.randn(1, 16, 16, generator=g) * 0.5 + label + shift
        items.append({"image": image, "label": label, "id": f"s{seed}-{i}"})
    return items


def test_fit_trains_a_dann_model_unchanged_and_predict_gives_class_probabilities():
    source, target = _toy_items(12, seed=0), _toy_items(12, seed=1, shift=2.0)
    classes = [item["label"] for item in source] + [-1] * len(target)  # target studies are unlabelled
    domains, _ = domain_labels(["S"] * len(source) + ["T"] * len(target), target="T")
    train_ds = DomainLabelDataset(source + target, domains, class_labels=classes)
    assert train_ds[len(source)]["label"].tolist() == [-1, 1]
    classifier = tiny_classifier()
    model = DANNModel(classifier)
    head_before = copy.deepcopy(model.domain_head.state_dict())
    plan = DANNPlan(make_transfer_plan(model, "finetune", lr=1e-2), epochs=2)
    cfg = TrainConfig(epochs=2, batch_size=8, num_workers=0, amp="off", progress=False, warmup_epochs=0.0,
                      early_stopping_patience=None)

    result = fit(model, train_ds, _toy_items(6, seed=2), loss_fn=dann_loss(2), cfg=cfg, plan=plan)

    assert result.epochs_run == 2 and np.isfinite(result.history[-1]["val_loss"])
    assert model.grl.lambda_ == pytest.approx(plan.lambda_at(1))
    assert any(not torch.equal(v, model.domain_head.state_dict()[k]) for k, v in head_before.items())
    x = torch.stack([item["image"] for item in _toy_items(3, seed=4)])
    torch.testing.assert_close(classifier.eval()(x), model.eval()(x))  # shared modules: the Classifier holds the trained weights
    rows = predict(model, _toy_items(4, seed=3), progress=False)
    assert [tuple(r["output"].shape) for r in rows] == [(2,)] * 4
    torch.testing.assert_close(rows[0]["output"].sum(), torch.tensor(1.0))
