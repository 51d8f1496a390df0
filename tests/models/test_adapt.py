"""Stem channel adaptation, kernel inflation and module inflation, checked numerically."""

from __future__ import annotations

import pytest
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from medtl.errors import WeightsError
from medtl.models import adapt_input_channels, inflate_kernel, inflate_to_3d


def _rgb_kernel(spatial: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(8, 3, *spatial, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spatial", [(3, 3), (3, 3, 3)])
def test_three_to_one_channel_sums_the_rgb_kernels(spatial):
    weight = _rgb_kernel(spatial)
    torch.testing.assert_close(adapt_input_channels(weight, 1), weight.sum(1, keepdim=True))


@pytest.mark.parametrize(("source", "target"), [(3, 5), (3, 2), (1, 4)])
@pytest.mark.parametrize("spatial", [(3, 3), (3, 3, 3)])
def test_channel_repeat_keeps_the_response_to_a_constant_input(source, target, spatial):
    weight = torch.randn(8, source, *spatial, generator=torch.Generator().manual_seed(1))
    adapted = adapt_input_channels(weight, target)
    assert adapted.shape == (8, target, *spatial)
    # A constant image gives sum(kernel) per output channel; 3->2 truncates, so compare means.
    if target % source == 0:
        torch.testing.assert_close(adapted.sum(dim=tuple(range(1, adapted.ndim))),
                                   weight.sum(dim=tuple(range(1, weight.ndim))))
    torch.testing.assert_close(adapted[:, 0] * target / source, weight[:, 0])


def test_kernel_with_an_unsupported_channel_count_is_refused():
    with pytest.raises(WeightsError, match="must take 1, 3 or 4 input channels, not 2"):
        adapt_input_channels(torch.randn(8, 2, 3, 3), 4)


def test_inflated_kernel_sums_back_to_the_2d_kernel_over_depth():
    weight = _rgb_kernel((5, 5))
    inflated = inflate_kernel(weight, 5)
    assert inflated.shape == (8, 3, 5, 5, 5)
    torch.testing.assert_close(inflated.sum(2), weight)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("same", [False, True])
def test_inflated_conv_on_identical_slices_repeats_the_2d_output(stride, same):
    conv = Conv2dSame(3, 4, 3, stride=stride) if same else nn.Conv2d(3, 4, 3, stride=stride, padding=1)
    net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2))
    net.eval()
    image = torch.randn(1, 3, 17, 12)
    with torch.no_grad():
        expected = net(image)
        inflate_to_3d(net)
        volume = image[:, :, None].repeat(1, 1, 9, 1, 1)  # (B, C, depth, rows, cols)
        got = net(volume)
    assert isinstance(net[0], nn.Conv3d) and isinstance(net[1], nn.BatchNorm3d)
    for index in range(got.shape[2]):
        torch.testing.assert_close(got[:, :, index], expected, rtol=1e-5, atol=1e-5)


def test_inflation_refuses_a_2d_only_module_by_name():
    class Odd2d(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="module 'odd' of type Odd2d must have a 3D counterpart"):
        inflate_to_3d(nn.ModuleDict({"odd": Odd2d()}))
