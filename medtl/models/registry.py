"""One registry of encoders, filled by `@register_encoder` on builder functions (timm's idea).

Builders live in `timm_encoders.py` (2D ImageNet) and `medicalnet.py` (3D MedicalNet) and are
imported explicitly by `medtl.models`, so importing any `medtl.models.*` module registers them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from medtl.errors import ConfigError, did_you_mean
from medtl.models.encoder import Encoder
from medtl.models.weights import WeightRecord

Builder = Callable[[int], Encoder]
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder and which pretrained weights fit it.

    Attributes:
        name: registry name (the builder function's name).
        build: `build(in_channels)` -> the encoder in its native dimensionality.
        native_dims: 2 for ImageNet encoders (3D by inflation), 3 for MedicalNet.
        weights: weight source name -> record; the first is the encoder's default.
        convert: turns a checkpoint of another naming scheme into the encoder's names.
        check: raises `WeightsError` with a precise reason when a checkpoint cannot belong to
            this encoder (e.g. MedicalNet shortcut type or depth).
        description: one line for listings and docs.
    """

    name: str
    build: Builder
    native_dims: int
    weights: Mapping[str, WeightRecord] = field(hash=False)
    convert: Callable[[StateDict], StateDict] | None = None
    check: Callable[[Mapping[str, torch.Tensor]], None] | None = None
    description: str = ""

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Dimensionalities the encoder can be built for (2D encoders inflate to 3D)."""
        return (2, 3) if self.native_dims == 2 else (3,)

    @property
    def default_weights(self) -> str:
        """The weight source used for `weights="pretrained"`."""
        return next(iter(self.weights))


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    *,
    native_dims: int,
    weights: tuple[WeightRecord, ...],
    convert: Callable[[StateDict], StateDict] | None = None,
    check: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder `fn(in_channels) -> Encoder` under its function name.

    Args:
        native_dims: 2 or 3.
        weights: the pretrained records that fit, default first.
        convert: optional checkpoint renamer (see `EncoderSpec.convert`).
        check: optional checkpoint check (see `EncoderSpec.check`).

    Returns:
        The decorator (it returns the builder unchanged).
    """

    def decorator(fn: Builder) -> Builder:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"encoder name must be unique, not a second '{fn.__name__}'")
        _REGISTRY[fn.__name__] = EncoderSpec(
            name=fn.__name__, build=fn, native_dims=native_dims, weights={w.source: w for w in weights},
            convert=convert, check=check, description=(fn.__doc__ or "").strip().splitlines()[0],
        )
        return fn

    return decorator


def list_encoders(pattern: str = "*", *, spatial_dims: int | None = None) -> list[str]:
    """Registered encoder names matching a shell pattern, sorted.

    Args:
        pattern: fnmatch pattern, e.g. "medicalnet_*".
        spatial_dims: keep only encoders that can be built for 2 or 3 dimensions.

    Returns:
        The names.

    Example:
        >>> list_encoders("resnet*")
        ['resnet18', 'resnet50']
    """
    return sorted(
        name for name, spec in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (spatial_dims is None or spatial_dims in spec.spatial_dims)
    )


def get_encoder_spec(name: str, *, key: str = "encoder") -> EncoderSpec:
    """The registry entry of an encoder.

    Args:
        name: the registered name.
        key: what the name was given as, for the error (e.g. "config key 'model.encoder'").

    Raises:
        ConfigError: for an unknown name, listing the closest registered names.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise ConfigError(f"{key} must be a registered encoder name, not {name!r}; {did_you_mean(name, list_encoders())}")
