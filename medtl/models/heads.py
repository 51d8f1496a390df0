"""Task models around an `Encoder`: classification (pool, dropout, linear) and U-Net segmentation.

Both keep the encoder as `.encoder` and everything trained from scratch elsewhere (`.head`, and
`.decoder` for segmentation), which is how transfer strategies tell "encoder" from "head".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import TwoConv
from monai.networks.nets.flexible_unet import SegmentationHead
from torch import nn

from medtl.errors import ConfigError
from medtl.models.encoder import Encoder

_NORM = ("batch", {"eps": 1e-3, "momentum": 0.1})  # MONAI FlexibleUNet's decoder default
_ACT = ("relu", {"inplace": True})


class ClassificationHead(nn.Module):
    """Global average pooling, dropout and a linear layer (2D or 3D feature maps).

    Args:
        in_features: channels of the encoder's deepest map.
        num_classes: output logits.
        dropout: dropout probability before the linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features.flatten(2).mean(-1)))


class Classifier(nn.Module):
    """Encoder + classification head; multi-class (softmax) or multi-label (sigmoid) logits.

    Args:
        encoder: the encoder.
        num_classes: number of classes (binary tasks: 2 softmax logits, or 1 with multi_label).
        dropout: dropout before the linear layer.
        multi_label: whether classes are independent (train with BCE, predict with sigmoid).
    """

    def __init__(self, encoder: Encoder, num_classes: int, *, dropout: float = 0.2, multi_label: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(encoder.num_features, num_classes, dropout)
        self.multi_label = multi_label

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return self.head.fc.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's deepest feature map."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes) for input (B, C, cols, rows[, slices])."""
        return self.head(self.encoder.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the linear layer by a freshly initialised one with `num_classes` outputs."""
        self.head.fc = nn.Linear(self.encoder.num_features, num_classes).to(self.head.fc.weight.device)


class UNetDecoder(nn.Module):
    """U-Net decoder on an encoder pyramid: upsample, concatenate the skip, two conv blocks.

    One level per distinct reduction (the deepest map of each, so MedicalNet's three stride-8
    stages count once), then a last block at input resolution. Written here rather than MONAI's
    `UNetDecoder` because that one upsamples by exactly 2 per level and pads at most one voxel:
    dilated encoders (output stride 8 over three stages) and small or odd 3D inputs break it. Its
    building blocks (`TwoConv`, `SegmentationHead`) are MONAI's.

    Args:
        spatial_dims: 2 or 3.
        encoder_channels: channels of every encoder stage (stem first).
        encoder_reductions: reduction of every encoder stage.
        decoder_channels: output channels of each decoder block, deepest first; one per level
            below the deepest plus one at full resolution (longer lists are cut from the front).
        input_skip: channels of a conv block on the input itself, the skip of the full-resolution
            block (0: none). Encoders with a stride-2 stem have no full-resolution map, so without it
            the last block sees only upsampled half-resolution features; a U-Net's first level
            (nnU-Net's too) works at full resolution.
        in_channels: the input's channels (for `input_skip`).
    """

    def __init__(self, spatial_dims: int, encoder_channels: Sequence[int], encoder_reductions: Sequence[int],
                 decoder_channels: Sequence[int], *, input_skip: int = 0, in_channels: int = 1) -> None:
        super().__init__()
        last = {r: i for i, r in enumerate(encoder_reductions)}  # deepest stage of each reduction
        self.levels = tuple(sorted(last.values()))
        steps = len(self.levels)  # (levels - 1) skip blocks + 1 full-resolution block
        if len(decoder_channels) < steps:
            raise ValueError(f"decoder_channels must have at least {steps} entries, not {len(decoder_channels)}")
        channels = list(decoder_channels)[-steps:]
        skips = [encoder_channels[i] for i in self.levels[:-1]][::-1] + [input_skip]
        inputs = [encoder_channels[self.levels[-1]], *channels[:-1]]
        self.blocks = nn.ModuleList(
            TwoConv(spatial_dims, cin + skip, cout, act=_ACT, norm=_NORM, bias=False)
            for cin, skip, cout in zip(inputs, skips, channels, strict=True)
        )
        self.input_block = (TwoConv(spatial_dims, in_channels, input_skip, act=_ACT, norm=_NORM, bias=False)
                            if input_skip else None)
        self.out_channels = channels[-1]

    def forward(self, pyramid: Sequence[torch.Tensor], size: Sequence[int],
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to spatial `size` (the input's, in the encoder's axis order); `image` (the input, in
        that axis order) feeds the full-resolution skip when the decoder has one."""
        return self.forward_levels(pyramid, size, image)[-1]

    def forward_levels(self, pyramid: Sequence[torch.Tensor], size: Sequence[int],
                       image: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every block's output, coarsest first (the last is `forward`'s)."""
        features = [pyramid[i] for i in self.levels]
        x = features[-1]
        skips = features[:-1][::-1]
        if self.input_block is not None:
            if image is None:
                raise ValueError("this decoder has a full-resolution skip: pass the input image")
            skips = [*skips, self.input_block(image)]
        outputs = []
        for index, block in enumerate(self.blocks):
            skip = skips[index] if index < len(skips) else None
            target = skip.shape[2:] if skip is not None else tuple(size)
            x = F.interpolate(x, size=target, mode="nearest")
            x = block(x if skip is None else torch.cat([skip, x], dim=1))
            outputs.append(x)
        return outputs


class Segmenter(nn.Module):
    """Encoder + U-Net decoder + segmentation head; logits at input resolution.

    Args:
        encoder: the encoder.
        num_classes: output channels (classes including background).
        decoder_channels: see `UNetDecoder`.
        input_skip: see `UNetDecoder` (0: no full-resolution skip).
        deep_supervision: how many coarser decoder blocks (half resolution, quarter, ...) also get a
            1x1 segmentation head in training, as nnU-Net trains; then training-mode `forward` returns
            a list of logits, finest first, for MONAI's `DeepSupervisionLoss`. 0: off.
    """

    def __init__(self, encoder: Encoder, num_classes: int, decoder_channels: Sequence[int], *,
                 input_skip: int = 0, deep_supervision: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.spatial_dims, encoder.feature_channels, encoder.feature_reductions,
                                   decoder_channels, input_skip=input_skip, in_channels=encoder.in_channels)
        self.head = SegmentationHead(encoder.spatial_dims, self.decoder.out_channels, num_classes, kernel_size=3)
        coarser = [block.conv_1.conv.out_channels for block in self.decoder.blocks][:-1][::-1]
        if deep_supervision > len(coarser):
            raise ConfigError(f"model.deep_supervision must be at most {len(coarser)} (the decoder's coarser "
                              f"blocks), not {deep_supervision}; use 2 (the half- and quarter-resolution blocks)")
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[encoder.spatial_dims]
        self.aux_heads = nn.ModuleList(conv(channels, num_classes, kernel_size=1)
                                       for channels in coarser[:deep_supervision])

    @property
    def num_classes(self) -> int:
        """Number of output channels."""
        return self.head[0].out_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's deepest feature map."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits of shape (B, num_classes, *x.shape[2:]) for input (B, C, cols, rows[, slices]); in
        training with deep supervision, a list: those logits, then each coarser head's."""
        pyramid = self.encoder.forward_pyramid(x)
        if not (self.training and len(self.aux_heads)):
            return segmentation_logits(self.encoder, self.decoder, self.head, pyramid, x)
        levels = self.decoder.forward_levels(pyramid, *_decoder_inputs(self.encoder, self.decoder, x))
        outputs = [self.head(levels[-1]), *(aux(levels[-2 - i]) for i, aux in enumerate(self.aux_heads))]
        return [self.encoder.to_input_axes(out) for out in outputs]


def segmentation_logits(encoder: Encoder, decoder: UNetDecoder, head: nn.Module, pyramid: Sequence[torch.Tensor],
                        x: torch.Tensor) -> torch.Tensor:
    """Decode `encoder`'s `pyramid` of input `x` into logits of shape (B, K, *x.shape[2:])."""
    return encoder.to_input_axes(head(decoder(pyramid, *_decoder_inputs(encoder, decoder, x))))


def _decoder_inputs(encoder: Encoder, decoder: UNetDecoder, x: torch.Tensor) -> tuple[tuple[int, ...],
                                                                                     torch.Tensor | None]:
    """The decoder's target size and full-resolution image for input `x`, in the encoder's axis order."""
    size = tuple(x.shape[2:][::-1])  # the encoder works in reversed axis order
    return size, encoder.to_weight_axes(x) if decoder.input_block is not None else None
