"""medtl.data.seg_out: label maps on load_study's grid written as DICOM SEG, read back with highdicom.

Every SEG frame is checked against the source instance it references, matched to the loaded array
by pixel content (not by geometry or file order), so a frame put on the wrong slice, flipped or
transposed fails the test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medtl.data.discover import discover, load_study
from medtl.data.seg_out import write_dicom_seg
from medtl.data.types import Study
from medtl.errors import InputError
from tests.data import dicom_factory as factory

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
NAMES = ["liver", "lesion"]


def _add_frame_of_reference(paths: list[Path]) -> None:
    """Give the factory's files the FrameOfReferenceUID real CT/MR always carries (Type 1)."""
    frame_of_reference = pydicom.uid.generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.save_as(path, enforce_file_format=True)


def _only_study(root: Path) -> Study:
    studies, _ = discover(root, progress=False)
    assert len(studies) == 1
    return studies[0]


def _two_boxes(shape: tuple[int, ...]) -> np.ndarray:
    """Label 1 and label 2 in boxes off every axis' centre, so any flip or swap moves them."""
    mask = np.zeros(shape, np.uint8)
    mask[1:6, 2:9, 1:3] = 1
    mask[14:17, 11:13, 4] = 2
    return mask


def _source_slices(path: Path) -> np.ndarray:
    """(frames, rows, columns) of a source file in HU, as stored (no geometry involved)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64).reshape(-1, ds.Rows, ds.Columns)
    if "SharedFunctionalGroupsSequence" in ds:  # enhanced multi-frame: the rescale is a functional group
        ds = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    return pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def _slice_holding(array: np.ndarray, pixels: np.ndarray) -> int:
    """The index k of the loaded (columns, rows, slices) array whose slice shows these pixels."""
    matches = [k for k in range(array.shape[2]) if np.array_equal(array[..., k].T, pixels)]
    assert len(matches) == 1
    return matches[0]


def test_series_seg_frames_match_the_mask_slice_of_each_source_instance(tmp_path, caplog, capfd):
    volume = np.random.default_rng(1).integers(0, 2000, (6, 20, 24)).astype(np.uint16)
    paths = factory.write_series(tmp_path / "data" / "sag", volume, orientation=SAGITTAL, modality="MR",
                                 names=[f"{k}.dcm" for k in (3, 1, 5, 0, 2, 4)])
    _add_frame_of_reference(paths)
    study = _only_study(tmp_path / "data")
    image = load_study(study)
    mask = _two_boxes(image.array.shape)
    shuffled = [study.files[k] for k in (4, 0, 5, 2, 1, 3)]  # the writer must not rely on file order
    caplog.set_level(logging.DEBUG)
    out = write_dicom_seg(mask, image.affine, shuffled, tmp_path / "out" / "nested" / "seg.dcm", NAMES)
    said = caplog.text + "".join(capfd.readouterr())
    assert not any(value in said for value in (factory.PATIENT_ID, "DOE", factory.ACCESSION, str(tmp_path)))
    seg = hd.seg.segread(out)
    assert seg.PatientID == factory.PATIENT_ID  # the SEG belongs to the study, by design
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert [str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SegmentationType == "BINARY"
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == NAMES
    seen = set()
    for path in paths:
        k = _slice_holding(image.array, _source_slices(path)[0])
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2])[0]
        for number in (1, 2):
            np.testing.assert_array_equal(pixels[..., number - 1], (mask[..., k] == number).T)
        seen.add(k)
    assert seen == set(range(6)) and mask[..., 4].any() and mask[..., 1].any()


def test_gantry_tilted_series_maps_the_resampled_mask_back_onto_each_source_frame(tmp_path):
    # Slices move along z while the plane is tilted: the loader shifts slice k by k rows (exactly).
    tilt = np.deg2rad(20.0)
    gap = 0.8 / np.sin(tilt)  # one row (0.8 mm) of in-plane drift per slice
    rng = np.random.default_rng(2)
    volume = (rng.random((5, 20, 24)) > 0.5).astype(np.uint16) * 1000 + 500
    paths = factory.write_series(tmp_path / "data" / "tilt", volume, step=(0.0, 0.0, gap),
                                 orientation=(1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)))
    _add_frame_of_reference(paths)
    study = _only_study(tmp_path / "data")
    image = load_study(study)
    mask = (image.array > 0).astype(np.uint8)  # label 1 where the source pixel was bright
    out = write_dicom_seg(mask, image.affine, study.files, tmp_path / "seg.dcm", ["bright"])
    seg = hd.seg.segread(out)
    for k, path in enumerate(study.files):
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, ..., 0]
        bright = _source_slices(path)[0] > 0
        # Rows the resampling moved out of the volume hold no labels; every other row is exact.
        kept = slice(k, None) if image.affine[1, 1] < 0 else slice(None, bright.shape[0] - k)
        assert pixels.shape == bright.shape and bright[kept].any()
        np.testing.assert_array_equal(pixels[kept], bright[kept])


def test_multiframe_seg_frames_match_the_mask_slice_of_each_source_frame(tmp_path):
    volume = np.random.default_rng(3).integers(0, 2000, (6, 20, 24)).astype(np.uint16)
    path = factory.write_multiframe(tmp_path / "data" / "mf.dcm", volume, [(0, 0, 2.0 * k) for k in (2, 0, 1, 3, 5, 4)])
    _add_frame_of_reference([path])
    image = load_study(_only_study(tmp_path / "data"))
    mask = _two_boxes(image.array.shape)
    seg = hd.seg.segread(write_dicom_seg(mask, image.affine, [path], tmp_path / "seg.dcm", NAMES))
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    for number, pixels in enumerate(_source_slices(path), start=1):
        k = _slice_holding(image.array, pixels)
        labels = seg.get_pixels_by_source_frame(uid, [number], segment_numbers=[1, 2])[0]
        np.testing.assert_array_equal(labels, np.stack([(mask[..., k] == n).T for n in (1, 2)], axis=-1))


def test_radiograph_seg_round_trips_the_transposed_2d_mask(tmp_path):
    path = factory.write_radiograph(tmp_path / "data" / "cr.dcm", np.random.default_rng(4).integers(0, 4000, (30, 26)))
    study = _only_study(tmp_path / "data")
    image = load_study(study)
    assert image.array.shape == (26, 30)  # (columns, rows)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[2:7, 20:29] = 1
    seg = hd.seg.segread(write_dicom_seg(mask, image.affine, study.files, tmp_path / "seg.dcm", ["lung"]))
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])[0, ..., 0]
    np.testing.assert_array_equal(pixels, mask.T)


def test_empty_classes_and_an_empty_mask_are_written(tmp_path):
    paths = factory.write_series(tmp_path / "data" / "ct", np.zeros((4, 20, 24), np.int16))
    _add_frame_of_reference(paths)
    study = _only_study(tmp_path / "data")
    image = load_study(study)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[3:5, 4:6, 2] = 2  # class 1 and class 3 have no voxels
    names = ["a", "b", "c"]
    seg = hd.seg.segread(write_dicom_seg(mask, image.affine, study.files, tmp_path / "seg.dcm", names))
    assert seg.number_of_segments == 3
    for k, path in enumerate(study.files):
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2, 3])[0]
        np.testing.assert_array_equal(pixels, np.stack([(mask[..., k] == n).T for n in (1, 2, 3)], axis=-1))
    empty = write_dicom_seg(np.zeros_like(mask), image.affine, study.files, tmp_path / "empty.dcm", names)
    assert hd.seg.segread(empty).number_of_segments == 3


def test_mismatched_masks_raise_input_errors_that_name_no_path_or_header_value(tmp_path):
    folder = tmp_path / factory.PATIENT_NAME.replace("^", "_")
    paths = factory.write_series(folder, np.zeros((4, 20, 24), np.int16))
    _add_frame_of_reference(paths)
    study = _only_study(folder)
    image = load_study(study)
    good = np.zeros(image.array.shape, np.uint8)
    flipped_affine = image.affine @ np.diag([1.0, 1.0, 2.0, 1.0])  # half the slice spacing
    cases = [
        (np.zeros((24, 20, 5), np.uint8), image.affine, NAMES),  # one slice too many
        (np.zeros((24, 20, 3), np.uint8), image.affine, NAMES),  # one slice too few
        (np.zeros((20, 24, 4), np.uint8), image.affine, NAMES),  # rows and columns swapped
        (good[..., 0], image.affine, NAMES),  # 2D mask for a volume
        (good + 3, image.affine, NAMES),  # a label without a name
        (good, flipped_affine, NAMES),  # another grid
        (good, image.affine, []),
    ]
    for mask, affine, names in cases:
        with pytest.raises(InputError) as refused:
            write_dicom_seg(mask, affine, study.files, tmp_path / "seg.dcm", names)
        message = str(refused.value)
        assert str(tmp_path) not in message and "DOE" not in message and factory.PATIENT_ID not in message
        assert refused.value.__cause__ is None
    assert not (tmp_path / "seg.dcm").exists()


def test_a_series_with_an_empty_character_set_gets_its_seg(tmp_path):
    """Real scanners write SpecificCharacterSet empty (the default repertoire); highdicom refused it."""
    paths = factory.write_series(tmp_path / "ct", np.arange(6 * 20 * 24, dtype=np.int16).reshape(6, 20, 24))
    _add_frame_of_reference(paths)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ""
        ds.save_as(path)
    study = _only_study(tmp_path / "ct")
    loaded = load_study(study)
    mask = _two_boxes(loaded.array.shape)
    seg = hd.seg.segread(write_dicom_seg(mask, loaded.affine, study.files, tmp_path / "seg.dcm", ["a", "b"]))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(paths[0]).SeriesInstanceUID
    assert "SpecificCharacterSet" in pydicom.dcmread(paths[0])  # the source files are left as they were


def test_the_shared_real_ct_series_gets_its_seg(shared_data, tmp_path):
    found, _ = discover(shared_data / "dicom" / "ct_liver_3slice", progress=False)
    series = [s for s in found if s.kind == "dicom_series"]
    assert series, "the shared CT series must be found"
    loaded = load_study(series[0])
    mask = np.zeros(loaded.array.shape, np.uint8)
    mask[100:200, 150:300, :] = 1
    seg = hd.seg.segread(write_dicom_seg(mask, loaded.affine, series[0].files, tmp_path / "seg.dcm", ["liver"]))
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series[0].files],
        segment_numbers=[1], combine_segments=True)
    np.testing.assert_array_equal(frames, mask.transpose(2, 1, 0))
