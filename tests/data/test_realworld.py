"""Real-world intake cases seen on public data nobody here wrote (issue #12).

The PHI guard's false alarms and misses (1, 2), patient leakage through duplicated images and
disagreeing IDs (3), odd entries, tilted series and NaN volumes as the manifest sees them (4-6),
the project key (7), failed builds (8) and the repository layout (10). Every file is written
here with pydicom, nibabel or PIL. The same issue's other cases live beside the code they test:
`tests/data/test_realworld_intake.py` (discovery: file-system entries, series assembly, cine,
re-encoded copies, non-finite values), `tests/test_realworld_workflows.py` (8: the shipped 2D
workflow on PNG exports, checks before any work, manifests kept on failure) and
`tests/test_realworld_runs.py` (9: inconclusive audits; 11: the MLflow guard's false alarm,
tracebacks).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from medtl.data.manifest import MANIFEST_COLUMNS, build_manifest
from medtl.data.privacy import load_key
from medtl.data.splits import SPLITS
from medtl.errors import ConfigError, InputError, LeakageError
from tests.words import output_vocabulary

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("normal", "pneumonia")
# Genuinely identifying values planted beside the generic ones: none is an English word.
GENUINE_NAMES = ("KOWALSKI^ZOFIA", "NGUYEN^THANH", "OKONKWO^CHIDI", "FITZGERALD^SIOBHAN", "MUELLER^HANS")
FIELDS = ("PatientName", "PatientID", "StudyDescription", "SeriesDescription", "InstitutionName")


def _radiograph(path: Path, seed: int, **tags: str) -> Path:
    """A real DX file with distinct pixels per seed and the given header values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientSex, ds.PatientAge = "DX", "F", "047Y"
    ds.PatientName, ds.PatientID = f"PATIENT{seed:03d}^X", f"PID{seed:06d}"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    pixels = np.random.default_rng(seed).integers(0, 4000, (16, 16)).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12)).astype(np.uint8)).save(path)
    return path


def _labels(tmp_path: Path, rows: list[dict]) -> Path:
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return labels


def _build(tmp_path: Path, root: Path, rows: list[dict], **kwargs):
    return build_manifest(root, _labels(tmp_path, rows), tmp_path / "out" / "manifest.csv", progress=False,
                          **kwargs)


def _written(result) -> str:
    return result.manifest_csv.read_text(encoding="utf-8") + result.sidecar_json.read_text(encoding="utf-8")


def _radiograph_set(root: Path, n: int = 8, **tags_of_first: str) -> list[dict]:
    """n radiographs, the first with the given header values; labels rows for all of them."""
    rows = []
    for i in range(n):
        rel = f"dx/img_{i:03d}.dcm"
        _radiograph(root / rel, seed=i, **(tags_of_first if i == 0 else {}))
        rows.append({"path": rel, "label": CLASSES[i % 2]})
    return rows


# --- 1. the guard blocks real data (false positives) -----------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientName", "TEST"), ("PatientName", "PATIENT"), ("PatientName", "ANONYMOUS^PATIENT"),
     ("PatientName", "NAME^PATIENT^NAME"), ("PatientID", "TRAIN"), ("StudyDescription", "Test"),
     ("StudyDescription", "normal"), ("SeriesDescription", "series"), ("InstitutionName", "test")],
)
def test_placeholder_words_and_class_names_in_headers_never_block_a_build(tmp_path, keyword, value):
    rows = _radiograph_set(tmp_path / "root", **{keyword: value})
    result = _build(tmp_path, tmp_path / "root", rows)
    assert result.rows == len(rows)


def test_a_caret_in_free_text_makes_a_name_of_that_token_only(tmp_path):
    # "series of DOE^JANE" used to make "series" and "of" needles that hit the column names.
    rows = _radiograph_set(tmp_path / "root", SeriesDescription="series of KOWALSKI^ZOFIA",
                           StudyDescription="Chest PA and lateral")
    result = _build(tmp_path, tmp_path / "root", rows)
    written = _written(result).casefold()
    assert result.rows == len(rows) and "series" in written
    assert "kowalski" not in written and "zofia" not in written


def test_a_refusal_names_the_row_column_and_source_file_never_the_value(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root, PatientName="KOWALSKI^ZOFIA")
    for row in rows:
        row["ward"] = "east"
    rows[3]["ward"] = "Zofia Kowalski"  # the patient's name, typed into a free-text subgroup column
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError) as caught:
        _build(tmp_path, root, rows, subgroup_columns=["ward"])
    message = str(caught.value)
    assert "(labels CSV row 5), column 'ward'" in message
    assert "the DICOM PatientName of file dx/img_000.dcm" in message
    assert "kowalski" not in message.casefold() and "zofia" not in message.casefold()
    assert "labels CSV cells" in message and not any((tmp_path / "out").iterdir())


def test_every_vocabulary_word_alone_or_beside_a_name_is_never_a_needle():
    # Unit-level and exhaustive: the needles built from a header value never include a word that
    # medtl writes by construction, and a real name beside it stays a needle.
    from medtl.data.needles import identifying_needles

    for word in VOCABULARY:
        for kind in ("person", "name", "text"):
            assert identifying_needles([(word, "", kind)], CLASSES).labels == {}, (word, kind)
        needles = identifying_needles([(f"{word}^KOWALSKI", "", "person")], CLASSES).labels
        assert word.casefold() not in needles and "kowalski" in needles, word


VOCABULARY = sorted(output_vocabulary() | set(CLASSES))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word=st.sampled_from(VOCABULARY), field=st.sampled_from(FIELDS),
       beside=st.sampled_from(["", "genuine", "vocabulary"]), other=st.sampled_from(VOCABULARY),
       genuine=st.sampled_from(GENUINE_NAMES))
def test_vocabulary_in_headers_never_blocks_and_planted_names_never_leak(tmp_path_factory, word, field, beside,
                                                                         other, genuine):
    # A vocabulary word alone, as a "^" component beside a genuine name, or beside another
    # vocabulary word ("SPLIT^TRAIN", "LABELS^CSV"): never a refusal, and the genuine name (in the
    # same file's headers) never in the outputs.
    tmp_path = tmp_path_factory.mktemp("vocab")
    value = {"": word, "genuine": f"{word}^{genuine.split('^')[0]}", "vocabulary": f"{word}^{other}"}[beside]
    rows = _radiograph_set(tmp_path / "root", n=6, **{field: value})
    # The genuinely identifying value sits beside the generic one, in the same file's PatientName
    # (or, when the field is PatientName itself, in another file's).
    _radiograph(tmp_path / "root" / "dx" / "img_000.dcm", seed=0, **{field: value},
                **({"OtherPatientNames": genuine} if field == "PatientName" else {"PatientName": genuine}))
    result = _build(tmp_path, tmp_path / "root", rows)
    written = _written(result).casefold()
    for part in genuine.casefold().split("^"):
        assert part not in written


def test_a_manifest_builds_over_the_real_dicom_files_pydicom_ships(tmp_path):
    source = Path(pydicom.__file__).parent / "data" / "test_files"
    root = tmp_path / "root"
    root.mkdir()
    for file in sorted(source.glob("*.dcm")):
        shutil.copy(file, root / file.name)
    rows = [{"path": f.name, "label": CLASSES[i % 2]} for i, f in enumerate(sorted(root.iterdir()))]
    result = _build(tmp_path, root, rows)
    counts = result.counts
    assert result.rows > 20
    assert counts["files_seen"] == counts["used"] + counts["quarantined"] + counts["skipped"]
    assert counts["unaccounted"] == 0


# --- 2. names in file names (false negatives) -------------------------------------------------

NAME_BEARING = (
    "chest_john_smith.png", "JOSÉ_NÚÑEZ.png", "LOPEZ_DE_LA_CRUZ_ANA.png", "mueller, hans.png",
    "cxr 12-25-1957.png", "dob_1957-3-9_garcia.png", "maria.garcia@example.org.png", "smith^john.png",
    "van der Berg, Piet.png", "O'Brien_Siobhan.png", "Nguyễn Văn An.png", "25.12.1957_thorax.png",
    "1957-12-25.png", "cxr_12-25-57.png", "j.kowalski@hospital.pl.png", "ÅSA_ÖBERG_cxr.png",
    "d'Alembert, Jean.png", "GARCÍA MÁRQUEZ GABRIEL.png",
)


def test_name_bearing_export_file_names_are_aliased_and_never_written(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i, name in enumerate(NAME_BEARING):
        _png(root / name, seed=i)
        rows.append({"path": name, "label": CLASSES[i % 2]})
    result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    assert len(table) == len(NAME_BEARING) and table["path"].str.startswith("alias:").all()
    written = _written(result).casefold()
    for word in ("john", "núñez", "lopez", "mueller", "1957", "garcia", "example.org", "berg", "brien", "nguyễn",
                 "kowalski", "öberg", "alembert", "márquez"):
        assert word not in written, word
    assert json.loads(result.sidecar_json.read_text())["counts"]["aliased_paths"] >= len(NAME_BEARING)


def test_counter_style_export_paths_stay_readable(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i in range(6):
        split = SPLITS[i % 3]
        rel = f"{split}/{split}_{i + 1:05d}.png"
        _png(root / rel, seed=i)
        rows.append({"path": rel, "label": CLASSES[i % 2], "split": split})
    _png(root / "pneumonia" / "3fa85f64-5717-4562-b3fc-2c963f66afa6.png", seed=50)
    rows.append({"path": "pneumonia/3fa85f64-5717-4562-b3fc-2c963f66afa6.png", "label": "pneumonia"})
    result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    assert sorted(table["path"]) == sorted(r["path"] for r in rows)
    assert json.loads(result.sidecar_json.read_text())["counts"]["aliased_paths"] == 0


def test_real_short_patient_ids_stay_patients_and_placeholders_do_not(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i in range(24):  # 8 patients with short real IDs, three radiographs each
        rel = f"dx/img_{i:03d}.dcm"
        _radiograph(root / rel, seed=i, PatientID=("CASE-1", "12", "sub-01", "P01", "A12", "7", "SMITH", "GRAY")[i % 8])
        rows.append({"path": rel, "label": CLASSES[i % 2]})
    result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str)
    assert result.patients == 8 and (table.groupby("patient")["split"].nunique() == 1).all()


def test_a_labels_row_whose_path_is_longer_than_the_os_allows_is_a_row_problem_not_a_crash(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root, n=6)
    rows.append({"path": "SMITH_JOHN_" + "x" * 5000 + ".png", "label": "normal"})
    result = _build(tmp_path, root, rows)
    sidecar = json.loads(result.sidecar_json.read_text())
    assert result.rows == 6 and sidecar["label_rows_not_used"] == [{"row": 8, "reason": "no file or folder at this path"}]
    assert "smith" not in _written(result).casefold()


def test_names_made_of_the_layouts_words_and_protocols_copied_to_subgroups_never_block(tmp_path):
    root = tmp_path / "root"
    rows = []
    names = ("PNEUMONIA^TRAIN", "LABELS^CSV", "SPLIT^TRAIN", "NORMAL^TEST")
    for i in range(8):
        rel = f"{CLASSES[i % 2]}/{SPLITS[i % 3]}/img_{i:03d}.dcm"
        _radiograph(root / rel, seed=i, PatientName=names[i % 4], ProtocolName="Routine Chest",
                    InstitutionalDepartmentName="Emergency Radiology")
        rows.append({"path": rel, "label": CLASSES[i % 2], "protocol": "Routine Chest",
                     "department": "Emergency Radiology"})
    result = _build(tmp_path, root, rows, subgroup_columns=["protocol", "department"])
    assert result.rows == 8


def test_short_values_inside_site_codes_and_hashes_are_chance_not_a_leak():
    from medtl.data.needles import scan_for_phi

    assert scan_for_phi({"manifest": "SITE-a48213,SCN-3ada2f,R-0e48213f9c1d2b7a"}, ["48213", "ADA^ZOFIA"]) == []
    assert scan_for_phi({"manifest": "patient 48213 of site a"}, ["48213"]) != []


MORE_IDENTIFYING_PATHS = (
    "E1234567/cxr.png", "abe19570722.png", "555-123-4567/x.png", "123-45-6789/x.png", "079 123 45 67.png",
    "J.D/x.png", "j_d_0042.png", "2019_07/x.png", "2019,07,22/x.png", "+1 (555) 123 4567.png",
)


def test_ids_phone_numbers_initials_and_partial_dates_in_file_names_are_aliased(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i, name in enumerate(MORE_IDENTIFYING_PATHS):
        _png(root / name, seed=i)
        rows.append({"path": name, "label": CLASSES[i % 2]})
    _png(root / "1234567" / "cxr.png", seed=90)  # a folder named by the digits hidden in E1234567
    rows.append({"path": "1234567/cxr.png", "label": "normal"})
    result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    assert table["path"].str.startswith("alias:").all()
    written = _written(result)
    for planted in ("e1234567", "1234567/", "19570722", "555-123", "123-45-6789", "079 123", "j.d/", "j_d",
                    "2019_07", "2019,07", "(555)"):
        assert planted not in written.casefold(), planted


def test_a_patient_name_made_of_common_words_is_still_a_name(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i in range(6):
        rel = f"Gray_Val/IM-0001-{i + 1:04d}.dcm" if i == 0 else f"dx/img_{i:03d}.dcm"
        _radiograph(root / rel, seed=i, **({"PatientName": "GRAY^VAL"} if i == 0 else {}))
        rows.append({"path": rel, "label": CLASSES[i % 2], "ward": "east"})
    clean = _build(tmp_path, root, rows)
    assert pd.read_csv(clean.manifest_csv, dtype=str)["path"].str.startswith("alias:").sum() == 1
    assert "gray" not in _written(clean).casefold()
    rows[2]["ward"] = "Val Gray"
    with pytest.raises(InputError, match="column 'ward': contains the DICOM PatientName of file alias:"):
        _build(tmp_path, root, rows, subgroup_columns=["ward"])


def test_dates_written_day_first_and_names_given_as_patient_ids_are_found(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root, StudyDate="20190722")
    for i, row in enumerate(rows):
        row["ward"], row["patient_id"] = "east", f"Pat{i}"
    rows[0]["patient_id"] = "Garcia, Maria"
    rows[3]["ward"] = "scan 22.07.2019"
    with pytest.raises(InputError, match=r"row 5 \(labels CSV row 5\), column 'ward': contains the DICOM StudyDate"):
        _build(tmp_path, root, rows, subgroup_columns=["ward"])
    rows[3]["ward"] = "Garcia"  # one part of the name given as patient_id
    with pytest.raises(InputError, match="column 'ward': contains the patient_id of labels CSV row 2"):
        _build(tmp_path, root, rows, subgroup_columns=["ward"])


def test_descriptions_and_medtl_wording_in_headers_never_block_a_build(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root, StudyDescription="Routine Chest", SeriesDescription="Structured Report",
                           InstitutionalDepartmentName="Emergency Radiology")
    ds = pydicom.dcmread(root / "dx" / "img_001.dcm")
    ds.add_new(0x00090010, "LO", "ACME DEID")
    ds.add_new(0x00091001, "LO", "Annex E Basic Profile, dates removed")
    ds.save_as(root / "dx" / "img_001.dcm")
    for row in rows:
        row["protocol"] = "Routine Chest"
    result = _build(tmp_path, root, rows, subgroup_columns=["protocol"])
    assert result.rows == len(rows)


def test_a_file_name_that_is_not_utf8_is_aliased_not_a_crash(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root, n=4)
    os.rename(root / "dx" / "img_003.dcm", os.path.join(os.fsencode(root / "dx"), b"M\xfcller.dcm"))
    result = _build(tmp_path, root, rows[:3])
    sidecar = json.loads(result.sidecar_json.read_text())
    assert result.counts["files_seen"] == 4 and all(e["file"].startswith("alias:") for e in sidecar["files_not_used"])


def test_a_labelled_copy_of_an_unlabelled_file_is_served_by_the_file_it_copies(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root, n=6)
    (root / "archive").mkdir()
    shutil.copy(root / "dx" / "img_000.dcm", root / "archive" / "img_000.dcm")  # sorts before dx/
    result = _build(tmp_path, root, rows)
    assert result.rows == 6
    rows.append({"path": "archive/img_000.dcm", "label": "normal"})  # now both copies are labelled
    result = _build(tmp_path, root, rows)
    sidecar = json.loads(result.sidecar_json.read_text())
    assert result.rows == 6
    # archive/ sorts first, so its file is the one kept; the row naming the copy says so.
    assert sidecar["label_rows_not_used"] == [{"row": 2, "path": "dx/img_000.dcm",
                                              "reason": "its file is a copy of the image that labels CSV row 8 "
                                                        "names; keep one of the two rows"}]


# --- 3. patient leakage -------------------------------------------------------------------------


def test_identical_images_under_different_names_share_a_split(tmp_path, caplog):
    root = tmp_path / "root"
    rows = []
    (root / "b").mkdir(parents=True)
    for i in range(30):
        shutil.copy(_png(root / "a" / f"img_{i:03d}.png", seed=i), root / "b" / f"copy_{i:03d}.png")
        rows += [{"path": f"a/img_{i:03d}.png", "label": CLASSES[i % 2]},
                 {"path": f"b/copy_{i:03d}.png", "label": CLASSES[i % 2]}]
    with caplog.at_level(logging.WARNING, logger="medtl"):
        result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    assert table["patient"].nunique() == 60  # still one patient per file (no ID said otherwise)
    per_image = table.groupby("sha256")["split"].nunique()
    assert len(per_image) == 30 and (per_image == 1).all()
    assert "identical to an image of another patient" in caplog.text and "labels CSV rows 2 and 3" in caplog.text
    leakage = json.loads(result.sidecar_json.read_text())["leakage"]
    assert leakage["identical_pixels_across_patients"] == 60 and leakage["linked_groups"] == 30


def test_labels_patient_id_that_disagrees_with_dicom_patient_id_keeps_the_dicom_patient_in_one_split(tmp_path,
                                                                                                  caplog):
    root = tmp_path / "root"
    rows = []
    for i in range(20):  # 20 DICOM patients, each filed under two different patient_id values
        for j in range(2):
            rel = f"dx/p{i:02d}_{j}.dcm"
            _radiograph(root / rel, seed=100 * i + j, PatientID=f"MRN{i:07d}")
            rows.append({"path": rel, "label": CLASSES[i % 2], "patient_id": f"case-{i}-{j}"})
    with caplog.at_level(logging.WARNING, logger="medtl"):
        result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str, keep_default_na=False)
    table["dicom_patient"] = [r["path"].split("/")[1].split("_")[0] for r in rows]
    assert (table.groupby("dicom_patient")["split"].nunique() == 1).all()
    assert "patient_id disagrees with the DICOM PatientID" in caplog.text and "labels CSV rows 2 and 3" in caplog.text
    assert "MRN" not in caplog.text and "case-" not in caplog.text
    assert json.loads(result.sidecar_json.read_text())["leakage"]["patient_id_conflicts"] == 20


def test_given_splits_that_separate_identical_images_are_refused_naming_the_rows(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i in range(4):
        _png(root / f"img_{i}.png", seed=i)
        rows.append({"path": f"img_{i}.png", "label": "normal", "split": "train"})
    shutil.copy(root / "img_0.png", root / "img_9.png")
    rows.append({"path": "img_9.png", "label": "normal", "split": "test"})
    with pytest.raises(LeakageError, match=r"labels CSV rows 2 \(train\) and 6 \(test\)"):
        _build(tmp_path, root, rows)


def test_placeholder_patient_ids_do_not_make_one_patient_of_the_whole_data_set(tmp_path):
    root = tmp_path / "root"
    rows = []
    for i in range(10):
        rel = f"dx/img_{i:03d}.dcm"
        _radiograph(root / rel, seed=i, PatientID="ANONYMOUS" if i % 2 else "0000000")
        rows.append({"path": rel, "label": CLASSES[i % 2]})
    result = _build(tmp_path, root, rows)
    assert result.patients == 10
    assert set(pd.read_csv(result.manifest_csv, dtype=str)["split"]) == set(SPLITS)


# --- 4-6. odd entries, series and values, as the manifest sees them ------------------------------


def test_odd_file_system_entries_never_hang_the_build_and_are_all_accounted_for(tmp_path):
    import signal
    import socket

    root = tmp_path / "root"
    rows = _radiograph_set(root, n=6)
    os.mkfifo(root / "x.dcm")  # a named pipe: opening it would block forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "b.dcm"))
    (root / "broken.dcm").symlink_to(root / "missing.dcm")
    (root / "c.dcm").symlink_to(root / "d.dcm")  # a loop
    (root / "d.dcm").symlink_to(root / "c.dcm")
    outside = _radiograph(tmp_path / "elsewhere" / "DOE_JANE.dcm", seed=99)
    (root / "e.dcm").symlink_to(outside)  # a file outside the data root
    (root / "f").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    def hung(*_):
        raise TimeoutError("the manifest build hung on an odd file-system entry")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        result = _build(tmp_path, root, rows)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        server.close()
    counts = result.counts
    assert counts["files_seen"] == 6 + 7  # the radiographs and the odd entries (the labels CSV is outside)
    assert counts["files_seen"] == counts["used"] + counts["quarantined"] + counts["skipped"]
    not_used = {e["file"]: (e["status"], e["reason"]) for e in json.loads(result.sidecar_json.read_text())["files_not_used"]}
    assert not_used["x.dcm"][0] == "skipped" and "FIFO" in not_used["x.dcm"][1]
    assert not_used["broken.dcm"][0] == "quarantined" and not_used["c.dcm"][0] == "quarantined"
    assert "outside the data root" in not_used["e.dcm"][1] and "folder" in not_used["f"][1]
    assert not_used["b.dcm"][0] == "skipped"
    assert result.rows == 6  # the file outside the root was neither followed nor trained on
    assert str(tmp_path) not in _written(result)


def test_a_tilted_series_enters_the_manifest_with_its_slice_spacing_along_the_normal(tmp_path, caplog):
    from tests.data import dicom_factory as factory

    tilt = np.deg2rad(18.5)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), np.sin(tilt))  # gantry tilt about the x axis
    gap = 2.5  # along the table (z); the slice distance along the normal is gap * cos(tilt)
    root = tmp_path / "root"
    volume = np.random.default_rng(0).integers(0, 2000, (6, 12, 10)).astype(np.int16)
    factory.write_series(root / "ct", volume, orientation=orientation, step=(0.0, 0.0, gap))
    with caplog.at_level(logging.WARNING, logger="medtl"):
        result = _build(tmp_path, root, [{"path": "ct", "label": "normal"}])
    row = pd.read_csv(result.manifest_csv, dtype=str).iloc[0]
    spacing = [float(v) for v in row["spacing"].split("x")]
    assert spacing[2] == pytest.approx(gap * np.cos(tilt), abs=1e-3)
    assert "gantry tilt" in caplog.text
    assert json.loads(result.sidecar_json.read_text())["counts"]["gantry_tilt_corrected"] == 1


def test_a_nifti_with_nan_voxels_never_enters_the_manifest(tmp_path):
    import nibabel as nib

    root = tmp_path / "root"
    root.mkdir()
    rows = []
    for i in range(4):
        data = np.random.default_rng(i).normal(size=(6, 6, 4)).astype(np.float32)
        if i == 0:
            data[2, 2, 2] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / f"case_{i:03d}.nii.gz")
        rows.append({"path": f"case_{i:03d}.nii.gz", "label": CLASSES[i % 2]})
    result = _build(tmp_path, root, rows)
    sidecar = json.loads(result.sidecar_json.read_text())
    assert result.rows == 3
    reasons = {e["file"]: e["reason"] for e in sidecar["files_not_used"]}
    assert "NaN" in reasons["case_000.nii.gz"]


def test_an_official_split_of_train_and_test_gets_val_patients_from_train(tmp_path, caplog):
    root = tmp_path / "root"
    rows = []
    for i in range(40):
        split = "test" if i < 10 else "train"
        rel = f"{split}/{CLASSES[i % 2]}/img_{i:05d}.png"
        _png(root / rel, seed=i)
        rows.append({"path": rel, "label": CLASSES[i % 2], "split": split})
    with caplog.at_level(logging.WARNING, logger="medtl"):
        result = _build(tmp_path, root, rows)
    table = pd.read_csv(result.manifest_csv, dtype=str)
    given = {r["path"]: r["split"] for r in rows}
    assert all(given[p] == "test" for p in table.loc[table["split"] == "test", "path"])
    assert (table["split"] == "test").sum() == 10
    val = table.loc[table["split"] == "val"]
    assert 4 <= len(val) <= 7 and set(val["label"]) == set(CLASSES)  # ~15/85 of the 30 train patients, stratified
    assert "the split column names no val rows" in caplog.text


def test_many_rows_with_the_same_problem_are_named_once(tmp_path):
    rows = [{"path": f"/abs/DOE_JANE_{i}.png", "label": "normal"} for i in range(9)]
    (tmp_path / "root").mkdir()
    with pytest.raises(InputError) as caught:
        _build(tmp_path, tmp_path / "root", rows)
    message = str(caught.value)
    assert message.count("must be relative") == 1 and "rows 2, 3, 4, 5, 6 and 4 more" in message
    assert "doe" not in message.casefold()


# --- 7. the project key -------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b" " * 41, b"a" * 32, b"ab" * 40, b"\n\n\n" + b"0" * 64])
def test_blank_repeated_or_placeholder_keys_are_refused(tmp_path, content):
    key = tmp_path / "k.key"
    key.write_bytes(content)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="must hold at least 32 random bytes"):
        load_key(key)


def test_a_key_others_may_write_is_refused_and_one_they_may_read_is_warned_about(tmp_path, caplog):
    key = tmp_path / "k.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by its owner only, not mode 0666"):
        load_key(key)
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="medtl"):
        load_key(key)
    assert "readable by other users (mode 0644)" in caplog.text
    key.chmod(0o600)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtl"):
        load_key(key)
    assert caplog.text == ""


def test_a_base64_key_of_fewer_than_32_bytes_is_refused_and_a_raw_binary_key_is_used_byte_for_byte(tmp_path):
    short = tmp_path / "short.key"
    short.write_bytes(base64.b64encode(os.urandom(31)) + b"\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="not 31 bytes"):
        load_key(short)
    raw = b" " + os.urandom(30) + b"\n"  # random bytes may begin or end with whitespace bytes
    binary = tmp_path / "binary.key"
    binary.write_bytes(raw)
    binary.chmod(0o600)
    import hmac

    assert load_key(binary).key_id == hmac.new(raw, b"medtl/key-id", hashlib.sha256).hexdigest()[:16]


def test_a_trailing_newline_never_changes_the_key_id(tmp_path):
    secret = base64.b64encode(os.urandom(32))
    ids = []
    for name, content in (("a", secret), ("b", secret + b"\n"), ("c", secret + b"\r\n"), ("d", b" " + secret + b" \n")):
        path = tmp_path / name
        path.write_bytes(content)
        path.chmod(0o600)
        ids.append(load_key(path).key_id)
    assert len(set(ids)) == 1


def test_hex_keys_made_by_medtl_keep_their_key_id(tmp_path):
    secret = os.urandom(32)
    path = tmp_path / "k.key"
    path.write_text(secret.hex() + "\n")
    path.chmod(0o600)
    import hmac

    assert load_key(path).key_id == hmac.new(secret, b"medtl/key-id", hashlib.sha256).hexdigest()[:16]


# --- 8. a failed build never replaces a good manifest -----------------------------------------


def test_a_failed_build_never_replaces_an_existing_manifest(tmp_path):
    root = tmp_path / "root"
    rows = _radiograph_set(root)
    good = _build(tmp_path, root, rows)
    before = good.manifest_csv.read_bytes(), good.sidecar_json.read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nothing was written"):
        _build(tmp_path, tmp_path / "empty", rows)  # an empty data root: no study matches
    for row in rows:
        row["ward"] = "east"
    rows[0]["ward"] = "PID000003"  # an identifier in a free-text column: the guard refuses
    with pytest.raises(InputError, match="an existing manifest is unchanged"):
        _build(tmp_path, root, rows, subgroup_columns=["ward"])
    assert (good.manifest_csv.read_bytes(), good.sidecar_json.read_bytes()) == before
    assert sorted(p.name for p in good.manifest_csv.parent.iterdir()) == ["manifest.csv", "manifest.json"]


# --- 10. layout -----------------------------------------------------------------------------------


def test_data_manifests_folder_says_how_manifests_are_versioned_and_gitignore_agrees():
    readme = REPO / "data_manifests" / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert "sidecar" in text and "commit" in text and "PHI" in text
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 0

    assert not ignored("data_manifests/README.md")
    assert not ignored("data_manifests/chest_xray_2024.csv") and not ignored("data_manifests/chest_xray_2024.json")
    assert ignored("data_manifests/demo.csv") and ignored("data_manifests/demo.json")


def test_manifest_columns_are_the_documented_contract():
    docs = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    for column in MANIFEST_COLUMNS:
        assert f"| `{column}` |" in docs
