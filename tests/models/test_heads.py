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
