"""Multi-task model: packed outputs and labels, the weighted loss, one step and a whole `fit`."""

from __future__ import annotations

import copy

import pytest
import torch

from medtl.engine import TrainConfig, fit, predict
from medtl.errors import ConfigError, InputError
from medtl.models import Segmenter, create_model, make_transfer_plan
from medtl.models.multitask import (
    MultiTaskDataset,
    MultiTaskModel,
    multitask_loss,
    pack_outputs,
    split_labels,
    split_outputs,
)

SIZE = (32, 32)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """`fit` switches process-wide determinism settings: put them back for the other tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _segmenter(seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    return create_model("segmentation", "efficientnet_lite0", num_classes=2, weights="none",
                        decoder_channels=(16, 16, 16, 16, 16)).model


def _items(n: int, seed: int) -> list[dict]:
    """Bright squares (mask 1) on noise; the class says whether the square is large."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        side = 14 if i % 2 else 6
        mask = torch.zeros(1, *SIZE)
        mask[:, 4:4 + side, 6:6 + side] = 1.0
        image = 0.2 * torch.randn(1, *SIZE, generator=g) + mask
        items.append({"image": image, "label": mask, "id": f"m{seed}-{i}"})
    return items


def test_forward_packs_the_segmenter_output_and_the_class_logits():
    segmenter = _segmenter()
    reference = copy.deepcopy(segmenter).eval()
    model = MultiTaskModel(segmenter, num_classes=3).eval()
    x = torch.randn(2, 1, 32, 48)  # non-square: the axis order must survive the packing

    outputs = model(x)
    assert outputs.shape == (2, 2 + 3, 32, 48)
    seg, cls = split_outputs(outputs, model.num_seg_classes)
    torch.testing.assert_close(seg, reference(x))
    torch.testing.assert_close(cls, model.cls_head(model.encoder.forward_features(x)))
    torch.testing.assert_close(model.select_output("classification")(x), cls)
    torch.testing.assert_close(model.select_output("segmentation")(x), seg)
    with pytest.raises(ConfigError, match="multi-task output"):
        model.select_output("mask")


def test_state_dict_is_the_segmenters_plus_the_class_head():
    model = MultiTaskModel(_segmenter(), num_classes=2)
    segmenter = _segmenter(seed=1)
    seg_keys = {k for k in model.state_dict() if not k.startswith("cls_head.")}
    assert seg_keys == set(segmenter.state_dict())
    segmenter.load_state_dict({k: v for k, v in model.state_dict().items() if k in seg_keys})


def test_dataset_packs_mask_and_class_and_split_labels_recovers_them():
    items = _items(3, seed=0)
    dataset = MultiTaskDataset(items, class_labels=[1, -1, 0])
    labels = torch.stack([dataset[i]["label"] for i in range(3)])
    assert labels.shape == (3, 2, *SIZE)
    mask, classes = split_labels(labels)
    torch.testing.assert_close(mask, torch.stack([item["label"] for item in items]))
    assert classes.tolist() == [1, -1, 0]
    with pytest.raises(InputError, match="one entry per study"):
        MultiTaskDataset(items, class_labels=[1])


def test_loss_is_the_weighted_sum_and_ignores_studies_without_a_class():
    from monai.losses import DiceCELoss

    outputs = pack_outputs(torch.randn(4, 2, 8, 8), torch.randn(4, 3))
    mask = (torch.rand(4, 1, 8, 8) > 0.5).float()
    classes = torch.tensor([2, -1, 0, 1])
    labels = torch.cat([mask, classes.float()[:, None, None, None].expand(4, 1, 8, 8)], dim=1)
    seg, cls = split_outputs(outputs, 2)
    expected = (0.25 * torch.nn.functional.cross_entropy(cls[[0, 2, 3]], classes[[0, 2, 3]])
                + 2.0 * DiceCELoss(to_onehot_y=True, softmax=True)(seg, mask))
    torch.testing.assert_close(multitask_loss(2, cls_weight=0.25, seg_weight=2.0)(outputs, labels), expected)
    with pytest.raises(ConfigError, match="must not both be 0"):
        multitask_loss(2, cls_weight=0, seg_weight=0)
    with pytest.raises(InputError, match="MultiTaskDataset"):
        multitask_loss(2)(outputs, mask)


def _grads_after_one_backward(cls_weight: float, seg_weight: float) -> MultiTaskModel:
    model = MultiTaskModel(_segmenter(), num_classes=2).train()
    batch = torch.utils.data.default_collate([MultiTaskDataset(_items(4, 0), [0, 1, 0, 1])[i] for i in range(4)])
    multitask_loss(2, cls_weight=cls_weight, seg_weight=seg_weight)(model(batch["image"]), batch["label"]).backward()
    return model


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_one_optimisation_step_updates_both_heads_and_the_shared_encoder():
    model = MultiTaskModel(_segmenter(), num_classes=2).train()
    before = {name: {n: p.detach().clone() for n, p in getattr(model, name).named_parameters()}
              for name in ("head", "cls_head", "encoder")}
    dataset = MultiTaskDataset(_items(4, seed=0), class_labels=[0, 1, 0, 1])
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    loss = multitask_loss(model.num_seg_classes, cls_weight=1.0, seg_weight=1.0)(model(batch["image"]),
                                                                                  batch["label"])
    loss.backward()
    optimizer.step()

    assert _changed(model.head, before["head"]), "segmentation head did not move"
    assert _changed(model.cls_head, before["cls_head"]), "classification head did not move"
    stem = model.encoder.first_conv + ".weight"
    assert not torch.equal(model.encoder.net.get_parameter(stem), before["encoder"]["net." + stem])


@pytest.mark.parametrize(("cls_weight", "seg_weight", "silent"), [(0.0, 1.0, "cls_head"), (1.0, 0.0, "head")])
def test_a_zero_loss_weight_leaves_that_head_without_gradient(cls_weight, seg_weight, silent):
    model = _grads_after_one_backward(cls_weight, seg_weight)
    other = "head" if silent == "cls_head" else "cls_head"
    assert all(p.grad is None or not p.grad.any() for p in getattr(model, silent).parameters())
    assert any(p.grad is not None and p.grad.any() for p in getattr(model, other).parameters())


def test_fit_trains_a_multitask_model_unchanged_and_predict_serves_either_task():
    model = MultiTaskModel(_segmenter(), num_classes=2)
    classes = [i % 2 for i in range(8)]
    train_ds = MultiTaskDataset(_items(8, seed=0), classes)
    val_ds = MultiTaskDataset(_items(4, seed=1), [0, 1, 0, 1])
    cfg = TrainConfig(epochs=1, batch_size=4, num_workers=0, amp="off", progress=False, warmup_epochs=0.0,
                      early_stopping_patience=None)
    plan = make_transfer_plan(model, "finetune", lr=1e-3)
    assert {"head"} < {g["name"] for g in plan.param_groups}  # decoder and both heads train as "head"

    result = fit(model, train_ds, val_ds, loss_fn=multitask_loss(model.num_seg_classes), cfg=cfg, plan=plan)

    assert result.epochs_run == 1 and torch.isfinite(torch.tensor(result.history[0]["val_loss"]))
    test = _items(2, seed=2)
    probs = predict(model.select_output("classification"), test, progress=False)
    masks = predict(model.select_output("segmentation"), test, progress=False)
    assert probs[0]["output"].shape == (2,) and masks[0]["output"].shape == (2, *SIZE)
