"""classify_3d on volumes already on a grid: 28³ arrays saved as NIfTI with an identity affine (as
MedMNIST 3D ships them) train at their own grid, with only the settings that describe the data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medtl.data.dataset import IMAGENET_MEAN, IMAGENET_STD, PERCENTILES, DiskCache, deterministic_transforms
from medtl.models.factory import create_model
from medtl.workflow.config import load_config
from medtl.workflow.run import run_workflow
from medtl.workflow.train import preprocessing_for

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "classify_3d.yaml"
GRID = (28, 28, 28)


def write_grid_volumes(root: Path, count: int = 40) -> Path:
    """`count` 28³ float volumes (noise around 100) with an identity affine; every other one holds a
    bright blob (label 1). Returns the labels CSV (path,label)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    axes = np.indices(GRID).astype(np.float32)
    rows = []
    for i in range(count):
        volume = rng.normal(100.0, 10.0, GRID).astype(np.float32)
        if i % 2:
            centre = rng.uniform(9, 19, 3)[:, None, None, None]
            volume += 120.0 * np.exp(-((axes - centre) ** 2).sum(0) / 18.0).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / f"vol_{i:03d}.nii.gz")
        rows.append({"path": f"vol_{i:03d}.nii.gz", "label": i % 2})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return labels


def _network_input(volume: np.ndarray) -> np.ndarray:
    """The volume as the run must feed it without resampling: percentile-scaled to 0..1, then the
    ImageNet mean/std of one channel."""
    low, high = np.percentile(volume, PERCENTILES)
    scaled = np.clip((volume - low) / (high - low), 0.0, 1.0)
    return (scaled - np.mean(IMAGENET_MEAN)) / np.mean(IMAGENET_STD)


def test_the_shipped_classify_3d_keeps_the_source_spacing():
    cfg = load_config(WORKFLOW)
    assert cfg.data.spacing == ()
    bundle = create_model(cfg.task, cfg.model.encoder, spatial_dims=3, weights=cfg.model.weights, meta=True)
    prep = preprocessing_for(cfg, bundle)
    steps = deterministic_transforms(prep, Path("."), None, has_mask=False).transforms
    assert not [step for step in steps if type(step).__name__ == "Spacingd"]


@pytest.mark.slow
def test_classify_3d_trains_on_volumes_already_on_a_grid_at_their_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded MLflow store is ./mlruns
    labels = write_grid_volumes(tmp_path / "grid")
    cfg = load_config(WORKFLOW, [
        f"data.root={labels.parent}", f"data.labels={labels}", f"data.manifest_out={tmp_path / 'manifest.csv'}",
        # What describes the data: no DICOM modality, not CT, already on a 28³ grid.
        "data.modalities=[]", "data.intensity=mr", "data.spacing=[]", "data.image_size=[28, 28, 28]",
        "data.cache=disk", "train.epochs=1", "train.min_steps=0", "train.num_threads=1", "evaluation.n_boot=100"])
    inputs: set[tuple[tuple[int, ...], bool]] = set()

    def record(module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 5 and args[0].shape[1] == 1:
            inputs.add((tuple(args[0].shape[2:]), module.training))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run_workflow(cfg, tmp_path / "out", progress=False)
    finally:
        hook.remove()

    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 40 and set(manifest["shape"]) == {"28x28x28"} and set(manifest["spacing"]) == {"1x1x1"}
    assert inputs == {(GRID, True), (GRID, False)}  # trained and scored at the volumes' grid

    # The disk cache holds what the network was fed: each volume voxel for voxel, never resampled.
    files = sorted((tmp_path / "out" / "cache").glob("*.safetensors"))
    assert len(files) == 40
    path_of = dict(zip(manifest["id"], manifest["path"], strict=True))
    for file in files:
        cached = DiskCache._read(file)
        volume = nib.load(labels.parent / path_of[cached["id"]]).get_fdata(dtype=np.float32)
        assert tuple(cached["image"].shape) == (1, *GRID)
        np.testing.assert_allclose(cached["image"][0].numpy(), _network_input(volume), atol=1e-4)
