"""Find every study under a data root, and load one study's pixels.

`discover` walks every file (sorted, deterministic) and puts each in exactly one `Study` or one
`Rejection`: DICOM files are grouped by SeriesInstanceUID in whatever folder structure, ordered by
position along the slice normal and checked for gaps, duplicates and mixed sizes; NIfTI and 2D
exports (PNG, JPEG, TIFF, BMP) are one study each; everything else is skipped or quarantined with
a one-line reason. `load_study` returns MONAI-convention arrays (columns, rows[, slices]) with a
voxel-to-RAS affine.

NIfTI and 2D exports load through MONAI's `LoadImage` (NibabelReader, PILReader). DICOM loads
through pydicom directly (see medtl/data/dicom.py for what MONAI's PydicomReader lacks).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medtl.data import dicom
from medtl.data.deid import quiet_pydicom
from medtl.data.dicom import DicomImage
from medtl.data.types import HeaderFacts, LoadedImage, Rejection, Study
from medtl.errors import InputError

_IMAGE2D_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_DOCUMENT_SUFFIXES = frozenset(
    ".txt .csv .tsv .json .jsonl .md .rst .xml .yaml .yml .html .htm .log .ini .cfg .toml .dump .pdf .doc "
    ".docx .xls .xlsx .odt .ods .sha256 .md5".split()
)
_OTHER_IMAGE_SUFFIXES = frozenset(
    ".nrrd .nhdr .mha .mhd .mgz .mnc .hdr .img .npy .npz .h5 .hdf5 .zarr".split()
)
_ARCHIVE_SUFFIXES = frozenset(".gz .zip .tar .tgz .bz2 .xz .7z".split())
# PIL modes MONAI's PILReader returns as numbers we can use directly; others (palette, CMYK, YCbCr,
# LAB, HSV) are converted to RGB first so that the luminance below sees colours, not indices.
_PIL_DIRECT_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB", "RGBA"})


def discover(root: Path, *, progress: bool = True) -> tuple[list[Study], list[Rejection]]:
    """Find the studies under `root`; every file ends in exactly one Study or one Rejection.

    DICOM images are decoded once here, so every returned study loads with `load_study`.

    Args:
        root: The data folder, searched recursively (symbolic links to folders are not followed).
        progress: Show a tqdm progress bar over the files.

    Returns:
        (studies, rejections): studies sorted by their first file path, DICOM series files in
        slice order; rejections sorted by path, each with a one-line reason free of header values
        and paths. Status "quarantined" marks bad input (empty, truncated, corrupt, pixel-less,
        undecodable, inconsistent series), "skipped" valid files that are not images.

    Raises:
        InputError: If `root` is not an existing folder.

    Example:
        >>> studies, rejections = discover(Path("data"), progress=False)  # doctest: +SKIP
        >>> image = load_study(studies[0])  # doctest: +SKIP
    """
    root = Path(root).absolute()  # Study.files are absolute; symlinks are kept, not resolved
    if not root.is_dir():
        raise InputError(
            "the data root must be an existing folder, not a missing path or a file; check the root setting"
        )
    files = _walk(root)
    studies: list[Study] = []
    rejections: list[Rejection] = []
    images: list[DicomImage] = []
    for path in tqdm(files, desc="Scanning files", unit="file", disable=not progress):
        outcome = _inspect(path)
        if isinstance(outcome, Study):
            studies.append(outcome)
        elif isinstance(outcome, Rejection):
            rejections.append(outcome)
        else:
            images.append(outcome)
    series_studies, series_rejections = assemble_series(images)
    studies.extend(series_studies)
    rejections.extend(series_rejections)
    studies.sort(key=lambda s: min(s.files))
    rejections.sort(key=lambda r: r.path)
    return studies, rejections


def load_study(study: Study) -> LoadedImage:
    """Load one study's pixels in MONAI's convention with its voxel-to-RAS affine.

    DICOM radiographs and other single images get Modality LUT/rescale, VOI LUT/window and
    MONOCHROME1 inversion (brighter = more attenuation); CT/MR/PT/NM keep modality units (HU for
    CT). Colour images (DICOM RGB/YBR/palette, RGB(A) PNG/JPEG/TIFF exports) become luminance
    with ITU-R BT.601 weights (0.299 R + 0.587 G + 0.114 B, PIL's "L"); alpha is dropped. 2D
    exports carry no geometry: MONAI gives them an identity affine (1 mm pixels). Multi-page TIFFs
    load their first page (PIL's behaviour).

    Args:
        study: A study returned by `discover`.

    Returns:
        The float32 array, (columns, rows) or (columns, rows, slices), and its affine.

    Raises:
        InputError: If the files can no longer be read (changed since discovery).
    """
    try:
        if study.kind == "nifti":
            return _load_nifti(study.files[0])
        if study.kind == "image2d":
            return _load_image2d(study.files[0])
        if study.kind == "dicom_image":
            return _load_dicom_image(study.files[0])
        if study.kind == "dicom_series":
            if len(study.files) == 1:
                return _load_multiframe(study.files[0])
            return _load_series(study.files)
    except Exception:
        # `from None`: the original error can quote a path or a header value (PHI).
        raise InputError(
            f"a {study.kind} study of {len(study.files)} file(s) must be readable, not failing to load; "
            "the files may have changed since discover() ran, so run it again"
        ) from None
    raise InputError(
        f"study kind must be one of dicom_series, dicom_image, nifti, image2d, not {study.kind!r}"
    )


def assemble_series(images: Iterable[DicomImage]) -> tuple[list[Study], list[Rejection]]:
    """Group DICOM images by SeriesInstanceUID into studies, quarantining inconsistent series.

    Per series: byte-identical copies of a file are skipped; multi-frame files are 3D studies of their own; projection images and images
    without position/orientation are 2D studies of their own; the remaining slices are split by
    orientation (e.g. localizer + axial stack) and each part with two or more slices must be an
    even stack of one size. A series whose slices fail that is quarantined as a whole. All studies
    of a series share its header, with identifying values collected over all its files.

    Args:
        images: Decodable DICOM images, in path order.

    Returns:
        (studies, rejections) for these images.
    """
    by_series: dict[str, list[DicomImage]] = {}
    for image in images:
        key = image.series_uid or f"no-series:{image.path}"
        by_series.setdefault(key, []).append(image)
    studies: list[Study] = []
    rejections: list[Rejection] = []
    for members in by_series.values():
        header = _series_header(members)
        slices: list[DicomImage] = []
        seen: set[str] = set()
        for image in members:
            if image.file_digest in seen:
                # A byte-identical copy would count the same image twice (and could leak across splits).
                rejections.append(
                    Rejection(image.path, "skipped", "identical copy of another file of this series")
                )
                continue
            seen.add(image.file_digest)
            if image.n_frames > 1:
                studies.append(Study((image.path,), "dicom_series", image.modality, header))
            elif image.orientation and image.positions and image.modality not in dicom.PROJECTION_MODALITIES:
                slices.append(image)
            else:
                studies.append(Study((image.path,), "dicom_image", image.modality, header))
        made, reason = _split_stacks(slices, header)
        if reason:
            rejections.extend(Rejection(image.path, "quarantined", reason) for image in slices)
        else:
            studies.extend(made)
    return studies, rejections


def _split_stacks(slices: list[DicomImage], header: HeaderFacts) -> tuple[list[Study], str]:
    """Studies made of a series' positioned slices, or a reason to quarantine them all."""
    if not slices:
        return [], ""
    if len(slices) == 1:
        return [Study((slices[0].path,), "dicom_image", slices[0].modality, header)], ""
    groups: list[list[DicomImage]] = []
    for image in slices:
        for group in groups:
            if np.allclose(group[0].orientation, image.orientation, atol=1e-3):
                group.append(image)
                break
        else:
            groups.append([image])
    if len(groups) > 1 and all(len(group) == 1 for group in groups):
        return [], "orientation changes from slice to slice: no part of the series forms a stack"
    studies = []
    for group in groups:
        if len(group) == 1:
            studies.append(Study((group[0].path,), "dicom_image", group[0].modality, header))
            continue
        made = _stack_study(group, header)
        if isinstance(made, str):
            prefix = "mixed orientations and a part is not a consistent stack: " if len(groups) > 1 else ""
            return [], prefix + made
        studies.append(made)
    return studies, ""


def _stack_study(group: list[DicomImage], header: HeaderFacts) -> Study | str:
    if len({(image.rows, image.columns) for image in group}) > 1:
        return "mixed image sizes (Rows x Columns) within one series"
    spacings = [image.pixel_spacing or (1.0, 1.0) for image in group]
    if not np.allclose(spacings, spacings[0], rtol=1e-3, atol=1e-4):
        return "mixed pixel spacing within one series"
    stack = dicom.order_stack(group[0].orientation, [image.positions[0] for image in group])
    if isinstance(stack, str):
        return stack
    return Study(tuple(group[i].path for i in stack.order), "dicom_series", group[0].modality, header)


def _series_header(members: list[DicomImage]) -> HeaderFacts:
    values: set[str] = set()
    for image in members:
        values |= image.header.identifying_values
    return replace(members[0].header, identifying_values=frozenset(values))


def _walk(root: Path) -> list[Path]:
    """Every file under root (also broken links, which are then quarantined), sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found.extend(Path(folder) / name for name in names)
    return sorted(found)


def _inspect(path: Path) -> Study | Rejection | DicomImage:
    name = path.name.lower()
    suffix = path.suffix.lower()
    try:
        if path.stat().st_size == 0:
            return Rejection(path, "quarantined", "empty file (0 bytes)")
        if dicom.looks_like_dicom(path):  # by content first: DICOM files come with any name
            return dicom.inspect_dicom(path)
        if name.endswith((".nii", ".nii.gz")):
            return _inspect_nifti(path)
        if suffix in _IMAGE2D_SUFFIXES:
            return _inspect_image2d(path)
    except OSError:
        return Rejection(path, "quarantined", "file could not be read (permission denied or broken link)")
    if suffix in _DICOM_SUFFIXES:
        return Rejection(
            path, "quarantined", "DICOM file extension but no DICOM content (corrupt or not DICOM)"
        )
    if suffix in _DOCUMENT_SUFFIXES:
        return Rejection(path, "skipped", "text, table or document file, not an image")
    if suffix in _OTHER_IMAGE_SUFFIXES:
        return Rejection(
            path, "skipped", "image/array format medtl does not read; convert it to NIfTI or PNG"
        )
    if suffix in _ARCHIVE_SUFFIXES:
        return Rejection(path, "skipped", "compressed archive; unpack it into the data folder")
    return Rejection(path, "skipped", "not a DICOM, NIfTI or PNG/JPEG/TIFF/BMP image")


def _inspect_nifti(path: Path) -> Study | Rejection:
    # nibabel reads the whole array here (as MONAI's NibabelReader will), without importing MONAI,
    # so a truncated .nii.gz is found during discovery.
    import nibabel as nib

    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception:
        return Rejection(path, "quarantined", "NIfTI file could not be read (truncated or corrupt)")
    spatial = _squeeze_trailing(data.shape)
    if len(spatial) not in (2, 3):
        return Rejection(
            path, "quarantined", "NIfTI must hold a 2D or 3D image, not a time series or multi-channel image"
        )
    return Study((path,), "nifti", "", None)


def _inspect_image2d(path: Path) -> Study | Rejection:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception:
        return Rejection(path, "quarantined", "image file could not be read (truncated or corrupt)")
    return Study((path,), "image2d", "", None)


@functools.cache
def _monai_loader(reader: str) -> Callable[[str], Any]:
    # Imported on first use: importing MONAI (and torch) takes seconds, discovery does not need it.
    from monai.transforms import LoadImage

    if reader == "PILReader":
        from monai.data import PILReader

        return LoadImage(reader=PILReader(converter=_pil_to_usable_mode), image_only=True, dtype=np.float32)
    return LoadImage(reader=reader, image_only=True, dtype=np.float32)


def _pil_to_usable_mode(image: Any) -> Any:
    """PIL image in, PIL image out: palette/CMYK/YCbCr/... become RGB, grey and RGB(A) stay."""
    return image if image.mode in _PIL_DIRECT_MODES else image.convert("RGB")


@quiet_pydicom()
def _load_dicom_image(path: Path) -> LoadedImage:
    """Load a single-frame DICOM image as (columns, rows) display values (see `frames`)."""
    ds = dicom.read_dataset(path)
    modality = dicom.modality_of(ds)
    pixels = dicom.frames(ds, display=modality not in dicom.QUANTITATIVE_MODALITIES)[0]
    orientation, positions, spacing = dicom.frame_geometry(ds, 1)
    affine = dicom.volume_affine(
        orientation, positions[0] if positions else None, spacing, dicom.slice_spacing(ds)
    )
    return LoadedImage(np.ascontiguousarray(pixels.T), affine, modality)


@quiet_pydicom()
def _load_multiframe(path: Path) -> LoadedImage:
    """Load a multi-frame DICOM file as a (columns, rows, frames) volume in modality units."""
    ds = dicom.read_dataset(path)
    n = dicom.number_of_frames(ds)
    volume = dicom.frames(ds)
    orientation, positions, spacing = dicom.frame_geometry(ds, n)
    origin = positions[0] if positions else None
    step: Sequence[float] | float = dicom.slice_spacing(ds)
    if orientation is not None and positions is not None and len(positions) == n:
        stack = dicom.order_stack(orientation, positions)
        if isinstance(stack, str):
            raise ValueError("multi-frame positions no longer form a stack")
        volume = volume[list(stack.order)]
        origin, step = positions[stack.order[0]], stack.step
    modality = dicom.modality_of(ds)
    return LoadedImage(
        np.ascontiguousarray(volume.transpose(2, 1, 0)),
        dicom.volume_affine(orientation, origin, spacing, step),
        modality,
    )


@quiet_pydicom()
def _load_series(paths: Sequence[Path]) -> LoadedImage:
    """Load single-frame slices, already in slice order, as a (columns, rows, slices) volume."""
    slices, geometry, modality = [], [], ""
    for path in paths:
        ds = dicom.read_dataset(path)
        slices.append(dicom.frames(ds)[0])
        geometry.append(dicom.frame_geometry(ds, 1))
        modality = modality or dicom.modality_of(ds)
    if len({s.shape for s in slices}) != 1:
        raise ValueError("slices of one series differ in size")
    orientation, first, spacing = geometry[0]
    last = geometry[-1][1]
    if orientation is None or first is None or last is None:
        raise ValueError("series slices lack position or orientation")
    step = (np.asarray(last[0]) - np.asarray(first[0])) / (len(paths) - 1)
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)
    return LoadedImage(
        np.ascontiguousarray(volume), dicom.volume_affine(orientation, first[0], spacing, step), modality
    )


def _load_nifti(path: Path) -> LoadedImage:
    loaded = _monai_loader("NibabelReader")(str(path))
    array = np.asarray(loaded.array, dtype=np.float32)
    array = array.reshape(_squeeze_trailing(array.shape))
    if array.ndim not in (2, 3):
        raise ValueError("NIfTI is not a 2D or 3D image")
    return LoadedImage(np.ascontiguousarray(array), np.asarray(loaded.affine, dtype=np.float64), "")


def _load_image2d(path: Path) -> LoadedImage:
    loaded = _monai_loader("PILReader")(str(path))
    array = np.asarray(loaded.array, dtype=np.float32)  # (columns, rows[, channels])
    if array.ndim == 3:
        channels = array.shape[-1]
        array = array[..., :3] @ dicom.LUMA_WEIGHTS if channels >= 3 else array[..., 0]
    return LoadedImage(
        np.ascontiguousarray(array, dtype=np.float32), np.asarray(loaded.affine, dtype=np.float64), ""
    )


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the second: (x, y, 1) is 2D, (x, y, z, 1) is 3D."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape
