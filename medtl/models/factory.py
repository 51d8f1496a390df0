"""`create_model`: one call from (task, encoder, weights) to a model, its weight record and load report."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medtl.errors import ConfigError, WeightsError
from medtl.models.adapt import LoadReport, load_encoder_weights
from medtl.models.heads import Classifier, Segmenter
from medtl.models.inflate import inflate_to_3d
from medtl.models.registry import EncoderSpec, get_encoder_spec
from medtl.models.weights import (
    WeightRecord,
    file_sha256,
    find_weight_file,
    hub_weight_file,
    missing_weights_message,
    read_checkpoint,
    scratch_record,
)
from medtl.vocabulary import TASKS

logger = logging.getLogger("medtl.models")

WEIGHT_CHOICES = ("pretrained", "imagenet", "medicalnet", "none")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# MONAI FlexibleUNet's decoder widths in 2D; halved in 3D, where activations are ~100x larger.
DECODER_CHANNELS = {2: (256, 128, 64, 32, 16), 3: (128, 64, 32, 16, 8)}


@dataclass(frozen=True)
class ModelBundle:
    """A built model with what it was built from.

    Attributes:
        model: a `Classifier` or `Segmenter` (both have `.encoder` and `.head`).
        weights: the record of the weights the encoder started from (sha256 = the file loaded);
            its `normalization`, `mean`, `std` tell the data pipeline how to scale inputs.
        load_report: what loading did tensor by tensor; None for weights="none".
        task: "classification" or "segmentation".
        encoder: registry name of the encoder.
        spatial_dims: 2 or 3.
        in_channels: input channels of the model.
        num_classes: output logits (classification) or channels (segmentation).
        multi_label: classification with independent classes (sigmoid/BCE).
    """

    model: nn.Module
    weights: WeightRecord
    load_report: LoadReport | None
    task: str
    encoder: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    multi_label: bool

    def describe(self) -> dict[str, str]:
        """Flat string values for MLflow params/tags: `model.*`, `weights.*` and `load.*` keys."""
        out = {
            "model.task": self.task, "model.encoder": self.encoder, "model.spatial_dims": str(self.spatial_dims),
            "model.in_channels": str(self.in_channels), "model.num_classes": str(self.num_classes),
            "model.multi_label": str(self.multi_label),
            "model.parameters": str(sum(p.numel() for p in self.model.parameters())),
        }
        out.update({f"weights.{k}": v for k, v in self.weights.as_dict().items()})
        if self.load_report is not None:
            report = self.load_report
            out.update({
                "load.checkpoint": report.checkpoint, "load.sha256": report.sha256,
                "load.matched": str(len(report.matched)), "load.adapted": str(len(report.adapted)),
                "load.newly_initialised": str(len(report.newly_initialised)),
                "load.unexpected": str(len(report.unexpected)), "load.dropped": str(len(report.dropped)),
                "load.matched_fraction": f"{report.matched_fraction:.4f}",
            })
        return out


def _check_int(key: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"model.{key} must be an integer >= {minimum}, not {value!r}; fix it in the model config")


def _resolve_weights(spec: EncoderSpec, weights: str | os.PathLike) -> tuple[WeightRecord, Path | None]:
    """The record and local file of the requested weights (file None for scratch)."""
    template = next(iter(spec.weights.values()))
    if isinstance(weights, str) and weights in WEIGHT_CHOICES:
        source = spec.default_weights if weights == "pretrained" else weights
        if source == "none":
            return scratch_record(template), None
        if source not in spec.weights:
            raise ConfigError(
                f"model.weights for encoder '{spec.name}' must be one of {[*spec.weights, 'none']} or a checkpoint "
                f"path, not {source!r}; {source} weights do not exist for this architecture"
            )
        record = spec.weights[source]
        path = find_weight_file(record) or hub_weight_file(record)
        if path is None:
            raise WeightsError(missing_weights_message(spec.name, record))
        return record, path
    path = Path(weights).expanduser()
    if not path.exists() and path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(
            f"model.weights must be one of {list(WEIGHT_CHOICES)} or a checkpoint path ({', '.join(CHECKPOINT_SUFFIXES)}), "
            f"not {str(weights)!r}; fix the model config"
        )
    if not path.is_file():
        # Only the file name: the folders of a user's path are none of the error's business.
        raise WeightsError(
            f"model.weights file {path.name} must be an existing checkpoint file, not "
            f"{'a folder' if path.is_dir() else 'missing'}; check the path (relative paths are read from the "
            f"working directory), or use imagenet, medicalnet or none"
        )
    record = dataclasses.replace(
        template, source="file", origin=f"local file {path.name} (tensor names of {template.origin})",
        licence="as provided by the user", sha256=None, file_names=(path.name,), hf_hub_id=None, package_file=None,
        notes=f"user checkpoint; expected input as for {template.source} weights. {template.notes}",
    )
    return record, path


def create_model(
    task: str,
    encoder: str = "efficientnet_lite0",
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    weights: str | os.PathLike = "pretrained",
    multi_label: bool = False,
    dropout: float = 0.2,
    decoder_channels: Sequence[int] | None = None,
    input_skip: int = 0,
    deep_supervision: int = 0,
    min_matched: float = 0.9,
    meta: bool = False,
) -> ModelBundle:
    """Build an encoder with pretrained weights adapted to a classification or segmentation task.

    Args:
        task: "classification" or "segmentation".
        encoder: a name from `list_encoders()`.
        spatial_dims: 2, or 3 (2D ImageNet encoders are inflated; MedicalNet encoders are 3D).
        in_channels: input channels; the stem's pretrained kernels are adapted (3->1 sum,
            3->N or 1->N repeated and scaled).
        num_classes: classification logits, or segmentation output channels incl. background.
        weights: "pretrained" (the encoder's own source: ImageNet for 2D encoders, MedicalNet
            for `medicalnet_*`), "imagenet", "medicalnet", "none" (scratch) or a checkpoint path.
        multi_label: classification with independent classes (BCE loss, sigmoid outputs).
        dropout: dropout before the classifier.
        decoder_channels: segmentation decoder widths, deepest first (default: MONAI
            FlexibleUNet's (256, 128, 64, 32, 16) in 2D, halved in 3D).
        input_skip: segmentation: channels of a conv block on the input that is the decoder's
            full-resolution skip (0: none; see `UNetDecoder`).
        deep_supervision: segmentation: coarser decoder blocks that also get a head in training
            (0: none; see `Segmenter`).
        min_matched: refuse a checkpoint that fills less than this share of the encoder.
        meta: build on PyTorch's meta device (shapes only: no memory, no values): every check of
            a real build, cheaply, for a preflight before hours of work (the weights file is still
            read and fitted tensor by tensor). Such a model is for its record, load report and
            `check_input_size`, never for training.

    Returns:
        The model with its weight record and load report.

    Raises:
        ConfigError: for unknown or invalid arguments (unknown names list close matches).
        WeightsError: when weights are missing offline (the message says which file goes where),
            unsafe to load, or do not fit the encoder.

    Example:
        >>> bundle = create_model("classification", "efficientnet_lite0", in_channels=1, num_classes=2)
        >>> bundle.load_report.matched_fraction
        1.0
    """
    return _assemble(task, encoder, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                     weights=weights, multi_label=multi_label, dropout=dropout, decoder_channels=decoder_channels,
                     input_skip=input_skip, deep_supervision=deep_supervision, min_matched=min_matched, meta=meta)


def _assemble(task: str, encoder: str, *, spatial_dims: int, in_channels: int, num_classes: int,
              weights: str | os.PathLike, multi_label: bool, dropout: float,
              decoder_channels: Sequence[int] | None, input_skip: int, deep_supervision: int,
              min_matched: float, meta: bool) -> ModelBundle:
    """`create_model`, on real tensors or on the meta device: one code path, so checks and builds agree."""
    if task not in TASKS:
        raise ConfigError(f"model.task must be one of {list(TASKS)}, not {task!r}; fix the model config")
    spec = get_encoder_spec(encoder)
    if spatial_dims not in spec.spatial_dims:
        raise ConfigError(f"model.spatial_dims for encoder '{encoder}' must be one of {list(spec.spatial_dims)}, "
                          f"not {spatial_dims!r}; pick a {spatial_dims}D encoder from list_encoders()")
    _check_int("in_channels", in_channels, 1)
    _check_int("num_classes", num_classes, 1)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), not {dropout!r}; use e.g. 0.2")
    for key, value in (("input_skip", input_skip), ("deep_supervision", deep_supervision)):
        _check_int(key, value, 0)
        if value and task != "segmentation":
            raise ConfigError(f"model.{key} must be 0 for {task}, not {value!r}; it is a setting of the "
                              f"segmentation decoder")
    if multi_label and task != "classification":
        raise ConfigError("model.multi_label must be false for segmentation, not true; segmentation channels "
                          "are exclusive classes")
    if not 0.0 < min_matched <= 1.0:
        raise ConfigError(f"model.min_matched must be in (0, 1], not {min_matched!r}; use e.g. 0.9")

    record, path = _resolve_weights(spec, weights)
    with torch.device("meta") if meta else contextlib.nullcontext():
        base = spec.build(in_channels)
        if spatial_dims == 3 and spec.native_dims == 2:
            inflate_to_3d(base.net)
            base.spatial_dims = 3
        if task == "classification":
            model: nn.Module = Classifier(base, num_classes, dropout=dropout, multi_label=multi_label)
        else:
            model = Segmenter(base, num_classes, decoder_channels or DECODER_CHANNELS[spatial_dims],
                              input_skip=input_skip, deep_supervision=deep_supervision)

    report = None
    if path is not None:
        sha256 = file_sha256(path)
        if record.sha256 is not None and record.sha256 != sha256:
            raise WeightsError(
                f"weights file {path.name} must have sha256 {record.sha256[:16]}..., not {sha256[:16]}...; "
                f"the file is damaged or another release: reinstall or replace it")
        state = read_checkpoint(path)
        if spec.convert is not None:
            state = spec.convert(state)
        with _quiet() if meta else contextlib.nullcontext():
            report = load_encoder_weights(
                model, state, encoder_name=encoder, first_conv=record.first_conv, classifier=record.classifier,
                checkpoint=path.name, sha256=sha256, min_matched=min_matched, check=spec.check,
            )
        record = dataclasses.replace(record, sha256=sha256)
    if meta:
        return ModelBundle(model=model, weights=record, load_report=report, task=task, encoder=encoder,
                           spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                           multi_label=multi_label)
    logger.info("built %s model: encoder '%s', %dD, %d input channel(s), %d output(s), weights %s",
                task, encoder, spatial_dims, in_channels, num_classes, record.source)
    return ModelBundle(model=model, weights=record, load_report=report, task=task, encoder=encoder,
                       spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                       multi_label=multi_label)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence a meta-device load: torch warns per tensor that copying into meta is a no-op, and the
    load report's log lines would repeat when the real model is built."""
    medtl_logger = logging.getLogger("medtl.models")
    disabled = medtl_logger.disabled
    medtl_logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        medtl_logger.disabled = disabled


_PROBE_SIZES = (16, 32, 64, 96, 128, 224, 256)


def check_input_size(bundle: ModelBundle, input_size: Sequence[int], *, name: str = "input size") -> None:
    """Refuse an input size the model cannot take (pooling below one voxel), naming one it can.

    One forward pass of a (1, in_channels, *input_size) batch on the meta device (shapes only);
    when it fails, larger sizes are tried to tell a too small size from anything else.

    Args:
        bundle: from `create_model(..., meta=True)` (or a real build).
        input_size: spatial size (cols, rows[, slices]).
        name: what the size was given as, for the error (e.g. "config key 'data.image_size'").

    Raises:
        ConfigError: when the size is too small and a larger one works.

    Example:
        >>> check_input_size(create_model("classification", "densenet121", weights="none", meta=True), (16, 16))
        Traceback (most recent call last):
        medtl.errors.ConfigError: input size must be large enough for encoder 'densenet121' (...), not [16, 16]; ...
    """
    size = tuple(int(s) for s in input_size)
    model = bundle.model

    def fits(candidate: tuple[int, ...]) -> bool:
        try:
            with torch.no_grad():
                model(torch.empty((1, bundle.in_channels, *candidate), device="meta"))
        except RuntimeError:
            return False
        return True

    if any(s < 1 for s in size) or len(size) != bundle.spatial_dims:
        return  # sizes of the wrong kind are the config validation's to report
    training = model.training
    model.eval()
    try:
        if fits(size):
            return
        for floor in _PROBE_SIZES:
            larger = tuple(max(s, floor) for s in size)
            if fits(larger):
                raise ConfigError(
                    f"{name} must be large enough for encoder '{bundle.encoder}' (its pooling would shrink the "
                    f"feature maps below one voxel), not {list(size)}; use e.g. {list(larger)}"
                )
    finally:
        model.train(training)
    # No size fits: a meta-device limitation rather than the size; the real run will tell.
    logger.debug("input-size check of encoder '%s' skipped: no probed size passes on the meta device", bundle.encoder)
