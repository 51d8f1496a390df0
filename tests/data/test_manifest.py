"""The manifest build, its accounting, the PHI scan, verify and resolve, on real files."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtl.data.discover import load_study
from medtl.data.manifest import MANIFEST_COLUMNS, build_manifest, pixel_sha256
from medtl.data.verify import resolve_path, resolve_study, verify_manifest
from medtl.errors import ConfigError, InputError, LeakageError

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "MRN0012345", "PatientBirthDate": "19570312",
           "StudyDate": "20240115", "InstitutionName": "Northgate General Hospital"}


def _dicom(path: Path, pixels: np.ndarray, *, modality: str, study_uid: str, series_uid: str,
           position: float | None = None, **tags: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE if modality == "CT" else DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, modality
    ds.PatientSex, ds.PatientAge, ds.Manufacturer, ds.ManufacturerModelName = "F", "066Y", "Acme", "Scan 1"
    for keyword, value in {**PATIENT, **tags}.items():
        setattr(ds, keyword, value)
    ds.PixelSpacing = [0.7, 0.7]
    if position is not None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, position]
        ds.SliceThickness = 2.0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, study_uid: str, seed: int, n: int = 3) -> None:
    series_uid = generate_uid()
    rng = np.random.default_rng(seed)
    for k in range(n):
        _dicom(folder / f"slice{k}.dcm", rng.integers(0, 4000, (8, 8)), modality="CT", study_uid=study_uid,
               series_uid=series_uid, position=2.0 * k)


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 10), dtype=np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """DICOM (a two-series study, a radiograph in a named folder), NIfTI + mask, PNGs, bad files."""
    root = tmp_path / "data"
    study_uid = generate_uid()
    _series(root / "dicom" / "study_two" / "a", study_uid, 1)
    _series(root / "dicom" / "study_two" / "b", study_uid, 2)
    _dicom(root / "DOE_JANE" / "chest.dcm", np.full((10, 12), 700), modality="DX", study_uid=generate_uid(),
           series_uid=generate_uid())
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    (root / "nifti").mkdir()
    nib.save(nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), affine),
             root / "nifti" / "case_01.nii.gz")
    nib.save(nib.Nifti1Image((np.arange(120).reshape(6, 5, 4) % 2).astype(np.uint8), affine),
             root / "nifti" / "case_01_mask.nii.gz")
    for name, seed in (("img_a", 1), ("img_b", 2), ("img_c", 3), ("unlabeled", 4)):
        _png(root / "png" / f"{name}.png", seed)
    (root / "bad").mkdir()
    (root / "bad" / "zero.dcm").write_bytes(b"")
    (root / "bad" / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    (root / "notes.txt").write_text("export notes\n")
    pd.DataFrame(
        [
            {"path": "dicom/study_two", "label": "1", "mask": "", "patient_id": ""},
            {"path": "DOE_JANE/chest.dcm", "label": "0", "mask": "", "patient_id": ""},
            {"path": "nifti/case_01.nii.gz", "label": "", "mask": "nifti/case_01_mask.nii.gz", "patient_id": "C01"},
            {"path": "png/img_a.png", "label": "1", "mask": "", "patient_id": ""},
            {"path": "png/img_b.png", "label": "0", "mask": "", "patient_id": ""},
            {"path": "png/img_c.png", "label": "0", "mask": "", "patient_id": ""},
            {"path": "missing/gone.png", "label": "1", "mask": "", "patient_id": ""},
        ]
    ).to_csv(root / "labels.csv", index=False)
    return root


def _build(root: Path, out: Path, **kwargs):
    return build_manifest(root, root / "labels.csv", out / "manifest.csv", progress=False, **kwargs)


def test_manifest_has_one_row_per_series_with_the_contract_columns(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    assert list(table.columns) == [*MANIFEST_COLUMNS, "split"]
    assert table["id"].is_unique and len(table) == result.rows == 7
    two = table[table["path"] == "dicom/study_two"]
    assert len(two) == 2 and set(two["label"]) == {"1"} and two["series"].nunique() == 2
    assert two["study"].nunique() == 1 and two["patient"].nunique() == 1
    assert set(two["shape"]) == {"8x8x3"} and set(two["spacing"]) == {"0.7x0.7x2"}
    assert set(two[["sex", "age_band"]].itertuples(index=False)) == {("F", "60-69")}
    assert re.fullmatch(r"SITE-[0-9a-f]{6}", two["site"].iloc[0]) and two["key_id"].iloc[0] == result.key_id
    assert table.loc[table["path"].str.startswith("alias:"), "kind"].tolist() == ["dicom_image"]
    seg = table[table["path"] == "nifti/case_01.nii.gz"].iloc[0]
    assert seg["mask"] == "nifti/case_01_mask.nii.gz" and len(seg["mask_sha256"]) == 64 and seg["label"] == ""
    pngs = table[table["kind"] == "image2d"]
    assert pngs["patient"].nunique() == 3  # no patient_id, no header: one patient per file
    assert set(table["split"]) <= {"train", "val", "test"}


def test_counts_add_up_and_bad_unlabeled_and_unmatched_inputs_are_reported(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    sidecar = json.loads(result.sidecar_json.read_text())
    counts = sidecar["counts"]
    files = [p for p in tree.rglob("*") if p.is_file()]
    assert counts["files_seen"] == len(files) == counts["used"] + counts["quarantined"] + counts["skipped"]
    assert counts["unaccounted"] == 0 and sidecar["unaccounted_files"] == []
    assert counts["used"] == 6 + 1 + 1 + 1 + 3 + 1  # 2 series x 3 slices, DX, NIfTI, mask, PNGs, labels CSV
    not_used = {e["file"]: (e["status"], e["reason"]) for e in sidecar["files_not_used"]}
    assert not_used["bad/zero.dcm"][0] == "quarantined" and not_used["bad/corrupt.dcm"][0] == "quarantined"
    assert not_used["notes.txt"][0] == "skipped" and not_used["png/unlabeled.png"] == ("skipped", "no row in the labels CSV")
    assert sidecar["unlabeled_files"] == ["png/unlabeled.png"]
    assert sidecar["label_rows_not_used"] == [{"row": 8, "reason": "no file or folder at this path"}]
    assert sidecar["patient_source"] == {"dicom_header": 3, "labels_csv": 1, "one_per_file": 3}
    assert any("own patient" in w for w in result.warnings)
    assert len(sidecar["inventory"]) == len(files)
    assert sidecar["k_anonymity"]["k"] == 1 and not sidecar["k_anonymity"]["ok"]
    assert sum(s["rows"] for s in sidecar["splits"].values()) == 7
    # Years only (Safe Harbor), from the DICOM StudyDate: two CT series and the DX; NIfTI and PNG carry none.
    assert sidecar["study_years"] == {"first": 2024, "last": 2024, "dated": 3, "undated": 4}
    assert "20240115" not in result.sidecar_json.read_text()


def test_identifying_paths_and_values_never_reach_the_outputs(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    written = (result.manifest_csv.read_text() + result.sidecar_json.read_text()).lower()
    for value in ("doe", "jane", "mrn0012345", "0012345", "19570312", "20240115", "northgate", "c01",
                  str(tree).lower(), result.key_path.read_text().strip()):
        # Short values count as whole tokens: "c01" occurs by chance inside hex pseudonyms.
        pattern = rf"(?<![0-9a-z]){re.escape(value)}(?![0-9a-z])" if len(value) < 6 else re.escape(value)
        assert not re.search(pattern, written), value
    assert "alias:" in written


def test_key_is_created_with_mode_0600_and_the_result_says_where(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    assert result.key_created and result.key_path.stat().st_mode & 0o777 == 0o600
    assert str(result.key_path) in result.key_message
    assert not _build(tree, tmp_path / "again").key_created


def test_resolve_study_and_path_turn_rows_back_into_files(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    for row in table.to_dict("records"):
        study = resolve_study(row, tree)
        assert pixel_sha256(load_study(study).array) == row["sha256"]
    aliased = table[table["path"].str.startswith("alias:")].iloc[0]
    assert resolve_path(aliased["path"], tree) == tree / "DOE_JANE" / "chest.dcm"


def test_verify_passes_untouched_data_and_names_a_tampered_file(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    assert verify_manifest(result.manifest_csv, tree, progress=False).ok
    _png(tree / "png" / "img_a.png", seed=99)
    (tree / "notes.txt").unlink()
    _png(tree / "png" / "new.png", seed=5)
    check = verify_manifest(result.manifest_csv, tree, progress=False)
    assert not check.ok
    assert check.changed == ("png/img_a.png",) and check.missing == ("notes.txt",) and check.new == ("png/new.png",)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    row_id = table.loc[table["path"] == "png/img_a.png", "id"].item()
    assert check.rows_changed == (f"{row_id} (png/img_a.png)",)
    assert any("changed file: png/img_a.png" == p for p in check.problems)


def test_verify_names_a_tampered_identifying_file_by_its_alias(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    path = tree / "DOE_JANE" / "chest.dcm"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    check = verify_manifest(result.manifest_csv, tree, progress=False)
    assert not check.ok and len(check.changed) == 1 and check.changed[0].startswith("alias:")
    assert "doe" not in " ".join(check.problems).lower()


def test_verify_refuses_a_key_other_than_the_one_that_built_the_manifest(tree, tmp_path):
    result = _build(tree, tmp_path / "out")
    other = tmp_path / "other.key"
    other.write_text(hashlib.sha256(b"another project").hexdigest())
    other.chmod(0o600)
    with pytest.raises(ConfigError, match=f"key id {result.key_id}"):
        verify_manifest(result.manifest_csv, tree, key_file=other, progress=False)


def test_a_given_split_that_leaks_a_patient_is_refused(tree, tmp_path):
    labels = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)
    labels["patient_id"] = ["", "", "C01", "P7", "P7", "P8", ""]
    labels["split"] = ["train", "train", "val", "train", "test", "test", ""]
    labels.to_csv(tree / "labels.csv", index=False)
    with pytest.raises(LeakageError, match="1 patient aliases appear in more than one split"):
        _build(tree, tmp_path / "out")


def test_identifying_text_in_an_extra_subgroup_column_aborts_and_deletes_outputs(tree, tmp_path):
    labels = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)
    labels["ward"] = ["north", "Jane Doe", "north", "south", "south", "north", "north"]
    labels.to_csv(tree / "labels.csv", index=False)
    with pytest.raises(InputError) as caught:
        _build(tree, tmp_path / "out", subgroup_columns=["ward"])
    message = str(caught.value)
    assert "manifest.csv row 4 (labels CSV row 3), column 'ward': contains the DICOM PatientName of file" in message
    assert "jane" not in message.lower()
    assert not (tmp_path / "out" / "manifest.csv").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_labels_csv_errors_name_the_row_never_the_value(tree, tmp_path):
    labels = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)
    labels.loc[2, "path"] = "/abs/DOE_JANE.dcm"
    labels.loc[3, "split"] = "later"
    labels.to_csv(tree / "labels.csv", index=False)
    with pytest.raises(InputError, match=r"labels\.csv row 4: .*row 5: split must be") as caught:
        _build(tree, tmp_path / "out")
    assert "doe" not in str(caught.value).lower()


def test_rows_with_neither_label_nor_mask_are_kept_as_counted_unlabelled_studies(tree, tmp_path):
    labels = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)
    unlabelled = labels.index[(labels["label"] != "") & (labels["mask"] == "")][:2]
    labels.loc[unlabelled, "label"] = ""  # e.g. a new site's studies for domain adaptation
    labels.to_csv(tree / "labels.csv", index=False)
    result = _build(tree, tmp_path / "out")
    sidecar = json.loads(result.sidecar_json.read_text())
    assert sidecar["counts"]["unlabelled_rows"] == 2
    assert any("2 labels CSV rows have neither label nor mask" in w for w in result.warnings)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    assert ((table["label"] == "") & (table["mask"] == "")).sum() >= 2  # a folder row lists every image in it


def test_demo_data_build_writes_no_phi_anywhere(tmp_path, caplog, capsys):
    from medtl.data.synthetic import write_demo_data

    summary = write_demo_data(tmp_path / "demo", patients=16, seed=0, progress=False)
    caplog.set_level(logging.DEBUG)
    result = build_manifest(summary.root, summary.labels_csv, tmp_path / "out" / "manifest.csv", progress=True)
    captured = capsys.readouterr()
    outputs = {
        "manifest": result.manifest_csv.read_text(), "sidecar": result.sidecar_json.read_text(),
        "logs": "\n".join(r.getMessage() for r in caplog.records), "stdout": captured.out, "stderr": captured.err,
        "result": repr(result.warnings) + repr(result.counts),
    }
    assert result.rows == summary.n_radiographs + summary.n_ct_series
    for name, text in outputs.items():
        folded = text.lower()
        leaked = [s for s in summary.phi_strings if s.lower() in folded]
        assert not leaked, f"{len(leaked)} identifying strings in {name}"
        assert not [d for d in summary.phi_dates if re.search(rf"(?<!\d){d}(?!\d)", text)], name
        assert str(summary.root.resolve()) not in text and str(summary.root) not in text, name
        assert result.key_path.read_text().strip() not in text, name
    sidecar = json.loads(outputs["sidecar"])
    assert sidecar["counts"]["unaccounted"] == 0 and sidecar["counts"]["quarantined"] == 1
    assert len(sidecar["files_not_used"]) == len(summary.unlabelled_files)
    assert verify_manifest(result.manifest_csv, summary.root, progress=False).ok
