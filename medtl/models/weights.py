"""Where pretrained weights come from and what they expect: records, file locations, safe reading.

A `WeightRecord` is the data a run logs about its starting point (origin, licence, digest,
input channels, normalisation, axis order, first conv and classifier names), like timm's
`PretrainedCfg`. Files are found offline first: an explicit path, then `MEDTL_WEIGHTS_DIR`, then
`<config>/weights/` (`MEDTL_CONFIG_DIR` or `~/.config/medtl`). Checkpoints are read with
`torch.load(..., weights_only=True)` or safetensors, never by running pickled code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from medtl.errors import WeightsError

Normalization = Literal["imagenet", "zscore_nonzero", "unit"]
WeightSource = Literal["imagenet", "medicalnet", "file", "none"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys a checkpoint may nest its tensors under (MedicalNet: "state_dict"; timm train: "model").
_NESTED_KEYS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class WeightRecord:
    """What one source of pretrained weights is and what input it expects.

    Attributes:
        source: "imagenet", "medicalnet", "file" (a user checkpoint) or "none" (scratch).
        origin: where the weights come from (package, URL or hub id, or "random initialisation").
        licence: licence of the weights (and terms of the data they were trained on).
        sha256: digest of the file actually loaded; in the catalogue, the expected digest when
            it is known (None otherwise).
        in_channels: input channels the weights were trained with.
        spatial_dims: 2 or 3, as trained (a 2D record used by an inflated 3D model stays 2).
        axes: spatial axis order the kernels were trained on: "HW" (rows, cols) for photos,
            "DHW" (slices, rows, cols) for MedicalNet. medtl encoders reverse medtl's
            (cols, rows[, slices]) arrays into this order themselves.
        normalization: intensity scheme the data pipeline must apply: "imagenet" (0..1 then
            `mean`/`std` per channel), "zscore_nonzero" (MedicalNet: z-score over voxels > 0)
            or "unit" (0..1 only, for scratch training).
        mean: per-channel mean for "imagenet" normalisation, else None.
        std: per-channel std for "imagenet" normalisation, else None.
        input_size: spatial size the weights were trained at, in `axes` order.
        spacing: voxel spacing (mm) the weights were trained at; None when the source did not
            resample to a fixed spacing (photos, MedicalNet's resize-to-fit pipeline).
        first_conv: checkpoint name of the stem convolution adapted to `in_channels`.
        classifier: checkpoint name prefix of the head that is dropped or re-used.
        file_names: file names accepted in the weights folder, first = preferred.
        hf_hub_id: Hugging Face hub repository used when no local file exists (None = local only).
        package_file: "package:relative/path" of weights installed with a Python package.
        notes: anything else a reader of the run must know.
    """

    source: WeightSource
    origin: str
    licence: str
    sha256: str | None
    in_channels: int
    spatial_dims: int
    axes: str
    normalization: Normalization
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    first_conv: str
    classifier: str | None
    file_names: tuple[str, ...] = ()
    hf_hub_id: str | None = None
    package_file: str | None = None
    notes: str = ""

    def as_dict(self) -> dict[str, str]:
        """Flat string values for MLflow params/tags (keys are the field names)."""
        return {f.name: _flat(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _flat(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else ",".join(
            f"{v:g}" if isinstance(v, float) else str(v) for v in value
        )
    return str(value)


def scratch_record(template: WeightRecord) -> WeightRecord:
    """The record of a randomly initialised model built like `template`'s encoder.

    Args:
        template: the encoder's pretrained record (for layer names and axis order).

    Returns:
        A record with source "none" and "unit" (0..1) normalisation.
    """
    return dataclasses.replace(
        template, source="none", origin="random initialisation", licence="n/a", sha256=None,
        normalization="unit", mean=None, std=None, input_size=None, spacing=None, file_names=(),
        hf_hub_id=None, package_file=None, notes="trained from scratch; no pretrained weights",
    )


def config_dir() -> Path:
    """medtl's configuration folder: `MEDTL_CONFIG_DIR`, else `~/.config/medtl`."""
    env = os.environ.get("MEDTL_CONFIG_DIR")
    return Path(env).expanduser() if env else Path.home() / ".config" / "medtl"


def weights_dir() -> Path:
    """The folder searched for pretrained weight files: `MEDTL_WEIGHTS_DIR`, else `<config>/weights`."""
    env = os.environ.get("MEDTL_WEIGHTS_DIR")
    return Path(env).expanduser() if env else config_dir() / "weights"


def find_weight_file(record: WeightRecord) -> Path | None:
    """The record's weights on this machine, without any network access.

    Looks for `record.file_names` in `weights_dir()`, then for the file installed with a Python
    package (`record.package_file`), then for the names in torch's hub checkpoint cache
    (where torchvision keeps its downloads).

    Args:
        record: the weight source.

    Returns:
        The file path, or None when no accepted file exists locally.
    """
    for name in record.file_names:
        if (weights_dir() / name).is_file():
            return weights_dir() / name
    if record.package_file:
        package, _, relative = record.package_file.partition(":")
        try:
            candidate = Path(str(importlib.resources.files(package).joinpath(relative)))
        except ModuleNotFoundError:
            candidate = None
        if candidate is not None and candidate.is_file():
            return candidate
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in record.file_names:
        if (cache / name).is_file():
            return cache / name
    return None


def hub_weight_file(record: WeightRecord) -> Path | None:
    """The record's file from the Hugging Face hub cache (downloading only when online).

    `HF_HUB_OFFLINE` is read at call time (huggingface_hub reads it once at import), so an
    offline process never opens a connection.

    Args:
        record: the weight source; records without `hf_hub_id` return None.

    Returns:
        The cached file path, or None when the hub cannot provide it.
    """
    if record.hf_hub_id is None:
        return None
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        return Path(hf_hub_download(record.hf_hub_id, "model.safetensors", local_files_only=offline))
    except Exception:  # noqa: BLE001 - hub errors differ by version and network state; caller explains
        return None


def missing_weights_message(encoder: str, record: WeightRecord) -> str:
    """The "where to put the file" message for weights that are not available offline."""
    if not record.file_names:
        package = (record.package_file or "").partition(":")[0]
        return (f"{record.source} weights for encoder '{encoder}' must be installed, not missing; reinstall the "
                f"Python package providing '{package}' ({record.origin}) or pass a checkpoint path as weights")
    names = " or ".join(record.file_names)
    hub = f" (or let the hub cache fetch {record.hf_hub_id} when online)" if record.hf_hub_id else ""
    return (
        f"{record.source} weights for encoder '{encoder}' must be a local file, not missing; "
        f"put {names} ({record.origin}) in {weights_dir()} or set MEDTL_WEIGHTS_DIR{hub}, "
        f"or pass weights='none' to train from scratch"
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the standard library reads it in chunks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name, unwrapped and without DataParallel prefixes.

    Accepts a plain state_dict, MedicalNet's `{"state_dict": ...}`, a timm training checkpoint
    (`{"model": ...}`) saved with `torch.save`, or a `.safetensors` file. Keys lose a leading
    `module.` (DataParallel); non-tensor entries (epoch counters, optimizer state) are ignored.

    Args:
        path: the checkpoint file.

    Returns:
        Tensor name -> tensor, on CPU.

    Raises:
        WeightsError: when the file is missing, is no checkpoint (empty, truncated, text...),
            needs pickle code execution to load, or holds no tensors.
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path.name} must be an existing file, not "
                           f"{'a folder' if path.is_dir() else 'missing'}; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error kinds; name the file instead
            raise WeightsError(
                f"checkpoint {path.name} must be a readable safetensors file, not unreadable "
                f"({type(err).__name__}); copy it again or save it with safetensors.torch.save_file"
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names the GLOBAL it refused (a class or function to import);
        # any other unpickling error means the bytes are no pickle at all.
        if "GLOBAL" in str(err):
            raise WeightsError(
                f"checkpoint {path.name} must load with torch.load(weights_only=True), not need pickle code "
                f"execution; re-save only its tensors: torch.save(model.state_dict(), path)"
            ) from err
        raise WeightsError(_unreadable(path, err)) from err
    except Exception as err:  # noqa: BLE001 - torch raises EOFError, KeyError, RuntimeError... for non-checkpoints
        raise WeightsError(_unreadable(path, err)) from err
    state = _unwrap(obj)
    if not state:
        raise WeightsError(f"checkpoint {path.name} must hold a state_dict of tensors, not {type(obj).__name__}; "
                           f"save it with torch.save(model.state_dict(), path)")
    return state


def _unreadable(path: Path, err: BaseException) -> str:
    # The exception text may quote the full path: only its kind is shown.
    return (f"checkpoint {path.name} must be a torch checkpoint (torch.save of a state_dict) or a .safetensors "
            f"file, not an unreadable or truncated file ({type(err).__name__}); check that the path names the "
            f"weights file and that it was copied completely")


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        return {}
    for key in _NESTED_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key])
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
