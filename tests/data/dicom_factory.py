"""Write small, real DICOM files with pydicom for the data-layer tests.

Every file carries fake but realistic identifying values (name, IDs, dates, institution) so the
tests can check that none of them leaks into reasons, logs or outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PAT-7731"
BIRTH_DATE = "19610314"
STUDY_DATE = "20190722"
INSTITUTION = "Saint Example Hospital"
ACCESSION = "ACC99812"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def uid(seed: str) -> str:
    """A deterministic UID (2.25.<int>) derived from a seed string."""
    return generate_uid(prefix=None, entropy_srcs=[seed])


def base_dataset(*, sop_class: str, series_uid: str, study_uid: str, modality: str, instance: str) -> Dataset:
    """A dataset with patient/study/series identity and a file meta header."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = "058Y"
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = "101500"
    ds.AccessionNumber = ACCESSION
    ds.InstitutionName = INSTITUTION
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 3000"
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    return ds


def write_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    spacing: tuple[float, float] = (0.8, 0.7),
    series_uid: str,
    study_uid: str,
    instance_number: int = 1,
    modality: str = "CT",
    rescale: tuple[float, float] | None = (1.0, -1024.0),
) -> Path:
    """One CT/MR slice; `pixels` is (rows, columns) int16 or uint16."""
    ds = base_dataset(
        sop_class=CTImageStorage,
        series_uid=series_uid,
        study_uid=study_uid,
        modality=modality,
        instance=uid(f"{series_uid}/{path.name}/{instance_number}/{tuple(position)}"),
    )
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = 1.0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.set_pixel_data(np.ascontiguousarray(pixels), "MONOCHROME2", 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    orientation: Sequence[float] = AXIAL,
    step: Sequence[float] | None = None,
    slice_gap: float = 2.5,
    spacing: tuple[float, float] = (0.8, 0.7),
    series_uid: str | None = None,
    study_uid: str | None = None,
    names: Sequence[str] | None = None,
    instance_numbers: Sequence[int] | None = None,
    modality: str = "CT",
    positions: Sequence[Sequence[float]] | None = None,
) -> list[Path]:
    """Write `volume` (slices, rows, columns) as one file per slice, slice k at origin + k * step.

    `step` defaults to the slice normal times `slice_gap`; `positions[k]`, when given, places
    slice k instead (uneven spacing). `names[k]` and `instance_numbers[k]` (defaults: "k.dcm",
    k + 1) let tests scramble both.
    """
    orientation = np.asarray(orientation, dtype=float)
    if step is None:
        step = np.cross(orientation[:3], orientation[3:]) * slice_gap
    series_uid = series_uid or uid(f"series/{folder}")
    study_uid = study_uid or uid("study/1")
    paths = []
    for k, pixels in enumerate(volume):
        position = np.asarray(origin, dtype=float) + k * np.asarray(step, dtype=float)
        if positions is not None:
            position = np.asarray(positions[k], dtype=float)
        name = names[k] if names is not None else f"{k}.dcm"
        number = instance_numbers[k] if instance_numbers is not None else k + 1
        paths.append(
            write_slice(
                folder / name,
                pixels,
                position=position,
                orientation=orientation,
                spacing=spacing,
                series_uid=series_uid,
                study_uid=study_uid,
                instance_number=number,
                modality=modality,
            )
        )
    return paths


def write_radiograph(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME1",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    modality: str = "CR",
    imager_spacing: tuple[float, float] | None = (0.15, 0.2),
) -> Path:
    """A single-frame projection radiograph; `pixels` is (rows, columns) uint16."""
    series_uid = uid(f"cr-series/{path}")
    ds = base_dataset(
        sop_class=ComputedRadiographyImageStorage,
        series_uid=series_uid,
        study_uid=uid("study/cr"),
        modality=modality,
        instance=uid(f"cr/{path}"),
    )
    ds.BodyPartExamined = "CHEST"
    if imager_spacing:
        ds.ImagerPixelSpacing = list(imager_spacing)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.set_pixel_data(np.ascontiguousarray(pixels.astype(np.uint16)), photometric, bits_stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_multiframe(
    path: Path,
    volume: np.ndarray,
    positions: Sequence[Sequence[float]],
    *,
    orientation: Sequence[float] = AXIAL,
    spacing: tuple[float, float] = (0.5, 0.6),
) -> Path:
    """An enhanced CT file: `volume` (frames, rows, columns) with per-frame positions."""
    ds = base_dataset(
        sop_class=EnhancedCTImageStorage,
        series_uid=uid(f"mf-series/{path}"),
        study_uid=uid("study/mf"),
        modality="CT",
        instance=uid(f"mf/{path}"),
    )
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(spacing)
    measures.SliceThickness = 1.0
    plane = Dataset()
    plane.ImageOrientationPatient = list(orientation)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 1.0, -1024.0
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for position in positions:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in position]
        item.PlanePositionSequence = DicomSequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.set_pixel_data(np.ascontiguousarray(volume), "MONOCHROME2", 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_headerless(path: Path, pixels: np.ndarray) -> Path:
    """An old-style file: implicit VR little endian, no preamble, no file meta header."""
    ds = base_dataset(
        sop_class=ComputedRadiographyImageStorage,
        series_uid=uid(f"nometa/{path}"),
        study_uid=uid("study/nometa"),
        modality="CR",
        instance=uid(f"nometa-instance/{path}"),
    )
    ds.set_pixel_data(np.ascontiguousarray(pixels.astype(np.uint16)), "MONOCHROME2", 12)
    del ds.file_meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def write_structured_report(path: Path) -> Path:
    """A Basic Text SR (valid DICOM, no pixels)."""
    ds = base_dataset(
        sop_class="1.2.840.10008.5.1.4.1.1.88.11",
        series_uid=uid(f"sr/{path}"),
        study_uid=uid("study/1"),
        modality="SR",
        instance=uid(f"sr-instance/{path}"),
    )
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.ContentDate = STUDY_DATE
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_cine(path: Path, n_frames: int = 120, *, time_vector: bool = False) -> Path:
    """An ultrasound cine loop: `n_frames` 8-bit frames that are time points, not positions.

    Frame timing as scanners write it: FrameIncrementPointer -> FrameTime (33.3 ms, CineRate 30),
    or -> FrameTimeVector with `time_vector`. No ImagePositionPatient, no slice spacing.
    """
    ds = base_dataset(
        sop_class=UltrasoundMultiFrameImageStorage,
        series_uid=uid(f"us-series/{path}"),
        study_uid=uid("study/us"),
        modality="US",
        instance=uid(f"us/{path}"),
    )
    frames = (np.arange(n_frames)[:, None, None] + np.zeros((1, 12, 16))).astype(np.uint8)
    ds.set_pixel_data(frames, "MONOCHROME2", 8)
    ds.CineRate = 30
    if time_vector:
        ds.FrameIncrementPointer = Tag("FrameTimeVector")
        ds.FrameTimeVector = [0.0] + [33.3] * (n_frames - 1)
    else:
        ds.FrameIncrementPointer = Tag("FrameTime")
        ds.FrameTime = 33.3
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_multiframe_without_geometry(path: Path, n_frames: int = 5) -> Path:
    """A multi-frame secondary capture: no positions, no orientation, no slice spacing, no timing."""
    ds = base_dataset(
        sop_class=MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        series_uid=uid(f"sc-series/{path}"),
        study_uid=uid("study/sc"),
        modality="OT",
        instance=uid(f"sc/{path}"),
    )
    frames = (np.arange(n_frames)[:, None, None] * 10 + np.zeros((1, 6, 7))).astype(np.uint8)
    ds.set_pixel_data(frames, "MONOCHROME2", 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_reencoded(source: Path, path: Path, transfer_syntax: str, **encoding: object) -> Path:
    """Save `source` again under `path` in another transfer syntax (same SOPInstanceUID).

    Encapsulated syntaxes go through pydicom's encoders (`Dataset.compress`: RLE always, JPEG 2000
    with pylibjpeg-openjpeg, JPEG-LS with pyjpegls); deflated explicit VR little endian is written
    by `save_as` itself.
    """
    ds = pydicom.dcmread(source)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.compress(transfer_syntax, generate_instance_uid=False, **encoding)  # a copy, not a new instance
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- masks over a series: DICOM SEG (highdicom) and RTSTRUCT (pydicom) -----------------------------


def write_referenced_series(folder: Path, volume: np.ndarray, **series: object) -> list[Path]:
    """`write_series` plus what a mask object needs of its source: FrameOfReferenceUID and the Type 2
    attributes highdicom copies (StudyID, ReferringPhysicianName)."""
    paths = write_series(folder, volume, **series)
    frame_of_reference = uid(f"for/{folder}")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.StudyID, ds.ReferringPhysicianName, ds.StudyTime = "1", "", "101500"
        ds.save_as(path, enforce_file_format=True)
    return paths


def write_seg(
    path: Path, source_paths: Sequence[Path], segments: np.ndarray, names: Sequence[str], *, fractional: bool = False
) -> Path:
    """A DICOM SEG written by highdicom: `segments` is (slices, rows, columns, segments), slice k drawn
    on `source_paths[k]`; values 0/1, or 0.0-1.0 with `fractional`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="test", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(names, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(p) for p in source_paths],
        pixel_array=segments.astype(np.float32 if fractional else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="0",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def edit_seg_frames(path: Path, *, order: Sequence[int] | None = None, shift: Sequence[float] | None = None) -> Path:
    """Rewrite a SEG in place with its frames stored in `order` and/or every frame's
    ImagePositionPatient moved by `shift` (LPS mm), pixels and per-frame items kept together."""
    from pydicom.pixels import pack_bits

    ds = pydicom.dcmread(path)
    items = list(ds.PerFrameFunctionalGroupsSequence)
    if order is not None:
        frames = ds.pixel_array.reshape(len(items), ds.Rows, ds.Columns)[list(order)]
        ds.PerFrameFunctionalGroupsSequence = DicomSequence([items[i] for i in order])
        ds.PixelData = pack_bits(frames) if ds.BitsAllocated == 1 else frames.tobytes()
    if shift is not None:
        for item in ds.PerFrameFunctionalGroupsSequence:
            plane = item.PlanePositionSequence[0]
            plane.ImagePositionPatient = [float(v) + float(s) for v, s in zip(plane.ImagePositionPatient, shift, strict=True)]
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtstruct(path: Path, source_paths: Sequence[Path], rois: dict[str, np.ndarray]) -> Path:
    """An RTSTRUCT whose ROIs are the outlines of `rois` (name -> (slices, rows, columns) masks, slice k on
    `source_paths[k]`): `skimage.measure.find_contours` at 0.5 per slice (holes give inner contours),
    pixel (row, column) -> patient LPS mm through each source slice's position, orientation and spacing."""
    from skimage.measure import find_contours

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]
    first = sources[0]
    ds = base_dataset(sop_class="1.2.840.10008.5.1.4.1.1.481.3", series_uid=uid(f"rt-series/{path}"),
                      study_uid=first.StudyInstanceUID, modality="RTSTRUCT", instance=uid(f"rt/{path}"))
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "test", STUDY_DATE, "101500"
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    images = [_contour_image(s) for s in sources]
    series, study, frame = Dataset(), Dataset(), Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, DicomSequence(images)
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    structure, outlines, observations = [], [], []
    for number, (name, mask) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, first.FrameOfReferenceUID, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        structure.append(roi)
        contours = []
        for k, source in enumerate(sources):
            origin = np.asarray(source.ImagePositionPatient, dtype=float)
            row_dir = np.asarray(source.ImageOrientationPatient[:3], dtype=float)
            col_dir = np.asarray(source.ImageOrientationPatient[3:], dtype=float)
            row_mm, col_mm = (float(v) for v in source.PixelSpacing)
            for line in find_contours(np.pad(mask[k], 1).astype(float), 0.5):
                rows, cols = line[:, 0] - 1, line[:, 1] - 1
                points = origin + np.outer(cols * col_mm, row_dir) + np.outer(rows * row_mm, col_dir)
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([_contour_image(source)])
                contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
                contour.ContourData = [round(float(v), 4) for v in points.ravel()]
                contours.append(contour)
        outline = Dataset()
        outline.ReferencedROINumber, outline.ROIDisplayColor = number, [255, 0, 0]
        outline.ContourSequence = DicomSequence(contours)
        outlines.append(outline)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(structure)
    ds.ROIContourSequence = DicomSequence(outlines)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _contour_image(source: Dataset) -> Dataset:
    image = Dataset()
    image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    return image
