"""Fit a checkpoint onto an encoder loudly: channel adaptation, 2D->3D inflation, load report.

Like timm's `_builder.load_pretrained`, but every tensor is accounted for in a `LoadReport`
(matched / adapted / newly initialised / unexpected / dropped), mismatched shapes are refused
instead of skipped (MedicalNet's own loader and MONAI's DenseNet skip them silently), and a
checkpoint that fills too little of the encoder is refused with the keys that did not fit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from timm.models import adapt_input_conv
from torch import nn

from medtl.errors import WeightsError

logger = logging.getLogger("medtl.models")

_SKIP_SUFFIX = "num_batches_tracked"  # BatchNorm counters: not weights, absent from many checkpoints
_SHOW = 5  # keys quoted in error messages


@dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did to each tensor.

    Checkpoint-side names are used for `matched`, `adapted`, `unexpected` and `dropped`;
    model-side names (relative to the task model, e.g. "head.fc.weight") for `newly_initialised`.

    Attributes:
        checkpoint: file name of the checkpoint (no folders).
        sha256: SHA-256 of the checkpoint file.
        matched: tensors copied unchanged.
        adapted: (name, how) for tensors changed to fit: input channels, 2D->3D inflation.
        newly_initialised: model tensors the checkpoint did not provide (head, decoder, and any
            encoder tensor that stayed random).
        unexpected: checkpoint tensors with no place in the model.
        dropped: checkpoint head tensors deliberately not used (a classifier of another size,
            MedicalNet's `conv_seg`).
        matched_fraction: share of the encoder's tensors filled from the checkpoint.
    """

    checkpoint: str
    sha256: str
    matched: tuple[str, ...]
    adapted: tuple[tuple[str, str], ...]
    newly_initialised: tuple[str, ...]
    unexpected: tuple[str, ...]
    dropped: tuple[str, ...]
    matched_fraction: float

    def summary(self) -> str:
        """One line for logs: counts, fraction and digest prefix."""
        return (
            f"loaded {self.checkpoint} (sha256 {self.sha256[:12]}): {len(self.matched)} matched, "
            f"{len(self.adapted)} adapted, {len(self.newly_initialised)} newly initialised, "
            f"{len(self.unexpected)} unexpected, {len(self.dropped)} dropped; "
            f"encoder {self.matched_fraction:.1%} from checkpoint"
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (for an MLflow artifact)."""
        out = dataclasses.asdict(self)
        out["adapted"] = [{"key": k, "how": how} for k, how in self.adapted]
        return out


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A stem kernel converted to `in_channels` input channels (2D or 3D kernels).

    3 -> 1 sums the RGB kernels and 3 -> N repeats them scaled by 3/N (timm's
    `adapt_input_conv`); 1 -> N (e.g. MedicalNet) repeats scaled by 1/N, so a constant input
    gives the same response. timm's function takes only 4D RGB kernels, hence the reshape and
    the 1-channel case here.

    Args:
        weight: kernel of shape (out, in, *spatial).
        in_channels: wanted input channels.

    Returns:
        Kernel of shape (out, in_channels, *spatial).

    Raises:
        WeightsError: when the source has neither 1, 3 nor `in_channels` channels.
    """
    source = weight.shape[1]
    if source == in_channels:
        return weight
    if source == 3:
        flat = weight.reshape(weight.shape[0], 3, -1, weight.shape[-1])
        adapted = adapt_input_conv(in_channels, flat)
        return adapted.reshape(weight.shape[0], in_channels, *weight.shape[2:])
    if source == 1:
        return weight.repeat(1, in_channels, *([1] * (weight.ndim - 2))) / in_channels
    raise WeightsError(
        f"the checkpoint's first convolution must take 1, 3 or {in_channels} input channels, not {source}; "
        f"use a checkpoint trained on grey-level or RGB input"
    )


def inflate_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """A 2D kernel inflated to 3D, I3D-style: repeated `depth` times along depth and divided by it.

    A volume of identical slices then gives the 2D response on every slice (Carreira and
    Zisserman 2017, "boring video" bootstrapping).

    Args:
        weight: kernel of shape (out, in, h, w).
        depth: kernel depth of the 3D convolution.

    Returns:
        Kernel of shape (out, in, depth, h, w).
    """
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def _adapt(name: str, src: torch.Tensor, target: torch.Tensor, first_conv: str) -> tuple[torch.Tensor, str] | None:
    """The checkpoint tensor reshaped to fit the model, with how; None when it cannot fit."""
    steps = []
    if name == f"{first_conv}.weight" and src.ndim >= 3 and src.shape[1] != target.shape[1]:
        rule = "sum" if target.shape[1] == 1 else "repeat, scaled"
        steps.append(f"input channels {src.shape[1]}->{target.shape[1]} ({rule})")
        src = adapt_input_channels(src, target.shape[1])
    if src.ndim == 4 and target.ndim == 5:
        src = inflate_kernel(src, target.shape[2])
        steps.append(f"inflated 2D->3D (depth {target.shape[2]})")
    if not steps or src.shape != target.shape:
        return None
    return src, "; ".join(steps)


@dataclass
class _Sorted:
    """Checkpoint tensors sorted by what happens to them (checkpoint names), and what gets loaded."""

    encoder_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # encoder.net names
    head_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # task-model names
    matched: list[str] = dataclasses.field(default_factory=list)
    adapted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)


def load_encoder_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    encoder_name: str,
    first_conv: str,
    classifier: str | None,
    checkpoint: str,
    sha256: str,
    min_matched: float = 0.9,
    check: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> LoadReport:
    """Load a checkpoint into a task model's encoder (and classifier when it fits) with a report.

    The encoder's own tensors (`model.encoder.net`) carry checkpoint names. A checkpoint
    classifier (`<classifier>.weight/.bias`) is copied into `model.head.fc` when the shapes
    agree (e.g. 1000 ImageNet classes kept), otherwise dropped and reported.

    Args:
        model: a medtl task model (has `.encoder.net`, and `.head.fc` for classification).
        state: checkpoint tensors by name (see `weights.read_checkpoint`).
        encoder_name: registry name, for messages.
        first_conv: checkpoint name of the stem convolution (adapted to the model's channels).
        classifier: checkpoint name prefix of the source head, or None.
        checkpoint: file name for the report.
        sha256: file digest for the report.
        min_matched: refuse when less than this share of the encoder's tensors (and of the
            checkpoint's non-head tensors) can be used.
        check: encoder-specific check run first (e.g. MedicalNet shortcut type and depth).

    Returns:
        The load report (also logged).

    Raises:
        WeightsError: on shape mismatches, too small a matched share, or a failed `check`.
    """
    if check is not None:
        check(state)
    net = model.encoder.net
    target = {k: v for k, v in net.state_dict().items() if not k.endswith(_SKIP_SUFFIX)}
    sorted_ = _sort_tensors(state, target, _head_targets(model, classifier), classifier, first_conv)
    filled = _check_fit(sorted_, state, target, checkpoint=checkpoint, encoder_name=encoder_name,
                        min_matched=min_matched)
    full = net.state_dict()
    full.update(sorted_.encoder_state)
    net.load_state_dict(full, strict=True)
    with torch.no_grad():
        for name, tensor in sorted_.head_state.items():
            model.get_parameter(name).copy_(tensor)
    loaded = {f"encoder.net.{k}" for k in sorted_.encoder_state} | set(sorted_.head_state)
    fresh = tuple(k for k in model.state_dict() if not k.endswith(_SKIP_SUFFIX) and k not in loaded)
    report = LoadReport(
        checkpoint=checkpoint, sha256=sha256, matched=tuple(sorted_.matched), adapted=tuple(sorted_.adapted),
        newly_initialised=fresh, unexpected=tuple(sorted_.unexpected), dropped=tuple(sorted_.dropped),
        matched_fraction=round(filled, 6),
    )
    _log_report(report, encoder_name)
    return report


def _head_targets(model: nn.Module, classifier: str | None) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Checkpoint classifier names -> (task-model name, tensor) of the model's `head.fc`, if it has one."""
    fc = getattr(getattr(model, "head", None), "fc", None)
    if fc is None or classifier is None:
        return {}
    return {f"{classifier}.weight": ("head.fc.weight", fc.weight), f"{classifier}.bias": ("head.fc.bias", fc.bias)}


def _sort_tensors(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                  head_target: Mapping[str, tuple[str, torch.Tensor | None]], classifier: str | None,
                  first_conv: str) -> _Sorted:
    """Match, adapt, keep as head, drop or set aside every checkpoint tensor (nothing is loaded yet)."""
    out = _Sorted()
    for name, src in state.items():
        if name.endswith(_SKIP_SUFFIX):
            continue
        if name in target:
            if src.shape == target[name].shape:
                out.encoder_state[name] = src
                out.matched.append(name)
                continue
            fitted = _adapt(name, src, target[name], first_conv)
            if fitted is None:
                out.mismatched.append(name)
            else:
                out.encoder_state[name] = fitted[0]
                out.adapted.append((name, fitted[1]))
        elif name in head_target and head_target[name][1] is not None and src.shape == head_target[name][1].shape:
            out.head_state[head_target[name][0]] = src
            out.matched.append(name)
        elif classifier is not None and (name == classifier or name.startswith(f"{classifier}.")):
            out.dropped.append(name)
        else:
            out.unexpected.append(name)
    return out


def _check_fit(sorted_: _Sorted, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
               checkpoint: str, encoder_name: str, min_matched: float) -> float:
    """Refuse mismatched shapes and too small a share filled or used; returns the share of the encoder filled."""
    if sorted_.mismatched:
        shown = "; ".join(f"'{k}' must be {tuple(target[k].shape)}, not {tuple(state[k].shape)}"
                          for k in sorted_.mismatched[:_SHOW])
        raise WeightsError(
            f"checkpoint {checkpoint} must fit encoder '{encoder_name}' tensor by tensor, but {len(sorted_.mismatched)} "
            f"tensor shape(s) differ (channel counts or kernel sizes): {shown}; "
            f"use the checkpoint made for this encoder or pick the encoder it was trained with"
        )
    loaded, unexpected = sorted_.encoder_state, sorted_.unexpected
    filled = len(loaded) / max(1, len(target))
    used = len(loaded) / max(1, len(loaded) + len(unexpected))
    if filled < min_matched:
        missing = [k for k in target if k not in loaded]
        raise WeightsError(
            f"checkpoint {checkpoint} must fill at least {min_matched:.0%} of encoder '{encoder_name}', not "
            f"{filled:.0%} ({len(missing)} encoder tensors missing, e.g. {missing[:_SHOW]}); "
            f"check that the checkpoint belongs to this encoder, or lower min_matched to accept a partial load"
        )
    if used < min_matched:
        raise WeightsError(
            f"checkpoint {checkpoint} must be used at least {min_matched:.0%} by encoder '{encoder_name}', not "
            f"{used:.0%} ({len(unexpected)} checkpoint tensors have no place, e.g. {unexpected[:_SHOW]}); "
            f"it holds another or a larger network: pick the encoder it was trained with"
        )
    return filled


def _log_report(report: LoadReport, encoder_name: str) -> None:
    logger.info("encoder '%s': %s", encoder_name, report.summary())
    for name, how in report.adapted[:_SHOW]:
        logger.info("adapted %s: %s", name, how)
    encoder_fresh = [k for k in report.newly_initialised if k.startswith("encoder.")]
    if encoder_fresh or report.unexpected:
        logger.warning(
            "encoder '%s': %d encoder tensors left random (e.g. %s), %d checkpoint tensors unused (e.g. %s)",
            encoder_name, len(encoder_fresh), encoder_fresh[:_SHOW], len(report.unexpected),
            list(report.unexpected[:_SHOW]),
        )
