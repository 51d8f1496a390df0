"""`data.image_size: []` (segment_3d's default): the 3D training patch chosen from the manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from medtl.data.synthetic import write_demo_data
from medtl.errors import InputError
from medtl.workflow.config import load_config
from medtl.workflow.prepare import input_size_from_data, prepare_data

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def _data(rows: list[tuple[str, str, str]], split: str = "train") -> SimpleNamespace:
    table = pd.DataFrame([{"shape": s, "spacing": mm, "orientation": o, "split": split} for s, mm, o in rows])
    return SimpleNamespace(manifest=table, manifest_path=Path("manifest.csv"))


def _cfg(*extra: str):
    return load_config(WORKFLOWS / "segment_3d.yaml", ["data.image_size=[]", *extra])


def test_the_patch_is_the_median_volume_in_ras_order_at_the_run_spacing_to_a_multiple_of_16():
    # Hippocampus-like crops stored in two axis orders: the patch follows RAS, not the array order.
    rows = [("35x51x35", "1x1x1", "RAS"), ("51x35x36", "1x1x1", "ARS"), ("34x52x35", "1x1x1", "LPI")]
    assert input_size_from_data(_cfg("data.spacing=[1, 1, 1]"), _data(rows)).data.image_size == (32, 48, 32)
    # At 2 mm the same volumes are half as many voxels along each axis.
    assert input_size_from_data(_cfg("data.spacing=[2, 2, 2]"), _data(rows)).data.image_size == (16, 32, 16)
    # data.spacing [] keeps each volume's grid: its own voxel counts.
    assert input_size_from_data(_cfg("data.spacing=[]"), _data(rows)).data.image_size == (32, 48, 32)


def test_the_patch_stays_within_its_bounds_and_only_training_rows_count():
    tiny, huge = ("5x6x4", "1x1x1", "RAS"), ("400x512x300", "1x1x1", "RAS")
    assert input_size_from_data(_cfg("data.spacing=[1, 1, 1]"), _data([tiny])).data.image_size == (16, 16, 16)
    assert input_size_from_data(_cfg("data.spacing=[1, 1, 1]"), _data([huge])).data.image_size == (96, 96, 96)
    data = _data([tiny])
    data.manifest = pd.concat([data.manifest, _data([huge] * 5, split="test").manifest])
    assert input_size_from_data(_cfg("data.spacing=[1, 1, 1]"), data).data.image_size == (16, 16, 16)


def test_3d_classification_resizes_to_the_median_volume_on_each_volume_s_own_grid():
    # classify_3d keeps each volume's grid (data.spacing []): the input is the median voxel counts.
    cfg = load_config(WORKFLOWS / "classify_3d.yaml", ["data.image_size=[]"])
    rows = [("28x28x28", "1x1x1", "RAS"), ("28x28x28", "2x2x2", "LPS"), ("64x64x64", "1x1x1", "RAS")]
    assert input_size_from_data(cfg, _data(rows)).data.image_size == (32, 32, 32)


def test_a_given_size_is_kept_and_a_manifest_without_geometry_is_refused_naming_the_key():
    given = load_config(WORKFLOWS / "segment_3d.yaml", ["data.image_size=[48, 48, 16]"])
    assert input_size_from_data(given, _data([("9x9x9", "1x1x1", "RAS")])) is given
    with pytest.raises(InputError, match=r"for data.image_size \[\] to choose the patch; set data.image_size"):
        input_size_from_data(_cfg(), _data([("9x9", "1x1", "RA")]))


def test_the_demo_ct_series_get_the_patch_segment_3d_shipped_before(tmp_path, monkeypatch, fixed_key):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    write_demo_data(root, patients=60, seed=3, progress=False)
    cfg = load_config(WORKFLOWS / "segment_3d.yaml", [f"data.root={root}", f"data.labels={root / 'labels.csv'}",
                                                      "data.manifest_out="])
    assert cfg.data.image_size == ()
    data = prepare_data(cfg, tmp_path / "out", progress=False)
    assert input_size_from_data(cfg, data).data.image_size == (32, 32, 16)


def test_a_classifier_input_that_leaves_batchnorm_too_few_values_is_warned_about(caplog):
    def warned(workflow: str, *sets: str, rows=None) -> list[str]:
        caplog.clear()
        cfg = load_config(WORKFLOWS / f"{workflow}.yaml", list(sets))
        with caplog.at_level(logging.WARNING, logger="medtl.workflow.prepare"):
            input_size_from_data(cfg, _data(rows or [("9x9x9", "1x1x1", "RAS")]))
        return [r.getMessage() for r in caplog.records if "BatchNorm" in r.getMessage()]

    # The old classify_3d default: EfficientNet's last stage of one voxel, BatchNorm over the batch of 4.
    assert warned("classify_3d", "data.image_size=[32, 32, 16]") == [
        "data.image_size [32, 32, 16] leaves encoder 'efficientnet_lite0' a last stage of 1 voxel(s) (its input is "
        "reduced 32 times per axis): with train.batch_size 4 its BatchNorm sees only 4 values per channel, and "
        "classification then barely trains; use a larger data.image_size (e.g. [64, 64, 32]) or train.batch_size"]
    # Chosen from the data: the demo CT series' median volume gives the same size, and the same warning.
    assert len(warned("classify_3d", "data.image_size=[]", rows=[("26x26x14", "1.5x1.5x2.5", "LPS")])) == 1
    assert warned("classify_3d") == []  # the shipped [64, 64, 32]: 2 x 2 x 1 voxels, 16 values
    assert warned("classify_3d", "data.image_size=[32, 32, 16]", "train.batch_size=16") == []
    assert warned("classify_3d", "data.image_size=[32, 32, 16]", "model.encoder=medicalnet_resnet10",
                  "model.weights=none") == []  # MedicalNet downsamples 8 times: 4 x 4 x 2 voxels
    assert warned("segment_3d", "data.image_size=[32, 32, 16]") == []  # the decoder works at finer stages
    assert warned("classify_2d", "data.image_size=[32, 32]", "train.batch_size=8") != []
    assert warned("classify_2d") == []  # 96 px at batch 32: 3 x 3 voxels, 288 values
