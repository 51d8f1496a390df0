"""Manifest rows -> MONAI datasets: shapes, the encoder's normalisation, masks as label maps, no paths."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from monai import transforms as mt
from monai.data import get_track_meta
from monai.data.utils import set_rnd
from safetensors import safe_open
from safetensors.torch import save_file

from medtl.data.dataset import (
    Augmentation,
    DiskCache,
    Preprocessing,
    TrainingPipeline,
    augmentation_transforms,
    class_names,
    make_dataset,
    manifest_items,
)
from medtl.data.manifest import build_manifest
from medtl.data.synthetic import write_demo_data
from medtl.errors import InputError


@pytest.fixture(scope="module")
def demo_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = write_demo_data(root / "data", patients=24, seed=3, progress=False)
    out = root / "manifest.csv"
    import os

    os.environ["MEDTL_KEY_FILE"] = str(root / "key")
    (root / "key").write_bytes(os.urandom(32))
    try:
        build_manifest(root / "data", summary.labels_csv, out, progress=False)
        manifest = pd.read_csv(out, dtype=str, keep_default_na=False)
        manifest.attrs["phi"] = sorted(summary.phi_strings)  # the demo's fake identifiers, for the cache test
        yield root / "data", manifest
    finally:
        os.environ.pop("MEDTL_KEY_FILE", None)


def _key(root):
    return root.parent / "key"


def test_radiographs_become_normalised_one_channel_tensors_with_no_path(demo_manifest):
    root, manifest = demo_manifest
    xray = manifest[manifest["modality"].isin(["CR", "DX"])]
    items = manifest_items(xray, "train", "classification", class_names(xray["label"]))
    prep = Preprocessing(spatial_dims=2, image_size=(40, 40), normalization="imagenet", in_channels=1)
    ds = make_dataset(items, prep, root, key_file=_key(root), train=False, cache="none", progress=False)
    sample = ds[0]
    assert set(sample) == {"id", "image", "label"}
    assert sample["id"].startswith("R-") and sample["label"] in (0, 1)
    image = sample["image"]
    assert tuple(image.shape) == (1, 40, 40) and image.dtype == torch.float32
    assert not hasattr(image, "meta") or "filename_or_obj" not in getattr(image, "meta", {})
    # 0..1 scaling then ImageNet mean/std averaged over RGB (the 1-channel stem sums RGB kernels)
    lo, hi = (0 - 0.449) / 0.226, (1 - 0.449) / 0.226
    assert lo - 1e-3 <= float(image.min()) < float(image.max()) <= hi + 1e-3


def test_three_channel_inputs_get_per_channel_imagenet_statistics(demo_manifest):
    root, manifest = demo_manifest
    xray = manifest[manifest["modality"].isin(["CR", "DX"])]
    items = manifest_items(xray, "train", "classification", class_names(xray["label"]))[:1]
    prep = Preprocessing(spatial_dims=2, image_size=(32, 32), normalization="imagenet", in_channels=3)
    image = make_dataset(items, prep, root, key_file=_key(root), train=False, cache="none")[0]["image"]
    assert image.shape[0] == 3
    raw = (image * torch.tensor([0.229, 0.224, 0.225])[:, None, None]) + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_ct_masks_are_resampled_as_label_maps(demo_manifest):
    root, manifest = demo_manifest
    ct = manifest[manifest["modality"] == "CT"]
    assert len(ct), "the demo must contain CT series with masks"
    split = ct["split"].iloc[0]
    items = manifest_items(ct, split, "segmentation", [])
    prep = Preprocessing(spatial_dims=3, image_size=(24, 24, 12), spacing=(1.5, 1.5, 2.5), intensity="ct",
                         ct_window=(-200.0, 300.0), normalization="zscore_nonzero", patch=False)
    for train in (False, True):
        sample = make_dataset(items, prep, root, key_file=_key(root), train=train, cache="memory", progress=False)[0]
        assert tuple(sample["image"].shape) == (1, 24, 24, 12) == tuple(sample["label"].shape)
        assert set(np.unique(sample["label"].numpy())) <= {0.0, 1.0, 2.0}  # nearest neighbour only
        assert (sample["label"] > 0).any()


def test_unknown_label_is_refused_naming_the_row(demo_manifest):
    root, manifest = demo_manifest
    xray = manifest[manifest["modality"].isin(["CR", "DX"])].copy()
    xray.loc[xray.index[0], "label"] = "7"
    xray.loc[xray.index[0], "split"] = "train"
    with pytest.raises(ValueError, match=xray["id"].iloc[0]):
        manifest_items(xray, "train", "classification", ["0", "1"])


def test_disk_cache_files_hold_tensors_and_pseudonyms_only_and_serve_later_epochs(demo_manifest, tmp_path):
    root, manifest = demo_manifest
    xray = manifest[manifest["modality"].isin(["CR", "DX"])]
    items = manifest_items(xray, "train", "classification", class_names(xray["label"]))
    prep = Preprocessing(spatial_dims=2, image_size=(32, 32), normalization="imagenet", in_channels=1)
    cache = tmp_path / "cache"
    ds = make_dataset(items, prep, root, key_file=_key(root), train=False, cache="disk", cache_dir=cache)
    first = [ds[i] for i in range(len(ds))]
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == len(items) and not list(cache.glob("*.tmp"))

    needles = [str(root.resolve()), str(root), *(p for p in xray["path"] if not p.startswith("alias:")),
               *(s for s in manifest.attrs["phi"] if len(s) >= 6)]
    for file in files:
        raw = file.read_bytes()  # safetensors stores its JSON header and the tensors uncompressed
        assert not [n for n in needles if n.encode() in raw], file.name
        with safe_open(file, framework="pt") as f:
            assert set(f.keys()) == {"image"} and set(f.metadata()) == {"medtl"}
            assert set(json.loads(f.metadata()["medtl"])) == {"id", "label"}
        cached = DiskCache._read(file)
        assert set(cached) == {"id", "image", "label"} and cached["id"].startswith("R-")
        assert type(cached["label"]) is int and type(cached["image"]) is torch.Tensor
    assert not any(item["id"] in f.name or item["row"]["sha256"] in f.name for item in items for f in files)

    # Later epochs read the files, not the studies: a dataset whose root does not exist still serves them,
    # with the augmentations of training applied after the cache.
    gone = tmp_path / "no-such-root"
    again = make_dataset(items, prep, gone, key_file=_key(root), train=False, cache="disk", cache_dir=cache)
    assert all(torch.equal(a["image"], again[i]["image"]) and a["id"] == again[i]["id"] for i, a in enumerate(first))
    train = make_dataset(items, prep, gone, key_file=_key(root), train=True, cache="disk", cache_dir=cache)
    assert tuple(train[0]["image"].shape) == (1, 32, 32)
    assert len(list(cache.glob("*.safetensors"))) == len(items)


def test_disk_cache_serves_the_memory_cache_values_with_the_same_augmentations_and_recomputes_a_broken_file(
        demo_manifest, tmp_path, caplog):
    root, manifest = demo_manifest
    ct = manifest[manifest["modality"] == "CT"]
    items = [item for split in sorted(set(ct["split"])) for item in manifest_items(ct, split, "segmentation", [])]
    assert len(items) >= 3
    prep = Preprocessing(spatial_dims=3, image_size=(16, 16, 8), spacing=(1.5, 1.5, 2.5), intensity="ct",
                         ct_window=(-200.0, 300.0), normalization="zscore_nonzero", patch=True)
    always = Augmentation(affine_prob=1.0, noise_prob=1.0, contrast_prob=1.0)
    cache = tmp_path / "cache"

    def epoch(kind: str, seed: int) -> list[dict]:
        ds = make_dataset(items, prep, root, key_file=_key(root), train=True, augmentation=always, cache=kind,
                          cache_dir=cache, progress=False)
        set_rnd(ds, seed)  # as the engine seeds an epoch
        return [ds[i] for i in range(len(ds))]

    for seed in (0, 1):  # seed 0 writes the files, seed 1 reads them
        memory, disk = epoch("memory", seed), epoch("disk", seed)
        for a, b in zip(memory, disk, strict=True):
            assert a["id"] == b["id"]
            for key in ("image", "label"):  # the mask comes back as a tensor label map, as from memory
                assert type(b[key]) is torch.Tensor and torch.equal(a[key], b[key])
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == len(items)

    files[0].write_bytes(files[0].read_bytes()[:200])  # cut short, e.g. a disk that filled up
    save_file({"image": torch.zeros(1)}, files[1], metadata={"medtl": "[1, 2]"})  # a header that is no item
    save_file({"other": torch.zeros(1)}, files[2], metadata={"medtl": "{}"})  # no image
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtl.data.dataset"):
        again = epoch("disk", 1)
    warned = sorted(r.getMessage() for r in caplog.records if r.name == "medtl.data.dataset")
    assert warned == sorted(f"disk cache file {f.name} cannot be read (cut short, or not written by medtl); "
                            f"computing it again" for f in files[:3])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(memory, again, strict=True))
    assert all(DiskCache._read(f) is not None for f in files[:3])  # written again, whole
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~_umask() for f in files[:3])  # as other outputs, not 0600
    assert not list(cache.glob("*.tmp"))

    # A cache folder that cannot be written says so and what to do, without its path.
    shutil.rmtree(cache)
    blocked = make_dataset(items, prep, root, key_file=_key(root), train=False, cache="disk", cache_dir=cache,
                           progress=False)
    shutil.rmtree(cache)  # gone under the run (or not writable): the first item cannot be stored
    with pytest.raises(InputError, match=r"the disk cache folder \(the run's OUTPUT/cache, data.cache: disk\) "
                                         r"cannot be written \(FileNotFoundError: No such file or directory\); "
                                         r"make it writable or delete it, or set data.cache=memory") as caught:
        blocked[0]
    assert str(tmp_path) not in str(caught.value)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match="the disk cache folder .* cannot be written"):
        make_dataset(items, prep, root, key_file=_key(root), train=False, cache="disk",
                     cache_dir=tmp_path / "a-file" / "cache", progress=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_training_augmentations_run_without_metadata_tracking_and_give_the_same_values(demo_manifest):
    root, manifest = demo_manifest
    ct = manifest[manifest["modality"] == "CT"]
    items = manifest_items(ct, ct["split"].iloc[0], "segmentation", [])
    prep = Preprocessing(spatial_dims=3, image_size=(24, 24, 12), spacing=(1.5, 1.5, 2.5), intensity="ct",
                         ct_window=(-200.0, 300.0), normalization="zscore_nonzero", patch=False)
    always = Augmentation(affine_prob=1.0, noise_prob=1.0, contrast_prob=1.0)  # every draw changes the values
    ds = make_dataset(items, prep, root, key_file=_key(root), train=True, augmentation=always, cache="none")
    assert isinstance(ds.transform, TrainingPipeline)
    tracked = mt.Compose(list(ds.transform.transforms))  # the same transform objects, MONAI's metadata on
    for seed in (0, 1):
        ds.transform.set_random_state(seed)
        untracked = ds[0]
        assert get_track_meta(), "the switch must be restored after the random transforms"
        tracked.set_random_state(seed)
        reference = tracked(dict(ds.data[0]))
        for key in ("image", "label"):
            assert type(untracked[key]) is torch.Tensor
            assert torch.equal(untracked[key], reference[key].as_subclass(torch.Tensor))
    unaugmented = make_dataset(items, prep, root, key_file=_key(root), train=False, cache="none")[0]
    assert not torch.equal(untracked["image"], unaugmented["image"])


@pytest.mark.parametrize("fraction", [1.0, 1 / 3])
def test_3d_patches_are_centred_on_foreground_as_often_as_asked(fraction):
    volume = torch.zeros(1, 48, 48, 48)
    label = torch.zeros(1, 48, 48, 48)
    label[0, 40:44, 2:6, 40:44] = 1  # a small structure in a corner: uniform patches rarely hold it
    prep = Preprocessing(spatial_dims=3, image_size=(16, 16, 16), patch=True)
    crop = augmentation_transforms(prep, True, Augmentation(foreground_fraction=fraction, affine_prob=0.0,
                                                            noise_prob=0.0, contrast_prob=0.0))
    crop.set_random_state(0)
    draws = 300
    hits = sum(bool(crop({"image": volume, "label": label})["label"].sum() > 0) for _ in range(draws))
    # The chance that a patch anywhere holds some of it: patch starts 0-32 per axis, of which those
    # overlapping 40-43, 2-5 and 40-43 (8, 6 and 8 of 33): about 0.01.
    uniform = 8 * 6 * 8 / 33**3
    if fraction == 1.0:
        assert hits == draws
    else:  # a third centred on it, plus the uniform chance of the other two thirds
        expected = fraction + (1 - fraction) * uniform
        assert abs(hits / draws - expected) < 0.08, (hits / draws, expected)


@pytest.mark.parametrize(("dims", "axes"), [(2, (0,)), (2, (1,)), (3, (0, 2)), (3, (0, 1, 2))])
def test_flips_mirror_image_and_mask_together_along_each_axis_asked(dims, axes):
    size = (6, 8, 10)[:dims]
    image = torch.arange(np.prod(size), dtype=torch.float32).reshape(1, *size)
    label = (image % 3).float()
    prep = Preprocessing(spatial_dims=dims, image_size=size)
    only_flips = Augmentation(affine_prob=0.0, noise_prob=0.0, contrast_prob=0.0, flip_axes=axes, flip_prob=1.0)
    out = augmentation_transforms(prep, True, only_flips)({"image": image, "label": label})
    dims_flipped = [1 + a for a in axes]  # after the channel axis
    assert torch.equal(torch.as_tensor(out["image"]), image.flip(dims_flipped))
    assert torch.equal(torch.as_tensor(out["label"]), label.flip(dims_flipped))


def test_each_axis_flips_on_its_own_with_the_probability_asked():
    image = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 2, 3)
    flips = augmentation_transforms(Preprocessing(spatial_dims=2, image_size=(2, 3)), False,
                                    Augmentation(affine_prob=0.0, noise_prob=0.0, contrast_prob=0.0, flip_axes=(0, 1)))
    flips.set_random_state(0)
    seen = Counter()
    for _ in range(400):
        out = torch.as_tensor(flips({"image": image})["image"])
        seen[next(d for d in [(), (1,), (2,), (1, 2)] if torch.equal(out, image.flip(list(d)) if d else image))] += 1
    assert all(abs(seen[d] / 400 - 0.25) < 0.07 for d in [(), (1,), (2,), (1, 2)]), seen  # 0.5 x 0.5 each


def test_no_flips_unless_asked():
    assert Augmentation().flip_axes == ()
    steps = augmentation_transforms(Preprocessing(spatial_dims=3, image_size=(8, 8, 8)), True).transforms
    assert not [s for s in steps if "Flip" in type(s).__name__]
