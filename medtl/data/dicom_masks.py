"""Label maps from DICOM SEG and RTSTRUCT objects, on the grid of the image series they reference.

The label map has the layout `load_study` gives the series: (columns, rows, slices), slices ordered
along the normal by `geometry.order_stack` (a one-file series gives (columns, rows)), so
`labels[i, j, k]` is the class of voxel (i, j, k) of the loaded image.

SEG frames are placed by the source instance each frame references and, when it carries one, by its
ImagePositionPatient, which must fall on a series slice: frames in any order are fine, frames off
the series grid are refused. The pixels come from highdicom (`Segmentation.get_stored_frame`, any
transfer syntax, BINARY bits unpacked); its `get_pixels_by_source_instance` is not used because it
matches frames by SOPInstanceUID only and never checks where a frame lies.

RTSTRUCT contours are rasterised here on pydicom + scikit-image rather than with rt-utils, which pins
its own pydicom/numpy/OpenCV versions and fills through OpenCV: each CLOSED_PLANAR contour goes to
the slice within half a slice spacing of its plane, patient mm -> pixel indices through the
slice's position, orientation and spacing, filled with `skimage.draw.polygon` (pixel centres
inside), and the contours of one ROI on one slice combine by the even-odd (XOR) rule, so an inner
contour is a hole, as RTSTRUCT viewers draw it. Other contour types (POINT, OPEN_PLANAR) hold no
area and are left out.

Segment labels and ROI names are free text that may identify a patient: no message and no log
record here quotes one, or any other header value; errors name the mask file by its file name and
give counts. The names not in `segment_map` are returned to the caller, who passes them through the
PHI guard before showing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from skimage.draw import polygon

from medtl.data import dicom, geometry
from medtl.data.deid import quiet_pydicom
from medtl.errors import InputError

SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})  # SEG, label map SEG
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# A SEG frame must lie on a source slice to within this fraction of the smallest voxel edge.
_GRID_FRACTION = 0.1
_ORIENTATION_ATOL = 1e-3
_SPACING_RTOL = 1e-3
_ABSENT = "the referenced series is absent"
_HOW_SERIES = "check that the image series given (a labels CSV row's path) is the one the mask was drawn on"


@dataclass(frozen=True)
class _Grid:
    """The series' slices in `order_stack` order, with the geometry shared by all of them (LPS mm)."""

    sop_uids: tuple[str, ...]
    series_uid: str
    origins: np.ndarray  # (slices, 3): ImagePositionPatient of each slice
    orientation: tuple[float, ...]
    spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    gap: float  # slice distance along the normal; SliceThickness for a one-file series

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    def slice_at(self, point: np.ndarray, tolerance: float) -> int | None:
        """The slice whose plane lies within `tolerance` mm of `point` along the normal, or None."""
        depth = (point - self.origins) @ self.normal
        k = int(np.argmin(np.abs(depth)))
        return k if abs(depth[k]) <= tolerance else None


def mask_kind(path: Path) -> str | None:
    """Whether a file is a DICOM SEG ("seg"), an RTSTRUCT ("rtstruct") or neither (None).

    Decided from the SOP Class UID; only the header is read.

    Example:
        >>> mask_kind(Path("liver.dcm"))  # doctest: +SKIP
        'seg'
    """
    try:
        ds = dicom.read_dataset(Path(path), pixels=False)
        with quiet_pydicom():
            sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    except Exception:  # noqa: BLE001 - not readable as DICOM is "neither"
        return None
    if sop_class in SEG_SOP_CLASSES:
        return "seg"
    return "rtstruct" if sop_class == RTSTRUCT_SOP_CLASS else None


def referenced_series(path: Path) -> str:
    """The SeriesInstanceUID of the image series a SEG or RTSTRUCT was drawn on.

    SEG: ReferencedSeriesSequence, else the source images highdicom finds. RTSTRUCT:
    ReferencedFrameOfReferenceSequence -> RTReferencedStudySequence -> RTReferencedSeriesSequence
    (the first series when it names several).

    Raises:
        InputError: If the file is neither a SEG nor an RTSTRUCT, or names no referenced series.

    Example:
        >>> referenced_series(Path("rt.dcm"))  # doctest: +SKIP
        '1.2.840...'
    """
    path = Path(path)
    kind = _kind_or_refuse(path)
    if kind == "seg":
        uids = _seg_series_uids(path)
    else:
        uids = _rt_references(_read(path))[0]
    if not uids:
        raise InputError(f"{path.name} must name the image series it was drawn on, not leave its reference out; "
                         "export the mask again with its source series referenced")
    return uids[0]


def label_map(
    mask_path: Path, series_files: Sequence[Path], segment_map: Mapping[str, int], *, name: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """The label map of a DICOM SEG or RTSTRUCT on the grid of the series it references.

    Each SEG segment (SegmentLabel) or RTSTRUCT ROI (ROIName) gets the class `segment_map` gives its
    name, names compared without regard to case and spacing ("Liver" and "liver " are "liver").
    Names not in the map stay 0 and are returned, never guessed. FRACTIONAL SEG frames are
    thresholded at half their maximum fractional value (value / MaximumFractionalValue >= 0.5).

    Args:
        mask_path: The SEG or RTSTRUCT file.
        series_files: The files of the image series it references (single-frame images, any order).
        segment_map: Segment or ROI name -> class index (0-255; 0 keeps a known name as background).
        name: How errors call the mask file (default its file name; a manifest build passes "the
            mask of labels CSV row 7", as a file name can identify a patient).

    Returns:
        (labels, unknown): uint8 labels, (columns, rows, slices) as `load_study` loads the series
        ((columns, rows) for one file), and the segment/ROI names not in `segment_map`, as written
        in the file (free text: pass them through the PHI guard before showing them).

    Raises:
        InputError: naming the mask file, when it is neither SEG nor RTSTRUCT; when images it
            references are not among `series_files` (the referenced series is absent); when frames
            or contours do not lie on the series grid (position, orientation, pixel spacing, size);
            when segments mapped to different classes overlap; or when the series files are not one
            untilted stack.

    Example:
        >>> labels, unknown = label_map(Path("liver.dcm"), study.files, {"liver": 1})  # doctest: +SKIP
        >>> labels.shape, unknown
        ((512, 512, 3), [])
    """
    mask_path = Path(mask_path)
    try:
        kind = _kind_or_refuse(mask_path)
        classes = _class_lookup(segment_map)
        grid = _series_grid(series_files)
        if kind == "seg":
            labels, unknown = _seg_labels(mask_path, grid, classes)
        else:
            labels, unknown = _rtstruct_labels(mask_path, grid, classes)
    except InputError as err:
        message = str(err)
        if name is None or not message.startswith(mask_path.name):
            raise
        raise InputError(name + message[len(mask_path.name):]) from None
    volume = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (slices, rows, columns) -> load_study's layout
    return (volume[:, :, 0] if len(grid.sop_uids) == 1 else volume), list(dict.fromkeys(unknown))


# --- shared steps -------------------------------------------------------------------------------


def _normalised(name: object) -> str:
    return " ".join(str(name).split()).casefold()


def check_segment_map(segment_map: Mapping[str, int]) -> dict[str, int]:
    """`segment_map` with names as `label_map` compares them, checked to give one class 0-255 per name.

    Raises:
        InputError: If it is not a mapping, a value is not a class index, or two names that differ
            only in case or spacing map to different classes.
    """
    return _class_lookup(segment_map)


def _class_lookup(segment_map: Mapping[str, int]) -> dict[str, int]:
    """`segment_map` with normalised names, checked to give one uint8 class per name."""
    if not isinstance(segment_map, Mapping):
        raise InputError(f"segment_map must be a mapping of names to class indices, not {type(segment_map).__name__}; "
                         "pass e.g. {'liver': 1}")
    lookup: dict[str, int] = {}
    for name, index in segment_map.items():
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= int(index) <= 255:
            raise InputError("segment_map values must be class indices 0-255, not other values; "
                             "give each name a whole class number")
        key = _normalised(name)
        if lookup.get(key, int(index)) != int(index):
            raise InputError("segment_map keys that differ only in case or spacing must map to one class, not "
                             "several; merge them")
        lookup[key] = int(index)
    return lookup


def _series_grid(series_files: Sequence[Path]) -> _Grid:
    """The series' slices ordered as medtl orders a series, checked to be one untilted stack."""
    if isinstance(series_files, str | Path) or not series_files:
        raise InputError("series_files must be the list of the series' DICOM files, not one path or an empty list")
    slices = []
    for path in series_files:
        try:
            ds = dicom.read_dataset(Path(path), pixels=False)
            with quiet_pydicom():
                single = dicom.number_of_frames(ds) == 1
                orientation, positions, spacing = dicom.frame_geometry(ds, 1)
                facts = (str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                         int(ds.Rows), int(ds.Columns), dicom.slice_spacing(ds))
        except Exception as err:  # noqa: BLE001 - pydicom's messages can quote header values
            # Series file k by its place, not its name: image file names can carry a patient's name.
            raise InputError(f"series file {len(slices) + 1} of {len(series_files)} must be a readable DICOM image, "
                             f"not failing with {type(err).__name__}; {_HOW_SERIES}") from None
        if not single or orientation is None or positions is None:
            raise InputError(f"series file {len(slices) + 1} of {len(series_files)} must be a single-frame image "
                             f"with position and orientation, not lack them; {_HOW_SERIES}")
        slices.append((orientation, positions[0], spacing or (1.0, 1.0), *facts))
    orientation, _, spacing, _, series_uid, rows, columns, thickness = slices[0]
    if any(
        s[4] != series_uid or (s[5], s[6]) != (rows, columns) or not np.allclose(s[0], orientation, atol=_ORIENTATION_ATOL)
        or not np.allclose(s[2], spacing, rtol=_SPACING_RTOL) for s in slices
    ):
        raise InputError("series_files must be one series of equally sized, equally oriented slices, not a mix; "
                         f"{_HOW_SERIES}")
    order, gap = (0,), float(thickness or min(spacing))
    if len(slices) > 1:
        stack = geometry.order_stack(orientation, [s[1] for s in slices])
        if isinstance(stack, str):
            raise InputError(f"series_files must form one stack of slices, not: {stack}")
        if stack.tilt >= geometry.TILT_MIN_DEG:
            raise InputError(f"series_files must form an untilted stack, not one with gantry tilt {stack.tilt:.1f}°: "
                             "load_study resamples such a stack, so a mask drawn on its slices would not align")
        normal = np.cross(orientation[:3], orientation[3:])
        order, gap = stack.order, float(abs(np.asarray(stack.step) @ normal))
    picked = [slices[k] for k in order]
    return _Grid(tuple(s[3] for s in picked), series_uid, np.asarray([s[1] for s in picked], dtype=np.float64),
                 tuple(orientation), tuple(spacing), rows, columns, gap)


def _check_references(path: Path, series_uids: Sequence[str], sop_uids: set[str], grid: _Grid) -> None:
    """Refuse a mask whose referenced series or images are not the given series files."""
    if not series_uids and not sop_uids:
        raise InputError(f"{path.name} must reference the images it was drawn on, not leave them out; export the "
                         "mask again with its source series referenced")
    if series_uids and grid.series_uid not in series_uids:
        raise InputError(f"{path.name}: {_ABSENT}: the series files must be the series the mask references, not "
                         f"another one; {_HOW_SERIES}")
    missing = len(sop_uids - set(grid.sop_uids))
    if missing:
        raise InputError(f"{path.name}: {_ABSENT}: {missing} of {len(sop_uids)} images the mask references are not "
                         f"among the {len(grid.sop_uids)} series files; {_HOW_SERIES}")


def _paint(labels: np.ndarray, k: int, region: np.ndarray, index: int) -> int:
    """Set class `index` on `region` of slice k; the number of voxels another class already held."""
    plane = labels[k]
    clash = int(np.count_nonzero(region & (plane != 0) & (plane != index)))
    plane[region] = index
    return clash


def _refuse_overlap(path: Path, clashes: int) -> None:
    if clashes:
        raise InputError(f"{path.name}: segments mapped to different classes must not overlap in a label map, not "
                         f"share {clashes} voxels; map the overlapping names to one class or leave one out")


# --- SEG ----------------------------------------------------------------------------------------


def _seg_labels(path: Path, grid: _Grid, classes: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """(slices, rows, columns) labels and unknown names of a SEG."""
    with quiet_pydicom():
        try:
            seg = hd.seg.segread(path)
        except Exception as err:  # noqa: BLE001 - highdicom's messages can quote header values
            raise InputError(_unreadable_seg(path, err)) from None
        names = {int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in seg.SegmentSequence}
        per_frame = list(seg.get("PerFrameFunctionalGroupsSequence") or [])
        n_frames = int(seg.number_of_frames)
        if per_frame and len(per_frame) != n_frames:  # which description belongs to which frame is unknown
            raise InputError(f"{path.name}: a SEG must describe each of its frames once, not hold {n_frames} "
                             f"frame(s) of pixel data with {len(per_frame)} per-frame descriptions "
                             f"(NumberOfFrames missing or wrong?); export it again")
        sources = [_frame_sources(item) for item in per_frame]
        uids = _seg_series_uids(path, seg)
        sop_uids = {str(u[2]) for u in seg.get_source_image_uids()} | {s for refs in sources for s in refs}
        _check_references(path, uids, sop_uids, grid)
        placement = _frame_slices(path, seg, n_frames, sources, grid)
        kind = seg.segmentation_type.value
        top = float(seg.get("MaximumFractionalValue") or 1) if kind == "FRACTIONAL" else 1.0
        labels = np.zeros((len(grid.sop_uids), grid.rows, grid.columns), np.uint8)
        unknown = [name for name in names.values() if _normalised(name) not in classes]
        clashes = 0
        for i, k in enumerate(placement):
            values = seg.get_stored_frame(i, as_index=True)
            if kind == "LABELMAP":  # stored values are segment numbers
                for number in np.unique(values[values > 0]):
                    index = classes.get(_normalised(names.get(int(number), "")), 0)
                    clashes += _paint(labels, k, values == number, index) if index else 0
                continue
            index = classes.get(_normalised(names.get(_segment_number(seg, per_frame, i), "")), 0)
            if index:
                clashes += _paint(labels, k, values >= 0.5 * top if kind == "FRACTIONAL" else values > 0, index)
    _refuse_overlap(path, clashes)
    return labels, unknown


def _unreadable_seg(path: Path, err: Exception) -> str:
    """Why highdicom could not read a SEG, without its message (it can quote header values)."""
    with quiet_pydicom():
        try:
            syntax = dicom.read_dataset(path, pixels=False).file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - then there is nothing more to say than the error type
            syntax = None
    if syntax is not None and not syntax.is_little_endian:
        return (f"{path.name} must be a DICOM SEG in a little-endian transfer syntax (highdicom reads no other), not "
                f"big endian; convert it to explicit VR little endian (DCMTK, pydicom) and build again")
    return f"{path.name} must be a DICOM SEG highdicom can read, not one it refuses ({type(err).__name__}); export it again"


def _frame_sources(item: Dataset) -> list[str]:
    """SOPInstanceUIDs a SEG frame was derived from (DerivationImageSequence -> SourceImageSequence)."""
    return [
        str(source.ReferencedSOPInstanceUID)
        for derivation in item.get("DerivationImageSequence") or []
        for source in derivation.get("SourceImageSequence") or []
        if "ReferencedSOPInstanceUID" in source
    ]


def _segment_number(seg: Dataset, per_frame: list[Dataset], i: int) -> int:
    """The segment of frame i: per-frame SegmentIdentificationSequence, else the shared one (one-segment SEGs)."""
    shared = seg.get("SharedFunctionalGroupsSequence") or [Dataset()]
    for item in (per_frame[i] if i < len(per_frame) else Dataset(), shared[0]):
        if item.get("SegmentIdentificationSequence"):
            return int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    return 0


def _seg_series_uids(path: Path, seg: Dataset | None = None) -> list[str]:
    """Series a SEG references: ReferencedSeriesSequence, else highdicom's source image references."""
    header = seg if seg is not None else _read(path)
    with quiet_pydicom():
        uids = [str(item.SeriesInstanceUID) for item in header.get("ReferencedSeriesSequence") or []
                if item.get("SeriesInstanceUID")]
        if not uids:
            try:
                seg = seg if seg is not None else hd.seg.segread(path, lazy_frame_retrieval=True)
                uids = [str(u[1]) for u in seg.get_source_image_uids() if u[1]]
            except Exception as err:  # noqa: BLE001 - highdicom's messages can quote header values
                raise InputError(_unreadable_seg(path, err)) from None
    return list(dict.fromkeys(uids))


def _frame_slices(path: Path, seg: Dataset, n_frames: int, sources: list[list[str]], grid: _Grid) -> list[int]:
    """The series slice of every SEG frame, from its source reference and its position (both must agree)."""
    orientation, positions, spacing = dicom.frame_geometry(seg, n_frames)
    placed = positions is not None and len(positions) == n_frames
    # Positions only mean something with the orientation and spacing of the frames (None: absent or
    # disagreeing between frames); frames placed by their source images alone need the size only.
    same_plane = orientation is not None and np.allclose(orientation, grid.orientation, atol=_ORIENTATION_ATOL)
    same_spacing = spacing is not None and np.allclose(spacing, grid.spacing, rtol=_SPACING_RTOL)
    shape_ok = (int(seg.Rows), int(seg.Columns)) == (grid.rows, grid.columns)
    if not shape_ok or (placed and not (same_plane and same_spacing)):
        raise InputError(f"{path.name}: SEG frames must have the size, orientation and pixel spacing of the series "
                         f"slices, not others; {_HOW_SERIES}, or resample the mask onto it")
    tolerance = _GRID_FRACTION * min(*grid.spacing, grid.gap)
    by_sop = {uid: k for k, uid in enumerate(grid.sop_uids)}
    placement, off_grid = [], 0
    for i in range(n_frames):
        referenced = {by_sop[uid] for uid in (sources[i] if i < len(sources) else []) if uid in by_sop}
        if not placed:
            if len(referenced) != 1:
                raise InputError(f"{path.name}: every SEG frame must carry its position or one source image, not "
                                 "neither; export the SEG with per-frame positions")
            placement.append(referenced.pop())
            continue
        point = np.asarray(positions[i], dtype=np.float64)
        k = grid.slice_at(point, tolerance)
        in_plane = k is not None and np.linalg.norm(point - grid.origins[k]) <= tolerance
        if not in_plane or (referenced and referenced != {k}):
            off_grid += 1
            continue
        placement.append(k)
    if off_grid:
        raise InputError(f"{path.name}: SEG frames must lie on the series slices they reference, not "
                         f"{off_grid} of {n_frames} off them; {_HOW_SERIES}, or resample the mask onto it")
    return placement


# --- RTSTRUCT -----------------------------------------------------------------------------------


def _rtstruct_labels(path: Path, grid: _Grid, classes: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """(slices, rows, columns) labels and unknown names of an RTSTRUCT."""
    ds = _read(path)
    with quiet_pydicom():
        series_uids, sop_uids = _rt_references(ds)
        names = {int(item.ROINumber): str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence") or []}
        contours = {
            int(item.ReferencedROINumber): [c for c in item.get("ContourSequence") or []
                                            if str(c.get("ContourGeometricType", "")).upper() == "CLOSED_PLANAR"]
            for item in ds.get("ROIContourSequence") or []
        }
    _check_references(path, series_uids, sop_uids, grid)
    labels = np.zeros((len(grid.sop_uids), grid.rows, grid.columns), np.uint8)
    unknown = [name for name in names.values() if _normalised(name) not in classes]
    clashes = 0
    for number, items in contours.items():
        index = classes.get(_normalised(names.get(number, "")), 0)
        if index:
            for k, region in _roi_slices(path, items, grid).items():
                clashes += _paint(labels, k, region, index)
    _refuse_overlap(path, clashes)
    return labels, unknown


def _rt_references(ds: Dataset) -> tuple[list[str], set[str]]:
    """Series UIDs (ReferencedFrameOfReference -> RTReferencedStudy -> RTReferencedSeries) and the image
    SOPInstanceUIDs referenced there or by single contours."""
    series, sops = [], set()
    with quiet_pydicom():
        for frame in ds.get("ReferencedFrameOfReferenceSequence") or []:
            for study in frame.get("RTReferencedStudySequence") or []:
                for item in study.get("RTReferencedSeriesSequence") or []:
                    if item.get("SeriesInstanceUID"):
                        series.append(str(item.SeriesInstanceUID))
                    sops |= {str(i.ReferencedSOPInstanceUID) for i in item.get("ContourImageSequence") or []}
        for roi in ds.get("ROIContourSequence") or []:
            for contour in roi.get("ContourSequence") or []:
                sops |= {str(i.ReferencedSOPInstanceUID) for i in contour.get("ContourImageSequence") or []}
    return list(dict.fromkeys(series)), sops


def _roi_slices(path: Path, contours: Sequence[Dataset], grid: _Grid) -> dict[int, np.ndarray]:
    """One ROI's filled contours per slice index, combined by the even-odd rule."""
    row_dir, col_dir = np.asarray(grid.orientation[:3]), np.asarray(grid.orientation[3:])
    half = grid.gap / 2
    planes: dict[int, np.ndarray] = {}
    for contour in contours:
        with quiet_pydicom():
            points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
        if points.size % 3 or points.size < 9:
            raise InputError(f"{path.name}: closed contours must hold at least 3 (x, y, z) points, not "
                             f"{points.size} numbers; export the RTSTRUCT again")
        points = points.reshape(-1, 3)
        k = grid.slice_at(points.mean(axis=0), half)
        depth = (points - points.mean(axis=0)) @ grid.normal
        if k is None or np.ptp(depth) > half:
            raise InputError(f"{path.name}: contours must lie in the plane of a series slice (within half the "
                             f"{grid.gap:.2f} mm slice spacing), not off or across the slices; {_HOW_SERIES}")
        offset = points - grid.origins[k]
        rr, cc = polygon(offset @ col_dir / grid.spacing[0], offset @ row_dir / grid.spacing[1],
                         shape=(grid.rows, grid.columns))
        plane = planes.setdefault(k, np.zeros((grid.rows, grid.columns), bool))
        plane[rr, cc] ^= True
    return planes


# --- small helpers ------------------------------------------------------------------------------


def _kind_or_refuse(path: Path) -> str:
    kind = mask_kind(path)
    if kind is None:
        raise InputError(f"{path.name} must be a DICOM SEG or RTSTRUCT, not another file; pass the mask object")
    return kind


def _read(path: Path) -> Dataset:
    try:
        return dicom.read_dataset(path, pixels=False)
    except Exception as err:  # noqa: BLE001 - pydicom's messages can quote header values
        raise InputError(f"{path.name} must be a readable DICOM file, not failing with {type(err).__name__}") from None

