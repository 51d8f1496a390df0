"""Find every study under a data root, and load one study's pixels.

`walk` lists every entry under a data root (sorted, deterministic); `discover` puts each in exactly
one `Study` or one `Rejection`, opening nothing but regular files: DICOM files are grouped by
SeriesInstanceUID in whatever folder structure, copies of one instance in other encodings are
dropped, slices are ordered by position along the slice normal and checked for gaps, duplicates
and mixed sizes; NIfTI and 2D exports (PNG, JPEG, TIFF, BMP) are one study each; everything else
(links that are broken, loop or leave the root, FIFOs, sockets, devices, paths beyond PATH_MAX,
folders that cannot be listed, non-images) is skipped or quarantined with a one-line reason.
`load_study` returns MONAI-convention arrays (columns, rows[, slices]) with a voxel-to-RAS affine.
Files are inspected in worker processes when there are many (`workers`, `map_in_workers`), with the
same result, order included, as in one process.

`load_study` reads through the MONAI image readers of `medtl.data.reader` (the same ones the
datasets' `LoadImaged` uses): medtl's DICOM reader (see medtl/data/dicom.py for what MONAI's
PydicomReader lacks), and MONAI's NibabelReader and PILReader for NIfTI and 2D exports.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm.auto import tqdm

from medtl.data import dicom, geometry
from medtl.data.deid import values_kept_between_files
from medtl.data.dicom import DicomImage, PixelSummary
from medtl.data.types import HeaderFacts, LoadedImage, Rejection, Study
from medtl.errors import InputError

#: File name endings of the studies discover finds besides DICOM (which it recognises by content).
IMAGE2D_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_DOCUMENT_SUFFIXES = frozenset(
    ".txt .csv .tsv .json .jsonl .md .rst .xml .yaml .yml .html .htm .log .ini .cfg .toml .dump .pdf .doc "
    ".docx .xls .xlsx .odt .ods .sha256 .md5".split()
)
_OTHER_IMAGE_SUFFIXES = frozenset(
    ".nrrd .nhdr .mha .mhd .mgz .mnc .hdr .img .npy .npz .h5 .hdf5 .zarr".split()
)
_ARCHIVE_SUFFIXES = frozenset(".gz .zip .tar .tgz .bz2 .xz .7z".split())
# Entries that are not regular files: opening a FIFO blocks until a writer appears, a device can
# stream forever, a socket cannot be opened at all. Their type is read with lstat/stat only.
_NOT_REGULAR = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device file"),
    (stat.S_ISBLK, "block device file"),
)
_UNLISTABLE_FOLDER = ("folder could not be listed (permission denied?): the files in it were not seen; make it "
                      "readable and run again")
#: Fewer files than this are inspected in this process: starting worker processes costs about a second.
PARALLEL_MIN_FILES = 200
_MAX_DEFAULT_WORKERS = 8  # beyond this, reading the disk, not decoding, limits intake
_T = TypeVar("_T")
_R = TypeVar("_R")
# Lossy copies of one image differ by a little: fingerprints within this fraction of the image's
# range are one image; other images sharing a SOPInstanceUID (bad anonymisers) differ by far more.
_COPY_RTOL = 0.02


def discover(
    root: Path, *, progress: bool = True, workers: int | None = None
) -> tuple[list[Study], list[Rejection]]:
    """Find the studies under `root`; every entry `walk` lists ends in one Study or one Rejection.

    DICOM images are decoded once here, so every returned study loads with `load_study`. Only
    regular files are opened. Symbolic links to files inside the root are followed; links to
    files outside it and links to folders are skipped (not followed); broken and looping links,
    paths longer than PATH_MAX and folders that cannot be listed are quarantined (a folder that
    cannot be listed is one rejection: the files in it cannot be counted). Values that are not
    finite (NaN/Inf in NIfTI, float TIFF or rescaled DICOM) quarantine the file. Multi-frame
    DICOM whose frames are time points (cine) is skipped, and multi-frame DICOM with neither
    per-frame positions nor a slice spacing is quarantined rather than given 1 mm slices.

    Files are read, parsed and decoded in `workers` processes when there are at least
    `PARALLEL_MIN_FILES` of them; the result is the same as with one process, order included.

    Args:
        root: The data folder, searched recursively.
        progress: Show a tqdm progress bar over the files.
        workers: Processes that inspect files; default `default_workers()`, 1 for none.

    Returns:
        (studies, rejections): studies sorted by their first file path, DICOM series files in
        slice order; rejections sorted by path, each with a one-line reason free of header values
        and paths. Status "quarantined" marks bad input (empty, truncated, corrupt, pixel-less,
        undecodable, inconsistent series), "skipped" valid files that are not images.

    Raises:
        InputError: If `root` is not an existing folder or cannot be listed.
        ValueError: If `workers` is not a positive integer.

    Example:
        >>> studies, rejections = discover(Path("data"), progress=False)  # doctest: +SKIP
        >>> image = load_study(studies[0])  # doctest: +SKIP
    """
    studies, rejections, _ = discover_with_pixels(root, progress=progress, workers=workers)
    return studies, rejections


def discover_with_pixels(
    root: Path, *, progress: bool = True, workers: int | None = None
) -> tuple[list[Study], list[Rejection], dict[Path, PixelSummary]]:
    """`discover`, plus what `load_study` would give of the studies that are one DICOM file.

    Multi-frame files, radiographs and other unpositioned images are decoded during discovery
    anyway; their `PixelSummary` (shape, spacing, orientation, pixel hash) is kept, so a manifest
    build need not read them again. Other studies (series of slices, NIfTI, 2D exports) are not
    in the mapping.

    Returns:
        (studies, rejections, pixels): as `discover`, and the summary by the study's one file.

    Raises:
        InputError: If `root` is not an existing folder or cannot be listed.
        ValueError: If `workers` is not a positive integer.
    """
    count = check_workers(workers)
    root = Path(root).absolute()  # Study.files are absolute; symlinks are kept, not resolved
    if not root.is_dir():
        raise InputError(
            "the data root must be an existing folder, not a missing path or a file; check the root setting"
        )
    files = walk(root)
    real_root = os.path.realpath(root)
    studies: list[Study] = []
    rejections: list[Rejection] = []
    images: list[DicomImage] = []
    outcomes = tqdm(_inspected(files, real_root, count), total=len(files), desc="Scanning files", unit="file",
                    disable=not progress)
    with values_kept_between_files():  # series slices repeat their header values
        for outcome in outcomes:
            if isinstance(outcome, Study):
                studies.append(outcome)
            elif isinstance(outcome, Rejection):
                rejections.append(outcome)
            else:
                images.append(outcome)
    series_studies, series_rejections = assemble_series(images)
    known = {image.path: image.pixels for image in images if image.pixels is not None}
    studies.extend(series_studies)
    rejections.extend(series_rejections)
    studies.sort(key=lambda s: min(s.files))
    rejections.sort(key=lambda r: r.path)
    pixels = {s.files[0]: known[s.files[0]] for s in studies if len(s.files) == 1 and s.files[0] in known}
    return studies, rejections, pixels


def default_workers() -> int:
    """Worker processes intake uses by default: the CPUs this process may run on, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DEFAULT_WORKERS))


def check_workers(workers: int | None) -> int:
    """The number of worker processes to use: `workers`, or `default_workers()` for None.

    Raises:
        ValueError: If `workers` is not a positive integer.
    """
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer (1 = no worker processes), not {workers!r}; "
                         f"omit it to use {default_workers()}")
    return workers


def _inspected(files: list[Path], real_root: str, workers: int) -> Iterator[Study | Rejection | DicomImage]:
    """`_inspect` of every file, in order: in this process, or in `workers` worker processes."""
    if workers == 1 or len(files) < PARALLEL_MIN_FILES:
        return (_inspect(path, real_root) for path in files)
    return map_in_workers(partial(_inspect, real_root=real_root), files, workers)


def map_in_workers(function: Callable[[_T], _R], items: Sequence[_T], workers: int) -> Iterator[_R]:
    """`function(item)` for every item, in order, computed in `workers` worker processes.

    Workers are forked where the platform allows it: a caller's script then needs no
    `if __name__ == "__main__"` guard and nothing is imported again. Intake runs pydicom,
    nibabel, PIL, numpy and MONAI's readers there, never torch operations (forking a process
    that may hold torch's threads is safe for them). Python warnings raised in a worker are
    raised again here, in item order, so the caller's warning filters and recorders see them as
    they would without workers; an exception raised in a worker is raised here.

    Args:
        function: A module-level function (or a `functools.partial` of one) of one item.
        items: Its arguments; small, picklable values.
        workers: Worker processes (2 or more).

    Returns:
        The results, lazily, in the order of `items`.
    """
    # Chunks amortise the round trip; several per worker keep all of them busy until the end.
    chunk = max(1, min(64, len(items) // (workers * 8)))
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for result, caught in pool.map(partial(_recording, function), items, chunksize=chunk):
            for message, category, filename, lineno in caught:
                warnings.warn_explicit(message, category, filename, lineno)
            yield result


def _recording(function: Callable[[_T], _R], item: _T) -> tuple[_R, list[tuple]]:
    """`function(item)` in a worker, with the warnings it raised (message, category, file, line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(item)
    return result, [(str(w.message), w.category, w.filename, w.lineno) for w in caught]


def study_pixels(study: Study) -> PixelSummary | str:
    """The `PixelSummary` of `load_study(study)`, or the name of the error it raised (for a worker)."""
    try:
        image = load_study(study)
    except Exception as err:  # noqa: BLE001 - the caller quarantines the study, naming the error type
        return type(err).__name__
    return PixelSummary.of(image)


def load_study(study: Study) -> LoadedImage:
    """Load one study's pixels in MONAI's convention with its voxel-to-RAS affine.

    Reads with the study kind's MONAI image reader (`medtl.data.reader`), the same code a
    dataset's `LoadImaged` runs. DICOM radiographs and other single images get Modality
    LUT/rescale, VOI LUT/window and MONOCHROME1 inversion (brighter = more attenuation);
    CT/MR/PT/NM keep modality units (HU for CT). Colour images (DICOM RGB/YBR/palette, RGB(A)
    PNG/JPEG/TIFF exports) become luminance with ITU-R BT.601 weights (0.299 R + 0.587 G + 0.114 B,
    PIL's "L"); alpha is dropped. 2D exports carry no geometry: they get an identity affine
    (1 mm pixels), as MONAI gives them. Multi-page TIFFs load their first page (PIL's behaviour).

    Args:
        study: A study returned by `discover`.

    Returns:
        The float32 array, (columns, rows) or (columns, rows, slices), its affine and the study's
        modality ("" for NIfTI and 2D exports).

    Raises:
        InputError: If the files can no longer be read (changed since discovery).

    Example:
        >>> load_study(discover(Path("data"), progress=False)[0][0]).array.shape  # doctest: +SKIP
        (512, 512, 40)
    """
    # Imported here: MONAI (and torch) take seconds to import, and discovery does not need them.
    from medtl.data.reader import reader_for_kind

    try:
        reader = reader_for_kind(study.kind)
    except ValueError:
        raise InputError(
            f"study kind must be one of dicom_series, dicom_image, nifti, image2d, not {study.kind!r}"
        ) from None
    try:
        array, meta = reader.get_data(reader.read([str(path) for path in study.files]))
    except Exception:
        # `from None`: the original error can quote a path or a header value (PHI).
        raise InputError(
            f"a {study.kind} study of {len(study.files)} file(s) must be readable, not failing to load; "
            "the files may have changed since discover() ran, so run it again"
        ) from None
    return LoadedImage(
        np.ascontiguousarray(array, dtype=np.float32), np.asarray(meta["affine"], dtype=np.float64), study.modality
    )


def walk(root: Path) -> list[Path]:
    """Every entry under `root` that must end in a Study or a Rejection, sorted (deterministic).

    That is every entry that is not a folder (regular files, symbolic links of any kind, FIFOs,
    sockets, devices), every symbolic link to a folder (listed, not followed) and every folder
    that could not be listed (permission denied), whose files cannot be counted. The walk moves
    by folder file descriptors (`os.fwalk`), so entries whose path exceeds PATH_MAX are listed
    too, where `os.walk` would silently drop them. Paths are `root` joined with the entry's
    relative path (not resolved). `discover` and the manifest inventory both count this list.

    Args:
        root: The data folder; it may itself be a symbolic link to a folder.

    Returns:
        The entries, sorted.

    Raises:
        InputError: If `root` cannot be opened and listed as a folder.
    """
    root = Path(root)
    found: list[Path] = []
    listed: set[str] = set()
    announced: set[str] = set()
    try:
        # fwalk(".", dir_fd=...) walks the root even when it is a link, without following links below.
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for folder, dirs, names, _fd in os.fwalk(".", dir_fd=top):
                listed.add(folder)
                announced.update(os.path.join(folder, name) for name in dirs)
                found.extend(root / folder / name for name in names)
        finally:
            os.close(top)
    except OSError:
        raise InputError(
            "the data root must be a folder medtl can list, not one it cannot open or read; "
            "check its permissions"
        ) from None
    # fwalk names links to folders among the folders but never enters them, and skips folders
    # it cannot open: both are entries of their own.
    found.extend(root / name for name in announced - listed)
    return sorted(found)


def assemble_series(images: Iterable[DicomImage]) -> tuple[list[Study], list[Rejection]]:
    """Group DICOM images by SeriesInstanceUID into studies, quarantining inconsistent series.

    First, copies of one instance (same SOPInstanceUID, size, positions and pixels) in other
    encodings are skipped, keeping one: uncompressed, else lossless, else lossy, ties by path.
    Per series: byte-identical copies of a file are skipped; multi-frame files are 3D studies of
    their own; projection images and images without position/orientation are 2D studies of their
    own; the remaining slices are split by orientation (e.g. localizer + axial stack) and each
    part with two or more slices must be an even stack of one size. A series whose slices fail
    that is quarantined as a whole. All studies of a series share its header, with identifying
    values collected over all its files. Gantry-tilted stacks get a note (`Study.notes`).

    Args:
        images: Decodable DICOM images, in path order.

    Returns:
        (studies, rejections) for these images.
    """
    images = list(images)
    copies = _other_encodings(images)
    by_series: dict[str, list[DicomImage]] = {}
    for image in images:
        key = image.series_uid or f"no-series:{image.path}"
        by_series.setdefault(key, []).append(image)
    studies: list[Study] = []
    rejections: list[Rejection] = list(copies.values())
    for members in by_series.values():
        header = _series_header(members)  # copies too: their values must be scanned for as well
        slices: list[DicomImage] = []
        seen: dict[str, Path] = {}
        for image in members:
            if image.path in copies:
                continue
            if image.file_digest in seen:
                # A byte-identical copy would count the same image twice (and could leak across splits).
                rejections.append(Rejection(image.path, "skipped", "identical copy of another file of this series",
                                            copy_of=seen[image.file_digest]))
                continue
            seen[image.file_digest] = image.path
            if image.n_frames > 1:
                studies.append(
                    Study((image.path,), "dicom_series", image.modality, header, _tilt_notes(image))
                )
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


def _other_encodings(images: list[DicomImage]) -> dict[Path, Rejection]:
    """Rejections of the copies of an instance that another file holds in a better encoding.

    A re-encoded copy (RLE, JPEG-LS, JPEG 2000, deflate, other VR or byte order, padded pixel
    data) keeps the SOPInstanceUID but not the bytes, so the digest check of `assemble_series`
    misses it. Files that share the UID but not the size, positions or pixel fingerprint are
    different images (some anonymisers write one constant UID) and are left alone, and so are
    files whose transfer syntax and stored pixel bytes are the same: those differ in header
    values only (an edited copy), not in encoding, and keep their usual handling.
    """
    groups: dict[tuple[object, ...], list[DicomImage]] = {}
    for image in images:
        if image.sop_uid:
            key = (image.sop_uid, image.rows, image.columns, image.n_frames, image.positions)
            groups.setdefault(key, []).append(image)
    dropped: dict[Path, Rejection] = {}
    for group in groups.values():
        pending = sorted(group, key=lambda im: (dicom.encoding_rank(im.transfer_syntax), im.path))
        while pending:  # the best remaining file keeps its copies; other images form the next round
            best, rest = pending[0], pending[1:]
            same = [_same_pixels(image, best) for image in rest]
            pending = [image for image, copy in zip(rest, same, strict=True) if not copy]
            for image, copy in zip(rest, same, strict=True):
                if copy and _encoding(image) != _encoding(best):
                    dropped[image.path] = Rejection(
                        image.path, "skipped", "another copy of the same DICOM instance in another encoding",
                        copy_of=best.path,
                    )
    return dropped


def _encoding(image: DicomImage) -> tuple[str, str]:
    return image.transfer_syntax, image.pixel_digest


def _same_pixels(a: DicomImage, b: DicomImage) -> bool:
    """Whether two pixel fingerprints agree within `_COPY_RTOL` of their range."""
    if not a.thumbnail or len(a.thumbnail) != len(b.thumbnail):
        return False
    first, second = np.asarray(a.thumbnail), np.asarray(b.thumbnail)
    scale = float(np.ptp(np.concatenate([first, second])))
    return bool(np.allclose(first, second, rtol=0.0, atol=_COPY_RTOL * scale + 1e-6))


def _tilt_notes(image: DicomImage) -> tuple[str, ...]:
    """The gantry-tilt note of a multi-frame file whose per-frame positions form a tilted stack."""
    if image.orientation is None or image.positions is None or len(image.positions) != image.n_frames:
        return ()
    stack = geometry.order_stack(image.orientation, image.positions)
    return _notes(stack) if isinstance(stack, geometry.Stack) else ()


def _notes(stack: geometry.Stack) -> tuple[str, ...]:
    """What loading changes about a stack: gantry tilt is resampled away (`load_study`)."""
    if stack.tilt < geometry.TILT_MIN_DEG:
        return ()
    return (f"gantry tilt {stack.tilt:.1f}° corrected by resampling",)


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
    stack = geometry.order_stack(group[0].orientation, [image.positions[0] for image in group])
    if isinstance(stack, str):
        return stack
    files = tuple(group[i].path for i in stack.order)
    return Study(files, "dicom_series", group[0].modality, header, _notes(stack))


def _series_header(members: list[DicomImage]) -> HeaderFacts:
    values: set[str] = set()
    for image in members:
        values |= image.header.identifying_values
    return replace(members[0].header, identifying_values=frozenset(values))


def _inspect(path: Path, real_root: str) -> Study | Rejection | DicomImage:
    rejection = _entry_rejection(path, real_root)
    if rejection is not None:
        return rejection
    name = path.name.lower()
    suffix = path.suffix.lower()
    try:
        if path.stat().st_size == 0:
            return Rejection(path, "quarantined", "empty file (0 bytes)")
        if dicom.looks_like_dicom(path):  # by content first: DICOM files come with any name
            return dicom.inspect_dicom(path)
        if name.endswith(NIFTI_SUFFIXES):
            return _inspect_nifti(path)
        if suffix in IMAGE2D_SUFFIXES:
            return _inspect_image2d(path)
    except OSError as err:
        return Rejection(path, "quarantined", _os_error_reason(err))
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


def regular_file(path: Path, root: Path) -> bool:
    """Whether an entry `walk` listed may be opened and read, decided with stat alone.

    True for a regular file or a symbolic link to one inside `root`; False for FIFOs, sockets,
    devices, folders, broken or looping links, links out of the root and paths beyond PATH_MAX,
    which `discover` rejects without opening them. Whoever reads the entries `walk` lists (for
    example to hash them) must read only these.

    Args:
        path: An entry `walk(root)` returned.
        root: The data root.

    Returns:
        Whether reading `path` is safe and meant.
    """
    return _entry_rejection(Path(path), os.path.realpath(root)) is None


def _entry_rejection(path: Path, real_root: str) -> Rejection | None:
    """Why an entry is not a regular file to read, or None; opens nothing (stat only)."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            link = _link_rejection(path, real_root)
            if link is not None:
                return link
            info = os.stat(path)
    except OSError as err:
        return Rejection(path, "quarantined", _os_error_reason(err))
    if stat.S_ISDIR(info.st_mode):  # `walk` lists a folder only when it could not list its files
        return Rejection(path, "quarantined", _UNLISTABLE_FOLDER)
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(info.st_mode):
            return Rejection(path, "skipped", f"{kind}, not a regular file")
    if not stat.S_ISREG(info.st_mode):
        return Rejection(path, "skipped", "not a regular file")
    return None


def _link_rejection(path: Path, real_root: str) -> Rejection | None:
    """Why a symbolic link is not followed, or None for a link to a file inside the data root."""
    try:
        target = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return Rejection(
                path, "quarantined", "symbolic link loop (links that point at each other), not followed"
            )
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return Rejection(path, "quarantined", "broken symbolic link: its target does not exist")
        raise
    if stat.S_ISDIR(target.st_mode):
        return Rejection(path, "skipped", "symbolic link to a folder, not followed")
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        # A link out of the root would train on files nobody put in the data set.
        return Rejection(path, "skipped", "symbolic link to a file outside the data root, not followed")
    return None


def _os_error_reason(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "path longer than the OS limit (PATH_MAX); shorten the folder names"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "file could not be read (permission denied)"
    return "file could not be read (operating-system error)"


def _inspect_nifti(path: Path) -> Study | Rejection:
    # nibabel reads the whole array here (as MONAI's NibabelReader will), without importing MONAI,
    # so a truncated .nii.gz is found during discovery.
    import nibabel as nib

    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception:
        return Rejection(path, "quarantined", "NIfTI file could not be read (truncated or corrupt)")
    spatial = squeeze_trailing(data.shape)
    if len(spatial) not in (2, 3):
        return Rejection(
            path, "quarantined", "NIfTI must hold a 2D or 3D image, not a time series or multi-channel image"
        )
    problem = dicom.non_finite_problem(data, "voxel")
    if problem:  # training would stop much later on a NaN loss or score, naming no file
        return Rejection(path, "quarantined", problem)
    return Study((path,), "nifti", "", None)


def _inspect_image2d(path: Path) -> Study | Rejection:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            # Only float modes hold NaN/Inf (32-bit float TIFF); PIL's loader reads the first page too.
            problem = dicom.non_finite_problem(np.asarray(image), "pixel") if image.mode == "F" else ""
    except Exception:
        return Rejection(path, "quarantined", "image file could not be read (truncated or corrupt)")
    return Rejection(path, "quarantined", problem) if problem else Study((path,), "image2d", "", None)


def squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the second: (x, y, 1) is 2D, (x, y, z, 1) is 3D."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape
