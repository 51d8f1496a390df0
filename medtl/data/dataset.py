"""Manifest rows -> MONAI datasets of dictionaries, with the preprocessing the encoder expects.

The deterministic part is MONAI transforms, cached by MONAI's `CacheDataset` in memory or by
`DiskCache` on disk (safetensors files; see there why not MONAI's `PersistentDataset`): the row's
study is resolved to its files, `LoadImaged` reads them with medtl's readers (`medtl.data.reader`),
the intensity is scaled to 0..1 by the scheme of the row's modality (`IntensityByScheme`: a CT
window or MONAI's percentile scaling), then orientation/spacing, resize and the encoder's
normalisation. Augmentations (`Augmentation`) run after the cache, for training only. Masks are
declared as label maps: nearest-neighbour resampling, never intensity transforms. A mask that is a
DICOM SEG or RTSTRUCT (`mask_sop_class` in the manifest) becomes a label map on its image's grid
through the manifest's `segment_map` (`LoadMaskd`). Items carry only the manifest's pseudonymous
`id`: no path, no header ever reaches the batch or a cache file (the readers return geometry-only
metadata, `LoadImaged` prunes the file name it adds, and the pipeline ends by dropping all
metadata). `preprocessing_record` gives every setting as flat run parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from monai.data import (
    CacheDataset,
    Dataset,
    ImageReader,
    MetaTensor,
    get_track_meta,
    set_track_meta,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from medtl.data import dicom_masks
from medtl.data.reader import PRUNE_META_PATTERN, MedtlNiftiReader, MedtlStudyReader
from medtl.data.verify import resolve_path, resolve_study
from medtl.errors import InputError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The "mr" and "xray" schemes map these percentiles of an image's values to 0 and 1.
PERCENTILES = (0.5, 99.5)
#: The intensity schemes of `Preprocessing.intensity` ("auto" picks one by modality).
INTENSITY_SCHEMES = ("ct", "mr", "xray")


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


@dataclass(frozen=True)
class Augmentation:
    """The random transforms of training (MONAI's; their random draws are seeded as the run is).

    Each transform runs on an item with its probability. A random affine rotates by up to
    `rotate_range` radians about each axis (one in 2D, three in 3D), scales by up to
    `scale_range` and shifts by up to `translate_fraction` of the image size per axis (masks
    follow with nearest neighbour); Gaussian noise of `noise_std` and a gamma in
    `contrast_gamma` change the image only. 3D patch training crops a random patch first: with a
    mask, a `foreground_fraction` of the patches are centred on a foreground voxel (nnU-Net forces
    a third), the others anywhere in the volume. `flip_axes` are spatial axes mirrored at random,
    each on its own with probability `flip_prob` (nnU-Net mirrors every axis); none by default.
    """

    affine_prob: float = 0.5
    rotate_range: float = 0.15
    scale_range: float = 0.1
    translate_fraction: float = 0.05
    noise_prob: float = 0.2
    noise_std: float = 0.05
    contrast_prob: float = 0.2
    contrast_gamma: tuple[float, float] = (0.8, 1.25)
    foreground_fraction: float = 1 / 3
    flip_axes: tuple[int, ...] = ()
    flip_prob: float = 0.5


def preprocessing_record(prep: Preprocessing, augmentation: Augmentation | None = None) -> dict[str, str | float]:
    """Every preprocessing and augmentation setting as flat run parameters.

    Args:
        prep: The network-input settings of the run's datasets.
        augmentation: The training augmentations, or None when training does not augment.

    Returns:
        `preprocessing.<field>` and `augmentation.<field>` keys (`augmentation.enabled` False and
        no other augmentation key without augmentation); tuples as JSON lists, e.g.
        `{"preprocessing.image_size": "[96, 96]", "preprocessing.percentiles": "[0.5, 99.5]",
        "augmentation.affine_prob": 0.5, ...}`.

    Example:
        >>> preprocessing_record(Preprocessing(), Augmentation())["augmentation.noise_std"]
        0.05
    """
    record: dict[str, str | float] = {}
    settings = {**dataclasses.asdict(prep), "percentiles": PERCENTILES}
    for key, value in settings.items():
        record[f"preprocessing.{key}"] = _param(value)
    record["augmentation.enabled"] = str(augmentation is not None)
    for key, value in (dataclasses.asdict(augmentation) if augmentation is not None else {}).items():
        record[f"augmentation.{key}"] = _param(value)
    return record


def _param(value: object) -> str | float:
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int | float):
        return value
    return json.dumps(list(value))  # tuples


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


def intensity_transforms(prep: Preprocessing) -> dict[str, tuple[mt.MapTransform, ...]]:
    """The MONAI transforms that scale "image" to 0..1, per intensity scheme.

    "ct" maps `prep.ct_window` (Hounsfield units) to 0..1 and clips; "mr" and "xray" map the
    `PERCENTILES` of each image's values to 0..1 and clip (`ScaleIntensityRangePercentilesd`).
    """
    lo, hi = prep.ct_window
    hi = hi if hi > lo else lo + 1.0
    window = mt.ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    percentiles = (
        mt.ScaleIntensityRangePercentilesd(
            keys="image", lower=PERCENTILES[0], upper=PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True
        ),
        # MONAI returns an image whose two percentiles are equal shifted but unclipped (it warns
        # "Divide by zero"); medtl always clipped to 0..1. On every other image this is the identity.
        mt.ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    )
    return {"ct": (window,), "mr": percentiles, "xray": percentiles}


class IntensityByScheme(mt.MapTransform):
    """Apply the intensity transforms of the scheme an item names under `scheme_key`, and drop the key.

    One dataset may mix modalities (`Preprocessing.intensity` "auto"): a CT series gets the CT
    window, a radiograph percentile scaling. Deterministic, so MONAI caches its output.

    Args:
        schemes: Transforms per scheme name, e.g. `intensity_transforms(prep)`.
        scheme_key: The item key that names the scheme.
    """

    def __init__(self, schemes: Mapping[str, Sequence[mt.MapTransform]], scheme_key: str = "intensity") -> None:
        super().__init__(keys="image")
        self.schemes = {name: tuple(steps) for name, steps in schemes.items()}
        self.scheme_key = scheme_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        item = dict(data)
        scheme = str(item.pop(self.scheme_key))
        if scheme not in self.schemes:
            raise InputError(f"intensity must be auto or one of {', '.join(self.schemes)}, not {scheme!r}; "
                             "set data.intensity")
        for step in self.schemes[scheme]:
            item = step(item)
        return item


def study_item(item: dict, root: Path, key_file: Path | None, prep: Preprocessing) -> dict:
    """What `LoadImaged` reads for one dataset item: the row's files, its mask file, its intensity scheme.

    Returns a new dict of "id", "label" (the class index, or the mask file), "image" (the study's
    files, a DICOM series in slice order) and "intensity"; the manifest row is left behind, so
    nothing but pseudonyms and tensors is left once the files are read.

    Raises:
        InputError: If the row's study or mask cannot be found (naming the row id, never a path).
    """
    row = item["row"]
    dicom_mask = bool(str(row.get("mask_sop_class") or "").strip()) and bool(item.get("mask_ref"))
    try:
        study = resolve_study(row, root, key_file=key_file)
        mask = resolve_path(item["mask_ref"], root, key_file=key_file) if item.get("mask_ref") else None
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any lookup failure becomes a named, safe error
        raise InputError(
            f"manifest row {row['id']} could not be loaded ({type(err).__name__}); "
            f"run `medtl manifest verify` to see what changed"
        ) from err
    loaded = {
        "id": item["id"],
        "label": str(mask) if mask is not None else item["label"],
        "image": [str(path) for path in study.files],
        "intensity": _modality_scheme(str(row.get("modality", "")), prep.intensity),
    }
    if dicom_mask:  # LoadMaskd rasterises it onto these files' grid, then drops both keys
        loaded.update(mask_series=list(loaded["image"]), segment_map=dict(item.get("segment_map") or {}))
    return loaded


def load_transform(keys: str, reader: ImageReader) -> mt.LoadImaged:
    """`LoadImaged` as medtl uses it: float32, channel first, metadata pruned to geometry.

    `LoadImage` writes the file's path into the metadata (`filename_or_obj`); the pattern deletes
    it, and any other non-geometry key, as the image is made, before any cache can hold it.

    Args:
        keys: The item key(s) holding a file or a list of files (a DICOM series in slice order).
        reader: E.g. `MedtlStudyReader()`.

    Returns:
        The transform; it replaces the file names by a (1, *spatial) float32 `MetaTensor`.

    Example:
        >>> load_transform("image", MedtlStudyReader())({"image": files})["image"].meta.keys()  # doctest: +SKIP
        dict_keys(['affine', 'original_affine', 'spatial_shape', 'original_channel_dim', 'space'])
    """
    return mt.LoadImaged(keys=keys, reader=reader, image_only=True, dtype=np.float32, ensure_channel_first=True,
                         prune_meta_pattern=PRUNE_META_PATTERN, prune_meta_sep=" ")


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
    """Resolve -> load -> intensity -> orientation/spacing (3D) -> resize (unless patching) -> normalise.

    This is the cached part. Images load with `MedtlStudyReader` (DICOM, NIfTI or 2D export,
    as `discover` found it); masks with `MedtlNiftiReader` (MONAI's own readers for other files).
    """
    keys = ["image", "label"] if has_mask else ["image"]
    modes = ["bilinear", "nearest"] if has_mask else ["bilinear"]
    steps: list = [
        mt.Lambda(func=functools.partial(study_item, root=root, key_file=key_file, prep=prep)),
        load_transform("image", MedtlStudyReader()),
    ]
    if has_mask:
        steps.append(LoadMaskd())
    steps.append(IntensityByScheme(intensity_transforms(prep)))
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


class LoadMaskd(mt.MapTransform):
    """Load an item's "label" mask: an image file with `MedtlNiftiReader` (MONAI's readers for other
    formats), or a DICOM SEG/RTSTRUCT as a label map on the grid of the item's "image".

    MONAI has no reader for SEG or RTSTRUCT; `dicom_masks.label_map` gives the label map in the
    layout `MedtlStudyReader` gives the series, so it takes the loaded image's affine and metadata.
    Runs after the image is loaded; removes the item's "mask_series" and "segment_map".
    """

    def __init__(self) -> None:
        super().__init__(keys="label")
        self._image_mask = load_transform("label", MedtlNiftiReader())

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        series, segment_map = d.pop("mask_series", None), d.pop("segment_map", None)
        if series is None:
            return self._image_mask(d)
        name = f"the DICOM mask of manifest row {d['id']}"
        labels, _ = dicom_masks.label_map(Path(str(d["label"])), [Path(f) for f in series], segment_map or {},
                                          name=name)
        image = d["image"]
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise InputError(f"{name} must lie on its image's grid, not a grid of another shape; rebuild the "
                             f"manifest (`medtl manifest build`)")
        d["label"] = MetaTensor(np.ascontiguousarray(labels[None], dtype=np.float32), affine=image.affine.clone(),
                                meta={k: v for k, v in image.meta.items() if k != "affine"})
        return d


def scoring_item(study_id: str, files: Sequence[Path], modality: str, prep: Preprocessing) -> dict:
    """What `scoring_transforms` reads for one study given by its files (no manifest row, no key).

    Args:
        study_id: The id the prediction is reported under (a row pseudonym, or an index).
        files: The study's files as `discover` found them (a DICOM series in slice order).
        modality: The DICOM modality ("" for NIfTI and 2D exports): it picks the intensity scheme.
        prep: The frozen network-input settings.
    """
    return {"id": study_id, "image": [str(f) for f in files], "intensity": _modality_scheme(modality, prep.intensity)}


def scoring_transforms(prep: Preprocessing) -> mt.Compose:
    """The deterministic transforms of training for `scoring_item`s, keeping the image's metadata.

    The same load -> intensity -> orientation/spacing -> resize/pad -> normalise steps (so scores
    equal the training run's), but the output stays a `MetaTensor` that records every spatial
    step, so `mt.Invertd` can bring a predicted mask back onto the input's grid and affine. The
    metadata holds geometry only (no file name: see `load_transform`).
    """
    steps = deterministic_transforms(prep, Path("."), None, has_mask=False).transforms
    return mt.Compose(list(steps[1:-1]))  # neither the manifest lookup nor the metadata drop


def augmentation_transforms(prep: Preprocessing, has_mask: bool, augmentation: Augmentation | None = None) -> mt.Compose:
    """Random transforms for training only; masks follow spatial ones with nearest neighbour.

    Args:
        prep: The network-input settings (patch size, spatial dims).
        has_mask: Whether items carry a mask under "label".
        augmentation: The settings; default `Augmentation()`.
    """
    aug = augmentation or Augmentation()
    keys = ["image", "label"] if has_mask else ["image"]
    modes = ["bilinear", "nearest"] if has_mask else ["bilinear"]
    steps: list = []
    if prep.patch and has_mask and aug.foreground_fraction > 0:
        steps.append(ForegroundPatchd(keys, prep.image_size, aug.foreground_fraction))
    elif prep.patch:
        steps.append(mt.RandSpatialCropd(keys=keys, roi_size=prep.image_size, random_size=False))
    steps += [
        mt.RandAffined(
            keys=keys,
            prob=aug.affine_prob,
            rotate_range=[aug.rotate_range] * (1 if prep.spatial_dims == 2 else 3),
            scale_range=[aug.scale_range] * prep.spatial_dims,
            translate_range=[s * aug.translate_fraction for s in prep.image_size],
            mode=modes,
            padding_mode="zeros",
        ),
        mt.RandGaussianNoised(keys="image", prob=aug.noise_prob, std=aug.noise_std),
        mt.RandAdjustContrastd(keys="image", prob=aug.contrast_prob, gamma=aug.contrast_gamma),
        *(mt.RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in aug.flip_axes),
    ]
    return mt.Compose(steps)


class ForegroundPatchd(mt.RandomizableTransform, mt.MapTransform):
    """A random patch, centred on a foreground voxel of "label" with probability `fraction`.

    MONAI's `RandCropByPosNegLabeld` draws the patch; it returns a list even for one sample, and
    medtl's batches are of single items, so this returns its one item.
    """

    def __init__(self, keys: Sequence[str], size: Sequence[int], fraction: float) -> None:
        mt.MapTransform.__init__(self, keys)
        mt.RandomizableTransform.__init__(self, prob=1.0)
        # pos/neg are relative weights: pos / (pos + neg) of the patches are centred on foreground.
        self.crop = mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=size, pos=fraction,
                                              neg=1 - fraction, num_samples=1, allow_smaller=True)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.crop.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        return self.crop(data)[0]


class TrainingPipeline(mt.Compose):
    """The transforms of a training dataset: its random ones run on plain tensors, without MONAI's metadata.

    The random transforms come after the cache and work on plain tensors (the deterministic part
    ends by dropping the metadata), but MONAI's random spatial transforms wrap every item as a
    `MetaTensor` again and record its affine and applied operations, which costs more than the
    augmentation itself on small items (about half of a cached epoch's data time at 64 px), and
    the items leave as plain tensors anyway. So from the first random transform to the end of a
    call MONAI's metadata tracking is off (`set_track_meta(False)`), and restored after. The
    transforms, their random draws (`set_random_state` as `mt.Compose`'s) and the values they
    return are unchanged; the deterministic part before them keeps its metadata (orientation and
    spacing need the affine), also when a dataset without cache runs all of it in one call.

    MONAI's switch is per process: a dataset is read by one thread at a time (torch's DataLoader
    reads in the main process or in worker processes).
    """

    def __call__(self, input_, start: int = 0, end: int | None = None, threading: bool = False,
                 lazy: bool | None = None):
        first_random = self.get_index_of_first(lambda t: isinstance(t, mt.RandomizableTrait))
        if first_random is None or (end is not None and end <= first_random):
            return super().__call__(input_, start, end, threading, lazy)
        if start < first_random:
            input_ = super().__call__(input_, start, first_random, threading, lazy)
            start = first_random
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, start, end, threading, lazy)
        finally:
            set_track_meta(tracking)


def manifest_items(manifest: pd.DataFrame, split: str, task: str, classes: Sequence[str],
                   segment_map: Mapping[str, int] | None = None) -> list[dict]:
    """Dataset items of one split: pseudonymous id, the manifest row, the target.

    `segment_map` (the manifest sidecar's) turns the rows' DICOM SEG/RTSTRUCT masks into classes.
    """
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
            if str(row.get("mask_sop_class") or "").strip():
                item["segment_map"] = dict(segment_map or {})
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
    augmentation: Augmentation | None = None,
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
        augmentation: the augmentation settings (default `Augmentation()`); record them with
            `preprocessing_record`.
        cache: "memory" (CacheDataset), "disk" (`DiskCache` under `cache_dir`) or "none".
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
    rand = augmentation_transforms(prep, has_mask, augmentation) if (train and augment) else None
    # MONAI's random spatial transforms turn plain tensors back into MetaTensors; items leave as
    # plain tensors (no metadata to collate, cache or leak).
    after_cache: list = []
    if rand is not None:
        keys = ["image", "label"] if has_mask else ["image"]
        after_cache = [*rand.transforms, mt.EnsureTyped(keys=keys, track_meta=False)]
    pipeline = TrainingPipeline([*det.transforms, *after_cache]) if after_cache else det
    if cache == "none":
        return Dataset(items, transform=pipeline)
    if cache == "disk":
        if cache_dir is None:
            raise InputError("cache 'disk' must come with a cache_dir, not None; give a folder (a run uses "
                             "OUTPUT/cache) or set data.cache=memory")
        random = TrainingPipeline(after_cache) if after_cache else None
        return DiskCache(items, det, random, Path(cache_dir), [_cache_key(item, prep) for item in items])
    if cache != "memory":
        raise InputError(f"cache must be one of memory, disk, none, not {cache!r}; set data.cache")
    return CacheDataset(items, transform=pipeline, num_workers=0, progress=progress, copy_cache=True)


class DiskCache(Dataset):
    """Items after the deterministic transforms, kept as one safetensors file each under `cache_dir`.

    Why not MONAI's `PersistentDataset`: it stores items with `torch.save` and reads them back
    through torch's weights-only unpickler, about 0.4 ms per 2D item and 0.9 ms per volume with
    its mask beyond what the memory cache costs; safetensors cuts that to a quarter to a half
    (docs/benchmarks.md, data pipeline). safetensors files hold nothing but tensors and a
    string map, so a cache file cannot carry code or metadata. Each file holds the item's tensors
    ("image", and "label" for a mask) and, as JSON in the header, its other values: the row
    pseudonym "id" and a class index "label". A file is written to a temporary name in the same
    folder and renamed into place, so workers and DDP ranks never read half a file; a file that
    cannot be read is computed and written again (with a warning naming the file). A folder that
    cannot be written fails with `InputError` saying what to do.

    `transform` is the random part (MONAI's `set_rnd` seeds it like a cached dataset's pipeline).
    """

    def __init__(self, items: Sequence[dict], det: mt.Compose, rand: TrainingPipeline | None, cache_dir: Path,
                 keys: Sequence[str]) -> None:
        self.transform = rand  # first attribute: `set_rnd` seeds it as it seeds a cached dataset's pipeline
        super().__init__(list(items), transform=rand)
        self._det, self._files = det, [Path(cache_dir) / f"{key}.safetensors" for key in keys]
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cache_folder_error(error) from error

    def _transform(self, index: int) -> dict:
        item = self._read(self._files[index])
        if item is None:
            item = self._det(dict(self.data[index]))
            _write_cached(self._files[index], item)
        return item if self.transform is None else self.transform(item)

    @staticmethod
    def _read(file: Path) -> dict | None:
        """The cached item, or None when there is none or it is not a whole cache file (then it is
        computed again)."""
        try:
            with safe_open(file, framework="pt") as f:
                item = json.loads((f.metadata() or {}).get("medtl", "{}"))
                if isinstance(item, dict) and "image" in f.keys():
                    item.update({key: f.get_tensor(key) for key in f.keys()})
                    return item
        except FileNotFoundError:
            return None
        except (SafetensorError, ValueError, OSError):
            pass
        logger.warning("disk cache file %s cannot be read (cut short, or not written by medtl); computing it "
                       "again", file.name)
        return None


def _write_cached(file: Path, item: Mapping) -> None:
    """Write one cached item (see `DiskCache`) atomically."""
    tensors = {k: v.contiguous() for k, v in item.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in item.items() if k not in tensors}
    try:
        header = {"medtl": json.dumps(others)}
    except TypeError as error:
        raise InputError(f"a preprocessed item holds {sorted(others)}, which the disk cache cannot store as "
                         "tensors or JSON; set data.cache=memory") from error
    data = save(tensors, metadata=header)
    temp = file.with_name(f"{file.stem}.{uuid.uuid4().hex[:8]}.tmp")  # unique per writer (workers, ranks)
    try:
        with open(temp, "xb") as handle:  # created with the umask's permissions, as the run's other outputs
            handle.write(data)
        os.replace(temp, file)
    except OSError as error:
        raise cache_folder_error(error) from error
    finally:
        temp.unlink(missing_ok=True)


def cache_folder_error(error: OSError) -> InputError:
    """What to do when the disk cache folder cannot be created or written (without its path)."""
    return InputError(f"the disk cache folder (the run's OUTPUT/cache, data.cache: disk) cannot be written "
                      f"({type(error).__name__}: {error.strerror or 'unknown reason'}); make it writable or "
                      "delete it, or set data.cache=memory")


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
