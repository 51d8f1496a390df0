"""Intake with worker processes: the same studies, rejections and manifest as without them.

Throughput figures live in benchmarks/intake.py; these tests check that the parallel path cannot
change what a build finds or writes.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medtl.data import discover as discovery
from medtl.data.manifest import build_manifest
from tests.data import dicom_factory as factory


def _write_mixed(root: Path) -> Path:
    """DICOM series (one gantry-tilted), multi-frame, radiographs, a headerless file, PNG/JPEG,
    NIfTI, a corrupt DICOM, a text file and a labels CSV naming most of them."""
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 2000, (5, 12, 14)).astype(np.uint16)
    factory.write_series(root / "ct" / "axial", volume)
    tilt = np.deg2rad(18.5)
    factory.write_series(root / "ct" / "tilt", volume, orientation=(1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)),
                         step=(0.0, np.sin(tilt) * 2.5, np.cos(tilt) * 2.5), series_uid=factory.uid("tilt"))
    factory.write_multiframe(root / "mf" / "mf.dcm", volume, [(0, 0, 2.0 * k) for k in (2, 0, 1, 3, 4)])
    for k in range(6):
        factory.write_radiograph(root / "cr" / f"r{k}.dcm", rng.integers(0, 4000, (20, 18)), window=(2000, 3000))
    factory.write_headerless(root / "old" / "headerless", rng.integers(0, 4000, (16, 18)).astype(np.uint16))
    (root / "png").mkdir()
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (21, 17, 3)).astype(np.uint8)).save(root / "png" / f"p{k}.png")
    Image.fromarray(rng.integers(0, 256, (21, 17)).astype(np.uint8)).save(root / "png" / "grey.jpg")
    (root / "nii").mkdir()
    nib.save(nib.Nifti1Image(rng.normal(size=(12, 14, 5)).astype(np.float32), np.diag([0.7, 0.8, 1.5, 1.0])),
             root / "nii" / "vol.nii.gz")
    (root / "bad").mkdir()
    (root / "bad" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
    (root / "notes.txt").write_text("not an image\n")
    rows = ["path,label,patient_id", "ct/axial,1,P1", "ct/tilt,0,P2", "mf/mf.dcm,1,P3", "old/headerless,0,P4",
            "nii/vol.nii.gz,1,P5", "png/grey.jpg,0,P6", "bad/broken.dcm,1,P7"]
    rows += [f"cr/r{k}.dcm,{k % 2},P{10 + k}" for k in range(6)]
    rows += [f"png/p{k}.png,{k % 2},P{20 + k}" for k in range(3)]  # png/p3.png has no row
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return _write_mixed(tmp_path_factory.mktemp("mixed"))


@pytest.fixture()
def parallel_always(monkeypatch):
    """Use worker processes however few files there are (the test folder is small)."""
    monkeypatch.setattr(discovery, "PARALLEL_MIN_FILES", 1)


def test_discover_with_workers_finds_the_same_studies_and_rejections_in_the_same_order(mixed, parallel_always):
    serial = discovery.discover(mixed, progress=False, workers=1)
    parallel = discovery.discover(mixed, progress=False, workers=2)
    assert [s.files for s in parallel[0]] == [s.files for s in serial[0]]
    assert parallel == serial
    assert any(r.status == "quarantined" for r in serial[1])  # the corrupt file is in the comparison


def test_pixels_known_from_discovery_equal_what_load_study_gives(mixed):
    studies, _, pixels = discovery.discover_with_pixels(mixed, progress=False, workers=1)
    known = [s for s in studies if s.files[0] in pixels]
    # The radiographs, the headerless image and the multi-frame file: one DICOM file each.
    assert {s.kind for s in known} == {"dicom_image", "dicom_series"} and len(known) == 8
    for study in known:
        assert pixels[study.files[0]] == discovery.study_pixels(study)


def test_manifest_built_with_workers_is_byte_identical_to_the_serial_build(mixed, tmp_path, parallel_always):
    one = build_manifest(mixed, mixed / "labels.csv", tmp_path / "serial" / "m.csv", progress=False, workers=1)
    two = build_manifest(mixed, mixed / "labels.csv", tmp_path / "parallel" / "m.csv", progress=False, workers=2)
    assert one.rows >= 10
    assert two.manifest_csv.read_bytes() == one.manifest_csv.read_bytes()
    assert two.sidecar_json.read_bytes() == one.sidecar_json.read_bytes()
    assert two.warnings == one.warnings


def test_warnings_raised_in_a_worker_reach_the_caller(mixed, parallel_always, monkeypatch):
    real = discovery._inspect_nifti

    def warning_nifti(path):
        warnings.warn("nifti header oddity", UserWarning, stacklevel=1)
        return real(path)

    monkeypatch.setattr(discovery, "_inspect_nifti", warning_nifti)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        discovery.discover(mixed, progress=False, workers=1)
    assert [str(w.message) for w in caught] == ["nifti header oddity"]
    inspect = functools.partial(discovery._inspect, real_root=str(mixed.resolve()))
    outcome, recorded = discovery._recording(inspect, mixed / "nii" / "vol.nii.gz")
    assert isinstance(outcome, discovery.Study) and [r[0] for r in recorded] == ["nifti header oddity"]
    # Forked workers inherit the patch: the warning is raised again in the caller.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        discovery.discover(mixed, progress=False, workers=2)
    assert [str(w.message) for w in caught] == ["nifti header oddity"]


def test_a_build_parses_each_dicom_file_once_but_the_slices_of_a_series_twice(mixed, tmp_path, monkeypatch):
    import pydicom

    parsed = []
    real = pydicom.dcmread

    def counting(source, *args, **kwargs):
        parsed.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    build_manifest(mixed, mixed / "labels.csv", tmp_path / "m.csv", progress=False, workers=1)
    dicom_files = [p for p in sorted(mixed.rglob("*")) if p.is_file() and discovery.dicom.looks_like_dicom(p)]
    slices = [p for p in dicom_files if p.parent.parent.name == "ct"]  # two series of 5 slices
    assert len(dicom_files) == 19 and len(slices) == 10
    # Discovery parses every DICOM file once (from the bytes it hashed); the radiographs, the
    # headerless file and the multi-frame file are not read again, the slices once more as volumes.
    assert len(parsed) == len(dicom_files) + len(slices)
    assert sorted(Path(p) for p in parsed if not hasattr(p, "read")) == sorted(slices)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_integer(workers, mixed, tmp_path):
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        discovery.discover(mixed, progress=False, workers=workers)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        build_manifest(mixed, mixed / "labels.csv", tmp_path / "m.csv", progress=False, workers=workers)
