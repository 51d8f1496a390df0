"""DICOM specifics of discovery and loading: sniffing, reading, classifying, geometry and pixels.

medtl reads DICOM with pydicom directly, not with MONAI's `PydicomReader`: in MONAI 1.6 that
reader orders a folder's slices by InstanceNumber (not by position), does not separate the series
of a mixed folder, does not check slice gaps or duplicates, and applies neither VOI LUT/window nor
MONOCHROME1 inversion to radiographs (monai/data/image_reader.py). Its affine formula is the one
used here (nibabel's "DICOM orientation" notes); the tests cross-check the two.

Nothing here prints or logs a header value: pydicom's own warnings and log records, which can
quote values, are silenced while a file is read or decoded (`quiet_pydicom`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UID_dictionary,
)

from medtl.data import geometry
from medtl.data.deid import identifying_values, quiet_pydicom
from medtl.data.geometry import Point
from medtl.data.types import HeaderFacts, LoadedImage, Rejection

# Pixel values of these modalities are physical quantities (HU, activity, signal) kept as such;
# other single images (radiographs, secondary captures) get their VOI LUT or window.
QUANTITATIVE_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
# Projection images are never slices of a volume, even when they carry a position.
PROJECTION_MODALITIES = frozenset(
    {"CR", "DX", "MG", "IO", "PX", "RG", "RF", "XA", "XC", "OP", "ES", "GM", "SM"}
)

_ORIENTATION_ATOL = 1e-3  # direction cosines that agree within this are one orientation
# Transfer syntaxes that compress without loss (deflate compresses the whole dataset, not the pixels).
_LOSSLESS_SYNTAXES = frozenset(
    {
        DeflatedExplicitVRLittleEndian, RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
        JPEG2000Lossless, JPEG2000MCLossless, HTJ2KLossless, HTJ2KLosslessRPCL,
    }
)  # fmt: skip
# Attributes a FrameIncrementPointer names when the frames are time points (cine, dynamic, gated),
# PS3.3 C.7.6.6 and C.8.4.8; SliceVector alone means NM slices.
_TIME_POINTERS = frozenset(
    {"FrameTime", "FrameTimeVector", "TimeSlotVector", "TimeSliceVector", "PhaseVector", "RRIntervalVector"}
)
_NO_FRAME_GEOMETRY = (
    "multi-frame image without frame positions or slice spacing: the distance between frames is unknown; "
    "export it with per-frame positions or as single images"
)
_THUMBNAIL = 8  # blocks per side of the pixel fingerprint that tells copies from different images
# ITU-R BT.601 luma weights, the ones PIL uses for mode "L": DICOM colour images and PNG/JPEG
# exports become the same grey values.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# (words of the standard's SOP class name, modality codes, description) of valid non-image objects.
_NON_IMAGE = (
    (("Media Storage Directory",), (), "DICOMDIR index file"),
    (("Key Object Selection",), ("KO",), "DICOM key object selection (KO)"),
    (("Presentation State",), ("PR",), "DICOM presentation state (PR)"),
    (("SR Storage", "Procedure Log"), ("SR",), "DICOM structured report (SR)"),
    (("Segmentation Storage",), ("SEG",), "DICOM segmentation (SEG)"),
    (("Encapsulated",), ("DOC",), "encapsulated document (PDF, CDA or 3D model) in DICOM"),
    (("Waveform",), ("ECG", "HD", "AU", "EEG", "EMG", "RESP"), "DICOM waveform (ECG, audio, ...)"),
    (("Parametric Map",), (), "DICOM parametric map"),
)
Orientation = tuple[float, ...]  # ImageOrientationPatient: row then column direction cosines


@dataclass(frozen=True)
class DicomImage:
    """What discovery keeps of one decodable DICOM image file (in memory only, never written).

    `positions` holds one ImagePositionPatient per frame when known (per-frame functional groups
    for enhanced multi-frame files), only the first frame's when that is all the file gives, or
    None. `pixel_spacing` is (between rows, between columns) in mm, as DICOM orders it.
    """

    path: Path
    series_uid: str
    file_digest: str  # SHA-256 of the file's bytes, to recognise copied files
    modality: str
    rows: int
    columns: int
    n_frames: int
    orientation: Orientation | None
    positions: tuple[Point, ...] | None
    pixel_spacing: tuple[float, float] | None
    header: HeaderFacts
    sop_uid: str = ""  # SOPInstanceUID: copies of one instance in other encodings share it
    transfer_syntax: str = ""
    pixel_digest: str = ""  # SHA-256 of the PixelData bytes as stored (encoded)
    thumbnail: tuple[float, ...] = ()  # block means of the first decoded frame
    # The pixels of the file as a study of its own (see `own_study_pixels`), None for a slice of a stack.
    pixels: PixelSummary | None = None


@dataclass(frozen=True)
class PixelSummary:
    """What a manifest row needs of a study's loaded pixels (`load_study`), without the pixels.

    Computed where a file is decoded anyway (a discovery worker), so that a build neither keeps
    the arrays in memory nor reads the file again to hash them.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    sha256: str  # `pixel_sha256` of the array
    finite: bool  # no NaN or Inf
    constant: bool  # finite and every value equal (a blank image)

    @classmethod
    def of(cls, image: LoadedImage) -> PixelSummary:
        """The summary of a loaded study."""
        finite = bool(np.isfinite(image.array).all())
        return cls(tuple(int(n) for n in image.array.shape), image.spacing, image.orientation,
                   pixel_sha256(image.array), finite, finite and bool(image.array.min() == image.array.max()))


def pixel_sha256(array: np.ndarray) -> str:
    """SHA-256 of decoded pixels: dtype (with byte order), shape and C-order bytes."""
    data = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{data.dtype.str}|{data.shape}|".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def looks_like_dicom(path: Path) -> bool:
    """Whether a file starts like DICOM: "DICM" after the preamble, or a bare header element.

    Files written without preamble and meta header (older NEMA/ACR-era files) start directly with
    a group 0x0008 element. `dcmread(force=True)` would turn any bytes into a "dataset", so such
    a file must start with a dictionary tag followed by a valid explicit VR or a sane length.
    """
    with path.open("rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for endian in "<>":
        group, element = struct.unpack(endian + "HH", head[:4])
        if group not in (0x0002, 0x0008) or not (element == 0 or dictionary_has_tag(group << 16 | element)):
            continue
        if head[4:6] in _EXPLICIT_VRS:
            return True
        (length,) = struct.unpack(endian + "I", head[4:8])
        if length < 0x10000:
            return True
    return False


def read_dataset(path: Path | BinaryIO, *, pixels: bool = True) -> Dataset:
    """Read a DICOM file, with or without preamble/meta header, and make its transfer syntax explicit.

    Args:
        path: The file, or its bytes as a binary stream.
        pixels: Whether to read the pixel data too.

    Returns:
        The dataset; `file_meta.TransferSyntaxUID` is set from the encoding pydicom detected when
        the file lacks it (implicit VR little endian for headerless files, per PS3.5 default).

    Raises:
        Exception: whatever pydicom raises for an unreadable file (callers quarantine it).
    """
    with quiet_pydicom():
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is None or implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return ds


@quiet_pydicom()
def inspect_dicom(path: Path) -> DicomImage | Rejection:
    """Classify one DICOM file: a decodable image, a valid non-image object, or bad input.

    The pixels are decoded once here so that every study discover returns also loads.

    Args:
        path: A file for which `looks_like_dicom` is True.

    Returns:
        A `DicomImage`, or a `Rejection` whose reason names no header value and no path.
    """
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    try:
        ds = read_dataset(io.BytesIO(content))
    except Exception:
        return Rejection(path, "quarantined", "DICOM header could not be parsed (truncated or corrupt file)")
    if not any(
        elem.tag.group > 0x0002 and not elem.tag.is_private and dictionary_has_tag(elem.tag) for elem in ds
    ):
        return Rejection(path, "quarantined", "no readable DICOM attributes (corrupt file?)")
    modality = _text(ds, "Modality").upper()  # "" here: non_image_category needs to see it missing
    category = non_image_category(
        _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID"), modality
    )
    if category:
        return Rejection(path, "skipped", f"{category}, not an image")
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        return Rejection(path, "quarantined", "DICOM object without pixel data")
    if "PixelData" not in ds:
        return Rejection(path, "skipped", "floating-point pixel data (parametric map), not an image")
    header = header_facts(ds)  # before decoding converts elements (see header_facts)
    values = decoded_frames(ds)
    if isinstance(values, str):
        return Rejection(path, "quarantined", values)
    n_frames = number_of_frames(ds)
    orientation, positions, spacing = frame_geometry(ds, n_frames)
    if n_frames > 1:
        rejection = _multiframe_rejection(path, ds, orientation, positions)
        if rejection is not None:
            return rejection
    thumbnail = _thumbnail(values[0])
    return DicomImage(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID"),
        file_digest=digest,
        modality=modality or "OT",
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        n_frames=n_frames,
        orientation=orientation,
        positions=positions,
        pixel_spacing=spacing,
        header=header,
        sop_uid=_text(ds, "SOPInstanceUID"),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        pixel_digest=hashlib.sha256(ds.PixelData).hexdigest(),
        thumbnail=thumbnail,
        pixels=own_study_pixels(ds, n_frames, modality or "OT", orientation, positions),
    )


def own_study_pixels(
    ds: Dataset, n_frames: int, modality: str, orientation: Orientation | None, positions: tuple[Point, ...] | None
) -> PixelSummary | None:
    """The summary of `load_study` for a file that is a study of its own, from its decoded dataset.

    Multi-frame files, projection images and images without position or orientation are always
    studies of their own (`medtl.data.discover.assemble_series`); a positioned slice usually
    belongs to a stack and gets None, as does a file whose pixels do not load: `load_study`
    reads those when they are needed.
    """
    if n_frames == 1 and orientation and positions and modality not in PROJECTION_MODALITIES:
        return None
    try:
        array, affine = multiframe_volume(ds) if n_frames > 1 else single_image(ds)
    except Exception:  # noqa: BLE001 - load_study meets the same error later and reports it
        return None
    # As `load_study` returns it: C-order float32 pixels, float64 affine.
    image = LoadedImage(np.ascontiguousarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64), "")
    return PixelSummary.of(image)


def single_image(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A single-frame image as (columns, rows) values and its affine, as `MedtlDicomReader` loads it.

    Display values (see `frames`) unless the modality is quantitative. Here rather than in the
    reader's module, which imports MONAI: discovery workers decode with it too, without MONAI.
    """
    pixels = frames(ds, display=modality_of(ds) not in QUANTITATIVE_MODALITIES)[0]
    orientation, positions, spacing = frame_geometry(ds, 1)
    affine = geometry.volume_affine(orientation, positions[0] if positions else None, spacing, slice_spacing(ds) or 1.0)
    return np.ascontiguousarray(pixels.T), affine


def multiframe_volume(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A multi-frame file as a (columns, rows, frames) volume in modality units, as `MedtlDicomReader` loads it.

    Frames are placed by their per-frame positions (a gantry-tilted stack is resampled, see
    `geometry.correct_gantry_tilt`), else along the normal at the file's slice spacing.

    Raises:
        ValueError: If the frames have neither positions that form a stack nor a slice spacing.
    """
    n = number_of_frames(ds)
    volume = frames(ds)
    orientation, positions, spacing = frame_geometry(ds, n)
    origin = positions[0] if positions else None
    step: Sequence[float] | float | None = slice_spacing(ds)
    if orientation is not None and positions is not None and len(positions) == n:
        stack = geometry.order_stack(orientation, positions)
        if isinstance(stack, str):
            raise ValueError("multi-frame positions no longer form a stack")
        volume = volume[list(stack.order)]
        origin, step = positions[stack.order[0]], stack.step
    if step is None:
        raise ValueError("multi-frame file has neither frame positions nor a slice spacing")
    volume, step = geometry.correct_gantry_tilt(volume.transpose(2, 1, 0), orientation, spacing, step)
    return np.ascontiguousarray(volume), geometry.volume_affine(orientation, origin, spacing, step)


def _multiframe_rejection(
    path: Path, ds: Dataset, orientation: Orientation | None, positions: tuple[Point, ...] | None
) -> Rejection | None:
    """Why a multi-frame file is not a 3D volume, or None when its frames are slices in space.

    Frames with per-frame positions must form an even stack. Without them, frames that are time
    points (cine, dynamic) are skipped, and frames without any slice spacing attribute are
    quarantined: their distance is unknown, and assuming 1 mm would give the manifest a false
    voxel size.
    """
    n_frames = number_of_frames(ds)
    if positions is not None and len(positions) == n_frames:
        if orientation is None:
            return Rejection(path, "quarantined", "multi-frame orientation differs between frames")
        stack = geometry.order_stack(orientation, positions)
        return Rejection(path, "quarantined", f"multi-frame {stack}") if isinstance(stack, str) else None
    if frames_are_time_points(ds):
        cine = f"multi-frame cine (time series of {n_frames} frames), not a 3D volume"
        return Rejection(path, "skipped", f"{cine}; export a frame as PNG or DICOM to use it")
    if slice_spacing(ds) is None:
        return Rejection(path, "quarantined", _NO_FRAME_GEOMETRY)
    return None


def frames_are_time_points(ds: Dataset) -> bool:
    """Whether the frames of a multi-frame file are time points (cine, dynamic) rather than slices.

    Read from FrameIncrementPointer (PS3.3 C.7.6.6) when present; otherwise from frame timing
    attributes (FrameTime, FrameTimeVector, CineRate) or from several TemporalPositionIndex
    values in the per-frame functional groups (enhanced files).
    """
    pointer = ds.get("FrameIncrementPointer")
    if pointer not in (None, ""):
        tags = pointer if isinstance(pointer, list | tuple | MultiValue) else [pointer]
        return any(_keyword(tag) in _TIME_POINTERS for tag in tags)
    if any(ds.get(keyword) not in (None, "") for keyword in ("FrameTime", "FrameTimeVector", "CineRate")):
        return True
    temporal = {
        _group_value(item, "FrameContentSequence", "TemporalPositionIndex")
        for item in ds.get("PerFrameFunctionalGroupsSequence") or []
    }
    return len(temporal - {None}) > 1


def non_image_category(sop_class: str, modality: str) -> str:
    """A fixed description of a valid non-image DICOM object, or "" for (possible) images.

    Decided from the standard's SOP class name (only for UIDs in pydicom's dictionary, so a
    private value is never echoed), else, for unknown SOP classes, from the modality code.
    """
    known = sop_class in UID_dictionary and UID_dictionary[sop_class][1] == "SOP Class"
    name = UID_dictionary[sop_class][0] if known else ""
    for words, modalities, description in _NON_IMAGE:
        if any(word in name for word in words) or (not known and modality in modalities):
            return description
    radiotherapy = (name.startswith("RT ") and "Image" not in name) or "Radiation" in name
    if radiotherapy or (not known and modality.startswith("RT") and modality != "RTIMAGE"):
        return "DICOM radiotherapy object (plan, structure set, dose or record)"
    if known and not any(word in name for word in ("Image", "Volume Storage", "Map Storage", "AIT Storage")):
        return "non-image DICOM object"
    return ""


def decoded_frames(ds: Dataset) -> np.ndarray | str:
    """The frames as `frames` decodes them, or why the pixel data cannot become a usable image."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    ts_name = ts.name if ts in UID_dictionary else "this transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"pixel data in an unsupported transfer syntax ({ts_name})"
    if not decoder.is_available:
        return f"no installed decoder for {ts_name}"
    try:
        if not ts.is_compressed and len(ds.PixelData) < get_expected_length(ds):
            return "pixel data shorter than the image size requires (truncated file?)"
        values = frames(ds)
    except Exception:
        return "pixel data could not be decoded (corrupt data or inconsistent image attributes)"
    return non_finite_problem(values, "pixel") or values


def non_finite_problem(values: np.ndarray, unit: str) -> str:
    """Why `values` cannot be learned from (NaN or Inf in them), or "" when all are finite.

    Args:
        values: Decoded pixel or voxel values.
        unit: "pixel" or "voxel", for the reason.

    Returns:
        E.g. "non-finite voxel values (NaN or Inf) in 3 of 120 voxels", "every voxel is NaN", or "".
    """
    if not np.issubdtype(values.dtype, np.floating):
        return ""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if not bad:
        return ""
    if np.isnan(values).all():
        return f"every {unit} is NaN"
    return f"non-finite {unit} values (NaN or Inf) in {bad} of {values.size} {unit}s"


def encoding_rank(transfer_syntax: str) -> int:
    """0 for native (uncompressed) pixel data, 1 for lossless compression, 2 for lossy or unknown."""
    ts = UID(transfer_syntax)
    if ts in _LOSSLESS_SYNTAXES:
        return 1
    if ts in UID_dictionary and ts.is_transfer_syntax and not ts.is_compressed:
        return 0
    return 2


def modality_of(ds: Dataset) -> str:
    """The Modality code, "OT" (other) when absent."""
    return _text(ds, "Modality").upper() or "OT"


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent or empty; raises ValueError when it is not a number."""
    value = ds.get("NumberOfFrames")
    return max(int(value), 1) if value not in (None, "") else 1


def header_facts(ds: Dataset) -> HeaderFacts:
    """Identifying and subgroup-relevant header values of one file (in memory only)."""
    # First, while the elements are still raw: the walk skips converting those it has met in
    # earlier files (`medtl.data.deid`), and the fields below would convert them.
    found = identifying_values(ds)
    return HeaderFacts(
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sex=_text(ds, "PatientSex"),
        age=_text(ds, "PatientAge"),
        birth_date=_text(ds, "PatientBirthDate"),
        study_date=_text(ds, "StudyDate"),
        institution=_text(ds, "InstitutionName"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        body_part=_text(ds, "BodyPartExamined"),
        photometric=_text(ds, "PhotometricInterpretation"),
        identifying_values=found,
    )


# --- geometry -----------------------------------------------------------------------------------


def frame_geometry(
    ds: Dataset, n_frames: int
) -> tuple[Orientation | None, tuple[Point, ...] | None, tuple[float, float] | None]:
    """Orientation, per-frame positions and pixel spacing, from the top level or functional groups.

    Returns (None, ...) parts that are absent or malformed; orientation is None as well when the
    frames of a multi-frame file disagree on it.
    """
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])[:n_frames]

    orientations = [
        _group_value(item, "PlaneOrientationSequence", "ImageOrientationPatient") for item in per_frame
    ]
    orientations = [o for o in orientations if o is not None]
    candidates = [
        ds.get("ImageOrientationPatient"),
        _group_value(shared, "PlaneOrientationSequence", "ImageOrientationPatient"),
    ]
    orientation = _unit_orientation(
        next((c for c in candidates if c is not None), orientations[0] if orientations else None)
    )
    if orientation is not None and orientations:
        parsed = [_unit_orientation(o) for o in orientations]
        if any(p is None or not np.allclose(p, orientation, atol=_ORIENTATION_ATOL) for p in parsed):
            orientation = None

    frame_positions = [
        _group_value(item, "PlanePositionSequence", "ImagePositionPatient") for item in per_frame
    ]
    positions: tuple[Point, ...] | None = None
    if per_frame and len(per_frame) == n_frames and all(p is not None for p in frame_positions):
        positions = _points(frame_positions)
    if positions is None and ds.get("ImagePositionPatient") is not None:
        positions = _points([ds.ImagePositionPatient])

    spacing_candidates = [
        ds.get("PixelSpacing"),
        _group_value(shared, "PixelMeasuresSequence", "PixelSpacing"),
        _group_value(per_frame[0] if per_frame else None, "PixelMeasuresSequence", "PixelSpacing"),
        ds.get("ImagerPixelSpacing"),
        ds.get("NominalScannedPixelSpacing"),
    ]
    spacing = next((s for s in (_pair(c) for c in spacing_candidates) if s is not None), None)
    return orientation, positions, spacing


def slice_spacing(ds: Dataset) -> float | None:
    """Distance between frames without per-frame positions: SpacingBetweenSlices, else SliceThickness.

    Returns None when the file gives neither (top level or shared functional groups).
    """
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    for value in (
        ds.get("SpacingBetweenSlices"),
        _group_value(shared, "PixelMeasuresSequence", "SpacingBetweenSlices"),
        ds.get("SliceThickness"),
        _group_value(shared, "PixelMeasuresSequence", "SliceThickness"),
    ):
        with contextlib.suppress(TypeError, ValueError):
            if value not in (None, "") and np.isfinite(float(value)) and abs(float(value)) > 0:
                return abs(float(value))
    return None


# --- pixels -------------------------------------------------------------------------------------


def frames(ds: Dataset, *, display: bool = False) -> np.ndarray:
    """Decoded frames (frames, rows, columns) as float32, brighter = more attenuation/signal.

    Applies, per frame, the Modality LUT or rescale slope/intercept (also from enhanced
    functional groups); with `display`, the VOI LUT or window of monochrome images; and the
    MONOCHROME1 inversion over the output range of the last stage applied. Colour images
    (RGB, YBR, palette) become luminance with `LUMA_WEIGHTS`.
    """
    with quiet_pydicom():
        data = ds.pixel_array
    n = number_of_frames(ds)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"
    expected_ndim = 2 + (n > 1) + (colour and photometric != "PALETTE COLOR")
    if data.ndim != expected_ndim:
        raise ValueError("decoded pixel array does not match the image attributes")
    if n == 1:
        data = data[None]
    if photometric == "PALETTE COLOR":
        with quiet_pydicom():
            data = apply_color_lut(data, ds)
    if colour:
        return (data[..., :3].astype(np.float32) @ LUMA_WEIGHTS).astype(np.float32)
    out = np.empty(data.shape, dtype=np.float32)
    for index in range(n):
        out[index] = _grey_frame(data[index], ds, _rescale_source(ds, index), display=display)
    return out


def _grey_frame(frame: np.ndarray, ds: Dataset, rescale: Dataset, *, display: bool) -> np.ndarray:
    values = apply_modality_lut(frame, rescale)
    low, high = _modality_range(ds, rescale)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if display and photometric in ("MONOCHROME1", "MONOCHROME2"):
        voi_lut = ds.get("VOILUTSequence")
        uses_lut = bool(voi_lut) and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]
        source = np.rint(values).astype(np.int64) if uses_lut else values
        try:
            with quiet_pydicom():
                windowed = apply_voi_lut(source, ds)
        except Exception:
            # A malformed window (width < 1, unknown function) is a display hint, not the image:
            # keep the modality values rather than lose the radiograph.
            windowed = None
        if windowed is not None and windowed is not source and np.isfinite(windowed).all():
            values = windowed
            if uses_lut:
                low, high = _lut_range(ds, voi_lut[0])
    values = np.asarray(values, dtype=np.float64)
    if photometric == "MONOCHROME1":
        values = low + high - values  # PS3.3 C.7.6.3.1.2: minimum value is white
    with np.errstate(over="ignore"):  # beyond float32 becomes Inf, which discovery quarantines
        return values.astype(np.float32)


def _modality_range(ds: Dataset, rescale: Dataset) -> tuple[float, float]:
    """Output range of the modality stage, computed as pydicom's `apply_windowing` does."""
    lut = ds.get("ModalityLUTSequence")
    if lut:
        return _lut_range(ds, lut[0])
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        low, high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        low, high = 0.0, 2.0**bits - 1
    slope = float(rescale.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(rescale.get("RescaleIntercept", 0.0) or 0.0)
    a, b = low * slope + intercept, high * slope + intercept
    return min(a, b), max(a, b)


def _lut_range(ds: Dataset, item: Dataset) -> tuple[float, float]:
    """Smallest and largest entry of a Modality/VOI LUT: the output range inversion must mirror.

    The LUT Descriptor's bit depth is only nominal (a 10-bit LUT is often declared 16-bit), so
    inverting over 2**bits - 1 would shift the image to the top of the 16-bit range.
    """
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        little = ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
        entries = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
    else:
        entries = np.atleast_1d(np.asarray(data, dtype=np.float64))
    return float(entries.min()), float(entries.max())


def _rescale_source(ds: Dataset, index: int) -> Dataset:
    """The dataset holding the modality transform of one frame (enhanced files keep it per frame)."""
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return ds
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for item in (
        per_frame[index] if index < len(per_frame) else None,
        _first_item(ds, "SharedFunctionalGroupsSequence"),
    ):
        seq = item.get("PixelValueTransformationSequence") if item is not None else None
        if seq and "RescaleSlope" in seq[0] and "RescaleIntercept" in seq[0]:
            return seq[0]
    return ds


# --- small helpers ------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_value(item: Dataset | None, sequence: str, keyword: str) -> object:
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0].get(keyword) if seq else None


def _floats(value: object, count: int) -> np.ndarray | None:
    """`count` finite numbers from a multi-valued DS element, or None when absent or malformed."""
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.all(np.isfinite(numbers)) else None


def _unit_orientation(value: object) -> Orientation | None:
    cosines = _floats(value, 6)
    if cosines is None:
        return None
    row, col = cosines[:3], cosines[3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 0.5 or abs(float(row @ col)) > 0.05:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return tuple(float(v) for v in (*row, *col))


def _points(values: Sequence[object]) -> tuple[Point, ...] | None:
    points = [_floats(value, 3) for value in values]
    if any(p is None for p in points):
        return None
    return tuple((float(p[0]), float(p[1]), float(p[2])) for p in points)  # type: ignore[index]


def _keyword(tag: object) -> str:
    """The keyword of a tag, "" for unknown or malformed values (a header is never trusted)."""
    try:
        return keyword_for_tag(tag)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return ""


def _thumbnail(frame: np.ndarray) -> tuple[float, ...]:
    """Block means of a (rows, columns) frame: equal for lossless copies, close for lossy ones, apart otherwise.

    The blocks are `np.array_split`'s (up to `_THUMBNAIL` per side, the first ones a row or column
    larger); their sums come from one `np.add.reduceat` per axis instead of a mean per block (the
    per-block means were 8 % of the CPU of reading a file at intake).
    """
    rows = _split_starts(frame.shape[0], min(_THUMBNAIL, frame.shape[0]))
    cols = _split_starts(frame.shape[1], min(_THUMBNAIL, frame.shape[1]))
    sums = np.add.reduceat(np.add.reduceat(frame, cols, axis=1, dtype=np.float64), rows, axis=0)  # rows are contiguous
    counts = np.outer(np.diff(rows, append=frame.shape[0]), np.diff(cols, append=frame.shape[1]))
    return tuple((sums / counts).ravel().tolist())


def _split_starts(length: int, parts: int) -> np.ndarray:
    """Start indices of `np.array_split(range(length), parts)`: the first `length % parts` parts one longer."""
    size, extra = divmod(length, parts)
    return np.cumsum([0] + [size + 1] * extra + [size] * (parts - extra - 1), dtype=np.int64)


def _pair(value: object) -> tuple[float, float] | None:
    pair = _floats(value, 2)
    return (float(pair[0]), float(pair[1])) if pair is not None and pair.min() > 0 else None
