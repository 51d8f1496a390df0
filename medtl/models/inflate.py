"""Turn a 2D network into its 3D twin in place (I3D inflation), keeping every tensor name.

Convolutions become cubic (a k x k kernel becomes k x k x k, same stride along depth), their
weights repeated along depth and divided by it; BatchNorm and pooling become their 3D versions.
Depth is the first spatial axis, as in MedicalNet's (slices, rows, cols) order.

Padding along depth replicates the edge slices where the 2D layer pads with zeros in-plane: a
volume of identical slices then gives exactly the 2D response on every slice, edges included
(zero padding would darken the first and last slices, which ImageNet kernels never saw).
Neither timm nor MONAI inflates modules (timm's same-padding convs and BatchNormAct are 2D-only),
hence this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from medtl.models.adapt import inflate_kernel


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    # TensorFlow "SAME": output = ceil(size / stride); extra padding goes after (timm's pad_same).
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class InflatedConv3d(nn.Conv3d):
    """A Conv3d made from a Conv2d: zero padding in-plane like the original, replicated along depth.

    Args:
        conv: the 2D convolution (plain, `padding="same"`, or timm's dynamic `Conv2dSame`).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.padding_mode != "zeros":
            raise TypeError(f"a 2D convolution to inflate must pad with zeros, not {conv.padding_mode!r}")
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        self.tf_same = isinstance(conv, Conv2dSame) or conv.padding == "same"
        ph, pw = (0, 0) if self.tf_same or conv.padding == "valid" else conv.padding
        super().__init__(
            conv.in_channels, conv.out_channels, (kh, kh, kw), stride=(sh, sh, sw), padding=(0, ph, pw),
            dilation=(dh, dh, dw), groups=conv.groups, bias=conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        self.depth_padding = ph
        with torch.no_grad():
            self.weight.copy_(inflate_kernel(conv.weight, kh))
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            pads = [_same_pad(size, k, s, d) for size, k, s, d in
                    zip(x.shape[2:], self.kernel_size, self.stride, self.dilation, strict=True)]
            (d0, d1), (h0, h1), (w0, w1) = pads
            x = F.pad(x, (0, 0, 0, 0, d0, d1), mode="replicate") if d0 or d1 else x
            x = F.pad(x, (w0, w1, h0, h1))
        elif self.depth_padding:
            x = F.pad(x, (0, 0, 0, 0, self.depth_padding, self.depth_padding), mode="replicate")
        return super().forward(x)


class BatchNormAct3d(nn.BatchNorm3d):
    """timm's BatchNormAct2d (norm, then dropout and activation children) for volumes.

    Args:
        bn: the 2D module whose statistics, affine parameters and children are taken over.
    """

    def __init__(self, bn: BatchNormAct2d) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=_device(bn))
        self.load_state_dict(bn.state_dict())
        self.drop = bn.drop
        self.act = bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _device(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.state_dict().values()), None)
    return None if tensor is None else tensor.device


def _batchnorm3d(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    out = nn.BatchNorm3d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=_device(bn))
    out.load_state_dict(bn.state_dict())
    return out


def _cube(value: int | tuple[int, ...]) -> tuple[int, ...]:
    value = (value, value) if isinstance(value, int) else tuple(value)
    return (value[0], *value)


def _inflate_module(module: nn.Module) -> nn.Module | None:
    """The 3D replacement of one 2D leaf-like module, or None when it is dimension-agnostic."""
    if isinstance(module, nn.Conv2d):
        return InflatedConv3d(module)
    if isinstance(module, BatchNormAct2d):
        return BatchNormAct3d(module)
    if isinstance(module, nn.BatchNorm2d):
        return _batchnorm3d(module)
    if isinstance(module, nn.MaxPool2d):
        return nn.MaxPool3d(_cube(module.kernel_size), _cube(module.stride or module.kernel_size),
                            _cube(module.padding), _cube(module.dilation), ceil_mode=module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return nn.AvgPool3d(_cube(module.kernel_size), _cube(module.stride or module.kernel_size),
                            _cube(module.padding), ceil_mode=module.ceil_mode,
                            count_include_pad=module.count_include_pad)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d(module.output_size if module.output_size != (1, 1) else 1)
    return None


def inflate_to_3d(net: nn.Module) -> nn.Module:
    """Replace every 2D layer of `net` by its inflated 3D version, in place.

    Args:
        net: a 2D network built from Conv2d (incl. timm Conv2dSame), BatchNorm2d (incl. timm
            BatchNormAct2d), Max/AvgPool2d and dimension-agnostic modules.

    Returns:
        The same object, now taking (batch, channels, depth, rows, cols) input.

    Raises:
        TypeError: when a 2D-only module type has no 3D counterpart here (named in the message).
    """
    for name, child in list(net.named_children()):
        replacement = _inflate_module(child)
        if replacement is not None:
            setattr(net, name, replacement.train(child.training))
            continue
        if type(child).__name__.lower().endswith("2d"):
            raise TypeError(
                f"module '{name}' of type {type(child).__name__} must have a 3D counterpart to inflate, not be "
                f"2D-only; use an encoder built from Conv2d/BatchNorm2d/pooling layers"
            )
        inflate_to_3d(child)
    return net
