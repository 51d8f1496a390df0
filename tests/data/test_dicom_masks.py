"""medtl.data.dicom_masks: DICOM SEG and RTSTRUCT objects as label maps on their series' grid.

Generated series are written with scrambled file names, row and column spacings that differ, and
masks off every axis' centre, so a transposed, flipped or mis-ordered label map fails. Real files
from ../shared/data (dcmqi's liver SEG with its NRRD, rt-utils' RTSTRUCTs) are skipped when absent.
"""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from medtl.data.dicom_masks import label_map, mask_kind, referenced_series
from medtl.errors import InputError
from tests.data import dicom_factory as factory

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SLICES, ROWS, COLUMNS = 6, 24, 20
GAP = 2.5


def _mask() -> np.ndarray:
    """(slices, rows, columns): class 1 a box with a hole on slices 1-4, class 2 a disc on slices 2-3."""
    mask = np.zeros((SLICES, ROWS, COLUMNS), np.uint8)
    mask[1:5, 3:15, 2:12] = 1
    mask[1:5, 7:10, 5:8] = 0
    rr, cc = np.ogrid[:ROWS, :COLUMNS]
    mask[2:4][:, (rr - 18) ** 2 + (cc - 14) ** 2 <= 9] = 2
    return mask


def _series(folder: Path, orientation=factory.AXIAL) -> list[Path]:
    """A CT series whose file k holds slice k of `_mask` (names scrambled: order must come from positions)."""
    volume = np.random.default_rng(0).integers(0, 1500, (SLICES, ROWS, COLUMNS)).astype(np.uint16)
    names = [f"{k}.dcm" for k in (4, 0, 5, 2, 1, 3)]
    return factory.write_referenced_series(folder, volume, orientation=orientation, slice_gap=GAP, names=names)


def _loaded(mask: np.ndarray) -> np.ndarray:
    """A (slices, rows, columns) mask in load_study's (columns, rows, slices) layout."""
    return mask.transpose(2, 1, 0)


def _one_hot(mask: np.ndarray) -> np.ndarray:
    return np.stack([mask == 1, mask == 2], axis=-1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.sum(a & b)) / float(np.sum(a) + np.sum(b))


# --- generated SEG ------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [factory.AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_binary_seg_label_map_equals_the_mask_in_load_study_layout(tmp_path, orientation, caplog, capfd):
    paths = _series(tmp_path / "ct", orientation)
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["Liver", "Lesion"])
    caplog.set_level(logging.DEBUG)
    labels, unknown = label_map(seg, list(reversed(paths)), {"liver": 1, "lesion": 2})
    assert labels.dtype == np.uint8 and unknown == []
    np.testing.assert_array_equal(labels, _loaded(_mask()))
    said = caplog.text + "".join(capfd.readouterr())
    assert not any(text in said for text in ("Liver", "Lesion", factory.PATIENT_ID, str(tmp_path)))
    assert mask_kind(seg) == "seg" and mask_kind(paths[0]) is None
    assert referenced_series(seg) == hd.seg.segread(seg).ReferencedSeriesSequence[0].SeriesInstanceUID


@pytest.mark.slow  # MONAI import for load_study: ~15 s
def test_label_map_lies_voxel_for_voxel_on_the_array_load_study_gives(tmp_path):
    from medtl.data.discover import discover, load_study

    volume = _mask().astype(np.uint16) * 100 + 100  # the image shows the mask: alignment is visible
    names = [f"{k}.dcm" for k in (4, 0, 5, 2, 1, 3)]
    paths = factory.write_referenced_series(tmp_path / "data", volume, orientation=SAGITTAL, names=names)
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["liver", "lesion"])
    labels, _ = label_map(seg, paths, {"liver": 1, "lesion": 2})
    studies, _ = discover(tmp_path / "data", progress=False)
    image = load_study(studies[0]).array
    np.testing.assert_array_equal(image, labels * 100.0 + 100.0 - 1024.0)  # the factory's rescale intercept


def test_fractional_seg_is_thresholded_at_half_the_maximum_fractional_value(tmp_path):
    paths = _series(tmp_path / "ct")
    fractions = np.where(_one_hot(_mask()), 0.55, 0.45)  # either side of the threshold
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, fractions, ["liver", "lesion"], fractional=True)
    labels, _ = label_map(seg, paths, {"liver": 1, "lesion": 2})
    np.testing.assert_array_equal(labels, _loaded(_mask()))


def test_seg_frames_stored_in_any_order_land_on_their_slices(tmp_path):
    paths = _series(tmp_path / "ct")
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["liver", "lesion"])
    n_frames = int(hd.seg.segread(seg).NumberOfFrames)
    factory.edit_seg_frames(seg, order=np.random.default_rng(3).permutation(n_frames))
    labels, _ = label_map(seg, paths, {"liver": 1, "lesion": 2})
    np.testing.assert_array_equal(labels, _loaded(_mask()))


def test_seg_frames_moved_half_a_slice_off_the_series_grid_are_refused(tmp_path):
    paths = _series(tmp_path / "ct")
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["liver", "lesion"])
    factory.edit_seg_frames(seg, shift=(0.0, 0.0, GAP / 2))
    with pytest.raises(InputError, match=r"seg\.dcm: SEG frames must lie on the series slices"):
        label_map(seg, paths, {"liver": 1, "lesion": 2})


def test_seg_over_a_series_missing_referenced_slices_is_refused_as_absent(tmp_path):
    paths = _series(tmp_path / "ct")
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["liver", "lesion"])
    with pytest.raises(InputError, match=r"seg\.dcm: the referenced series is absent: 2 of 6 images"):
        label_map(seg, paths[:4], {"liver": 1})
    other = factory.write_referenced_series(tmp_path / "other2", np.zeros((SLICES, ROWS, COLUMNS), np.uint16))
    with pytest.raises(InputError, match="the referenced series is absent"):
        label_map(seg, other, {"liver": 1})


def test_overlapping_segments_are_refused_for_different_classes_and_merged_for_one(tmp_path):
    paths = _series(tmp_path / "ct")
    segments = _one_hot(_mask())
    segments[2, 18, 14, 0] = True  # one voxel of the disc is also liver
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, segments, ["liver", "lesion"])
    with pytest.raises(InputError, match=r"must not overlap in a label map, not share 1 voxels"):
        label_map(seg, paths, {"liver": 1, "lesion": 2})
    labels, _ = label_map(seg, paths, {"liver": 1, "lesion": 1})
    np.testing.assert_array_equal(labels, _loaded(_mask() > 0) | _loaded(segments[..., 0]))


def test_segment_not_in_the_map_is_reported_and_stays_background(tmp_path):
    paths = _series(tmp_path / "ct")
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["liver", "Tumour of J. Doe"])
    labels, unknown = label_map(seg, paths, {"liver": 1})
    assert unknown == ["Tumour of J. Doe"]
    np.testing.assert_array_equal(labels, _loaded(_mask() == 1))


def test_segment_labels_differing_in_case_and_spacing_map_to_one_class(tmp_path):
    paths = _series(tmp_path / "ct")
    seg = factory.write_seg(tmp_path / "seg.dcm", paths, _one_hot(_mask()), ["Liver", "liver "])
    labels, unknown = label_map(seg, paths, {"liver": 1})
    assert unknown == []
    np.testing.assert_array_equal(labels, _loaded(_mask() > 0))


# --- generated RTSTRUCT -------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [factory.AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_rtstruct_contours_of_the_mask_rasterise_back_to_it(tmp_path, orientation, caplog, capfd):
    paths = _series(tmp_path / "ct", orientation)
    mask = _mask()
    rt = factory.write_rtstruct(tmp_path / "rt.dcm", paths, {"Liver": mask == 1, " LESION": mask == 2})
    caplog.set_level(logging.DEBUG)
    labels, unknown = label_map(rt, paths[::-1], {"liver": 1, "lesion": 2})
    assert unknown == [] and mask_kind(rt) == "rtstruct"
    assert referenced_series(rt) == factory.pydicom.dcmread(paths[0]).SeriesInstanceUID
    for index in (1, 2):
        assert _dice(labels == index, _loaded(mask == index)) >= 0.95
    assert labels[6, 8, 2] == 0  # the hole in the box (column 6, row 8, slice 2): inner contour, even-odd rule
    said = caplog.text + "".join(capfd.readouterr())
    assert "LESION" not in said and "Liver" not in said


def test_rtstruct_contours_off_the_series_slices_are_refused(tmp_path):
    paths = _series(tmp_path / "ct")
    rt = factory.write_rtstruct(tmp_path / "rt.dcm", paths, {"liver": _mask() == 1})
    ds = factory.pydicom.dcmread(rt)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        points[:, 2] += 0.75 * GAP * SLICES  # beyond the last slice
        contour.ContourData = [float(v) for v in points.ravel()]
    ds.save_as(rt)
    with pytest.raises(InputError, match=r"rt\.dcm: contours must lie in the plane of a series slice"):
        label_map(rt, paths, {"liver": 1})


# --- real files -----------------------------------------------------------------------------------


def _nrrd(path: Path) -> np.ndarray:
    """A gzip/raw NRRD volume as (x, y, z) = (columns, rows, slices): the fastest axis comes first."""
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    fields = dict(line.split(": ", 1) for line in raw[:end].decode().splitlines()[1:] if ": " in line)
    dtype = {"short": "i2", "unsigned char": "u1", "uchar": "u1", "ushort": "u2", "int": "i4"}[fields["type"]]
    body = gzip.decompress(raw[end + 2:]) if fields["encoding"] == "gzip" else raw[end + 2:]
    sizes = [int(n) for n in fields["sizes"].split()]
    order = "<" if fields.get("endian", "little") == "little" else ">"
    return np.frombuffer(body, order + dtype).reshape(sizes[::-1]).transpose(2, 1, 0)


def test_real_liver_seg_equals_its_nrrd_mask_and_highdicoms_pixels():
    folder = SHARED / "ct_liver_3slice"
    if not folder.is_dir():
        pytest.skip("../shared/data is absent")
    series = [folder / name for name in ("02.dcm", "03.dcm", "01.dcm")]
    labels, unknown = label_map(folder / "liver.dcm", series, {"liver": 1})
    assert unknown == [] and labels.shape == (512, 512, 3)
    # The NRRD's slices run along +z from its origin, the series' along its normal (+z): the same order.
    expected = _nrrd(folder / "liver_seg.nrrd")
    np.testing.assert_array_equal(labels, (expected > 0).astype(np.uint8))
    seg = hd.seg.segread(folder / "liver.dcm")
    by_depth = sorted(series, key=lambda p: float(factory.pydicom.dcmread(p).ImagePositionPatient[2]))
    uids = [factory.pydicom.dcmread(p).SOPInstanceUID for p in by_depth]
    # dcmqi does not write SpatialLocationsPreserved; label_map checked the frame positions itself.
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, ignore_spatial_locations=True)
    np.testing.assert_array_equal(labels, pixels.transpose(2, 1, 0))
    assert labels.sum() > 100_000


def test_real_rtstruct_fills_its_contours_on_their_slice_only():
    folder = SHARED / "rtstruct_rtutils"
    if not folder.is_dir():
        pytest.skip("../shared/data is absent")
    series = [folder / "ct_2.dcm", folder / "ct_1.dcm"]
    labels, unknown = label_map(folder / "rt.dcm", series, {"roi-1": 1})
    assert unknown == [] and labels.shape == (512, 512, 2)
    # The contours lie at z = 60 mm: ct_1, the first slice along the normal (ct_2 is at 65 mm).
    assert labels[..., 0].any() and not labels[..., 1].any()
    rt = factory.pydicom.dcmread(folder / "rt.dcm")
    ct = factory.pydicom.dcmread(folder / "ct_1.dcm")
    points = np.concatenate([np.asarray(c.ContourData, float).reshape(-1, 3)
                             for c in rt.ROIContourSequence[0].ContourSequence])
    low = (points.min(axis=0)[:2] - np.asarray(ct.ImagePositionPatient[:2], float)) / float(ct.PixelSpacing[0])
    high = (points.max(axis=0)[:2] - np.asarray(ct.ImagePositionPatient[:2], float)) / float(ct.PixelSpacing[0])
    filled = np.argwhere(labels[..., 0])  # (column, row)
    assert np.all(filled.min(axis=0) >= np.floor(low)) and np.all(filled.max(axis=0) <= np.ceil(high))
    centre = np.rint((low + high) / 2).astype(int)
    assert labels[centre[0], centre[1], 0] == 0  # inside the inner contour: a hole by the even-odd rule


@pytest.mark.parametrize("name", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_real_rtstructs_referencing_missing_images_are_refused_as_absent(name):
    folder = SHARED / "rtstruct_rtutils"
    if not folder.is_dir():
        pytest.skip("../shared/data is absent")
    with pytest.raises(InputError, match=re.escape(f"{name}: the referenced series is absent")) as caught:
        label_map(folder / name, [folder / "ct_1.dcm", folder / "ct_2.dcm"], {"roi-1": 1})
    assert "ROI" not in str(caught.value) and "2.16.840" not in str(caught.value)


# --- pydicom's own SEG test files: real files nobody here wrote ------------------------------------


def test_pydicoms_big_endian_seg_is_refused_with_how_to_convert_it(tmp_path):
    from pydicom.data import get_testdata_file

    seg = Path(get_testdata_file("liver_expb_1frame.dcm"))  # Explicit VR Big Endian: highdicom refuses it
    with pytest.raises(InputError, match=r"^liver_expb_1frame\.dcm must be a DICOM SEG in a little-endian transfer "
                                         r"syntax .* not big endian; convert it"):
        label_map(seg, _series(tmp_path), {"liver": 1})


def test_pydicoms_seg_with_more_frame_descriptions_than_frames_is_refused_not_half_read(tmp_path):
    from pydicom.data import get_testdata_file

    seg = Path(get_testdata_file("liver_1frame.dcm"))  # no NumberOfFrames: 1 frame of pixels, 3 descriptions
    with pytest.raises(InputError, match=r"must describe each of its frames once, not hold 1 frame\(s\) of pixel "
                                         r"data with 3 per-frame descriptions"):
        label_map(seg, _series(tmp_path), {"liver": 1})
