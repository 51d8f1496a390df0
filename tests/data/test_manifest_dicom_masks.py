"""Masks that are DICOM SEG and RTSTRUCT objects, end to end: manifest build, dataset, verify, training.

The demo CT series are real multi-file DICOM series (head- and feet-first) whose NIfTI masks
medtl's demo writes; each mask is written again as a DICOM SEG (highdicom) and as an RTSTRUCT
(contours traced with scikit-image) over its series. The label maps medtl makes of them must equal
the NIfTI masks: exactly for SEG (Dice 1.0), Dice >= 0.95 per class for RTSTRUCT contours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from medtl.data.dataset import Preprocessing, make_dataset, manifest_items
from medtl.data.manifest import build_manifest
from medtl.data.manifest_masks import SOP_CLASS
from medtl.data.synthetic import write_demo_data
from medtl.data.verify import verify_manifest
from medtl.errors import ConfigError, InputError
from tests.data import dicom_factory as factory

SEGMENTS = {"Organ": 1, "Lesion": 2}  # the demo's mask classes, as an annotator would name them
PREP = Preprocessing(spatial_dims=3, image_size=(16, 16, 8), spacing=(), intensity="ct", ct_window=(-200, 300),
                     normalization="unit", patch=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo studies plus a SEG (seg/) and an RTSTRUCT (rt/) of every CT mask; labels CSVs for each."""
    work = tmp_path_factory.mktemp("dicom_masks")
    key = work / "project.key"
    key.write_bytes(np.random.default_rng(0).bytes(32))
    key.chmod(0o600)
    root = work / "data"
    write_demo_data(root, patients=60, seed=3, progress=False)
    labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    cts = labels[labels["mask"] != ""].reset_index(drop=True)
    seg_rows, rt_rows = cts.copy(), cts.copy()
    for i, row in cts.iterrows():
        files = sorted((root / row["path"]).glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
        volume = np.asarray(nib.load(root / row["mask"]).dataobj).transpose(2, 1, 0)  # -> (slices, rows, columns)
        named = {name: volume == index for name, index in SEGMENTS.items() if (volume == index).any()}
        # Name-bearing file names where the demo's folders bear names: the manifest must alias them.
        stem = row["path"].split("/")[0]
        seg_rows.loc[i, "mask"] = f"seg/{stem}.dcm"
        rt_rows.loc[i, "mask"] = f"rt/{stem}.dcm"
        factory.write_seg(root / seg_rows.loc[i, "mask"], files, np.stack(list(named.values()), axis=-1),
                          list(named))
        factory.write_rtstruct(root / rt_rows.loc[i, "mask"], files, named)
    for name, table in (("nifti", cts), ("seg", seg_rows), ("rt", rt_rows)):
        table.to_csv(work / f"{name}.csv", index=False)
    return work, root, key, cts


def _build(demo, labels: str, out: str, **kwargs):
    work, root, key, _ = demo
    result = build_manifest(root, work / labels, work / out, key_file=key, progress=False,
                            **{"segment_map": SEGMENTS, **kwargs})
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False).set_index("series")
    return result, table, json.loads(result.sidecar_json.read_text())


def _label_maps(demo, table: pd.DataFrame, sidecar: dict) -> dict[str, np.ndarray]:
    """Each row's mask as training loads it, by series pseudonym."""
    _, root, key, _ = demo
    rows = table.reset_index()
    items = manifest_items(rows.assign(split="train"), "train", "segmentation", [], sidecar.get("segment_map"))
    dataset = make_dataset(items, PREP, root, key_file=key, train=False, cache="none", progress=False)
    return {series: dataset[i]["label"].numpy() for i, series in enumerate(rows["series"])}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.sum(a & b)) / max(float(np.sum(a) + np.sum(b)), 1.0)


def test_seg_masks_give_exactly_the_nifti_label_maps_they_were_made_from(demo):
    _, nifti, nifti_sidecar = _build(demo, "nifti.csv", "nifti_manifest.csv")
    result, seg, sidecar = _build(demo, "seg.csv", "seg_manifest.csv")
    assert len(seg) == len(nifti) == len(demo[3]) and set(seg.index) == set(nifti.index)
    assert (seg["mask_sop_class"] == SOP_CLASS["seg"]).all() and (nifti["mask_sop_class"] == "").all()
    assert (seg["mask_sha256"] == nifti.loc[seg.index, "mask_sha256"]).all()  # the same labels, the same dtype
    assert sidecar["mask_labels"] == nifti_sidecar["mask_labels"] == [0, 1, 2]
    assert sidecar["segment_map"] == SEGMENTS and sidecar["dicom_masks"]["used"] == len(seg)
    used = {e["file"] for e in sidecar["files_not_used"]}
    assert not any(str(f).startswith("seg/") for f in used), "a SEG used as a mask is counted as used"
    named = seg[seg["path"].str.startswith("alias:")]
    assert len(named) and named["mask"].str.startswith("alias:").all(), "a name-bearing SEG file name is aliased"
    loaded, expected = _label_maps(demo, seg, sidecar), _label_maps(demo, nifti, nifti_sidecar)
    for series, labels in loaded.items():
        np.testing.assert_array_equal(labels, expected[series])
        assert all(_dice(labels == c, expected[series] == c) == 1.0 for c in (1, 2) if (expected[series] == c).any())
    assert verify_manifest(result.manifest_csv, demo[1], key_file=demo[2], progress=False).ok


def test_rtstruct_contours_give_the_nifti_label_maps_within_dice_0_95(demo):
    _, nifti, nifti_sidecar = _build(demo, "nifti.csv", "nifti_manifest.csv")
    _, rt, sidecar = _build(demo, "rt.csv", "rt_manifest.csv")
    assert (rt["mask_sop_class"] == SOP_CLASS["rtstruct"]).all() and len(rt) == len(nifti)
    loaded, expected = _label_maps(demo, rt, sidecar), _label_maps(demo, nifti, nifti_sidecar)
    scores = [_dice(loaded[s] == c, expected[s] == c) for s in expected for c in (1, 2) if (expected[s] == c).any()]
    assert len(scores) > len(expected) and min(scores) >= 0.95, scores


def test_masks_from_dicom_finds_the_seg_that_references_each_series(demo, tmp_path):
    work, root, key, cts = demo
    copy = tmp_path / "data"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("rt"))  # one mask per series
    cts[["path", "patient_id"]].to_csv(tmp_path / "paths.csv", index=False)  # no label or mask column
    result = build_manifest(copy, tmp_path / "paths.csv", tmp_path / "m.csv", key_file=key, progress=False,
                            segment_map=SEGMENTS, masks_from_dicom=True)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    _, seg, _ = _build(demo, "seg.csv", "seg_manifest.csv")
    assert len(table) == len(cts) and (table["mask_sop_class"] == SOP_CLASS["seg"]).all()
    assert dict(zip(table["series"], table["mask_sha256"], strict=True)) == seg["mask_sha256"].to_dict()
    assert json.loads(result.sidecar_json.read_text())["masks_from_dicom"] is True


def test_masks_from_dicom_refuses_to_choose_between_two_masks_of_one_series(demo, tmp_path):
    work, root, key, cts = demo
    cts[["path", "patient_id"]].to_csv(tmp_path / "paths.csv", index=False)
    with pytest.raises(InputError, match=r"paths\.csv must have at least one usable row, not none \(of 8 rows\): rows "
                                         r"2, 3, 4, 5, 6 and 3 more: 2 DICOM masks reference its series"):
        build_manifest(root, tmp_path / "paths.csv", tmp_path / "m.csv", key_file=key, progress=False,
                       segment_map=SEGMENTS, masks_from_dicom=True)
    named = cts[["path", "patient_id"]].assign(mask="")
    named.loc[0, "mask"] = pd.read_csv(work / "seg.csv", dtype=str)["mask"][0]  # a named mask is not searched for
    named.to_csv(tmp_path / "one_named.csv", index=False)
    result = build_manifest(root, tmp_path / "one_named.csv", tmp_path / "m.csv", key_file=key, progress=False,
                            segment_map=SEGMENTS, masks_from_dicom=True)
    sidecar = json.loads(result.sidecar_json.read_text())
    assert result.rows == 1 and [r["row"] for r in sidecar["label_rows_not_used"]] == list(range(3, len(cts) + 2))
    reasons = {r["reason"] for r in sidecar["label_rows_not_used"]}
    assert reasons == {"2 DICOM masks reference its series; name the one to use in the mask column"}


def test_segment_names_missing_from_the_map_stay_background_and_only_plain_words_are_shown(demo, tmp_path):
    work, root, key, cts = demo
    row = cts[cts["label"] == "1"].iloc[0]  # a CT with a lesion
    files = sorted((root / row["path"]).glob("*.dcm"))
    volume = np.asarray(nib.load(root / row["mask"]).dataobj).transpose(2, 1, 0)
    order = np.argsort([int(pydicom.dcmread(f).InstanceNumber) for f in files])
    files = [files[i] for i in order]
    factory.write_seg(root / "extra" / "named.dcm", files, np.stack([volume == 1, volume == 2], axis=-1),
                      ["Organ", "Xyloquent tumour"])
    pd.DataFrame([{"path": row["path"], "mask": "extra/named.dcm", "patient_id": row["patient_id"]}]).to_csv(
        tmp_path / "one.csv", index=False)
    for segment_map, shown in (({"Organ": 1}, []), ({"organ": 1, "XYLOQUENT  tumour": 2}, None)):
        result = build_manifest(root, tmp_path / "one.csv", tmp_path / "m.csv", key_file=key, progress=False,
                                segment_map=segment_map)
        sidecar = json.loads(result.sidecar_json.read_text())
        if shown is None:  # names compare without regard to case and spacing: both mapped
            assert sidecar["mask_labels"] == [0, 1, 2] and not sidecar["dicom_masks"]["unmapped_segment_names"]
            continue
        assert sidecar["mask_labels"] == [0, 1], "an unknown segment stays background"
        assert sidecar["dicom_masks"]["unmapped_segment_names"] == shown
        assert sidecar["dicom_masks"]["unmapped_segment_names_not_shown"] == 1
        assert "Xyloquent" not in result.sidecar_json.read_text() + " ".join(result.warnings)
        assert any("1 more not shown" in w for w in result.warnings)
    shutil.rmtree(root / "extra")


def test_dicom_masks_without_a_segment_map_are_refused_not_guessed(demo):
    with pytest.raises(ConfigError, match="segment_map must name the classes of DICOM SEG/RTSTRUCT masks"):
        _build(demo, "seg.csv", "seg_manifest.csv", segment_map={})


def test_a_seg_of_another_series_leaves_its_row_out_naming_the_row_not_the_file(demo, tmp_path):
    work, root, key, cts = demo
    seg = pd.read_csv(work / "seg.csv", dtype=str, keep_default_na=False)
    swapped = seg.assign(mask=[seg["mask"][1], seg["mask"][0], *seg["mask"][2:]])  # rows 2 and 3 swap masks
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    result = build_manifest(root, tmp_path / "swapped.csv", tmp_path / "m.csv", key_file=key, progress=False,
                            segment_map=SEGMENTS)
    text = result.sidecar_json.read_text()
    unused = json.loads(text)["label_rows_not_used"]
    assert [r["row"] for r in unused] == [2, 3] and all("referenced series is absent" in r["reason"] for r in unused)
    assert all(r["reason"].startswith(f"the DICOM mask of labels CSV row {r['row']}: ") for r in unused)
    assert not any(Path(name).stem in r["reason"] for name in seg["mask"] for r in unused)


@pytest.mark.slow
def test_segment_3d_trains_on_seg_masks_and_predict_stores_its_seg_objects_to_the_pacs(
    demo, tmp_path, monkeypatch, empty_pacs, credentials
):
    from medtl.cli import main
    from medtl.data.pacs import pull
    from medtl.workflow.config import load_config
    from medtl.workflow.run import run_workflow

    work, root, key, cts = demo
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDTL_KEY_FILE", str(key))
    seg = pd.read_csv(work / "seg.csv", dtype=str, keep_default_na=False)
    seg["split"] = ["train"] * (len(seg) - 4) + ["val", "val", "test", "test"]
    seg.to_csv(tmp_path / "seg_split.csv", index=False)
    workflow = Path(__file__).resolve().parents[2] / "workflows" / "segment_3d.yaml"
    cfg = load_config(workflow, [f"data.root={root}", f"data.labels={tmp_path / 'seg_split.csv'}",
                                 "data.segment_map={organ: 1, lesion: 2}", "data.image_size=[16, 16, 8]",
                                 "train.epochs=1", "train.min_steps=0", "evaluation.n_boot=100", "audit.reference=none",
                                 "data.manifest_out=", "tracking.registered_model=seg_from_dicom"])
    outputs = run_workflow(cfg, tmp_path / "run", progress=False)
    manifest = pd.read_csv(tmp_path / "run" / "manifest.csv", dtype=str, keep_default_na=False)
    assert (manifest["mask_sop_class"] == SOP_CLASS["seg"]).all() and len(manifest) == len(seg)
    assert np.isfinite(outputs.metrics["test"]["dice"])

    cts[["path"]].to_csv(tmp_path / "cts.csv", index=False)
    status = main(["-q", "predict", f"models:/seg_from_dicom/{outputs.model_version}", "--root", str(root), "--labels",
                   str(tmp_path / "cts.csv"), "--output", str(tmp_path / "pred"), "--store-to", empty_pacs])
    written = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "pred" / "dicom_seg").glob("*.dcm")}
    assert status == 0 and len(written) == len(cts)
    pull(empty_pacs, {"Modality": "SEG"}, tmp_path / "from_pacs", progress=False)
    assert written == {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "from_pacs").rglob("*.dcm")}
    with pytest.raises(ConfigError, match="data.segment_map' must equal the segment map"):
        run_workflow(load_config(workflow, [f"data.root={root}", f"data.manifest={tmp_path / 'run' / 'manifest.csv'}",
                                            "data.segment_map={organ: 1, lesion: 1}", "data.manifest_out="]),
                     tmp_path / "run2", progress=False)


def test_a_contradictory_segment_map_is_refused_once_before_any_row(demo, tmp_path):
    with pytest.raises(ConfigError, match=r"segment_map keys that differ only in case or spacing must map to one "
                                          r"class.*\(data\.segment_map / --segment-map\)"):
        _build(demo, "seg.csv", "seg_manifest.csv", segment_map={"organ": 1, "ORGAN": 2})


def test_when_every_row_is_refused_the_error_says_why_per_row(demo, tmp_path):
    work, root, key, _ = demo
    seg = pd.read_csv(work / "seg.csv", dtype=str, keep_default_na=False).head(2)
    seg.assign(mask=[seg["mask"][1], seg["mask"][0]]).to_csv(tmp_path / "swapped.csv", index=False)
    with pytest.raises(InputError, match=r"^swapped\.csv must have at least one usable row, not none \(of 2 rows\): "
                                         r"row 2: the DICOM mask of labels CSV row 2: the referenced series is absent"):
        build_manifest(root, tmp_path / "swapped.csv", tmp_path / "m.csv", key_file=key, progress=False,
                       segment_map=SEGMENTS)
