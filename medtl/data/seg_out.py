"""Write a label map predicted on a DICOM study back as a DICOM Segmentation (SEG) of that study.

The mask is on the grid `load_study` gives: (columns, rows[, slices]) with a voxel-to-RAS affine,
slices ordered along the normal and a gantry-tilted stack resampled (`medtl.data.reader`). Each
SEG frame is matched to its source frame by geometry, not by list position: the source frame's
ImagePositionPatient and ImageOrientationPatient (LPS) are carried through the inverse affine to
voxel indices, so any file order, any orientation and flipped or permuted mask axes map right.
A single-frame image without such geometry (a radiograph) is the (columns, rows) array transposed.

The SEG carries the source's patient and study identifiers by design (it belongs next to the
study); nothing here logs or prints a header value or a path, and errors name neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medtl import __version__
from medtl.data import dicom
from medtl.data.deid import quiet_pydicom
from medtl.errors import InputError

# A generic property for every class: the segment label carries what the class is.
_CATEGORY = codes.SCT.Tissue
_PROPERTY_TYPE = codes.SCT.Tissue
_SERIES_NUMBER = 900  # a fixed number well clear of the series scanners write
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GRID_ATOL = 0.1  # voxels: a source frame farther than this from a mask slice is on another grid
_AXIS_ATOL = 1e-2  # one pixel step must be one voxel step along one mask axis, to this tolerance
_LO_MAX = 64  # characters of a DICOM LO value (segment labels, series description)
# Type 2 attributes (present, possibly empty) highdicom copies from the source into the SEG; files
# from anonymisers and some scanners leave them out.
_TYPE2_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)


@dataclass(frozen=True)
class _Frame:
    """One source frame's pixel grid in LPS mm: first pixel, row and column directions, spacing."""

    position: np.ndarray
    orientation: tuple[float, ...]
    spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int


@dataclass(frozen=True)
class _Placement:
    """Where a source frame lies in the mask, in voxels."""

    start: np.ndarray  # voxel coordinates of the frame's first pixel
    axes: tuple[int, int, int]  # mask axes along a row (across columns), down a column, along the normal
    slice_index: int
    signs: tuple[int, int]  # +1 when the mask index grows with the column / row number, else -1


def write_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[Path],
    out_path: Path,
    segment_names: Sequence[str],
    *,
    series_description: str = "medtl segmentation",
) -> Path:
    """Save a label map as a BINARY DICOM SEG that references the source series, frame by frame.

    Args:
        mask: Integer label map (0 background, k for class k = 1..len(segment_names)) on the
            grid `load_study` gives for these files: (columns, rows, slices), or (columns, rows)
            for a single image.
        affine: The voxel-to-RAS affine of that grid (`LoadedImage.affine`).
        source_files: The study's DICOM files (`Study.files`): one series, or one file.
        out_path: Where to write the SEG; missing parent folders are created.
        segment_names: One label per class (at most 64 characters each), class 1 first.
        series_description: SeriesDescription of the SEG (at most 64 characters).

    Returns:
        `out_path`.

    Raises:
        InputError: If the mask is not a label map of these classes, does not lie on the grid of
            the source frames (shape, slice count or geometry differ), or the files are not one
            readable image series. Messages name no path and no header value.

    Example:
        >>> image = load_study(study)  # doctest: +SKIP
        >>> write_dicom_seg(labels, image.affine, study.files, Path("out/seg.dcm"), ["liver"])  # doctest: +SKIP
    """
    _check_texts(segment_names, series_description)
    labels = _label_map(mask, len(segment_names))
    datasets = _read_headers(source_files)
    frames = _source_frames(labels, np.asarray(affine, dtype=np.float64), datasets)
    seg = _segmentation(datasets, frames, segment_names, series_description)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with quiet_pydicom():
        seg.save_as(out_path)
    return Path(out_path)


def _check_texts(segment_names: Sequence[str], series_description: str) -> None:
    """Segment labels and the series description must fit a DICOM LO value."""
    if isinstance(segment_names, str) or not segment_names:
        raise InputError("segment_names must be a non-empty list of class names, not a single string or "
                         "an empty list; pass one name per class, class 1 first")
    for text in (*segment_names, series_description):
        if not isinstance(text, str) or not text.strip() or len(text) > _LO_MAX or "\\" in text:
            raise InputError(f"segment names and the series description must be non-empty text of at most "
                             f"{_LO_MAX} characters without backslashes; shorten or rename them")


def _label_map(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """The mask as uint8/uint16 labels 0..n_classes, or an InputError."""
    values = np.asarray(mask)
    if values.ndim not in (2, 3) or values.size == 0:
        raise InputError(f"the mask must be a 2D or 3D label map, not an array of {values.ndim} dimensions "
                         "or an empty one; drop channel and batch axes first")
    if values.dtype.kind not in ("b", "i", "u", "f") or (values.dtype.kind == "f" and not np.all(np.isfinite(values))):
        raise InputError("the mask must hold integer labels, not another data type or NaN; take the argmax "
                         "of the model output first")
    if np.any(values != np.round(values)) or values.min() < 0 or values.max() > n_classes:
        raise InputError(f"the mask must hold whole labels 0..{n_classes} (one per segment name), not "
                         "fractions or larger labels; name every class in segment_names")
    return values.astype(np.uint8 if n_classes < 256 else np.uint16)


def _read_headers(source_files: Sequence[Path]) -> list[Dataset]:
    """Headers of the source files (no pixels), checked to be one image series."""
    if isinstance(source_files, (str, Path)) or not source_files:
        raise InputError("source_files must be the list of a study's DICOM files (Study.files), not one path "
                         "or an empty list")
    try:
        datasets = [dicom.read_dataset(Path(path), pixels=False) for path in source_files]
        with quiet_pydicom():
            series = {(str(ds.get("SeriesInstanceUID", "")), str(ds.get("FrameOfReferenceUID", ""))) for ds in datasets}
            frames = [dicom.number_of_frames(ds) for ds in datasets]
            sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    except Exception as err:  # noqa: BLE001 - pydicom's messages can quote a path or a header value
        raise InputError(f"the source files must be readable DICOM images, not failing with "
                         f"{type(err).__name__}; pass the files of one study from discover()") from None
    if len(series) != 1 or not next(iter(series))[0] or len(sizes) != 1 or (len(datasets) > 1 and max(frames) > 1):
        raise InputError("the source files must be one series of equally sized single-frame images or one "
                         "image file, not several series or frames of reference; pass the files of one study from discover()")
    for ds in datasets:
        for keyword in _TYPE2_KEYWORDS:
            if keyword not in ds:
                setattr(ds, keyword, "")  # in memory only, as a conforming file would have it
        # An empty SpecificCharacterSet means the default repertoire (PS3.3 C.12.1.1.2); highdicom
        # refuses the empty value that real scanners write, so it is removed, in memory only.
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet
    return datasets


def _source_frames(labels: np.ndarray, affine: np.ndarray, datasets: list[Dataset]) -> np.ndarray:
    """The mask resampled onto every source frame, (frames, rows, columns) in source order.

    Frame i belongs to `datasets[i]` (a series) or to frame i of the one multi-frame file, the
    pairing highdicom expects when no plane positions are given.
    """
    n_frames = dicom.number_of_frames(datasets[0])
    if len(datasets) == 1 and n_frames == 1 and (labels.ndim == 2 or labels.shape[2:] == (1,)):
        return _single_image(labels.reshape(labels.shape[:2]), datasets[0])
    if labels.ndim != 3:
        raise InputError("the mask of a multi-slice source must be a 3D (columns, rows, slices) label map, "
                         "not 2D; predict on the whole volume load_study returns")
    inverse = np.linalg.inv(affine)
    placed = [_place(grid, inverse, labels.shape) for grid in _frame_grids(datasets, n_frames)]
    depth = labels.shape[placed[0].axes[2]]
    if sorted(place.slice_index for place in placed) != list(range(depth)):
        raise InputError(f"the mask must have one slice per source frame, not {depth} slices or slices "
                         "elsewhere; use the array grid and affine of load_study")
    return np.stack([_frame_values(labels, place) for place in placed])


def _single_image(labels: np.ndarray, ds: Dataset) -> np.ndarray:
    """A single image: the loader's (columns, rows) array is the pixel matrix transposed."""
    expected = (int(ds.Columns), int(ds.Rows))
    if labels.shape != expected:
        raise InputError(f"the mask of a single image must be (columns, rows) like the image, not {labels.shape}; "
                         "use the array grid of load_study")
    return labels.T[None]


def _frame_grids(datasets: list[Dataset], n_frames: int) -> list[_Frame]:
    """The pixel grid of every source frame, in source order, or an InputError."""
    grids = []
    for ds in datasets:
        with quiet_pydicom():
            orientation, positions, spacing = dicom.frame_geometry(ds, n_frames)
            shape = (int(ds.Rows), int(ds.Columns))
            frame_of_reference = ds.get("FrameOfReferenceUID")
        if orientation is None or positions is None or len(positions) != n_frames:
            raise InputError("every source frame must carry its position and orientation to place a SEG frame, "
                             "not lack them; export the series with ImagePositionPatient per slice")
        if not frame_of_reference:
            raise InputError("source images with positions must carry a FrameOfReferenceUID, not lack it: the SEG "
                             "must share their frame of reference; export the series with it")
        grids.extend(_Frame(np.asarray(p, dtype=np.float64), orientation, spacing or (1.0, 1.0), *shape)
                     for p in positions)
    return grids


def _place(grid: _Frame, inverse: np.ndarray, shape: tuple[int, ...]) -> _Placement:
    """Where a source frame's pixels lie in the mask, or an InputError if not on its voxels."""
    start = inverse[:3, :3] @ (_LPS_TO_RAS @ grid.position) + inverse[:3, 3]
    across = inverse[:3, :3] @ (_LPS_TO_RAS @ np.asarray(grid.orientation[:3])) * grid.spacing[1]
    down = inverse[:3, :3] @ (_LPS_TO_RAS @ np.asarray(grid.orientation[3:6])) * grid.spacing[0]
    col_axis, row_axis = int(np.argmax(np.abs(across))), int(np.argmax(np.abs(down)))
    unit_steps = [np.allclose(np.abs(across), np.eye(3)[col_axis], atol=_AXIS_ATOL),
                  np.allclose(np.abs(down), np.eye(3)[row_axis], atol=_AXIS_ATOL)]
    if not all(unit_steps) or col_axis == row_axis:
        raise InputError("the affine must map source pixels one-to-one onto mask voxels, not at another "
                         "spacing or orientation; pass the affine load_study returned with the mask")
    normal_axis = 3 - col_axis - row_axis
    slice_index = int(np.rint(start[normal_axis]))
    if abs(start[normal_axis] - slice_index) > _GRID_ATOL:
        raise InputError("source frames must lie on mask slices, not between them; use the array grid and "
                         "affine of load_study")
    # Only the loader's gantry-tilt resampling shifts slices within the plane, and never slice 0.
    if slice_index == 0 and np.any(np.abs(start - np.rint(start)) > _GRID_ATOL):
        raise InputError("the first mask slice must lie on its source frame's pixels, not be shifted within "
                         "the plane; pass the affine load_study returned with the mask")
    if (shape[col_axis], shape[row_axis]) != (grid.columns, grid.rows):
        raise InputError(f"the mask must have as many columns and rows per slice as the source images, not "
                         f"{shape[col_axis]} and {shape[row_axis]}; use the array grid of load_study")
    signs = (int(np.sign(across[col_axis])), int(np.sign(down[row_axis])))
    return _Placement(start, (col_axis, row_axis, normal_axis), slice_index, signs)


def _frame_values(labels: np.ndarray, place: _Placement) -> np.ndarray:
    """The labels under a source frame's pixels, (rows, columns), nearest voxel, 0 outside the mask.

    Only gantry-tilted stacks (resampled in-plane by the loader) land between voxels or outside.
    """
    col_axis, row_axis, _ = place.axes
    plane = np.moveaxis(labels, (row_axis, col_axis), (0, 1)).take(place.slice_index, axis=2)
    cols = np.rint(place.start[col_axis] + place.signs[0] * np.arange(plane.shape[1])).astype(int)
    rows = np.rint(place.start[row_axis] + place.signs[1] * np.arange(plane.shape[0])).astype(int)
    inside_rows, inside_cols = (rows >= 0) & (rows < plane.shape[0]), (cols >= 0) & (cols < plane.shape[1])
    frame = np.zeros_like(plane)
    frame[np.ix_(inside_rows, inside_cols)] = plane[np.ix_(rows[inside_rows], cols[inside_cols])]
    return frame


def _segmentation(datasets: list[Dataset], frames: np.ndarray, names: Sequence[str],
                  series_description: str) -> hd.seg.Segmentation:
    """The highdicom SEG of label frames paired with the source frames."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medtl", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=_CATEGORY,
            segmented_property_type=_PROPERTY_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(names, start=1)
    ]
    try:
        with quiet_pydicom():
            return hd.seg.Segmentation(
                source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=_SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medtl", manufacturer_model_name="medtl",
                software_versions=__version__, device_serial_number="0", series_description=series_description,
                omit_empty_frames=bool(frames.any()),  # highdicom refuses a SEG with no frames at all
            )
    except Exception as err:  # noqa: BLE001 - highdicom's messages can quote header values
        raise InputError(f"the source images must be ones highdicom can segment, not failing with "
                         f"{type(err).__name__}; check that they are one image series") from None

