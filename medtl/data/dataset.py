"""Manifest rows -> MONAI datasets of dictionaries, with the preprocessing the encoder expects.

The deterministic part (load, channel-first, orientation/spacing, intensity scaling, resize and
the encoder's normalisation) is cached by MONAI (`CacheDataset` in memory or `PersistentDataset`
on disk); augmentations run after the cache, for training only. Masks are declared as label maps:
nearest-neighbour resampling, never intensity transforms. Items carry only the manifest's
pseudonymous `id`: no path, no header ever reaches the batch or a cache file (the loader returns
a fresh dict of id, label and tensors, and the pipeline ends by dropping all metadata).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset

from medtl.data.discover import load_study
from medtl.data.verify import resolve_path, resolve_study
from medtl.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What the network input looks like: size, resampling, intensity scheme and normalisation.

    `normalization` follows the encoder's weight record: "imagenet" scales to 0..1 and applies the
    ImageNet mean/std (averaged over RGB when the stem takes fewer than 3 channels, because the
    adapted stem sums the RGB kernels); "zscore_nonzero" is MedicalNet's z-score over voxels > 0;
    "unit" keeps the 0..1 scaling (training from scratch).
    """

    spatial_dims: int = 2
    image_size: tuple[int, ...] = (96, 96)
    spacing: tuple[float, ...] = ()
    intensity: str = "auto"  # auto | ct | mr | xray
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    normalization: str = "imagenet"  # imagenet | zscore_nonzero | unit
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_channels: int = 1
    patch: bool = False  # 3D: random patches of image_size for training, whole volumes otherwise

    def digest(self) -> str:
        """A short stable hash of these settings (part of the disk-cache key)."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=list).encode()).hexdigest()[:16]


def class_names(labels: Sequence[object]) -> list[str]:
    """Sorted class names of a label column: integers sort numerically, names alphabetically."""
    values = sorted({str(v) for v in labels if str(v) not in ("", "nan")})
    if all(v.lstrip("-").isdigit() for v in values):
        values = sorted(values, key=int)
    return values


def _modality_scheme(modality: str, intensity: str) -> str:
    if intensity != "auto":
        return intensity
    modality = modality.upper()
    if modality == "CT":
        return "ct"
    if modality in ("MR", "PT", "NM"):
        return "mr"
    return "xray"


def _scale_to_unit(array: np.ndarray, scheme: str, ct_window: tuple[float, float]) -> np.ndarray:
    # Per-modality scaling to 0..1 before the encoder's own normalisation (see Preprocessing).
    if scheme == "ct":
        lo, hi = ct_window
    else:
        lo, hi = np.percentile(array, (0.5, 99.5)) if array.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _load_item(item: dict, root: Path, key_file: Path | None, prep: Preprocessing) -> dict:
    """Load one manifest row's pixels (and mask) as channel-first MetaTensors with an affine."""
    row = item["row"]
    try:
        image = load_study(resolve_study(row, root, key_file=key_file))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure becomes a named, safe error
        raise InputError(
            f"manifest row {row['id']} could not be loaded ({type(err).__name__}); "
            f"run `medtl manifest verify` to see what changed"
        ) from err
    scheme = _modality_scheme(str(row.get("modality", "")), prep.intensity)
    pixels = _scale_to_unit(image.array, scheme, prep.ct_window)
    out = {"id": item["id"], "label": item["label"]}
    out["image"] = MetaTensor(torch.from_numpy(pixels)[None], affine=torch.as_tensor(image.affine))
    if item.get("mask_ref"):
        mask_path = resolve_path(item["mask_ref"], root, key_file=key_file)
        mask = mt.LoadImage(image_only=True, reader="NibabelReader")(str(mask_path))
        # Keep only geometry: the reader's metadata carries the original file name.
        out["label"] = MetaTensor(torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None], affine=mask.affine)
    return out


def _normalise(prep: Preprocessing) -> mt.Transform:
    if prep.normalization == "imagenet":
        mean = float(np.mean(prep.mean)) if prep.in_channels != 3 else None
        std = float(np.mean(prep.std)) if prep.in_channels != 3 else None
        if prep.in_channels == 3:
            return mt.Compose(
                [
                    mt.RepeatChanneld(keys="image", repeats=3),
                    mt.NormalizeIntensityd(
                        keys="image",
                        subtrahend=np.array(prep.mean)[:, None, None],
                        divisor=np.array(prep.std)[:, None, None],
                    ),
                ]
            )
        return mt.NormalizeIntensityd(keys="image", subtrahend=mean, divisor=std)
    if prep.normalization == "zscore_nonzero":
        return mt.NormalizeIntensityd(keys="image", nonzero=True)
    if prep.normalization == "unit":
        return mt.Identityd(keys="image")
    raise InputError(f"normalization must be imagenet, zscore_nonzero or unit, not {prep.normalization!r}")


def deterministic_transforms(prep: Preprocessing, root: Path, key_file: Path | None, has_mask: bool) -> mt.Compose:
    """Load -> orientation/spacing (3D) -> resize (unless patching) -> normalise: the cached part."""
    keys = ["image", "label"] if has_mask else ["image"]
    modes = ["bilinear", "nearest"] if has_mask else ["bilinear"]
    steps: list = [mt.Lambda(lambda item: _load_item(item, root, key_file, prep))]
    if prep.spatial_dims == 3:
        steps.append(mt.Orientationd(keys=keys, axcodes="RAS", labels=None))
        if prep.spacing:
            steps.append(mt.Spacingd(keys=keys, pixdim=prep.spacing, mode=modes))
    if prep.patch:
        steps.append(mt.SpatialPadd(keys=keys, spatial_size=prep.image_size))
    else:
        resize_modes = ["area", "nearest"] if has_mask else ["area"]
        steps.append(mt.Resized(keys=keys, spatial_size=prep.image_size, mode=resize_modes))
    steps.append(_normalise(prep))
    steps.append(mt.EnsureTyped(keys=keys, track_meta=False))
    return mt.Compose(steps)


def augmentation_transforms(prep: Preprocessing, has_mask: bool) -> mt.Compose:
    """Random transforms for training only; masks follow spatial ones with nearest neighbour."""
    keys = ["image", "label"] if has_mask else ["image"]
    modes = ["bilinear", "nearest"] if has_mask else ["bilinear"]
    steps: list = []
    if prep.patch:
        steps.append(mt.RandSpatialCropd(keys=keys, roi_size=prep.image_size, random_size=False))
    steps += [
        mt.RandAffined(
            keys=keys,
            prob=0.5,
            rotate_range=[0.15] * (1 if prep.spatial_dims == 2 else 3),
            scale_range=[0.1] * prep.spatial_dims,
            translate_range=[s * 0.05 for s in prep.image_size],
            mode=modes,
            padding_mode="zeros",
        ),
        mt.RandGaussianNoised(keys="image", prob=0.2, std=0.05),
        mt.RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.8, 1.25)),
    ]
    return mt.Compose(steps)


def manifest_items(manifest: pd.DataFrame, split: str, task: str, classes: Sequence[str]) -> list[dict]:
    """Dataset items of one split: pseudonymous id, the manifest row, the target."""
    rows = manifest[manifest["split"] == split]
    items = []
    index = {name: i for i, name in enumerate(classes)}
    for row in rows.to_dict("records"):
        item: dict = {"id": row["id"], "row": row, "mask_ref": ""}
        if task == "segmentation":
            if not str(row.get("mask") or "").strip() or str(row.get("mask")) == "nan":
                continue  # rows without a mask cannot train a segmenter; counted by the caller
            item["mask_ref"] = str(row["mask"])
            item["label"] = -1  # replaced by the mask when loaded
        else:
            label = str(row.get("label", ""))
            if label not in index:
                raise InputError(f"manifest row {row['id']} has label {label!r}, not one of {list(classes)}")
            item["label"] = index[label]
        items.append(item)
    return items


def make_dataset(
    items: list[dict],
    prep: Preprocessing,
    root: Path,
    *,
    key_file: Path | None = None,
    train: bool,
    augment: bool = True,
    cache: str = "memory",
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Dataset:
    """A MONAI dataset over `items` with cached deterministic preprocessing.

    Args:
        items: from `manifest_items`.
        prep: network-input settings matching the encoder's weight record.
        root: data root the manifest paths are relative to.
        key_file: project key (to resolve aliased paths); default as in `medtl.data.privacy`.
        train: apply augmentations (training split only).
        augment: allow augmentations at all.
        cache: "memory" (CacheDataset), "disk" (PersistentDataset under `cache_dir`) or "none".
        cache_dir: folder for the disk cache, e.g. the run's `OUTPUT/cache`. Each file holds one
            item after the deterministic transforms ({"id", "label", "image"}: plain tensors and
            the row pseudonym, no metadata), named by a hash of what determines it (row id,
            pixel and mask digests, label index, `prep`), so changed settings never reuse a file.
        progress: show a progress bar while caching.

    Returns:
        A dataset of dicts with "id", "image" (C x spatial) and "label" (class index, or the mask
        as a 1 x spatial label map for segmentation).

    Raises:
        InputError: for an unknown `cache`, or "disk" without `cache_dir`.
    """
    has_mask = any(item.get("mask_ref") for item in items)
    det = deterministic_transforms(prep, root, key_file, has_mask)
    rand = augmentation_transforms(prep, has_mask) if (train and augment) else None
    pipeline = det if rand is None else mt.Compose([*det.transforms, *rand.transforms])
    if cache == "none":
        return Dataset(items, transform=pipeline)
    if cache == "disk":
        if cache_dir is None:
            raise InputError("cache 'disk' must come with a cache_dir, not None; give a folder (a run uses "
                             "OUTPUT/cache) or set data.cache=memory")
        keyed = [{**item, "cache_key": _cache_key(item, prep)} for item in items]
        return PersistentDataset(
            keyed, transform=pipeline, cache_dir=Path(cache_dir), hash_func=lambda it: it["cache_key"].encode()
        )
    if cache != "memory":
        raise InputError(f"cache must be one of memory, disk, none, not {cache!r}; set data.cache")
    return CacheDataset(items, transform=pipeline, num_workers=0, progress=progress, copy_cache=True)


def _cache_key(item: dict, prep: Preprocessing) -> str:
    """File name of an item in the disk cache: a digest of everything the cached tensors depend on.

    Only pseudonymous values and digests go in (never a path), and the name is their hash.
    """
    row = item["row"]
    parts = [str(item["id"]), str(row.get("sha256", "")), str(row.get("mask_sha256", "")), str(item["label"]),
             prep.digest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def label_counts(items: Mapping | list[dict], num_classes: int) -> np.ndarray:
    """How many items of each class (for class-balanced sampling or loss weights)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for item in items:
        if item["label"] >= 0:
            counts[item["label"]] += 1
    return counts
