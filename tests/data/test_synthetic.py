"""The demo data generator writes real, decodable, labelled DICOM/NIfTI files with fake PHI."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from skimage.filters import gaussian
from skimage.morphology import disk, erosion
from sklearn.metrics import roc_auc_score

from medtl.data.synthetic import DemoSummary, write_demo_data
from medtl.errors import InputError

AGE_BANDS = (0, 18, 30, 40, 50, 60, 70, 80, 90)  # 0-17, 18-29, ..., 80-89, 90+


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoSummary:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", patients=200, seed=0, progress=False)


@pytest.fixture(scope="module")
def rows(demo) -> list[dict[str, str]]:
    with demo.labels_csv.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def headers(demo) -> dict[str, Dataset]:
    """Every readable DICOM (without pixels), keyed by path relative to the root."""
    broken = {p.as_posix() for p in demo.unlabelled_files}
    return {
        p.relative_to(demo.root).as_posix(): dcmread(p, stop_before_pixels=True)
        for p in sorted(demo.root.rglob("*.dcm"))
        if p.relative_to(demo.root).as_posix() not in broken or p.name == "report.dcm"
    }


@pytest.fixture(scope="module")
def radiographs(demo, rows) -> dict[str, np.ndarray]:
    """Decoded labelled radiographs (brighter = more attenuation) and their header facts."""
    images, labels, sites, sexes, ages = [], [], [], [], []
    for row in rows:
        if row["mask"]:
            continue
        ds = dcmread(demo.root / row["path"])
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        images.append(-values if ds.PhotometricInterpretation == "MONOCHROME1" else values)
        labels.append(int(row["label"]))
        sites.append(str(ds.InstitutionName))
        sexes.append(str(ds.PatientSex))
        ages.append(_age_years(ds))
    return {
        "image": np.stack(images),
        "label": np.array(labels),
        "site": np.array(sites),
        "sex": np.array(sexes),
        "age": np.array(ages),
    }


def _age_years(ds: Dataset) -> int:
    if "PatientAge" in ds:
        return int(ds.PatientAge[:3]) if ds.PatientAge.endswith("Y") else 0
    birth, on = (dt.datetime.strptime(v, "%Y%m%d").date() for v in (ds.PatientBirthDate, ds.StudyDate))
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_writes_byte_identical_files_and_another_seed_differs(tmp_path):
    first = write_demo_data(tmp_path / "a", patients=12, seed=5, progress=False)
    second = write_demo_data(tmp_path / "b", patients=12, seed=5, progress=False)
    other = write_demo_data(tmp_path / "c", patients=12, seed=6, progress=False)
    assert _tree_digest(first.root) == _tree_digest(second.root)
    assert first.phi_strings == second.phi_strings
    assert _tree_digest(first.root) != _tree_digest(other.root)


def test_refuses_non_empty_folder_and_too_few_patients(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="out_dir must be"):
        write_demo_data(tmp_path / "full", patients=12, progress=False)
    with pytest.raises(InputError, match="patients must be"):
        write_demo_data(tmp_path / "new", patients=3, progress=False)


def test_every_dicom_reads_back_and_decodes_in_every_encoding(demo, headers):
    syntaxes, photometric, rescaled, windowed, classes = Counter(), Counter(), 0, 0, Counter()
    for rel, head in headers.items():
        assert head.preamble is not None and head.file_meta.MediaStorageSOPInstanceUID == head.SOPInstanceUID
        classes[head.SOPClassUID.name] += 1
        if head.Modality == "SR":
            assert "PixelData" not in dcmread(demo.root / rel)
            continue
        ds = dcmread(demo.root / rel)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) and ds.pixel_array.max() > 0
        syntaxes[ds.file_meta.TransferSyntaxUID] += 1
        photometric[ds.PhotometricInterpretation] += 1
        rescaled += ds.Modality != "CT" and float(ds.get("RescaleSlope", 1)) != 1.0
        windowed += ds.Modality != "CT" and "WindowCenter" in ds
    assert {ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless} <= set(syntaxes)
    assert photometric["MONOCHROME1"] >= 10 and rescaled >= 10 and windowed >= 10
    assert {
        "Computed Radiography Image Storage",
        "CT Image Storage",
        "Basic Text SR Storage",
        "Digital X-Ray Image Storage - For Presentation",
    } <= set(classes)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_unlabelled_files_are_an_sr_a_truncated_dicom_and_a_text_file(demo, rows):
    listed = {r["path"] for r in rows} | {r["mask"] for r in rows}
    sr, broken, notes = (demo.root / p for p in demo.unlabelled_files)
    assert not {p.as_posix() for p in demo.unlabelled_files} & listed
    assert dcmread(sr).Modality == "SR" and notes.read_text()
    head = dcmread(broken, stop_before_pixels=True)
    assert head.PatientName == "WINTERBOTTOM^GRETA"  # the header survives the cut, the pixels do not
    with pytest.raises((AttributeError, ValueError)):  # missing vs short pixel data, by encoding
        _ = dcmread(broken).pixel_array


def test_labels_csv_rows_point_to_existing_files_of_the_named_patient(demo, rows, headers):
    assert list(rows[0]) == ["path", "label", "mask", "patient_id"]
    assert len(rows) == demo.n_radiographs + demo.n_ct_series
    for row in rows:
        target = demo.root / row["path"]
        if row["mask"]:
            slices = sorted(target.glob("*.dcm"))
            assert target.is_dir() and 12 <= len(slices) <= 16 and (demo.root / row["mask"]).is_file()
            first = slices[0].relative_to(demo.root).as_posix()
        else:
            assert target.is_file()
            first = row["path"]
        assert row["label"] in {"0", "1"} and headers[first].PatientID == row["patient_id"]


def test_fake_phi_is_in_headers_free_text_private_tags_and_paths(demo, headers):
    phi = demo.phi_strings
    free_text = named_paths = 0
    for rel, ds in headers.items():
        for keyword in (
            "PatientName",
            "PatientID",
            "AccessionNumber",
            "InstitutionName",
            "InstitutionAddress",
            "ReferringPhysicianName",
            "OperatorsName",
            "StationName",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
        ):
            assert str(ds[keyword].value) in phi, keyword
        assert ds.PatientBirthDate in demo.phi_dates and ds.StudyDate in demo.phi_dates
        assert ds.private_block(0x0011, "ACME_PACS")[0x01].value == f"MRN {ds.PatientID}"
        name = f"{ds.PatientName.given_name} {ds.PatientName.family_name}"
        free_text += name in ds.StudyDescription and name in ds.get("ImageComments", "")
        named_paths += f"{ds.PatientName.family_name}_{ds.PatientName.given_name}" in rel
    assert free_text > 50 and named_paths > 50 and len(headers) - named_paths > 50
    assert b"WINTERBOTTOM^GRETA" in (demo.root / demo.unlabelled_files[1]).read_bytes()


def test_cohort_has_balanced_classes_both_sexes_every_age_band_and_repeat_studies(
    demo, rows, headers, radiographs
):
    assert abs(radiographs["label"].mean() - 0.5) < 0.02
    ct_labels = [int(r["label"]) for r in rows if r["mask"]]
    assert 0 < sum(ct_labels) < len(ct_labels)
    bands = Counter(np.digitize(radiographs["age"], AGE_BANDS))
    assert set(bands) == set(range(1, len(AGE_BANDS) + 1)) and min(bands.values()) >= 5
    assert Counter(radiographs["sex"]).keys() == {"F", "M"} and min(Counter(radiographs["sex"]).values()) > 90
    images = [ds for ds in headers.values() if ds.Modality != "SR"]
    no_age = [ds for ds in images if "PatientAge" not in ds]
    assert 0.1 < len(no_age) / len(images) < 0.35 and any(_age_years(ds) >= 90 for ds in no_age)
    assert any(ds.get("PatientAge", "").endswith("M") for ds in images)
    studies = defaultdict(set)
    for ds in images:
        studies[ds.PatientID].add(ds.StudyInstanceUID)
    assert (
        len(studies) == demo.n_patients
        and sum(len(s) >= 2 for s in studies.values()) >= 0.2 * demo.n_patients
    )


def test_sites_and_scanners_vary_and_the_gap_site_is_a_fifth_of_patients_or_more(demo, headers):
    xr = [ds for ds in headers.values() if ds.Modality in {"CR", "DX"}]
    scanners = defaultdict(set)
    patients = defaultdict(set)
    for ds in xr:
        scanners[ds.InstitutionName].add((ds.Manufacturer, ds.ManufacturerModelName))
        patients[ds.InstitutionName].add(ds.PatientID)
    assert len(scanners) == 4 and all(len(s) == 2 for s in scanners.values())
    assert len(patients[demo.gap_institution]) >= 0.2 * demo.n_patients
    assert demo.gap_institution in demo.planted_gap and "\n" not in demo.planted_gap


def _opacity_score(images: np.ndarray) -> np.ndarray:
    """Brightest smoothed spot inside the lung fields, relative to the lung's median.

    The lung fields come from the mean image (dark, away from edges), so no label is used.
    """
    lo, hi = np.percentile(images, [1, 99], axis=(1, 2), keepdims=True)
    z = (images - lo) / (hi - lo)
    mean = z.mean(axis=0)
    lung = erosion((mean > 0.15) & (mean < 0.5), disk(4))
    return np.array([gaussian(im, sigma=2.0)[lung].max() - np.median(im[lung]) for im in z])


def test_planted_gap_shows_in_a_simple_statistic_only_at_the_gap_site(demo, radiographs):
    score, label, site = _opacity_score(radiographs["image"]), radiographs["label"], radiographs["site"]
    auc = {s: roc_auc_score(label[site == s], score[site == s]) for s in set(site)}
    others = [a for s, a in auc.items() if s != demo.gap_institution]
    assert auc[demo.gap_institution] < 0.8 and min(others) > 0.88, auc
    assert min(others) - auc[demo.gap_institution] > 0.15, auc
    rest = site != demo.gap_institution  # sex and age must carry no gap of their own
    by_sex = [
        roc_auc_score(label[rest & (radiographs["sex"] == s)], score[rest & (radiographs["sex"] == s)])
        for s in "FM"
    ]
    old = radiographs["age"] >= 50
    by_age = [roc_auc_score(label[rest & g], score[rest & g]) for g in (old, ~old)]
    assert abs(by_sex[0] - by_sex[1]) < 0.08 and abs(by_age[0] - by_age[1]) < 0.08, (by_sex, by_age)


def _ct_from_headers(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """HU volume (cols, rows, slices) and voxel->RAS affine straight from the DICOM standard."""
    files = list(folder.glob("*.dcm"))
    slices = [dcmread(f) for f in files]
    iop = np.array(slices[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([normal @ np.array(s.ImagePositionPatient, float) for s in slices])
    slices = [slices[i] for i in order]
    hu = np.stack([apply_modality_lut(s.pixel_array, s).T for s in slices], axis=-1)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    first, last = (np.array(s.ImagePositionPatient, float) for s in (slices[0], slices[-1]))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * dc, iop[3:] * dr
    lps[:3, 2], lps[:3, 3] = (last - first) / (len(slices) - 1), first
    names = [files[i].name for i in order]
    return hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, names


def test_ct_masks_align_with_the_organ_and_lesion_of_their_series(demo, rows):
    ct_rows = [r for r in rows if r["mask"]]
    orientations = set()
    for row in ct_rows:
        hu, affine, names = _ct_from_headers(demo.root / row["path"])
        mask = nib.load(demo.root / row["mask"])
        labels = np.asarray(mask.dataobj)
        assert labels.dtype == np.uint8 and labels.shape == hu.shape
        np.testing.assert_allclose(mask.affine, affine, atol=1e-3)
        assert names != sorted(names)  # file order is not slice order
        organ = labels == 1
        assert np.mean(hu[organ] > 30) > 0.95 and hu[~organ & (labels == 0)].mean() < 0
        if row["label"] == "1":
            assert (labels == 2).sum() > 0 and hu[labels == 2].mean() < hu[organ].mean() - 25
        else:
            assert (labels == 2).sum() == 0
        orientations.add(nib.aff2axcodes(mask.affine))
    assert len(orientations) == 2  # head-first and feet-first series


def test_medtl_discovery_loads_ct_like_the_masks_and_rejects_the_unlabelled_files(demo, rows):
    discover_module = pytest.importorskip("medtl.data.discover")
    studies, rejections = discover_module.discover(demo.root, progress=False)
    status = {r.path.relative_to(demo.root.absolute()).as_posix(): r.status for r in rejections}
    sr, broken, notes = (p.as_posix() for p in demo.unlabelled_files)
    assert (status.get(sr), status.get(broken), status.get(notes)) == ("skipped", "quarantined", "skipped")
    series = {
        s.files[0].parent.relative_to(demo.root.absolute()).as_posix(): s
        for s in studies
        if s.kind == "dicom_series"
    }
    for row in (r for r in rows if r["mask"]):
        loaded = discover_module.load_study(series[row["path"]])
        mask = nib.load(demo.root / row["mask"])
        assert loaded.array.shape == mask.shape
        np.testing.assert_allclose(loaded.affine, mask.affine, atol=1e-3)
        assert np.mean(loaded.array[np.asarray(mask.dataobj) == 1] > 30) > 0.95
