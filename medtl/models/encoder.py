"""The one encoder contract every head relies on.

An `Encoder` wraps a backbone network (`net`, whose tensor names are the checkpoint's) and a
recipe of stages: each stage runs some of `net`'s submodules in order and yields one feature
map of the multi-scale pyramid. Heads use `forward_features` (deepest map) or `forward_pyramid`
(all maps) with `feature_channels` / `feature_reductions`; transfer strategies use
`stage_modules()` to freeze and unfreeze stage by stage.

Inputs follow medtl's (and MONAI's) array convention: (batch, channel, cols, rows[, slices]).
Pretrained kernels were trained on (rows, cols) photos or (slices, rows, cols) volumes, so the
encoder reverses the spatial axes on the way in; `to_input_axes` turns a map back for heads
that return images (segmentation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medtl.errors import InputError


class Encoder(nn.Module):
    """A backbone seen as a sequence of stages with one feature map each.

    Args:
        net: the backbone; its state_dict names match the pretrained checkpoint's.
        stages: per stage, the dotted names of `net` submodules to run in order (stem first).
        channels: channels of each stage's output.
        reductions: downsampling factor of each stage's output relative to the input.
        spatial_dims: 2 or 3.
        in_channels: input channels of the stem.
        first_conv: dotted name of the stem convolution inside `net`.
    """

    def __init__(
        self,
        net: nn.Module,
        stages: Sequence[Sequence[str]],
        channels: Sequence[int],
        reductions: Sequence[int],
        *,
        spatial_dims: int,
        in_channels: int,
        first_conv: str,
    ) -> None:
        super().__init__()
        if not len(stages) == len(channels) == len(reductions):
            raise ValueError("stages, channels and reductions must have one entry per stage")
        self.net = net
        self.stage_names = tuple(tuple(stage) for stage in stages)
        self.feature_channels = tuple(channels)
        self.feature_reductions = tuple(reductions)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.first_conv = first_conv

    @property
    def num_features(self) -> int:
        """Channels of the deepest feature map (the classifier's input)."""
        return self.feature_channels[-1]

    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules of each stage, stem first (looked up now, so inflation is reflected)."""
        return [[self.net.get_submodule(name) for name in stage] for stage in self.stage_names]

    def to_weight_axes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, cols, rows[, slices]) -> (B, C, [slices,] rows, cols), the kernels' order."""
        return _reverse_spatial(x)

    def to_input_axes(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_weight_axes`: (B, C, [slices,] rows, cols) -> (B, C, cols, rows[, slices])."""
        return _reverse_spatial(x)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's feature map, stem first, in the kernels' axis order.

        Args:
            x: input of shape (B, in_channels, cols, rows[, slices]).

        Returns:
            One map per stage with `feature_channels[i]` channels at 1/`feature_reductions[i]`
            of the input size (rounded up).

        Raises:
            InputError: when the input's channels or number of axes do not fit the encoder.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise InputError(
                f"encoder input must have shape (batch, {self.in_channels}, {self.spatial_dims} spatial axes), "
                f"not {tuple(x.shape)}; check in_channels/spatial_dims against the data"
            )
        x = self.to_weight_axes(x)
        features = []
        for stage in self.stage_modules():
            for module in stage:
                x = module(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest feature map (B, num_features, ...)."""
        return self.forward_pyramid(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _reverse_spatial(x: torch.Tensor) -> torch.Tensor:
    # Reversing the spatial axes is its own inverse.
    return x.permute(0, 1, *range(x.ndim - 1, 1, -1))
