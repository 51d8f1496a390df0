"""Plain data records shared by the data layer: what was found on disk and what was loaded.

Identifying values (patient IDs, names, UIDs, original paths) live only in these in-memory
records. Nothing in this module writes anywhere; the manifest layer decides what may leave
memory, and it only ever writes pseudonyms, codes and aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

StudyKind = Literal["dicom_series", "dicom_image", "nifti", "image2d"]
RejectionStatus = Literal["quarantined", "skipped"]


@dataclass(frozen=True)
class Rejection:
    """A file medtl saw but will not learn from, with a one-line reason.

    `status` is "quarantined" for bad input (corrupt, truncated, zero-byte, pixel-less,
    undecodable, inconsistent series) and "skipped" for valid files that are not images
    (DICOM SR/PR/KO/RTSTRUCT, text files, ...). `reason` must never contain a header value
    or a path: the manifest layer writes it next to the file's alias. A labels row that names a
    copy (`copy_of`) is served by the study of the file it copies.
    """

    path: Path
    status: RejectionStatus
    reason: str
    copy_of: Path | None = None  # for a copy of another file's image: that file (in memory only)


@dataclass(frozen=True)
class HeaderFacts:
    """Identifying and subgroup-relevant DICOM header values of one series (in memory only).

    Empty strings mean "absent". `identifying_values` collects every identifying value seen in
    the series' headers per DICOM PS3.15 Annex E Basic Profile (names, IDs, dates, UIDs,
    institution, physicians, free-text descriptions, private tag strings): the manifest layer
    uses them to alias file names and to scan everything it writes.
    """

    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sex: str = ""  # PatientSex as stored: "M", "F", "O" or ""
    age: str = ""  # PatientAge as stored, e.g. "045Y", or ""
    birth_date: str = ""  # YYYYMMDD or ""
    study_date: str = ""  # YYYYMMDD or ""
    institution: str = ""
    manufacturer: str = ""
    model: str = ""
    body_part: str = ""
    photometric: str = ""
    identifying_values: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # (value, attribute)


@dataclass(frozen=True)
class Study:
    """One unit of learning found on disk: a DICOM series, a radiograph, a NIfTI or a 2D export.

    `files` are absolute paths (symbolic links kept, not resolved); for a DICOM series they are
    already in slice order (by position along the slice normal). `header` is None for non-DICOM
    inputs. `notes` are fixed one-line sentences, free of paths and header values, about what
    loading changes (e.g. "gantry tilt 18.5° corrected by resampling"), for the manifest layer to
    warn about and count.
    """

    files: tuple[Path, ...]
    kind: StudyKind
    modality: str
    header: HeaderFacts | None = None
    notes: tuple[str, ...] = ()


@dataclass
class LoadedImage:
    """Pixels of one study in MONAI's voxel convention plus geometry.

    `array` is float32 without a channel axis, indexed like MONAI's readers return it:
    (columns, rows) for 2D and (columns, rows, slices) for 3D. `affine` is the 4x4 voxel-to-RAS
    matrix (millimetres; identity scaled by pixel spacing when the source has no geometry).
    Intensities are in modality units: Hounsfield units for CT after rescale slope/intercept,
    and for radiographs after modality LUT, VOI LUT/window and MONOCHROME1 inversion, so that
    brighter always means more attenuation.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per spatial axis, from the affine."""
        ndim = self.array.ndim
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(ndim))

    @property
    def orientation(self) -> str:
        """Axis codes such as "RAS" (3D) or "RA" (2D) derived from the affine."""
        import nibabel as nib

        codes = nib.orientations.aff2axcodes(self.affine)
        return "".join(c or "?" for c in codes[: self.array.ndim])
