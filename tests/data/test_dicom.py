"""Tests of medtl.data.dicom: sniffing, geometry, intensities (deid values: tests/data/test_deid.py)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydicom.uid import RLELossless

from medtl.data import dicom, geometry
from medtl.data.discover import load_study
from medtl.data.types import Study
from tests.data import dicom_factory as factory

# --- sniffing -----------------------------------------------------------------------------------


def test_looks_like_dicom_accepts_preamble_and_headerless_files_and_refuses_text_and_binary(tmp_path):
    with_preamble = factory.write_radiograph(tmp_path / "a.dcm", np.zeros((4, 4)))
    headerless = factory.write_headerless(tmp_path / "old", np.zeros((4, 4)))
    text = tmp_path / "notes.dcm"
    text.write_text("Patient DOE^JANE, chest film, see attached\n" * 20)
    binary = tmp_path / "blob"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x08\x00")

    assert dicom.looks_like_dicom(with_preamble)
    assert dicom.looks_like_dicom(headerless)
    assert not dicom.looks_like_dicom(text)
    assert not dicom.looks_like_dicom(binary)
    assert not dicom.looks_like_dicom(tiny)


def test_read_dataset_sets_implicit_little_endian_for_headerless_files(tmp_path):
    path = factory.write_headerless(tmp_path / "old", np.arange(12).reshape(3, 4))
    ds = dicom.read_dataset(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, np.arange(12).reshape(3, 4))


# --- geometry -----------------------------------------------------------------------------------


def test_order_stack_sorts_by_position_along_the_normal_not_input_order():
    positions = [(0, 0, 5.0), (0, 0, -5.0), (0, 0, 0.0), (0, 0, 2.5), (0, 0, -2.5)]
    stack = geometry.order_stack(factory.AXIAL, positions)
    assert stack.order == (1, 4, 2, 3, 0)
    np.testing.assert_allclose(stack.step, (0, 0, 2.5))


def test_order_stack_accepts_gantry_tilt_with_uniform_spacing():
    tilt = np.deg2rad(18.5)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), np.sin(tilt))  # column direction tilted
    positions = [(0.0, 0.0, 3.0 * k) for k in range(6)]  # table moves along z only
    stack = geometry.order_stack(orientation, positions)
    assert not isinstance(stack, str)
    np.testing.assert_allclose(stack.step, (0, 0, 3.0))


def test_order_stack_reports_gap_range_for_missing_slice():
    positions = [(0, 0, z) for z in (0.0, 1.0, 2.0, 5.0, 6.0)]
    reason = geometry.order_stack(factory.AXIAL, positions)
    assert reason == "missing slices: 1 gap of 3 times the usual 1.00 mm step along the normal"


def test_order_stack_tells_uneven_spacing_from_missing_slices():
    uneven = geometry.order_stack(factory.AXIAL, [(0, 0, z) for z in (0.0, 1.0, 2.0, 4.5, 7.0, 12.0)])
    assert uneven.startswith("uneven slice spacing: 3 distinct steps of 1.00-5.00 mm along the normal")
    missing = geometry.order_stack(factory.AXIAL, [(0, 0, z) for z in (0.0, 2.0, 4.0, 8.0, 10.0, 16.0, 18.0)])
    assert missing == "missing slices: 2 gaps of 2-3 times the usual 2.00 mm step along the normal"


def test_order_stack_reports_the_tilt_angle_of_a_tilted_stack():
    tilt = np.deg2rad(12.0)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), np.sin(tilt))
    stack = geometry.order_stack(orientation, [(0.0, 0.0, 2.0 * k) for k in range(4)])
    assert stack.tilt == pytest.approx(12.0)
    assert geometry.order_stack(factory.AXIAL, [(0.0, 0.0, 2.0 * k) for k in range(4)]).tilt == 0.0


def test_correct_gantry_tilt_leaves_orthogonal_stacks_untouched():
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    same, step = geometry.correct_gantry_tilt(volume, factory.AXIAL, (1.0, 1.0), (0.0, 0.0, 2.0))
    assert same is volume and step == (0.0, 0.0, 2.0)


def test_order_stack_reports_duplicate_positions():
    reason = geometry.order_stack(factory.AXIAL, [(0, 0, 0.0), (0, 0, 1.0), (0, 0, 1.0), (0, 0, 2.0)])
    assert isinstance(reason, str) and reason.startswith("duplicate slice positions (1 repeated)")


def test_order_stack_refuses_positions_off_one_line():
    positions = [(0, 0, 0.0), (0, 0, 1.0), (40, 0, 2.0), (0, 0, 3.0)]
    reason = geometry.order_stack(factory.AXIAL, positions)
    assert isinstance(reason, str) and "one line" in reason


def test_order_stack_tolerates_rounding_jitter_in_positions():
    positions = [(0, 0, z) for z in (0.0, 0.625, 1.25, 1.876, 2.5, 3.124)]
    assert not isinstance(geometry.order_stack(factory.AXIAL, positions), str)


def test_volume_affine_matches_the_dicom_formula_in_ras():
    orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal
    origin, spacing, step = (12.0, -30.0, 40.0), (0.8, 0.6), (3.0, 0.0, 0.0)
    affine = geometry.volume_affine(orientation, origin, spacing, step)
    # PS3.3 C.7.6.2.1.1: P = S + i * col_spacing * row_cosine + j * row_spacing * col_cosine (LPS)
    i, j, k = 4, 7, 2
    lps = (
        np.array(origin)
        + i * 0.6 * np.array(orientation[:3])
        + j * 0.8 * np.array(orientation[3:])
        + k * np.array(step)
    )
    expected_ras = lps * np.array([-1, -1, 1])
    np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], expected_ras)


def test_volume_affine_without_orientation_is_identity_scaled_by_spacing():
    np.testing.assert_allclose(
        geometry.volume_affine(None, None, (0.2, 0.15), 1.0), np.diag([0.15, 0.2, 1.0, 1.0])
    )


def test_frame_geometry_reads_per_frame_positions_from_functional_groups(tmp_path):
    positions = [(0, 0, 4.0), (0, 0, 0.0), (0, 0, 2.0)]
    path = factory.write_multiframe(tmp_path / "mf.dcm", np.zeros((3, 4, 5), np.int16), positions)
    orientation, found, spacing = dicom.frame_geometry(dicom.read_dataset(path), 3)
    assert orientation == factory.AXIAL
    assert found == tuple(tuple(float(v) for v in p) for p in positions)
    assert spacing == (0.5, 0.6)


# --- intensities --------------------------------------------------------------------------------


def _load_image(path):
    """Load one file the way discover's studies of kind "dicom_image" are loaded."""
    return load_study(Study((path,), "dicom_image", "", None))


def _linear_window(x: np.ndarray, center: float, width: float, low: float, high: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out independently of pydicom."""
    c, w = center - 0.5, width - 1
    y = ((x - c) / w + 0.5) * (high - low) + low
    return np.where(x <= c - w / 2, low, np.where(x > c + w / 2, high, y))


def test_monochrome1_radiograph_is_windowed_then_inverted_so_bright_means_attenuation(tmp_path):
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    path = factory.write_radiograph(
        tmp_path / "cr.dcm", stored, photometric="MONOCHROME1", window=(2048, 1024)
    )
    image = _load_image(path)

    expected = 4095 - _linear_window(stored.astype(float), 2048, 1024, 0, 4095)
    assert image.array.dtype == np.float32
    assert image.array.shape == (16, 16)
    np.testing.assert_allclose(image.array, expected.T, atol=1e-3)
    # MONOCHROME1: the lowest stored value is displayed white, i.e. the densest tissue.
    assert image.array[0, 0] == image.array.max() == 4095


def test_monochrome1_without_window_inverts_over_the_stored_range(tmp_path):
    stored = np.arange(20 * 12, dtype=np.uint16).reshape(20, 12) * 10
    image = _load_image(factory.write_radiograph(tmp_path / "cr.dcm", stored, bits_stored=12))
    np.testing.assert_allclose(image.array, (4095.0 - stored).T)


def test_rescale_is_applied_to_a_monochrome2_radiograph(tmp_path):
    stored = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8)
    path = factory.write_radiograph(
        tmp_path / "dx.dcm", stored, photometric="MONOCHROME2", rescale=(2.0, -100.0), modality="DX"
    )
    image = _load_image(path)
    np.testing.assert_allclose(image.array, (2.0 * stored - 100.0).T)
    np.testing.assert_allclose(image.spacing, (0.2, 0.15))  # ImagerPixelSpacing is (row, column)


def test_malformed_window_falls_back_to_modality_values(tmp_path):
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    path = factory.write_radiograph(tmp_path / "cr.dcm", stored, photometric="MONOCHROME2", window=(8, 0.5))
    np.testing.assert_allclose(_load_image(path).array, stored.T.astype(float))


def test_ct_slice_keeps_hounsfield_units_and_ignores_its_window(tmp_path):
    stored = np.arange(0, 2000, 125, dtype=np.int16).reshape(4, 4)
    path = factory.write_slice(
        tmp_path / "ct.dcm", stored, position=(0, 0, 0), series_uid="1.2.3", study_uid="1.2.4"
    )
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(path)
    np.testing.assert_allclose(_load_image(path).array, (stored - 1024.0).T)


def test_enhanced_multiframe_uses_rescale_from_functional_groups(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) + 1000
    path = factory.write_multiframe(tmp_path / "mf.dcm", volume, [(0, 0, 0), (0, 0, 1)])
    np.testing.assert_allclose(dicom.frames(dicom.read_dataset(path)), volume - 1024.0)


def test_rle_and_jpeg2000_lossless_decode_to_the_uncompressed_pixels(tmp_path):
    stored = np.random.default_rng(3).integers(-1000, 3000, (64, 48)).astype(np.int16)  # J2K needs >= 64 px
    plain = factory.write_slice(
        tmp_path / "plain.dcm", stored, position=(0, 0, 0), series_uid="1.2", study_uid="1.3"
    )
    expected = _load_image(plain).array
    for syntax in (RLELossless, pydicom.uid.JPEG2000Lossless):
        ds = pydicom.dcmread(plain)
        ds.compress(syntax)
        ds.save_as(tmp_path / "packed.dcm")
        assert dicom.read_dataset(tmp_path / "packed.dcm").file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(_load_image(tmp_path / "packed.dcm").array, expected)


def test_inspect_dicom_quarantines_truncated_pixel_data_without_quoting_the_header(tmp_path):
    path = factory.write_radiograph(tmp_path / "cr.dcm", np.ones((32, 32)))
    path.write_bytes(path.read_bytes()[:-300])
    rejection = dicom.inspect_dicom(path)
    assert rejection.status == "quarantined"
    assert "truncated" in rejection.reason
    assert factory.PATIENT_ID not in rejection.reason and str(tmp_path) not in rejection.reason


def test_inspect_dicom_quarantines_a_transfer_syntax_no_decoder_handles(tmp_path):
    path = factory.write_radiograph(tmp_path / "video.dcm", np.ones((8, 8)))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(path)
    rejection = dicom.inspect_dicom(path)
    assert rejection.status == "quarantined"
    assert rejection.reason.startswith("pixel data in an unsupported transfer syntax (MPEG2")


@pytest.mark.parametrize(
    ("sop_class", "modality", "expected"),
    [
        ("1.2.840.10008.5.1.4.1.1.88.22", "SR", "structured report"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "PR", "presentation state"),
        ("1.2.840.10008.5.1.4.1.1.88.59", "KO", "key object selection"),
        ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", "radiotherapy"),
        ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", "radiotherapy"),
        ("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE", "radiotherapy"),
        ("1.2.840.10008.5.1.4.1.1.66.4", "SEG", "segmentation"),
        ("1.2.840.10008.5.1.4.1.1.104.1", "DOC", "encapsulated document"),
        ("1.2.840.10008.1.3.10", "", "DICOMDIR"),
        ("", "SR", "structured report"),
    ],
)
def test_non_image_category_names_valid_non_image_objects(sop_class, modality, expected):
    assert expected in dicom.non_image_category(sop_class, modality)


@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography - For Presentation
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.999.1",  # private SOP class: decided by its pixel data
    ],
)
def test_non_image_category_keeps_image_storage_classes(sop_class):
    assert dicom.non_image_category(sop_class, "") == ""


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                  elements=st.floats(-5000, 5000, width=32)))
def test_thumbnail_is_the_mean_of_each_array_split_block(frame):
    # The definition the copy check relies on, computed the slow way: np.array_split's blocks.
    blocks = [block for band in np.array_split(frame, min(dicom._THUMBNAIL, frame.shape[0]), axis=0)
              for block in np.array_split(band, min(dicom._THUMBNAIL, frame.shape[1]), axis=1)]
    expected = [float(block.mean(dtype=np.float64)) for block in blocks]
    np.testing.assert_allclose(dicom._thumbnail(frame), expected, rtol=1e-9, atol=1e-9)
