"""DICOM SEG and RTSTRUCT masks in a manifest build: which rows they belong to, and their label maps.

Discovery skips SEG and RTSTRUCT files ("not an image"); a labels CSV row may still name one as its
`mask`, and with `masks_from_dicom` a row without a mask gets the one SEG/RTSTRUCT under the data
root that references its series. The label map (`dicom_masks.label_map`) is made here once, for
its hash and label values; training makes it again from the same files and `segment_map`.

Messages name the row ("the DICOM mask of labels CSV row 7"), never the mask's file name (it may
carry a patient's name) and never a segment or ROI name that is not a plain word.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medtl.data import dicom_masks
from medtl.data.dicom import pixel_sha256
from medtl.data.inventory import _Disk
from medtl.errors import ConfigError, InputError
from medtl.vocabulary import generic_value

#: SOP Class UID of each mask kind `dicom_masks.mask_kind` tells apart (the manifest's `mask_sop_class`).
SOP_CLASS = {"seg": "1.2.840.10008.5.1.4.1.1.66.4", "rtstruct": dicom_masks.RTSTRUCT_SOP_CLASS}


@dataclass(frozen=True)
class DicomMask:
    """What the manifest keeps of a DICOM mask's label map (in memory until written)."""

    sha256: str
    shape: tuple[int, ...]
    labels: tuple[int, ...]
    sop_class: str
    unknown: tuple[str, ...]  # segment/ROI names not in the segment map (free text: not written as such)


def check_segment_map(segment_map: Mapping[str, int]) -> dict[str, int]:
    """The segment map as given, once checked (class indices 0-255, names that differ only in case
    or spacing mapping to one class): a bad map is refused before any row, not in every row.

    Raises:
        ConfigError: naming what is wrong (never a name: names are free text).
    """
    try:
        dicom_masks.check_segment_map(segment_map)
    except InputError as err:
        raise ConfigError(f"{err} (data.segment_map / --segment-map)") from None
    return dict(segment_map)


def dicom_mask_files(disk: _Disk) -> dict[str, str]:
    """The SEG/RTSTRUCT files discovery skipped, by relative path -> "seg" or "rtstruct"."""
    found = {}
    for rel, rejection in disk.rejected.items():
        if rejection.status == "skipped" and rejection.copy_of is None:
            kind = dicom_masks.mask_kind(disk.root / rel)
            if kind is not None:
                found[rel] = kind
    return found


def with_found_masks(disk: _Disk, labels: Sequence, masks: Mapping[str, str]) -> tuple[list, dict[int, str]]:
    """Rows without a mask get the one DICOM mask that references their series (`masks_from_dicom`).

    Returns:
        (label rows, problems by row number); a row whose series two masks reference is a problem
        (which one to train on is the user's choice), a row with no referencing mask is kept as is.
    """
    by_series: dict[str, list[str]] = {}
    for rel in sorted(masks):
        try:
            by_series.setdefault(dicom_masks.referenced_series(disk.root / rel), []).append(rel)
        except InputError:
            continue  # names no series: it can only be used when a row names it
    rows, problems = [], {}
    for row in labels:
        found = disk.targets(row.path) if not row.mask else None
        series = _series_uid(disk, found[0]) if found and len(found) == 1 else ""
        candidates = by_series.get(series, []) if series else []
        if len(candidates) > 1:
            problems[row.number] = (f"{len(candidates)} DICOM masks reference its series; name the one to use in "
                                    f"the mask column")
        elif candidates:
            row = dataclasses.replace(row, mask=candidates[0])
        rows.append(row)
    return rows, problems


def load_dicom_mask(disk: _Disk, rel: str, kind: str, study_index: int, segment_map: Mapping[str, int],
                    row_number: int, cache: dict) -> DicomMask | str:
    """The label map of a DICOM mask on its row's series, or the reason it cannot be used.

    `kind` is the mask's "seg" or "rtstruct" (from `dicom_mask_files`); `cache` holds one result per
    (mask, series), so a mask is rasterised once per build.
    """
    if (rel, study_index) not in cache:
        cache[rel, study_index] = _label_map(disk, rel, kind, study_index, segment_map, row_number)
    return cache[rel, study_index]


def _label_map(disk: _Disk, rel: str, kind: str, study_index: int, segment_map: Mapping[str, int], row_number: int):
    if not segment_map:
        raise ConfigError(
            "segment_map must name the classes of DICOM SEG/RTSTRUCT masks, not be empty: medtl does not guess "
            "which segment is which class; set data.segment_map (or --segment-map), e.g. {liver: 1, tumour: 2}")
    study = disk.studies[study_index]
    name = f"the DICOM mask of labels CSV row {row_number}"
    try:
        labels, unknown = dicom_masks.label_map(disk.root / rel, study.files, segment_map, name=name)
    except InputError as err:
        return str(err)
    values = tuple(int(v) for v in np.unique(labels))
    return DicomMask(label_map_sha256(labels), tuple(labels.shape), values, SOP_CLASS[kind], tuple(unknown))


def label_map_sha256(labels: np.ndarray) -> str:
    """The manifest's `mask_sha256` of a DICOM mask's label map: the pixel hash of its float32 values,
    as `load_study` gives a mask image, so equal label maps hash equal whatever file they came from."""
    return pixel_sha256(labels.astype(np.float32))


def unmapped_names(masks: Sequence[DicomMask]) -> tuple[list[str], int]:
    """The segment/ROI names no segment map entry matched: the plain-word ones to show, and how many
    others there are (free text that is not a phrase of common words is never shown: it may be a name)."""
    names = sorted({n for mask in masks for n in mask.unknown})
    shown = [n for n in names if generic_value(n)]
    return shown, len(names) - len(shown)


def _series_uid(disk: _Disk, index: int) -> str:
    header = disk.studies[index].header
    return header.series_uid if header is not None and header.series_uid else ""
