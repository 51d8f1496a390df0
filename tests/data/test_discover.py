"""End-to-end tests of medtl.data.discover: real files on disk in, studies and rejections out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_voi_lut

from medtl.data import deid
from medtl.data.discover import discover, load_study
from medtl.data.types import Rejection, Study
from medtl.errors import InputError
from tests.data import dicom_factory as factory

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
OBLIQUE = (
    0.8660254, 0.5, 0.0,  # row direction: 30 degrees about z
    -0.3535534, 0.6123724, 0.7071068,  # column direction: tilted 45 degrees out of the axial plane
)  # fmt: skip


def _volume(slices: int = 8, rows: int = 12, columns: int = 16) -> np.ndarray:
    """Slice k holds 100 * k plus a pattern that tells rows from columns."""
    base = np.add.outer(np.arange(rows) * 3, np.arange(columns)).astype(np.int16)
    return np.stack([base + 100 * k for k in range(slices)])


def _every_file(root: Path) -> list[Path]:
    return sorted(Path(d) / n for d, _, names in os.walk(root) for n in names)


def _assert_partition(root: Path, studies: list[Study], rejections: list[Rejection]) -> None:
    """Every file under root is in exactly one study or one rejection."""
    seen = [f for s in studies for f in s.files] + [r.path for r in rejections]
    assert sorted(seen) == _every_file(root)
    assert len(seen) == len(set(seen))


def _write_scrambled_series(folder: Path, orientation, rng) -> tuple[np.ndarray, list[Path]]:
    volume = _volume()
    order = rng.permutation(len(volume))
    names = [f"sub{rng.integers(3)}/IMG{int(i):04d}" for i in rng.permutation(len(volume)) * 7 + 11]
    # Instance numbers run against the slice order, so sorting by them would reverse the stack.
    numbers = list(range(len(volume), 0, -1))
    paths = factory.write_series(
        folder, volume, orientation=orientation, names=names, instance_numbers=numbers, slice_gap=2.5
    )
    return volume, [paths[i] for i in order]


# --- series assembly ----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [factory.AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_shuffled_renamed_series_reassembles_in_slice_order_with_spacing_and_affine(tmp_path, orientation):
    volume, _ = _write_scrambled_series(tmp_path / "data", orientation, np.random.default_rng(7))

    studies, rejections = discover(tmp_path / "data", progress=False)

    assert rejections == []
    (study,) = studies
    assert study.kind == "dicom_series" and study.modality == "CT" and len(study.files) == 8
    image = load_study(study)
    assert image.array.dtype == np.float32
    assert image.array.shape == (16, 12, 8)  # (columns, rows, slices)
    np.testing.assert_array_equal(image.array, volume.transpose(2, 1, 0) - 1024.0)  # HU
    np.testing.assert_allclose(image.spacing, (0.7, 0.8, 2.5), atol=1e-5)
    # Voxel (i, j, k) must land where DICOM puts column i, row j of slice k (LPS -> RAS).
    for k, path in enumerate(study.files):
        ds = pydicom.dcmread(path)
        lps = np.array(ds.ImagePositionPatient, dtype=float) + 5 * 0.7 * np.array(orientation[:3])
        lps += 3 * 0.8 * np.array(orientation[3:])
        np.testing.assert_allclose((image.affine @ [5, 3, k, 1])[:3], lps * [-1, -1, 1], atol=1e-4)


def test_series_matches_monai_pydicom_reader_when_instance_numbers_are_in_order(tmp_path):
    from monai.transforms import LoadImage

    volume = _volume()
    factory.write_series(tmp_path / "s", volume, orientation=OBLIQUE, slice_gap=2.5)
    (study,), _ = discover(tmp_path / "s", progress=False)
    ours = load_study(study)
    theirs = LoadImage(reader="PydicomReader", image_only=True)(str(tmp_path / "s"))
    np.testing.assert_allclose(ours.array, np.asarray(theirs.array), atol=1e-4)
    np.testing.assert_allclose(ours.affine, np.asarray(theirs.affine), atol=1e-4)


def test_gantry_tilted_series_with_uniform_spacing_is_one_study_resampled_along_the_normal(tmp_path):
    tilt = np.deg2rad(18.5)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), np.sin(tilt))
    factory.write_series(tmp_path, _volume(6), orientation=orientation, step=(0.0, 0.0, 3.0))
    (study,), rejections = discover(tmp_path, progress=False)
    assert rejections == [] and len(study.files) == 6 and study.notes
    # No shear: the third axis is the slice normal (RAS), one step is the distance along it.
    along = 3.0 * np.cos(tilt)
    np.testing.assert_allclose(
        load_study(study).affine[:3, 2], (0.0, np.sin(tilt) * along, np.cos(tilt) * along)
    )


def test_series_with_a_missing_slice_is_quarantined_whole_with_a_gap_reason(tmp_path):
    paths = factory.write_series(tmp_path, _volume(), slice_gap=1.0)
    paths[3].unlink()

    studies, rejections = discover(tmp_path, progress=False)

    assert studies == []
    assert len(rejections) == 7 and {r.status for r in rejections} == {"quarantined"}
    assert {r.reason for r in rejections} == {
        "missing slices: 1 gap of 2 times the usual 1.00 mm step along the normal"
    }


def test_series_with_duplicate_positions_is_quarantined(tmp_path):
    volume = _volume(4)
    factory.write_series(tmp_path / "a", volume, series_uid="1.2.3.4", slice_gap=2.0)
    factory.write_series(tmp_path / "b", volume[:2] + 1, series_uid="1.2.3.4", slice_gap=2.0)  # second echo
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and len(rejections) == 6
    assert all(r.reason.startswith("duplicate slice positions") for r in rejections)


def test_series_with_mixed_rows_and_columns_is_quarantined(tmp_path):
    factory.write_series(tmp_path, _volume(4), series_uid="1.2.3.5", slice_gap=2.0)
    factory.write_slice(
        tmp_path / "odd.dcm", np.zeros((10, 16), np.int16), position=(-10.0, -20.0, 38.0),
        series_uid="1.2.3.5", study_uid=factory.uid("study/1"),
    )  # fmt: skip
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and len(rejections) == 5
    assert {r.reason for r in rejections} == {"mixed image sizes (Rows x Columns) within one series"}


def test_localizer_and_axial_stack_in_one_series_are_split(tmp_path):
    factory.write_series(tmp_path, _volume(6), series_uid="1.2.3.6", slice_gap=2.0)
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    factory.write_slice(
        tmp_path / "scout.dcm", np.zeros((20, 20), np.int16), position=(0.0, -100.0, 100.0),
        orientation=sagittal, series_uid="1.2.3.6", study_uid=factory.uid("study/1"),
    )  # fmt: skip

    studies, rejections = discover(tmp_path, progress=False)

    assert rejections == []
    kinds = sorted((s.kind, len(s.files)) for s in studies)
    assert kinds == [("dicom_image", 1), ("dicom_series", 6)]
    scout = next(s for s in studies if s.kind == "dicom_image")
    assert scout.files == (tmp_path / "scout.dcm",)
    assert load_study(scout).array.shape == (20, 20)


def test_mixed_orientation_series_whose_stack_has_a_gap_is_quarantined(tmp_path):
    paths = factory.write_series(tmp_path, _volume(6), series_uid="1.2.3.7", slice_gap=2.0)
    paths[2].unlink()
    factory.write_slice(
        tmp_path / "scout.dcm", np.zeros((20, 20), np.int16), position=(0.0, -100.0, 100.0),
        orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), series_uid="1.2.3.7", study_uid=factory.uid("study/1"),
    )  # fmt: skip
    studies, rejections = discover(tmp_path, progress=False)
    assert studies == [] and len(rejections) == 6
    assert all(
        r.reason.startswith("mixed orientations and a part is not a consistent stack") for r in rejections
    )


def test_multiframe_file_is_a_3d_study_with_frames_ordered_by_position(tmp_path):
    volume = _volume(5, rows=6, columns=7)
    positions = [(0.0, 0.0, z) for z in (4.0, 0.0, 8.0, 2.0, 6.0)]
    path = factory.write_multiframe(tmp_path / "enhanced.dcm", volume, positions)

    (study,), rejections = discover(tmp_path, progress=False)

    assert rejections == [] and study.kind == "dicom_series" and study.files == (path,)
    image = load_study(study)
    order = np.argsort([p[2] for p in positions])
    np.testing.assert_array_equal(image.array, volume[order].transpose(2, 1, 0) - 1024.0)
    np.testing.assert_allclose(image.spacing, (0.6, 0.5, 2.0))
    assert image.orientation == "LPS"


def test_multiframe_file_with_a_gap_is_quarantined(tmp_path):
    factory.write_multiframe(tmp_path / "mf.dcm", _volume(3), [(0, 0, 0), (0, 0, 1), (0, 0, 3)])
    (rejection,) = discover(tmp_path, progress=False)[1]
    assert rejection.status == "quarantined" and "missing slices" in rejection.reason


def test_series_header_facts_collect_identifying_values_over_all_files(tmp_path):
    paths = factory.write_series(tmp_path, _volume(3), slice_gap=2.0)
    ds = pydicom.dcmread(paths[2])
    ds.ImageComments = "scanned by technologist MARSHALL"
    ds.save_as(paths[2])

    (study,), _ = discover(tmp_path, progress=False)

    header = study.header
    assert header.patient_id == factory.PATIENT_ID and header.sex == "F" and header.age == "058Y"
    assert header.birth_date == factory.BIRTH_DATE and header.study_date == factory.STUDY_DATE
    assert header.institution == factory.INSTITUTION and header.manufacturer == "ACME"
    assert header.model == "Scanner 3000" and header.photometric == "MONOCHROME2"
    assert header.series_uid == ds.SeriesInstanceUID and header.study_uid == ds.StudyInstanceUID
    # Elements are strings or (value, keyword) pairs, depending on medtl.data.deid's version.
    values = {v if isinstance(v, str) else v[0] for v in header.identifying_values}
    assert {"scanned by technologist MARSHALL", factory.PATIENT_NAME, factory.ACCESSION} <= values
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths} <= values
    assert not deid._MEMO, "the values the walk kept between files must be dropped once discovery ends"


def test_copies_of_the_same_instance_are_skipped_not_stacked(tmp_path):
    (path,) = factory.write_series(tmp_path / "a", _volume(1))
    shutil.copy(path, tmp_path / "a" / "copy.dcm")
    studies, rejections = discover(tmp_path, progress=False)
    assert len(studies) == 1
    assert [(r.path.name, r.status) for r in rejections] == [("copy.dcm", "skipped")]


# --- bad and non-image input --------------------------------------------------------------------


def test_empty_truncated_corrupt_text_and_non_image_files_are_quarantined_or_skipped(tmp_path):
    factory.write_radiograph(tmp_path / "good.dcm", np.ones((8, 8)))
    (tmp_path / "empty.dcm").write_bytes(b"")
    full = factory.write_radiograph(tmp_path / "cut_pixels.dcm", np.ones((64, 64))).read_bytes()
    (tmp_path / "cut_pixels.dcm").write_bytes(full[:-500])
    (tmp_path / "cut_header.dcm").write_bytes(full[:200])
    (tmp_path / "notes.dcm").write_text("not dicom at all\n" * 30)
    (tmp_path / "labels.csv").write_text("id,label\n1,0\n")
    (tmp_path / "README").write_text("readme\n")
    (tmp_path / "blob.bin").write_bytes(
        np.random.default_rng(1).integers(0, 256, 999, dtype=np.uint8).tobytes()
    )
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    factory.write_structured_report(tmp_path / "report.dcm")

    studies, rejections = discover(tmp_path, progress=False)

    _assert_partition(tmp_path, studies, rejections)
    assert [s.files[0].name for s in studies] == ["good.dcm"]
    status = {r.path.name: r.status for r in rejections}
    assert status == {
        "empty.dcm": "quarantined", "cut_pixels.dcm": "quarantined", "cut_header.dcm": "quarantined",
        "notes.dcm": "quarantined", "broken.png": "quarantined", "broken.nii.gz": "quarantined",
        "labels.csv": "skipped", "README": "skipped", "blob.bin": "skipped", "report.dcm": "skipped",
    }  # fmt: skip
    for rejection in rejections:
        assert rejection.reason and "\n" not in rejection.reason
        assert str(tmp_path) not in rejection.reason and rejection.path.name not in rejection.reason
        assert not any(v in rejection.reason for v in (factory.PATIENT_ID, "DOE", factory.INSTITUTION))


def test_headerless_dicom_is_read_but_text_is_never_forced_into_dicom(tmp_path):
    factory.write_headerless(tmp_path / "OLDFILE", np.arange(12 * 16).reshape(12, 16))
    (tmp_path / "NOTES").write_text("\x08\x00 looks binary-ish but is a note\n")
    studies, rejections = discover(tmp_path, progress=False)
    assert [s.files[0].name for s in studies] == ["OLDFILE"]
    np.testing.assert_array_equal(load_study(studies[0]).array, np.arange(12 * 16).reshape(12, 16).T)
    assert [(r.path.name, r.status) for r in rejections] == [("NOTES", "skipped")]


def test_discover_refuses_a_missing_root(tmp_path):
    with pytest.raises(InputError, match="must be an existing folder"):
        discover(tmp_path / "absent", progress=False)


def test_discover_shows_a_progress_bar_only_when_asked(tmp_path, capsys):
    factory.write_radiograph(tmp_path / "a.dcm", np.ones((4, 4)))
    discover(tmp_path, progress=False)
    assert capsys.readouterr().err == ""
    discover(tmp_path, progress=True)
    assert "Scanning files" in capsys.readouterr().err


def test_discover_output_never_contains_identifying_values(tmp_path, capsys, caplog):
    paths = factory.write_series(tmp_path, _volume(3), slice_gap=2.0)
    paths[1].unlink()  # makes a quarantine reason
    discover(tmp_path, progress=True)
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert factory.PATIENT_ID not in text and "DOE" not in text and str(tmp_path) not in text


def test_load_study_of_a_vanished_file_raises_input_error_without_the_path(tmp_path):
    path = factory.write_radiograph(tmp_path / "DOE_JANE.dcm", np.ones((4, 4)))
    (study,), _ = discover(tmp_path, progress=False)
    path.unlink()
    with pytest.raises(InputError) as error:
        load_study(study)
    assert "DOE" not in str(error.value) and error.value.__cause__ is None


# --- NIfTI and 2D exports -----------------------------------------------------------------------


def test_nifti_loads_with_its_spacing_and_orientation(tmp_path):
    data = np.random.default_rng(2).normal(size=(6, 7, 5)).astype(np.float32)
    affine = np.diag([-0.5, 0.7, 2.0, 1.0])  # LAS
    affine[:3, 3] = (10.0, -20.0, 5.0)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "series4d.nii")

    studies, rejections = discover(tmp_path, progress=False)

    assert [(s.kind, s.files[0].name) for s in studies] == [("nifti", "vol.nii.gz")]
    assert [(r.path.name, r.status) for r in rejections] == [("series4d.nii", "quarantined")]
    image = load_study(studies[0])
    np.testing.assert_allclose(image.array, data)
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_allclose(image.spacing, (0.5, 0.7, 2.0))
    assert image.orientation == "LAS"


def test_png_exports_load_as_columns_by_rows_and_rgb_becomes_luminance(tmp_path):
    grey = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)  # 12 rows, 16 columns
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = np.zeros((5, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "colour.png")

    studies, rejections = discover(tmp_path, progress=False)

    assert rejections == [] and [s.kind for s in studies] == ["image2d", "image2d"]
    colour, grey_image = (load_study(s) for s in studies)
    np.testing.assert_array_equal(grey_image.array, grey.T.astype(np.float32))
    assert grey_image.spacing == (1.0, 1.0) and grey_image.orientation == "RA"
    np.testing.assert_allclose(
        colour.array, np.full((3, 5), 0.299 * 200 + 0.587 * 100 + 0.114 * 50), rtol=1e-6
    )


# --- every file pydicom ships, and compressed transfer syntaxes ---------------------------------


def test_every_bundled_pydicom_test_file_ends_in_a_loadable_study_or_a_rejection():
    studies, rejections = discover(PYDICOM_FILES, progress=False)
    _assert_partition(PYDICOM_FILES, studies, rejections)
    assert len(studies) > 20
    for study in studies:
        image = load_study(study)
        assert image.array.dtype == np.float32 and image.array.ndim == (
            3 if study.kind == "dicom_series" else 2
        )
        assert np.isfinite(image.array).all()
    assert all(r.reason and "\n" not in r.reason for r in rejections)
    status = {r.path.name: r.status for r in rejections}
    assert status["MR_truncated.dcm"] == status["JPEG2000-embedded-sequence-delimiter.dcm"] == "quarantined"
    assert status["rtstruct.dcm"] == status["test-SR.dcm"] == status["rtplan.dcm"] == "skipped"


def _load_alone(name: str, tmp_path: Path) -> np.ndarray:
    """Discover and load one bundled file in a folder of its own (its twins share its UIDs)."""
    source = PYDICOM_FILES / name
    if not source.exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(source, folder / name)
    (study,), rejections = discover(folder, progress=False)
    assert rejections == []
    return load_study(study).array


@pytest.mark.parametrize(
    ("compressed", "uncompressed", "tolerance"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm", 0.0),  # RLE Lossless
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0),  # JPEG-LS Lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),  # JPEG 2000 Lossless
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0.0),  # JPEG Lossless SV1 vs RLE of the same image
        ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 2.0),  # JPEG Baseline (lossy), RGB
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 2.0),  # JPEG Baseline (lossy), YBR
        ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 2.0),  # JPEG Baseline, odd size
    ],
)
def test_compressed_transfer_syntaxes_decode_like_their_uncompressed_twins(
    tmp_path, compressed, uncompressed, tolerance
):
    packed, plain = _load_alone(compressed, tmp_path), _load_alone(uncompressed, tmp_path)
    assert packed.shape == plain.shape
    if tolerance == 0.0:
        np.testing.assert_array_equal(packed, plain)
    else:
        assert np.abs(packed - plain).max() <= tolerance


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "GDCMJ2K_TextGBR.dcm"])
def test_lossy_syntaxes_without_a_bundled_twin_decode(tmp_path, name):
    array = _load_alone(name, tmp_path)
    assert array.ndim == 2 and np.ptp(array) > 0


# --- real data in ../shared/data/dicom ----------------------------------------------------------


def test_headerless_monochrome1_chest_radiograph_is_windowed_and_inverted(shared_data, tmp_path):
    source = shared_data / "dicom" / "fo_dicom_cr" / "CR-MONO1-10-chest"
    shutil.copy(source, tmp_path / source.name)
    (study,), _ = discover(tmp_path, progress=False)
    assert study.kind == "dicom_image" and study.modality == "CR"
    image = load_study(study)
    ds = pydicom.dcmread(source, force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    expected = 1023.0 - apply_voi_lut(ds.pixel_array, ds)  # 10 bits stored, window 550/1024
    np.testing.assert_allclose(image.array, expected.T, atol=1e-3)


def test_jpeg_lossless_radiograph_with_modality_lut_sequence(shared_data, tmp_path):
    source = shared_data / "dicom" / "fo_dicom_cr" / "CR-ModalitySequenceLUT.dcm"
    shutil.copy(source, tmp_path / source.name)
    (study,), _ = discover(tmp_path, progress=False)
    image = load_study(study)
    ds = pydicom.dcmread(source)
    lut_data = ds.ModalityLUTSequence[0].LUTData  # OW here: raw little-endian 16-bit words
    lut = (
        np.frombuffer(lut_data, "<u2").astype(float)
        if isinstance(lut_data, bytes)
        else np.asarray(lut_data, float)
    )
    mapped = lut[np.clip(ds.pixel_array, 0, len(lut) - 1)]
    np.testing.assert_allclose(image.array, (lut.min() + lut.max() - mapped).T)  # MONOCHROME1
    np.testing.assert_allclose(image.spacing, (0.15, 0.15))


def test_shared_dicom_folder_studies(shared_data):
    root = shared_data / "dicom"
    studies, rejections = discover(root, progress=False)
    _assert_partition(root, studies, rejections)
    by_folder: dict[str, list[Study]] = {}
    for study in studies:
        by_folder.setdefault(study.files[0].relative_to(root).parts[0], []).append(study)

    (liver,) = by_folder["ct_liver_3slice"]
    image = load_study(liver)
    assert image.array.shape == (512, 512, 3) and image.modality == "CT"
    np.testing.assert_allclose(image.spacing, (0.810547, 0.810547, 1.0), atol=1e-4)
    assert -1100 < np.median(image.array) < 200  # Hounsfield units, not raw stored values

    brain = by_folder["mr_brain_study"]
    assert len(brain) == 3 and len({s.header.study_uid for s in brain}) == 1
    assert len({s.header.series_uid for s in brain}) == 3

    radiographs = by_folder["cxr_dx"]
    assert len(radiographs) == 6 and {s.kind for s in radiographs} == {"dicom_image"}
    assert all(s.header.sex in ("M", "F") and s.header.age for s in radiographs)

    status = {r.path.relative_to(root).as_posix(): r.status for r in rejections}
    expected = {
        "ct_liver_3slice/liver.dcm": "skipped",  # DICOM SEG
        "ct_liver_3slice/liver_seg.nrrd": "skipped",
        "cxr_dx/sample_labels.csv": "skipped",
    }
    if (root / "rtstruct_rtutils").is_dir():  # RT structure sets (rt-utils' examples), not images
        names = ("rt.dcm", "invalid_reference_rt.dcm", "non_existent_reference_rt.dcm")
        expected.update({f"rtstruct_rtutils/{name}": "skipped" for name in names})
    assert status == expected
