"""Inference: per-sample predictions for a dataset, sliding windows for large volumes."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medtl.engine.runtime import resolve_amp
from medtl.errors import ConfigError, InputError
from medtl.vocabulary import TTA_MODES

ACTIVATIONS = ("softmax", "sigmoid", "none")


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (metadata tracking slows every op and breaks concat)."""
    as_tensor = getattr(value, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else value


def collate_fn() -> Any:
    """MONAI's `list_data_collate` when MONAI is in use (it flattens the lists that multi-sample
    crops such as RandCropByPosNegLabeld return), else torch's default collate.

    Checked through `sys.modules` so runs without MONAI transforms skip its seconds-long import.
    """
    if "monai" in sys.modules:
        from monai.data.utils import list_data_collate

        return list_data_collate
    return None


def sliding_window_predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mode: str = "gaussian",
    output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Model outputs for images larger than the training patch, by MONAI `sliding_window_inference`.

    Patches run on the model's device; overlapping outputs are blended (Gaussian weights by
    default). Call under `torch.no_grad()` (and `torch.autocast` for mixed precision).

    Args:
        model: maps a (B, C, *roi_size) batch to (B, K, *roi_size) outputs.
        images: (B, C, *spatial) batch, 2D or 3D, any spatial size.
        roi_size: patch size (the training patch), one entry per spatial axis.
        sw_batch_size: patches per forward pass.
        overlap: fraction of overlap between neighbouring patches.
        mode: "gaussian" or "constant" blending.
        output_device: where the stitched output lives; None = the images' device (use "cpu"
            for volumes too big for GPU memory).

    Returns:
        (B, K, *spatial) outputs with the images' spatial shape.

    Raises:
        InputError: when `roi_size` does not match the images' spatial dimensions.

    Example:
        >>> logits = sliding_window_predict(net, volume[None], roi_size=(96, 96, 96))
    """
    if images.ndim - 2 != len(roi_size) or images.ndim not in (4, 5):
        raise InputError(
            f"images must be (B, C, *spatial) with {len(roi_size)} spatial axes to match roi_size {tuple(roi_size)}, "
            f"not shape {tuple(images.shape)}; add the batch axis or fix roi_size"
        )
    from monai.inferers import sliding_window_inference  # seconds-long import, only needed here

    param = next(model.parameters(), None)
    sw_device = param.device if param is not None else images.device
    return sliding_window_inference(
        plain_tensor(images),
        roi_size=tuple(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=model,
        overlap=overlap,
        mode=mode,
        sw_device=sw_device,
        device=output_device if output_device is not None else images.device,
    )


def _activate(outputs: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(outputs, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(outputs)
    return outputs


def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    activation: str = "softmax",
    batch_size: int = 8,
    num_workers: int = 0,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    amp: str = "off",
    device: torch.device | str | None = None,
    progress: bool = True,
    flips: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Per-sample model outputs for a dataset, in dataset order (single process).

    Args:
        model: the trained model (put in eval mode here).
        dataset: yields {"image": C x spatial, optional "label", optional "id"} dicts.
        activation: "softmax" (single-label classes, segmentation classes), "sigmoid"
            (multi-label, binary masks) or "none" (raw logits).
        batch_size: samples per forward pass (1 is used with `roi_size`, volumes may differ).
        num_workers: DataLoader workers.
        roi_size: when set, sliding-window inference with this patch size.
        sw_batch_size: patches per forward pass for sliding windows.
        overlap: sliding-window overlap.
        amp: "off", "bf16", "fp16" or "auto" (see `TrainConfig.amp`).
        device: where to run; None = the model's device.
        progress: show a tqdm bar.
        flips: test-time augmentation: spatial axes (0 = the first after the channel) along which
            the mirrored image is also scored; the outputs are averaged after the activation (dense
            outputs mirrored back first). () = the image alone.

    Returns:
        One dict per sample: "output" (float32 CPU tensor, K x spatial: probabilities unless
        activation="none"), plus "label" and "id" when the dataset provides them.

    Raises:
        ConfigError: for an unknown activation.

    Example:
        >>> probs = [row["output"][1].item() for row in predict(model, test_ds)]
    """
    # Long only by its docstring (a public entry point); the body loads, runs and unpacks batches.
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"activation must be one of {list(ACTIVATIONS)}, not {activation!r}; pick one of those"
        )
    device = _inference_device(model, device)
    model = model.to(device).eval()
    amp_dtype = resolve_amp(amp, device)
    loader = DataLoader(
        dataset,
        batch_size=1 if roi_size else batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn(),
    )
    window = {"roi_size": roi_size, "sw_batch_size": sw_batch_size, "overlap": overlap} if roi_size else None
    rows: list[dict[str, Any]] = []
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None),
    ):
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
            images = plain_tensor(batch["image"]).to(device, non_blocking=True)
            views = [_forward(model, images, window, activation)]
            for axis in flips:
                dim = 2 + int(axis)  # batch and channel axes first
                out = _forward(model, images.flip(dim), window, activation)
                views.append(out.flip(dim) if out.ndim == images.ndim else out)
            rows += _rows(batch, torch.stack(views).mean(0) if len(views) > 1 else views[0])
    return rows


def tta_flips(mode: str, spatial_dims: int, trained_axes: Sequence[int] = ()) -> tuple[int, ...]:
    """The `flips` of `predict` for a test-time augmentation mode (`medtl.vocabulary.TTA_MODES`).

    "flip" mirrors the last spatial axis: the columns of a 2D image (left-right in a radiograph).
    "mirror" mirrors each of `trained_axes`, the axes training flipped (`data.flip_axes`).

    Raises:
        ConfigError: for an unknown mode.
    """
    if mode not in TTA_MODES:
        raise ConfigError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, not {mode!r}; "
                          "set evaluation.tta")
    if mode == "mirror":
        if not trained_axes:
            raise ConfigError("evaluation.tta mirror needs the axes training flipped; set data.flip_axes, e.g. [0, 1, 2]")
        return tuple(int(a) for a in trained_axes)
    return (spatial_dims - 1,) if mode == "flip" else ()


def _forward(model: torch.nn.Module, images: torch.Tensor, window: dict | None, activation: str) -> torch.Tensor:
    """One activated forward pass (sliding-window when `window` is set), on the CPU as float32."""
    if window is not None:
        outputs = sliding_window_predict(model, images, output_device="cpu", **window)
    else:
        outputs = model(images)
    return _activate(plain_tensor(outputs).float(), activation).cpu()


def _inference_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` if given, else the device of the model's parameters (CPU for a model without any)."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _rows(batch: dict[str, Any], outputs: torch.Tensor) -> list[dict[str, Any]]:
    """One {"output", "label", "id"} dict per sample of a batch (label and id when the batch has them)."""
    rows = []
    for i in range(outputs.shape[0]):
        row: dict[str, Any] = {"output": outputs[i]}
        if "label" in batch:
            row["label"] = plain_tensor(batch["label"][i]).cpu()
        if "id" in batch:
            ident = batch["id"][i]
            row["id"] = ident.item() if isinstance(ident, torch.Tensor) else ident
        rows.append(row)
    return rows
