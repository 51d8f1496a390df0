"""Multi-task transfer: one shared pretrained encoder, a segmentation decoder and a class head.

`MultiTaskModel` reuses a `Segmenter`'s encoder, decoder and segmentation head (same names, so
its state_dict is a Segmenter's plus `cls_head.*`) and adds a classification head on the deepest
feature map. It trains with the engine's unchanged `fit`, whose batches carry one "label" tensor
and whose validation concatenates one output tensor per batch, so both travel packed:

===========  ==========================================================================
output       `(B, S + K, *spatial)`: S segmentation logit maps, then the K class logits
             repeated over space (`pack_outputs`; `split_outputs` averages them back, which
             also blends patch-wise class logits under sliding-window validation).
label        `(B, 2, *spatial)` float: channel 0 = the mask (class index per voxel),
             channel 1 = the study's class index everywhere (-1 = no class label);
             wrap the segmentation dataset in `MultiTaskDataset` (after augmentation, so the
             class channel stays constant).
loss         `multitask_loss(S, cls_weight=..., seg_weight=...)` = seg_weight x Dice+CE
             (MONAI `DiceCELoss`) + cls_weight x cross-entropy over studies with a class.
prediction   `model.select_output("classification")` -> (B, K) logits, or
             `"segmentation"` -> (B, S, *spatial), then the engine's `predict` as usual.
===========  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Dataset

from medtl.errors import ConfigError, InputError
from medtl.models.domain import _plain, cross_entropy_known
from medtl.models.heads import ClassificationHead, Segmenter, segmentation_logits

OUTPUTS = ("both", "segmentation", "classification")


def pack_outputs(segmentation: torch.Tensor, classification: torch.Tensor) -> torch.Tensor:
    """(B, S, *spatial) and (B, K) logits -> (B, S + K, *spatial), class logits repeated over space."""
    spatial = segmentation.shape[2:]
    expanded = classification.to(segmentation.dtype).reshape(*classification.shape, *([1] * len(spatial)))
    return torch.cat([segmentation, expanded.expand(-1, -1, *spatial)], dim=1)


def split_outputs(outputs: torch.Tensor, num_seg_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed outputs -> (segmentation logits (B, S, *spatial), class logits (B, K)).

    Raises:
        InputError: when the outputs hold no class channel.
    """
    if outputs.ndim < 3 or outputs.shape[1] <= num_seg_classes:
        raise InputError(f"multi-task outputs must have more than {num_seg_classes} channels (segmentation + "
                         f"class), not shape {tuple(outputs.shape)}; use MultiTaskModel with output 'both'")
    return outputs[:, :num_seg_classes], outputs[:, num_seg_classes:].flatten(2).mean(-1)


def split_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed labels (B, 2, *spatial) -> (mask (B, 1, *spatial), class index (B,) long, -1 = none).

    Raises:
        InputError: when the labels are not packed by `MultiTaskDataset`.
    """
    if labels.ndim < 3 or labels.shape[1] != 2:
        raise InputError(f"multi-task labels must have shape (batch, 2, *spatial) = [mask, class], not "
                         f"{tuple(labels.shape)}; wrap the dataset in MultiTaskDataset")
    return labels[:, :1], labels[:, 1].flatten(1)[:, 0].round().long()


class MultiTaskModel(nn.Module):
    """Shared encoder with a U-Net decoder + segmentation head and a classification head.

    Args:
        segmenter: a `Segmenter` from `create_model("segmentation", ...)` (its modules are reused).
        num_classes: class logits of the classification head.
        dropout: dropout before the class head's linear layer.
        output: "both" (packed, for training and validation), "segmentation" or "classification".

    Raises:
        TypeError: when `segmenter` is not a `Segmenter`.
        ConfigError: for invalid sizes or an unknown output.

    Example:
        >>> seg = create_model("segmentation", "efficientnet_lite0", num_classes=2).model
        >>> model = MultiTaskModel(seg, num_classes=2)
    """

    def __init__(self, segmenter: Segmenter, num_classes: int, *, dropout: float = 0.2, output: str = "both") -> None:
        super().__init__()
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"multi-task training needs a medtl Segmenter, not {type(segmenter).__name__}; build it "
                            f"with create_model('segmentation', ...)")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"model.num_classes must be an integer >= 1, not {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), not {dropout!r}; use e.g. 0.2")
        if len(segmenter.aux_heads):
            raise ConfigError(f"model.deep_supervision must be 0 for multi-task training, not "
                              f"{len(segmenter.aux_heads)}; set model.deep_supervision=0")
        self.encoder = segmenter.encoder
        self.decoder = segmenter.decoder
        self.head = segmenter.head
        self.cls_head = ClassificationHead(self.encoder.num_features, num_classes, dropout)
        param = next(segmenter.parameters(), None)
        if param is not None:
            self.cls_head.to(param.device)
        self.output = "both"
        self.select_output(output)

    @property
    def num_seg_classes(self) -> int:
        """Segmentation output channels (incl. background)."""
        return self.head[0].out_channels

    @property
    def num_classes(self) -> int:
        """Class logits."""
        return self.cls_head.fc.out_features

    def select_output(self, output: str) -> MultiTaskModel:
        """Choose what `forward` returns: "both" (packed), "segmentation" or "classification".

        Returns:
            self, so `predict(model.select_output("classification"), ds)` reads naturally.

        Raises:
            ConfigError: for an unknown output.
        """
        if output not in OUTPUTS:
            raise ConfigError(f"multi-task output must be one of {list(OUTPUTS)}, not {output!r}")
        self.output = output
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's deepest feature map."""
        return self.encoder.forward_features(x)

    def forward_tasks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits (B, S, *x.shape[2:]) and class logits (B, K)."""
        pyramid = self.encoder.forward_pyramid(x)
        segmentation = segmentation_logits(self.encoder, self.decoder, self.head, pyramid, x)
        return segmentation, self.cls_head(pyramid[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Packed logits, or one task's logits (see `select_output`)."""
        if self.output == "classification":
            return self.cls_head(self.encoder.forward_features(x))
        segmentation, classification = self.forward_tasks(x)
        if self.output == "segmentation":
            return segmentation
        return pack_outputs(segmentation, classification)


class MultiTaskDataset(Dataset):
    """Wraps a segmentation dataset so each item's "label" is [mask, class index] (2, *spatial).

    Args:
        dataset: yields {"image", "label" (the 1 x spatial mask), ...} items (augmented already).
        class_labels: class index of every item, -1 where a study has a mask but no class label.

    Raises:
        InputError: when the lengths differ.
    """

    def __init__(self, dataset: Dataset, class_labels: Sequence[int]) -> None:
        self.dataset = dataset
        self.class_labels = np.asarray(class_labels, dtype=np.int64)
        size = len(dataset)  # type: ignore[arg-type]
        if len(self.class_labels) != size:
            raise InputError(f"class_labels must have one entry per study ({size}), not {len(self.class_labels)}")

    def __len__(self) -> int:
        return len(self.class_labels)

    def _pack(self, item: Mapping[str, Any], index: int) -> dict[str, Any]:
        mask = _plain(item["label"]).float()
        if mask.ndim < 2 or mask.shape[0] != 1:
            raise InputError(f"segmentation labels must be 1 x spatial masks, not shape {tuple(mask.shape)}; "
                             f"use a dataset built for task segmentation")
        packed = torch.cat([mask, torch.full_like(mask, float(self.class_labels[index]))])
        return {**item, "label": packed}

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, list):  # MONAI multi-sample crops return one dict per patch
            return [self._pack(part, index) for part in item]
        return self._pack(item, index)


def multitask_loss(
    num_seg_classes: int,
    *,
    cls_weight: float = 1.0,
    seg_weight: float = 1.0,
    class_weights: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """seg_weight x DiceCE(segmentation) + cls_weight x cross-entropy(class), on packed tensors.

    Args:
        num_seg_classes: segmentation channels at the front of the outputs.
        cls_weight: weight of the classification term (studies with class -1 do not count).
        seg_weight: weight of the segmentation term (MONAI `DiceCELoss`, softmax, one-hot mask).
        class_weights: optional (K,) weights of the classification cross-entropy.

    Returns:
        `loss(outputs, labels)` for the engine's `fit`.

    Raises:
        ConfigError: for negative weights or both weights zero.

    Example:
        >>> loss_fn = multitask_loss(model.num_seg_classes, cls_weight=0.5, seg_weight=1.0)
    """
    for key, value in (("cls_weight", cls_weight), ("seg_weight", seg_weight)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"multitask.{key} must be a number >= 0, not {value!r}; use e.g. 1.0")
    if cls_weight == 0 and seg_weight == 0:
        raise ConfigError("multitask.cls_weight and multitask.seg_weight must not both be 0; set one to e.g. 1.0")
    segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        segmentation, classification = split_outputs(outputs, num_seg_classes)
        mask, classes = split_labels(labels)
        value = cls_weight * cross_entropy_known(classification, classes, weight=class_weights)
        if seg_weight:
            value = value + seg_weight * segmentation_loss(segmentation.float(), mask)
        return value

    return loss
