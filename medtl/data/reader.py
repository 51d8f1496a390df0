"""MONAI image readers for the studies `discover` finds, so pipelines are `LoadImaged(keys, reader=...)`.

- `MedtlDicomReader`: a DICOM file (single image or multi-frame) or a series of single-frame
  files given in slice order (`Study.files`), with medtl's rules: slices along the normal,
  gantry tilt resampled away, Modality LUT/rescale, VOI LUT/window and MONOCHROME1 inversion
  for radiographs, colour as luminance (see medtl/data/dicom.py for what MONAI's `PydicomReader`
  does differently).
- `MedtlNiftiReader`: MONAI's `NibabelReader`, with trailing singleton axes dropped ((x, y, 1) is
  a 2D image, (x, y, z, 1) a 3D one).
- `MedtlImage2dReader`: MONAI's `PILReader` for PNG/JPEG/TIFF/BMP exports, palette/CMYK/YCbCr
  converted to RGB and colour turned into luminance with the BT.601 weights of `dicom.LUMA_WEIGHTS`.
- `MedtlStudyReader`: any of the above, chosen by content the way `discover` classifies files
  (DICOM by its bytes first, then NIfTI and 2D exports by name). The datasets load with it.

Every reader returns the array in MONAI's voxel order ((columns, rows[, slices]), no channel
axis) and metadata that holds geometry only (`GEOMETRY_KEYS`): never a file name and never a
header value, so nothing identifying can reach a cache, a log or a file through the metadata.
`LoadImage` adds the file name (`filename_or_obj`) itself; `PRUNE_META_PATTERN` drops it (and
anything but geometry) as the image is made.

Example:
    >>> from monai.transforms import LoadImaged
    >>> load = LoadImaged("image", reader=MedtlStudyReader(), ensure_channel_first=True,
    ...                   prune_meta_pattern=PRUNE_META_PATTERN, prune_meta_sep=" ")
    >>> load({"image": [str(f) for f in study.files]})["image"].shape  # doctest: +SKIP
    torch.Size([1, 512, 512, 40])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader, PILReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.dataset import Dataset

from medtl.data import dicom, geometry
from medtl.data.deid import quiet_pydicom
from medtl.data.discover import IMAGE2D_SUFFIXES, NIFTI_SUFFIXES, squeeze_trailing
from medtl.errors import InputError

PathLike = str | os.PathLike
#: The only metadata keys medtl's readers return, and the only ones `PRUNE_META_PATTERN` keeps.
GEOMETRY_KEYS = (
    MetaKeys.AFFINE, MetaKeys.ORIGINAL_AFFINE, MetaKeys.SPATIAL_SHAPE, MetaKeys.ORIGINAL_CHANNEL_DIM, MetaKeys.SPACE,
)
#: For `LoadImage(d)(prune_meta_pattern=..., prune_meta_sep=" ")`: a regular expression matching
#: every metadata key but `GEOMETRY_KEYS` (MONAI deletes the keys it matches with `re.search`).
PRUNE_META_PATTERN = "^(?!(?:" + "|".join(str(key) for key in GEOMETRY_KEYS) + ")$)"
# PIL modes MONAI's PILReader returns as numbers we can use directly; others (palette, CMYK, YCbCr,
# LAB, HSV) are converted to RGB first so that the luminance sees colours, not palette indices.
_PIL_DIRECT_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB", "RGBA"})


class MedtlDicomReader(ImageReader):
    """DICOM as `discover` and `load_study` read it, behind MONAI's `ImageReader` contract.

    `read` takes one file (a single image, or a multi-frame file whose frames are slices) or
    several single-frame files that are one series, already in slice order (`Study.files`);
    unlike MONAI's readers, several files are one volume, not channels. `get_data` returns a
    float32 array, (columns, rows) or (columns, rows, slices), in modality units (HU for CT) or,
    for single images of other modalities, display values (VOI LUT/window, MONOCHROME1 inverted),
    with `GEOMETRY_KEYS` metadata (voxel-to-RAS affine in mm, `space` "RAS", no channel axis).

    Example:
        >>> reader = MedtlDicomReader()
        >>> array, meta = reader.get_data(reader.read(["s0.dcm", "s1.dcm", "s2.dcm"]))  # doctest: +SKIP
        >>> array.shape, meta["affine"].shape  # doctest: +SKIP
        ((512, 512, 3), (4, 4))
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every file is DICOM, told by content as `discover` does (DICOM comes with any name)."""
        files = ensure_tuple(filename)
        return bool(files) and all(_is_dicom(name) for name in files)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Dataset | list[Dataset]:
        """The pydicom datasets of a file (one dataset) or of a series in slice order (a list).

        Raises:
            InputError: If a file is not DICOM or cannot be parsed (naming no path or value).
        """
        files = ensure_tuple(data)
        if not self.verify_suffix(files):
            raise InputError("MedtlDicomReader input must be DICOM files (one image, or one series in slice "
                             "order), not folders or other files; pass the files of a study from discover()")
        try:
            datasets = [dicom.read_dataset(Path(name)) for name in files]
        except Exception as err:  # noqa: BLE001 - the message of a pydicom error can quote a path
            raise InputError(f"DICOM files must be readable, not failing with {type(err).__name__}; "
                             "check that they did not change since discover() ran") from None
        return datasets if len(datasets) > 1 else datasets[0]

    def get_data(self, img: Dataset | Sequence[Dataset]) -> tuple[np.ndarray, dict]:
        """Decoded pixels and geometry-only metadata of what `read` returned.

        Raises:
            InputError: If the pixels do not decode or the slices no longer form a volume.
        """
        try:
            with quiet_pydicom():
                if isinstance(img, Dataset):
                    array, affine = (dicom.multiframe_volume(img) if dicom.number_of_frames(img) > 1
                                     else dicom.single_image(img))
                else:
                    array, affine = _series(list(img))
        except Exception as err:  # noqa: BLE001 - the message of a decoder error can quote a header value
            raise InputError(f"DICOM pixels must decode into one image or volume, not fail with "
                             f"{type(err).__name__}; run discover() again to see what changed") from None
        return array, geometry_meta(array, affine)


class MedtlNiftiReader(ImageReader):
    """One NIfTI file through MONAI's `NibabelReader`, as a 2D or 3D image without channel axis.

    Trailing singleton axes beyond the second are dropped ((x, y, 1) is 2D, (x, y, z, 1) is 3D),
    as `discover` counts them; the array keeps the file's dtype (`LoadImage` converts it). The
    NIfTI header (whose free-text fields can hold names) is not passed on: the metadata is
    `GEOMETRY_KEYS` only, with nibabel's affine.
    """

    def __init__(self) -> None:
        self._nibabel = NibabelReader()

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether `filename` is one `.nii` or `.nii.gz` file."""
        files = ensure_tuple(filename)
        return len(files) == 1 and str(files[0]).lower().endswith(NIFTI_SUFFIXES)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """The nibabel image of one NIfTI file.

        Raises:
            InputError: If `data` is not one NIfTI file or cannot be read.
        """
        return _read_one(self, self._nibabel, data, "one .nii or .nii.gz file")

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """The voxels with trailing singleton axes dropped, and geometry-only metadata.

        Raises:
            InputError: If the image is not 2D or 3D (a time series or multi-channel volume).
        """
        array, meta = self._nibabel.get_data(img)
        array = np.asarray(array)
        array = array.reshape(squeeze_trailing(array.shape))
        if array.ndim not in (2, 3):
            raise InputError("NIfTI must hold a 2D or 3D image, not a time series or multi-channel image; "
                             "export one volume per file")
        return array, geometry_meta(array, meta[MetaKeys.AFFINE])


class MedtlImage2dReader(ImageReader):
    """One PNG/JPEG/TIFF/BMP export through MONAI's `PILReader`, as float32 luminance.

    Palette, CMYK, YCbCr, LAB and HSV images are converted to RGB first; RGB(A) becomes
    0.299 R + 0.587 G + 0.114 B (alpha dropped), grey with alpha keeps the grey. Exports carry
    no geometry: the affine is the identity (1 mm pixels), as MONAI gives them.
    """

    def __init__(self) -> None:
        self._pil = PILReader(converter=pil_to_usable_mode)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether `filename` is one file with a PNG, JPEG, TIFF or BMP name."""
        files = ensure_tuple(filename)
        return len(files) == 1 and Path(files[0]).suffix.lower() in IMAGE2D_SUFFIXES

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """The PIL image of one export, in a mode whose numbers are grey or RGB values.

        Raises:
            InputError: If `data` is not one such file or cannot be opened.
        """
        return _read_one(self, self._pil, data, "one PNG, JPEG, TIFF or BMP file")

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """(columns, rows) float32 luminance and geometry-only metadata."""
        array, _ = self._pil.get_data(img)
        # (columns, rows[, channels]). C order before the weighted sum: the summation order (and so
        # the last bit of a float32, hence the manifest's pixel sha256) follows the memory layout.
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 3:
            array = array[..., :3] @ dicom.LUMA_WEIGHTS if array.shape[-1] >= 3 else array[..., 0]
        array = np.ascontiguousarray(array, dtype=np.float32)
        return array, geometry_meta(array, np.eye(4))


@dataclass(frozen=True)
class _Opened:
    """What `MedtlStudyReader.read` hands to its `get_data`: the chosen reader and its image, or why not."""

    reader: ImageReader | None
    image: Any = None
    problem: str = ""


class MedtlStudyReader(ImageReader):
    """Any study `discover` finds: DICOM (by content), NIfTI or a 2D export (by name), in that order.

    `read` never raises: `LoadImage` would answer a failed `read` by trying MONAI's own readers
    (`PydicomReader` stacks a list of DICOM files as channels, without medtl's slice order or VOI
    LUT) and by logging the file's path. A study it cannot read fails in `get_data` instead, with
    an `InputError` that names no path.

    Example:
        >>> reader = MedtlStudyReader()
        >>> array, meta = reader.get_data(reader.read([str(f) for f in study.files]))  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.readers: tuple[ImageReader, ...] = (MedtlDicomReader(), MedtlNiftiReader(), MedtlImage2dReader())

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether one of its readers takes `filename`."""
        return self._reader_of(filename) is not None

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> _Opened:
        """The reader for `data` and what it read, or the reason it could not be read."""
        try:
            reader = self._reader_of(data)
            if reader is None:
                return _Opened(None, problem="a study must be DICOM files, one NIfTI file or one PNG/JPEG/TIFF/BMP "
                                             "file, not another kind of file; run discover() again")
            return _Opened(reader, reader.read(data))
        except InputError as err:
            return _Opened(None, problem=str(err))
        except OSError as err:  # a vanished file while the content is sniffed
            return _Opened(None, problem=f"study files must be readable, not failing with {type(err).__name__}; "
                                         "run discover() again")

    def get_data(self, img: _Opened) -> tuple[np.ndarray, dict]:
        """What the chosen reader's `get_data` returns.

        Raises:
            InputError: If `read` could not read the study.
        """
        if img.reader is None:
            raise InputError(img.problem)
        return img.reader.get_data(img.image)

    def _reader_of(self, data: Sequence[PathLike] | PathLike) -> ImageReader | None:
        return next((reader for reader in self.readers if reader.verify_suffix(data)), None)


def reader_for_kind(kind: str) -> ImageReader:
    """A new reader for a `Study.kind`: DICOM for "dicom_series"/"dicom_image", else NIfTI or 2D.

    Raises:
        ValueError: For an unknown kind.
    """
    readers = {"dicom_series": MedtlDicomReader, "dicom_image": MedtlDicomReader,
               "nifti": MedtlNiftiReader, "image2d": MedtlImage2dReader}
    if kind not in readers:
        raise ValueError(f"study kind must be one of {', '.join(readers)}, not {kind!r}")
    return readers[kind]()


def geometry_meta(array: np.ndarray, affine: Any) -> dict:
    """MONAI metadata of a channel-less array: its affine (twice, as read), spatial shape, space RAS."""
    affine = np.array(affine, dtype=np.float64, copy=True)
    return {
        MetaKeys.AFFINE: affine,
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),  # MONAI's "no_channel"
        MetaKeys.SPACE: SpaceKeys.RAS,
    }


def pil_to_usable_mode(image: Any) -> Any:
    """PIL image in, PIL image out: palette/CMYK/YCbCr/... become RGB, grey and RGB(A) stay."""
    return image if image.mode in _PIL_DIRECT_MODES else image.convert("RGB")


def _read_one(owner: ImageReader, monai_reader: ImageReader, data: Sequence[PathLike] | PathLike, what: str) -> Any:
    """`monai_reader.read` of the one file `owner` takes, with errors that name no path."""
    if not owner.verify_suffix(data):
        raise InputError(f"{type(owner).__name__} input must be {what}, not other or several files")
    try:
        return monai_reader.read(ensure_tuple(data)[0])
    except Exception as err:  # noqa: BLE001 - nibabel's and PIL's messages quote the path
        raise InputError(f"{what} must be readable, not failing with {type(err).__name__}; "
                         "check that it did not change since discover() ran") from None


def _is_dicom(name: PathLike) -> bool:
    path = Path(name)
    return path.is_file() and dicom.looks_like_dicom(path)


def _series(datasets: list[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Single-frame slices, already in slice order, as a (columns, rows, slices) volume.

    A gantry-tilted stack is resampled onto the orthogonal grid of its normal
    (`geometry.correct_gantry_tilt`), so the affine has no shear and the third spacing is the
    slice distance along the normal.
    """
    slices = [dicom.frames(ds)[0] for ds in datasets]
    places = [dicom.frame_geometry(ds, 1) for ds in datasets]
    if len({s.shape for s in slices}) != 1:
        raise ValueError("slices of one series differ in size")
    orientation, first, spacing = places[0]
    last = places[-1][1]
    if orientation is None or first is None or last is None:
        raise ValueError("series slices lack position or orientation")
    step = (np.asarray(last[0]) - np.asarray(first[0])) / (len(datasets) - 1)
    volume, step = geometry.correct_gantry_tilt(
        np.stack(slices, axis=-1).transpose(1, 0, 2), orientation, spacing, step
    )
    return np.ascontiguousarray(volume), geometry.volume_affine(orientation, first[0], spacing, step)
