"""MedicalNet (Tencent "Med3D") 3D ResNets 10-200, faithful to their checkpoints.

Same tensor names as MedicalNet's `models/resnet.py` (`conv1`, `bn1`, `layerN.M.convK`,
`layerN.0.downsample.{0,1}`), same stem (7^3 conv stride 2, max-pool stride 2), layer2 stride 2,
layer3/layer4 stride 1 with dilation 2/4 (output stride 8), shortcut A (parameter-free zero
padding) for depths 18 and 34 and B (1x1x1 conv + BN) otherwise. MONAI's `ResNet` cannot be used:
its layer3/4 downsample instead of dilating (MONAI issue #7572), so the same weights would see a
different receptive field. MedicalNet's segmentation head `conv_seg` is not built (dropped on load).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medtl.errors import WeightsError
from medtl.models.encoder import Encoder
from medtl.models.registry import register_encoder
from medtl.models.weights import WeightRecord

# depth -> (block kind, blocks per layer, shortcut type), from MedicalNet's README and model.py.
ARCHITECTURES: dict[int, tuple[str, tuple[int, int, int, int], str]] = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
    101: ("bottleneck", (3, 4, 23, 3), "B"),
    152: ("bottleneck", (3, 8, 36, 3), "B"),
    200: ("bottleneck", (3, 24, 36, 3), "B"),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_DATASETS23 = (10, 18, 34, 50)  # depths with the better 23-dataset checkpoints


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, zero-pad the extra channels.

    MedicalNet's version detaches the input (`Variable(out.data)`), cutting the gradient of the
    identity path; this one keeps it, which changes training but not pretrained outputs.
    """

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3^3 convolutions and a residual connection."""

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1^3 -> 3^3 (strided, dilated) -> 1^3 convolutions with 4x expansion."""

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class MedicalNetResNet(nn.Module):
    """MedicalNet's 3D ResNet backbone (no `conv_seg` head).

    Args:
        depth: 10, 18, 34, 50, 101, 152 or 200.
        in_channels: input channels of the stem (MedicalNet: 1).
    """

    def __init__(self, depth: int, in_channels: int = 1) -> None:
        super().__init__()
        kind, blocks, self.shortcut = ARCHITECTURES[depth]
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self._cin = 64
        block = BasicBlock if kind == "basic" else Bottleneck
        expansion = _EXPANSION[kind]
        for index, (planes, count, stride, dilation) in enumerate(
                zip((64, 128, 256, 512), blocks, (1, 2, 1, 1), (1, 1, 2, 4), strict=True), start=1):
            self.add_module(f"layer{index}", self._layer(block, expansion, planes, count, stride, dilation))
        for module in self.modules():  # MedicalNet's initialisation
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _layer(self, block: type[nn.Module], expansion: int, planes: int, count: int, stride: int,
               dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._cin != planes * expansion:
            if self.shortcut == "A":
                downsample = ShortcutA(planes * expansion, stride)
            else:
                downsample = nn.Sequential(nn.Conv3d(self._cin, planes * expansion, 1, stride=stride, bias=False),
                                           nn.BatchNorm3d(planes * expansion))
        layers = [block(self._cin, planes, stride, dilation, downsample)]
        self._cin = planes * expansion
        layers += [block(self._cin, planes, 1, dilation, None) for _ in range(1, count)]
        return nn.Sequential(*layers)


_DOWNSAMPLE = re.compile(r"^layer(\d)\.0\.downsample\.0\.weight$")
_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")


def _checker(depth: int):
    kind, blocks, shortcut = ARCHITECTURES[depth]
    name = f"medicalnet_resnet{depth}"

    def check(state: Mapping[str, torch.Tensor]) -> None:
        """Raise a precise WeightsError when `state` cannot be MedicalNet's resnet_{depth}."""
        stem = state.get("conv1.weight")
        if stem is None or stem.ndim != 5:
            raise WeightsError(f"a MedicalNet checkpoint must hold a 3D stem 'conv1.weight', not "
                               f"{'none' if stem is None else tuple(stem.shape)}; is this a MedicalNet .pth file?")
        if stem.shape[1] != 1:
            raise WeightsError(f"a MedicalNet checkpoint's stem 'conv1.weight' must take 1 input channel, not "
                               f"{stem.shape[1]}; MedicalNet was trained on single-channel volumes")
        found = tuple(1 + max((int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and m.group(1) == str(i)),
                              default=-1) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in state
        if found != blocks or bottleneck != (kind == "bottleneck"):
            other = [d for d, (k, b, _) in ARCHITECTURES.items() if b == found and (k == "bottleneck") == bottleneck]
            hint = f"that is resnet_{other[0]}: use encoder 'medicalnet_resnet{other[0]}'" if other else \
                "it is not a MedicalNet ResNet"
            raise WeightsError(f"checkpoint for {name} must have {kind} blocks {blocks} per layer, not "
                               f"{'bottleneck' if bottleneck else 'basic'} blocks {found}; {hint}")
        has_downsample = sorted(m.group(1) for k in state if (m := _DOWNSAMPLE.match(k)))
        if shortcut == "A" and has_downsample:
            raise WeightsError(
                f"checkpoint for {name} must use shortcut type A (no downsample convolutions), not type B "
                f"(it has 'layer{has_downsample[0]}.0.downsample.0.weight'); MedicalNet trains resnet_{depth} with "
                f"shortcut A: use the resnet_{depth} file from MedicalNet")
        if shortcut == "B" and not has_downsample:
            raise WeightsError(
                f"checkpoint for {name} must use shortcut type B (1x1x1 downsample convolutions), not type A "
                f"(no 'layerN.0.downsample.0.weight'); MedicalNet trains resnet_{depth} with shortcut B: "
                f"use the resnet_{depth} file from MedicalNet")

    return check


def _record(depth: int) -> WeightRecord:
    names = ((f"resnet_{depth}_23dataset.pth",) if depth in _DATASETS23 else ()) + (f"resnet_{depth}.pth",)
    return WeightRecord(
        source="medicalnet",
        origin=f"Tencent MedicalNet resnet_{depth} (github.com/Tencent/MedicalNet, Med3D 2019)",
        licence="MIT (MedicalNet); trained on public segmentation datasets (3DSeg-8 / 23 datasets)",
        sha256=None, in_channels=1, spatial_dims=3, axes="DHW", normalization="zscore_nonzero",
        mean=None, std=None, input_size=(56, 448, 448), spacing=None, first_conv="conv1", classifier="conv_seg",
        file_names=names,
        notes="their pipeline crops to the foreground, resizes (nearest) to 56x448x448 (D, H, W) and z-scores "
              "over voxels > 0; it does not resample to a fixed spacing",
    )


def _encoder(depth: int, in_channels: int) -> Encoder:
    net = MedicalNetResNet(depth, in_channels)
    width = 512 * _EXPANSION[ARCHITECTURES[depth][0]]
    stages = [["conv1", "bn1", "relu"], ["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    channels = [64, width // 8, width // 4, width // 2, width]
    return Encoder(net, stages, channels, [2, 4, 8, 8, 8], spatial_dims=3, in_channels=in_channels,
                   first_conv="conv1")


@register_encoder(native_dims=3, weights=(_record(10),), check=_checker(10))
def medicalnet_resnet10(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-10 (basic blocks, shortcut B), 14.4 M parameters."""
    return _encoder(10, in_channels)


@register_encoder(native_dims=3, weights=(_record(18),), check=_checker(18))
def medicalnet_resnet18(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-18 (basic blocks, shortcut A), 33.0 M parameters."""
    return _encoder(18, in_channels)


@register_encoder(native_dims=3, weights=(_record(34),), check=_checker(34))
def medicalnet_resnet34(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-34 (basic blocks, shortcut A), 63.3 M parameters."""
    return _encoder(34, in_channels)


@register_encoder(native_dims=3, weights=(_record(50),), check=_checker(50))
def medicalnet_resnet50(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-50 (bottleneck blocks, shortcut B), 46.2 M parameters."""
    return _encoder(50, in_channels)


@register_encoder(native_dims=3, weights=(_record(101),), check=_checker(101))
def medicalnet_resnet101(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-101 (bottleneck blocks, shortcut B), 85.3 M parameters."""
    return _encoder(101, in_channels)


@register_encoder(native_dims=3, weights=(_record(152),), check=_checker(152))
def medicalnet_resnet152(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-152 (bottleneck blocks, shortcut B), 117.5 M parameters."""
    return _encoder(152, in_channels)


@register_encoder(native_dims=3, weights=(_record(200),), check=_checker(200))
def medicalnet_resnet200(in_channels: int) -> Encoder:
    """MedicalNet 3D ResNet-200 (bottleneck blocks, shortcut B), 126.7 M parameters."""
    return _encoder(200, in_channels)
