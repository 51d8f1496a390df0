"""Classification and segmentation heads: multi-label, odd sizes, decoder levels, input checks."""

from __future__ import annotations

import pytest
import torch

from medtl.errors import ConfigError, InputError
from medtl.models import create_model


def test_multi_label_classifier_trains_with_bce_on_independent_logits():
    bundle = create_model("classification", "resnet18", in_channels=1, num_classes=4, multi_label=True,
                          weights="none")
    model = bundle.model.train()
    assert model.multi_label and bundle.multi_label and bundle.describe()["model.multi_label"] == "True"
    logits = model(torch.randn(2, 1, 32, 32))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]]))
    loss.backward()
    assert logits.shape == (2, 4) and model.head.fc.weight.grad is not None


@pytest.mark.parametrize(("dims", "size"), [(2, (37, 45)), (3, (19, 23, 13))])
def test_segmentation_logits_come_back_at_any_input_size(dims, size):
    model = create_model("segmentation", "efficientnet_lite0", spatial_dims=dims, in_channels=2, num_classes=3,
                         weights="none").model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, *size)).shape == (1, 3, *size)


def test_segmentation_output_follows_the_input_axes():
    model = create_model("segmentation", "resnet18", in_channels=1, num_classes=1, weights="none").model.eval()
    image = torch.randn(1, 1, 64, 32)
    with torch.no_grad():
        straight = model(image)
        transposed = model(image.transpose(2, 3).contiguous())
    assert straight.shape == (1, 1, 64, 32) and transposed.shape == (1, 1, 32, 64)


def test_decoder_uses_the_deepest_map_of_each_resolution_for_medicalnet():
    model = create_model("segmentation", "medicalnet_resnet10", spatial_dims=3, weights="none").model
    assert model.encoder.feature_reductions == (2, 4, 8, 8, 8)
    assert model.decoder.levels == (0, 1, 4)
    assert len(model.decoder.blocks) == 3


def test_too_few_decoder_channels_is_an_error():
    with pytest.raises(ValueError, match="decoder_channels must have at least 5 entries, not 2"):
        create_model("segmentation", "resnet18", weights="none", decoder_channels=(32, 16))


def test_wrong_input_channels_name_the_expected_shape():
    model = create_model("classification", "resnet18", in_channels=1, weights="none").model
    with pytest.raises(InputError, match=r"encoder input must have shape \(batch, 1, 2 spatial axes\)"):
        model(torch.randn(1, 3, 32, 32))


def test_multi_label_segmentation_is_a_config_error():
    with pytest.raises(ConfigError, match="multi_label must be false for segmentation"):
        create_model("segmentation", "resnet18", multi_label=True, weights="none")


@pytest.mark.parametrize(("dims", "size"), [(2, (37, 45)), (3, (19, 23, 13))])
def test_input_skip_feeds_the_full_resolution_block_from_the_input_itself(dims, size):
    model = create_model("segmentation", "efficientnet_lite0", spatial_dims=dims, in_channels=2, num_classes=3,
                         weights="none", input_skip=16).model.eval()
    last = model.decoder.blocks[-1]
    assert last.conv_0.conv.in_channels == model.decoder.blocks[-2].conv_1.conv.out_channels + 16
    image = torch.randn(1, 2, *size)
    with torch.no_grad():
        logits = model(image)
        for parameter in model.decoder.input_block.parameters():
            parameter.zero_()
        without = model(image)
    assert logits.shape == (1, 3, *size)
    assert not torch.allclose(logits, without)  # the skip's features reach the logits


def test_input_skip_keeps_the_input_axes():
    model = create_model("segmentation", "resnet18", in_channels=1, num_classes=2, weights="none",
                         input_skip=8).model.eval()
    image = torch.randn(1, 1, 64, 32)
    with torch.no_grad():
        assert model(image).shape == (1, 2, 64, 32)
        assert model(image.transpose(2, 3).contiguous()).shape == (1, 2, 32, 64)


def test_input_skip_trains_from_scratch_with_the_decoder():
    from medtl.models.strategies import make_transfer_plan

    model = create_model("segmentation", "resnet18", weights="none", input_skip=8).model
    plan = make_transfer_plan(model, "linear_probe", lr=1e-3)
    head_ids = {id(p) for p in plan.param_groups[0]["params"]}
    assert {id(p) for p in model.decoder.input_block.parameters()} <= head_ids


@pytest.mark.parametrize(("value", "message"), [(8, "input_skip must be 0 for classification"),
                                                (-1, "input_skip must be an integer >= 0")])
def test_input_skip_outside_segmentation_or_negative_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        create_model("classification", "resnet18", weights="none", input_skip=value)


def test_deep_supervision_trains_coarser_heads_and_predicts_one_map():
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    model = create_model("segmentation", "efficientnet_lite0", spatial_dims=3, num_classes=3, weights="none",
                         deep_supervision=2).model.train()
    image = torch.randn(2, 1, 32, 48, 16)
    outputs = model(image)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 48, 16), (2, 3, 16, 24, 8), (2, 3, 8, 12, 4)]
    labels = torch.randint(0, 3, (2, 1, 32, 48, 16)).float()  # the masks as the data pipeline gives them
    DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(outputs, labels).backward()
    assert all(p.grad is not None for p in model.aux_heads.parameters())
    with torch.no_grad():
        assert model.eval()(image).shape == (2, 3, 32, 48, 16)  # evaluation and predict see the finest map only


def test_more_deep_supervision_than_decoder_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match="model.deep_supervision must be at most 4"):
        create_model("segmentation", "efficientnet_lite0", weights="none", deep_supervision=5)
    with pytest.raises(ConfigError, match="model.deep_supervision must be 0 for classification"):
        create_model("classification", "efficientnet_lite0", weights="none", deep_supervision=1)
