"""medtl.data.reader: medtl's MONAI image readers, their metadata, and equality with the loader they replaced.

The `_legacy_*` functions below are a frozen copy of how medtl loaded studies before the readers
(`discover._load_*` and the `Lambda` loader of `dataset.py`, commit 859face): the readers and the
`LoadImaged` pipelines must give the same arrays, affines and scaled intensities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor, PILReader
from monai.utils import set_determinism
from PIL import Image

from medtl.data import dicom, geometry
from medtl.data.dataset import (
    IntensityByScheme,
    Preprocessing,
    augmentation_transforms,
    class_names,
    deterministic_transforms,
    intensity_transforms,
    load_transform,
    make_dataset,
    manifest_items,
)
from medtl.data.deid import quiet_pydicom
from medtl.data.discover import discover, load_study
from medtl.data.manifest import build_manifest, pixel_sha256
from medtl.data.reader import GEOMETRY_KEYS, MedtlDicomReader, MedtlStudyReader
from medtl.data.synthetic import write_demo_data
from medtl.data.types import Study
from medtl.data.verify import resolve_path, resolve_study
from medtl.errors import InputError
from tests.data import dicom_factory as factory

# --- the loader before the readers (frozen copy) ------------------------------------------------------------


@quiet_pydicom()
def _legacy_dicom_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ds = dicom.read_dataset(path)
    modality = dicom.modality_of(ds)
    pixels = dicom.frames(ds, display=modality not in dicom.QUANTITATIVE_MODALITIES)[0]
    orientation, positions, spacing = dicom.frame_geometry(ds, 1)
    affine = geometry.volume_affine(
        orientation, positions[0] if positions else None, spacing, dicom.slice_spacing(ds) or 1.0
    )
    return np.ascontiguousarray(pixels.T), affine


@quiet_pydicom()
def _legacy_multiframe(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ds = dicom.read_dataset(path)
    n = dicom.number_of_frames(ds)
    volume = dicom.frames(ds)
    orientation, positions, spacing = dicom.frame_geometry(ds, n)
    origin = positions[0] if positions else None
    step = dicom.slice_spacing(ds)
    if orientation is not None and positions is not None and len(positions) == n:
        stack = geometry.order_stack(orientation, positions)
        volume = volume[list(stack.order)]
        origin, step = positions[stack.order[0]], stack.step
    volume, step = geometry.correct_gantry_tilt(volume.transpose(2, 1, 0), orientation, spacing, step)
    return np.ascontiguousarray(volume), geometry.volume_affine(orientation, origin, spacing, step)


@quiet_pydicom()
def _legacy_series(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    datasets = [dicom.read_dataset(path) for path in paths]
    slices = [dicom.frames(ds)[0] for ds in datasets]
    orientation, first, spacing = dicom.frame_geometry(datasets[0], 1)
    last = dicom.frame_geometry(datasets[-1], 1)[1]
    step = (np.asarray(last[0]) - np.asarray(first[0])) / (len(paths) - 1)
    volume, step = geometry.correct_gantry_tilt(np.stack(slices, axis=-1).transpose(1, 0, 2), orientation, spacing, step)
    return np.ascontiguousarray(volume), geometry.volume_affine(orientation, first[0], spacing, step)


def _legacy_monai(path: Path, reader) -> tuple[np.ndarray, np.ndarray]:
    loaded = mt.LoadImage(reader=reader, image_only=True, dtype=np.float32)(str(path))
    return np.asarray(loaded.array, dtype=np.float32), np.asarray(loaded.affine, dtype=np.float64)


def _legacy_load(study: Study) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) as medtl's `load_study` gave them before the readers."""
    if study.kind == "nifti":
        array, affine = _legacy_monai(study.files[0], "NibabelReader")
        shape = array.shape
        while len(shape) > 2 and shape[-1] == 1:
            shape = shape[:-1]
        return np.ascontiguousarray(array.reshape(shape)), affine
    if study.kind == "image2d":
        direct = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB", "RGBA"}
        reader = PILReader(converter=lambda im: im if im.mode in direct else im.convert("RGB"))
        array, affine = _legacy_monai(study.files[0], reader)
        if array.ndim == 3:
            array = array[..., :3] @ dicom.LUMA_WEIGHTS if array.shape[-1] >= 3 else array[..., 0]
        return np.ascontiguousarray(array, dtype=np.float32), affine
    if study.kind == "dicom_image":
        return _legacy_dicom_image(study.files[0])
    return _legacy_multiframe(study.files[0]) if len(study.files) == 1 else _legacy_series(study.files)


def _legacy_scale(array: np.ndarray, scheme: str, ct_window: tuple[float, float]) -> np.ndarray:
    if scheme == "ct":
        lo, hi = ct_window
    else:
        lo, hi = np.percentile(array, (0.5, 99.5)) if array.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _legacy_item(item: dict, root: Path, key_file: Path, prep: Preprocessing) -> dict:
    """The old `Lambda` loader of dataset.py: load_study, intensity scaling, a bare MetaTensor."""
    row = item["row"]
    array, affine = _legacy_load(resolve_study(row, root, key_file=key_file))
    modality = str(row.get("modality", "")).upper()
    scheme = prep.intensity if prep.intensity != "auto" else (
        "ct" if modality == "CT" else "mr" if modality in ("MR", "PT", "NM") else "xray")
    out = {"id": item["id"], "label": item["label"]}
    pixels = _legacy_scale(array, scheme, prep.ct_window)
    out["image"] = MetaTensor(torch.from_numpy(pixels)[None], affine=torch.as_tensor(affine))
    if item.get("mask_ref"):
        mask = mt.LoadImage(image_only=True, reader="NibabelReader")(str(resolve_path(item["mask_ref"], root,
                                                                                   key_file=key_file)))
        out["label"] = MetaTensor(torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None], affine=mask.affine)
    return out


def _legacy_pipeline(prep: Preprocessing, root: Path, key_file: Path, has_mask: bool, train: bool) -> mt.Compose:
    """The old pipeline: the `Lambda` loader, then the transforms that follow intensity scaling today."""
    steps = deterministic_transforms(prep, root, key_file, has_mask).transforms
    tail = steps[[isinstance(t, IntensityByScheme) for t in steps].index(True) + 1:]
    rand = augmentation_transforms(prep, has_mask).transforms if train else ()
    return mt.Compose([mt.Lambda(lambda item: _legacy_item(item, root, key_file, prep)), *tail, *rand])


# --- studies to compare on --------------------------------------------------------------------------------


def _write_studies(root: Path) -> Path:
    """DICOM series (axial, gantry-tilted, scrambled sagittal MR), multi-frame, radiographs, 2D exports, NIfTI."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 2000, (6, 20, 24)).astype(np.uint16)
    factory.write_series(root / "axial", volume)
    tilt = np.deg2rad(18.5)
    factory.write_series(root / "tilt", volume, orientation=(1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)),
                         step=(0.0, np.sin(tilt) * 2.5, np.cos(tilt) * 2.5), series_uid=factory.uid("tilt"))
    factory.write_series(root / "sag", volume, orientation=(0, 1, 0, 0, 0, -1), series_uid=factory.uid("sag"),
                         names=[f"{k}.dcm" for k in (3, 1, 5, 0, 2, 4)], modality="MR")
    factory.write_multiframe(root / "mf" / "mf.dcm", volume, [(0, 0, 2.0 * k) for k in (2, 0, 1, 3, 5, 4)])
    factory.write_radiograph(root / "cr" / "mono1.dcm", rng.integers(0, 4000, (30, 26)), window=(2000, 3000))
    factory.write_radiograph(root / "cr" / "mono2.dcm", rng.integers(0, 4000, (30, 26)), photometric="MONOCHROME2",
                             rescale=(2.0, -5.0))
    flat = np.zeros((30, 26), np.uint16)
    flat[0, :2] = 3000  # fewer bright pixels than the 99.5th percentile: both percentiles are 0
    factory.write_radiograph(root / "cr" / "flat.dcm", flat, photometric="MONOCHROME2")
    factory.write_headerless(root / "old" / "headerless", rng.integers(0, 4000, (16, 18)).astype(np.uint16))
    colour = Image.fromarray(rng.integers(0, 256, (21, 17, 3)).astype(np.uint8))
    (root / "png").mkdir()
    for name, mode in (("rgb.png", "RGB"), ("rgba.png", "RGBA"), ("la.png", "LA"), ("palette.png", "P"),
                       ("bits.png", "1"), ("cmyk.jpg", "CMYK"), ("rgb.tiff", "RGB"), ("rgb.bmp", "RGB")):
        colour.convert(mode).save(root / "png" / name)
    Image.fromarray(rng.integers(0, 65535, (21, 17)).astype(np.uint16)).save(root / "png" / "u16.png")
    affine = np.diag([0.7, 0.8, 1.5, 1.0])
    (root / "nii").mkdir()
    nib.save(nib.Nifti1Image(rng.normal(size=(12, 14, 1)).astype(np.float32), affine), root / "nii" / "flat.nii.gz")
    nib.save(nib.Nifti1Image(rng.integers(-99, 99, (12, 14, 9, 1)).astype(np.int16), affine), root / "nii" / "4d.nii")
    scaled = nib.Nifti1Image(rng.integers(-99, 99, (12, 14, 9)).astype(">i2"), affine)
    scaled.header.set_slope_inter(0.5, 3.0)
    nib.save(scaled, root / "nii" / "scaled.nii")
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[Study]:
    found, _ = discover(_write_studies(tmp_path_factory.mktemp("studies")), progress=False)
    assert {s.kind for s in found} == {"dicom_series", "dicom_image", "image2d", "nifti"} and len(found) == 20
    return found


def _real_studies(shared_data: Path) -> list[Study]:
    found = discover(shared_data / "dicom", progress=False)[0]
    hippocampus = shared_data / "hippocampus"
    if hippocampus.is_dir():
        for folder in ("images", "labels"):
            names = sorted(os.listdir(hippocampus / folder))[:4]
            found += [Study((hippocampus / folder / name,), "nifti", "") for name in names]
    return found


def _assert_loads_as_before(study: Study) -> None:
    image = load_study(study)
    array, affine = _legacy_load(study)
    assert image.array.dtype == array.dtype == np.float32 and image.array.shape == array.shape
    assert pixel_sha256(image.array) == pixel_sha256(array)  # bit for bit: the manifest's sha256 holds
    np.testing.assert_array_equal(image.affine, affine)


def _assert_scales_as_before(study: Study, scheme: str) -> None:
    window = (-200.0, 300.0)
    head = mt.Compose([load_transform("image", MedtlStudyReader()),
                       IntensityByScheme(intensity_transforms(Preprocessing(ct_window=window)))])
    new = head({"image": [str(f) for f in study.files], "intensity": scheme})
    array, affine = _legacy_load(study)
    old = _legacy_scale(array, scheme, window)[None]
    assert set(new) == {"image"} and new["image"].dtype == torch.float32
    np.testing.assert_allclose(new["image"].numpy(), old, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(new["image"].affine.numpy(), affine)


# --- the loader: same arrays, affines and pixel hashes ---------------------------------------------------------


def test_load_study_gives_the_arrays_affines_and_pixel_hashes_of_the_loader_it_replaced(studies):
    for study in studies:
        _assert_loads_as_before(study)


def test_real_files_load_through_the_readers_exactly_as_before(shared_data):
    for study in _real_studies(shared_data):
        _assert_loads_as_before(study)


@pytest.mark.parametrize("scheme", ["ct", "mr", "xray"])
def test_loadimaged_and_the_intensity_transform_equal_the_old_lambda_loader(studies, scheme):
    for study in studies:
        _assert_scales_as_before(study, scheme)


def test_real_files_scale_as_before_through_loadimaged(shared_data):
    for study in _real_studies(shared_data):
        _assert_scales_as_before(study, "ct" if study.modality == "CT" else "mr")


# --- the whole pipeline, old and new, on manifest rows ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = write_demo_data(root / "data", patients=24, seed=3, progress=False)
    key = root / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    build_manifest(root / "data", summary.labels_csv, root / "manifest.csv", key_file=key, progress=False)
    return root / "data", key, pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


PIPELINES = {
    "xray-imagenet": ("CR DX", "classification", Preprocessing(image_size=(40, 40))),
    "xray-3-channels": ("CR DX", "classification", Preprocessing(image_size=(32, 32), in_channels=3)),
    "ct-masks": ("CT", "segmentation", Preprocessing(spatial_dims=3, image_size=(24, 24, 12), spacing=(1.5, 1.5, 2.5),
                                                       intensity="ct", ct_window=(-200.0, 300.0),
                                                       normalization="zscore_nonzero")),
    "ct-as-mr-patches": ("CT", "segmentation", Preprocessing(spatial_dims=3, image_size=(16, 16, 8), intensity="mr",
                                                               normalization="unit", patch=True)),
}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_make_dataset_equals_the_old_lambda_pipeline_with_the_same_random_draws(demo, name, train):
    root, key, manifest = demo
    modalities, task, prep = PIPELINES[name]
    rows = manifest[manifest["modality"].isin(modalities.split())].assign(split="train")
    items = manifest_items(rows, "train", task, class_names(rows["label"]) if task == "classification" else [])
    has_mask = task == "segmentation"
    set_determinism(seed=7)
    new = make_dataset(items, prep, root, key_file=key, train=train, cache="none")
    new = [new[i] for i in range(len(new))]
    set_determinism(seed=7)
    old_pipeline = _legacy_pipeline(prep, root, key, has_mask, train)
    old = [old_pipeline(item) for item in items]
    set_determinism(None)
    assert len(new) == len(old) > 0
    for a, b in zip(new, old, strict=True):
        assert set(a) == set(b) == {"id", "image", "label"} and a["id"] == b["id"]
        # Items leave as plain tensors (the old pipeline's random transforms gave MetaTensors back).
        assert type(a["image"]) is torch.Tensor and a["image"].shape == b["image"].shape
        torch.testing.assert_close(a["image"], _plain(b["image"]), rtol=0, atol=1e-5)
        if has_mask:
            assert type(a["label"]) is torch.Tensor
            torch.testing.assert_close(a["label"], _plain(b["label"]), rtol=0, atol=0)
        else:
            assert a["label"] == b["label"]


# --- the reader contract ---------------------------------------------------------------------------------------


def test_every_reader_gives_geometry_only_metadata_and_loadimaged_keeps_no_file_name(studies):
    for study in studies:
        image = load_transform("image", MedtlStudyReader())({"image": [str(f) for f in study.files]})["image"]
        assert set(image.meta) == set(GEOMETRY_KEYS), study.kind
        loaded = load_study(study)
        assert tuple(image.shape) == (1, *loaded.array.shape)
        assert tuple(image.meta["spatial_shape"]) == loaded.array.shape
        np.testing.assert_array_equal(image.affine.numpy(), loaded.affine)
        assert image.meta["space"] == "RAS" and np.isnan(image.meta["original_channel_dim"])


def test_dicom_reader_takes_a_series_in_slice_order_as_one_volume_and_tells_dicom_by_content(tmp_path):
    paths = factory.write_series(tmp_path / "s", np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5))
    headerless = factory.write_headerless(tmp_path / "IMG0001", np.ones((4, 4), np.uint16))  # no suffix
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.dcm.png")
    reader = MedtlDicomReader()
    assert reader.verify_suffix([str(p) for p in paths]) and reader.verify_suffix(headerless)
    assert not reader.verify_suffix(tmp_path / "x.dcm.png") and not reader.verify_suffix(tmp_path / "s")
    array, meta = reader.get_data(reader.read([str(p) for p in paths]))
    assert array.shape == (5, 4, 3) and array.dtype == np.float32  # columns, rows, slices: not 3 channels
    np.testing.assert_array_equal(array[..., 2], np.arange(40, 60).reshape(4, 5).T - 1024.0)  # the CT rescale (HU)
    assert set(meta) == set(GEOMETRY_KEYS) and meta["affine"][2, 2] == pytest.approx(2.5)  # the slice gap


def test_failures_name_no_path_and_never_fall_back_to_monai_readers(tmp_path):
    folder = tmp_path / "DOE_JANE"
    path = factory.write_radiograph(folder / "DOE_JANE.dcm", np.ones((4, 4)))
    (folder / "notes.txt").write_text("DOE^JANE")
    with pytest.raises(InputError) as refused:
        MedtlDicomReader().read(folder / "notes.txt")
    assert "DOE" not in str(refused.value)
    load = load_transform("image", MedtlStudyReader())
    for files in ([str(folder / "notes.txt")], [str(folder / "gone.dcm")], [str(path), str(folder / "notes.txt")]):
        # LoadImage would try MONAI's PydicomReader (and log the path) if the reader's `read` refused.
        with pytest.raises(InputError) as failed:
            load({"image": files})
        assert "DOE" not in str(failed.value) and failed.value.__cause__ is None
    path.write_bytes(path.read_bytes()[:400])  # truncated: parses, but the pixels are gone
    with pytest.raises(InputError) as truncated:
        load({"image": [str(path)]})
    assert "DOE" not in str(truncated.value) and truncated.value.__cause__ is None
