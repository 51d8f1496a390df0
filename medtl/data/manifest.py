"""Studies + a labels CSV -> the privacy-aware manifest CSV and its JSON sidecar.

The manifest is the only description of the data that leaves the data folder: one row per
study/series used for learning, with keyed pseudonyms instead of identifiers, coarsened
subgroups, patient-level splits, decoded-pixel hashes and the relative path (or its alias).
The sidecar accounts for every file seen, records k-anonymity and the file inventory that
`medtl.data.verify.verify_manifest` re-checks. Before a build succeeds, every output (and every
medtl log message it would emit) is scanned for the identifying values read from the inputs; a
hit deletes the outputs and stops the build (`medtl.data.output_guard`).

Example:
    >>> result = build_manifest(Path("data"), Path("data/labels.csv"), Path("out/manifest.csv"))
    ... # doctest: +SKIP
    >>> result.sidecar_json.name  # doctest: +SKIP
    'manifest.json'
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from medtl.data import discover as discovery
from medtl.data.deid import attribute_kind
from medtl.data.dicom import PixelSummary, pixel_sha256
from medtl.data.inventory import _Disk, _inside, _row_id, _scan_disk, _series_identity
from medtl.data.leakage import SplitGroups, check_given_splits, split_groups
from medtl.data.manifest_masks import (
    DicomMask,
    check_segment_map,
    dicom_mask_files,
    load_dicom_mask,
    unmapped_names,
    with_found_masks,
)
from medtl.data.needles import Needles, PathNamer, identifying_needles, looks_identifying, needles_of
from medtl.data.output_guard import _held_messages, _write_checked
from medtl.data.privacy import (
    UNKNOWN,
    ProjectKey,
    age_band,
    key_created_message,
    load_key,
    normalise_sex,
    save_aliases,
    scanner_code,
    site_code,
)
from medtl.data.sidecar import NO_LABEL_ROW, BuildFacts, sidecar, tilt_corrected
from medtl.data.splits import SPLITS, assign_splits, check_fractions, check_leakage, normalise_split
from medtl.errors import ConfigError, InputError
from medtl.vocabulary import PLACEHOLDER_WORDS, words_of

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "id", "patient", "study", "series", "key_id", "path", "kind", "modality", "n_files", "shape", "spacing",
    "orientation", "sha256", "label", "mask", "mask_sha256", "mask_sop_class", "sex", "age_band", "site", "scanner",
)  # then the declared extra subgroup columns, then "split"
LABEL_COLUMNS = ("path", "label", "mask", "patient_id", "split", "sex", "age", "site", "scanner")


@dataclass(frozen=True, repr=False)
class LabelRow:
    """One row of the labels CSV, cleaned. `number` is the CSV line (the header is line 1).

    Its repr shows the line number only: the cells hold patient IDs, paths and free text.
    """

    number: int
    path: str
    label: str = ""
    mask: str = ""
    patient_id: str = ""
    split: str = ""
    sex: str = ""
    age: str = ""
    site: str = ""
    scanner: str = ""
    extras: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"LabelRow(row {self.number})"


@dataclass(frozen=True)
class ManifestResult:
    """What `build_manifest` wrote (the CLI prints `key_message` when it is not None)."""

    manifest_csv: Path
    sidecar_json: Path
    key_id: str
    key_path: Path
    key_created: bool
    key_message: str | None
    rows: int
    patients: int
    counts: dict[str, int]
    split_rows: dict[str, int]
    k_anonymity: int | None
    warnings: tuple[str, ...]
    # Identifying value -> kind, in memory only, so later steps (MLflow, report) can be scanned
    # for the same values; never written, never shown in repr.
    forbidden: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# Labels CSV


def read_labels(labels_csv: Path, subgroup_columns: Sequence[str] = (), *, targets: bool = True) -> list[LabelRow]:
    """Read and check the labels CSV; errors name the file and row, never a value.

    Args:
        labels_csv: Columns `path` and `label` and/or `mask`; optional `patient_id`, `split`,
            `sex`, `age`, `site`, `scanner` and the declared extra subgroup columns.
        subgroup_columns: Extra subgroup columns to carry into the manifest.
        targets: Require a `label` or `mask` column (False when masks are found from DICOM).

    Returns:
        The rows, in file order.

    Raises:
        InputError: If the file, a column or a row is unusable.
    """
    name = Path(labels_csv).name
    if not Path(labels_csv).is_file():
        raise InputError(f"labels CSV must be an existing file, not missing ({name}); check the path")
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = Path(labels_csv).read_bytes()[: err.start].count(b"\n") + 1
        raise InputError(
            f"{name} must be UTF-8 text, not another encoding (the first byte that is not UTF-8 is on line {line}); "
            f"save it as 'CSV UTF-8' in your spreadsheet program"
        ) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(
            f"{name} must be a comma-separated table with a header row, not unreadable ({type(err).__name__}); "
            f"save it as CSV"
        ) from err
    table.columns = [str(c).strip().lower() for c in table.columns]
    extras = _check_columns(name, list(table.columns), subgroup_columns, targets)
    rows, problems, seen = [], [], {}
    for number, record in enumerate(table.to_dict("records"), start=2):
        cell = {k: str(v).strip() for k, v in record.items()}
        path, mask = _clean_rel(cell["path"]), _clean_rel(cell.get("mask", ""))
        label = _canonical_label(cell.get("label", ""))
        if path is None or mask is None:
            problems.append((number, "path and mask must be relative to the data root, not absolute or leaving it (..)"))
        elif not path:
            problems.append((number, "path must not be empty"))
        elif path in seen:
            problems.append((number, f"path must appear once, not again after row {seen[path]}"))
        try:
            split = normalise_split(cell.get("split", ""))
        except ValueError:
            problems.append((number, "split must be train, val, test or empty"))
            split = ""
        if cell.get("age") and not _is_age(cell["age"]):
            problems.append((number, "age must be a number of years (0-150) or empty"))
        if path:
            seen.setdefault(path, number)
        rows.append(LabelRow(
            number, path or "", label, mask or "", cell.get("patient_id", ""), split, cell.get("sex", ""),
            cell.get("age", ""), cell.get("site", ""), cell.get("scanner", ""), tuple(cell[c] for c in extras)))
    if problems:
        raise InputError(f"{name} {_row_problems(problems)}; fix these rows and rebuild")
    return rows


def _row_problems(problems: list[tuple[int, str]]) -> str:
    """Problems grouped by kind: "rows 2, 3, 4 and 7 more: path and mask must be relative ..."."""
    by_text: dict[str, list[int]] = {}
    for number, text in problems:
        by_text.setdefault(text, []).append(number)
    parts = []
    for text, numbers in list(by_text.items())[:5]:
        shown = ", ".join(str(n) for n in numbers[:5]) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
        parts.append(f"row{'s' if len(numbers) > 1 else ''} {shown}: {text}")
    more = f" (and {len(by_text) - 5} more kinds of problem)" if len(by_text) > 5 else ""
    return "; ".join(parts) + more


def extra_subgroups(subgroup_columns: Sequence[str]) -> list[str]:
    """Declared subgroup columns beyond the built-in ones, lower-cased, in order.

    Raises:
        ConfigError: If a name clashes with a manifest or labels-CSV column.
    """
    extras: list[str] = []
    for column in (str(c).strip().lower() for c in subgroup_columns):
        if column in ("sex", "age", "age_band", "site", "scanner") or column in extras:
            continue  # built-in subgroups are always there
        if not column or column in MANIFEST_COLUMNS or column in LABEL_COLUMNS:
            raise ConfigError(f"subgroup column must not be empty or a manifest column, not {column!r}; rename it")
        extras.append(column)
    return extras


def _check_columns(name: str, columns: list[str], subgroup_columns: Sequence[str], targets: bool = True) -> list[str]:
    if "path" not in columns:
        separator = next((s for s in (";", "\t", "|") if len(columns) == 1 and s in columns[0]), None)
        if separator:
            raise InputError(f"{name} must be comma-separated, not separated by {separator!r}; save it as CSV with "
                             f"commas (a 'path' column, relative to the data root)")
        raise InputError(f"{name} must have a 'path' column, not only {columns}; add it (relative to the data root)")
    if targets and "label" not in columns and "mask" not in columns:
        raise InputError(f"{name} must have a 'label' and/or 'mask' column, not neither; add the targets")
    extras = extra_subgroups(subgroup_columns)
    for column in extras:
        if column not in columns:
            raise InputError(f"subgroup column {column!r} must be a column of {name}, not missing; add it or "
                             f"drop it from the subgroup columns")
    return extras


def _clean_rel(text: str) -> str | None:
    """POSIX relative path without '.' parts; None for absolute or escaping paths."""
    text = text.replace("\\", "/").strip()
    if not text:
        return ""
    pure = PurePosixPath(text)
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":") or ".." in pure.parts:
        return None
    return PurePosixPath(*[p for p in pure.parts if p != "."]).as_posix() if pure.parts else "."


def _is_age(text: str) -> bool:
    try:
        return 0 <= float(text) <= 150
    except ValueError:
        return False


def _canonical_label(text: str) -> str:
    """Integers in any spelling ("1.0", "01") become "1"; class names are kept as written."""
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


# ---------------------------------------------------------------------------------------------
# Build


def build_manifest(
    root: Path,
    labels_csv: Path,
    out_csv: Path,
    *,
    key_file: Path | None = None,
    seed: int = 0,
    subgroup_columns: Sequence[str] = (),
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    k_min: int = 11,
    progress: bool = True,
    exclude: Sequence[Path] = (),
    workers: int | None = None,
    segment_map: Mapping[str, int] | None = None,
    masks_from_dicom: bool = False,
) -> ManifestResult:
    """Build the manifest CSV and its sidecar `out_csv.with_suffix(".json")`.

    Args:
        root: Data folder; every file under it is accounted for in the sidecar.
        labels_csv: The labels CSV (see `read_labels`); may lie inside `root`.
        out_csv: Manifest CSV to write (parents are created).
        key_file: Project key; default `$MEDTL_KEY_FILE`, else `<config dir>/keys/medtl.key`.
        seed: Seed of the patient-level split.
        subgroup_columns: Extra labels-CSV columns to carry as subgroups.
        fractions: Train/val/test fractions for patients without a given split.
        k_min: Smallest acceptable k-anonymity over (sex, age_band, site); below it, a warning.
        progress: Show progress bars.
        exclude: More files under `root` that are not data (a published copy of this manifest
            and its sidecar); the outputs themselves are always left out.
        workers: Processes that read and decode the files (`medtl.data.discover.discover`);
            default `default_workers()`, 1 for none. The outputs do not depend on it.
        segment_map: Segment/ROI name -> class index for masks that are DICOM SEG or RTSTRUCT
            objects (`medtl.data.dicom_masks.label_map`); recorded in the sidecar.
        masks_from_dicom: A row without a mask gets the SEG/RTSTRUCT under `root` that references
            its series; the labels CSV then needs no label or mask column.

    Returns:
        A `ManifestResult`.

    Raises:
        InputError: Unusable root or labels CSV, or identifying values found in the outputs.
        ConfigError: Bad key, fractions or k_min.
        LeakageError: A given split puts a patient in two splits.
        ValueError: If `workers` is not a positive integer.
    """
    workers = discovery.check_workers(workers)
    root, out_csv, labels_csv = Path(root).resolve(), Path(out_csv).resolve(), Path(labels_csv).resolve()
    sidecar_json = out_csv.with_suffix(".json")
    fractions = _check_build_settings(root, fractions, k_min)
    key = load_key(key_file)
    labels = read_labels(labels_csv, subgroup_columns, targets=not masks_from_dicom)
    segment_map = check_segment_map(segment_map or {})
    extras = extra_subgroups(subgroup_columns)
    extra = [Path(p).resolve() for p in exclude]
    outputs = {_inside(root, p) for p in (out_csv, sidecar_json, *extra)} - {None}
    with _held_messages() as (held_logs, held_warnings):
        disk = _scan_disk(root, outputs, progress, workers)
        masks = _MaskSettings.of(disk, labels, segment_map, masks_from_dicom)
        labels = masks.labels
        rows, fate, notes = _rows(key, disk, labels, labels_csv, progress, workers, masks)
    allowed = _class_names(labels)
    namer = _namer(key, disk, labels, allowed)
    records = _records_or_refuse(rows, labels, disk, labels_csv)
    for record in records:
        record["path"] = namer(record["path"])
        record["mask"] = namer(record["mask"]) if record["mask"] else ""
    groups = split_groups(records)
    table, split_notes = _table(records, extras, seed, fractions, groups)
    check_leakage(table)
    facts = BuildFacts(key, disk, labels, labels_csv, rows, fate, extras, namer, seed, fractions, k_min, progress)
    document, messages = sidecar(facts, table, [*notes, *groups.warnings, *split_notes])
    document["leakage"] = groups.counts
    # The label values the masks hold, so a segmentation run can check model.num_classes up front.
    document["mask_labels"] = sorted({v for r in records if r.get("_mask_labels") for v in r["_mask_labels"]})
    document.update(masks.sidecar())
    needles = _needles(disk, labels, namer, allowed)
    _write_checked(out_csv, sidecar_json, table, document, messages, held_logs, held_warnings, needles,
                   [r["_row"] for r in records], ("label", *extras))
    save_aliases(key, namer.aliases)
    for message in messages:
        logger.warning(message)
    forbidden = {**needles.labels, **_raw_values(disk, labels, namer, allowed), str(root): "the data folder path"}
    return ManifestResult(
        manifest_csv=out_csv, sidecar_json=sidecar_json, key_id=key.key_id, key_path=key.path,
        key_created=key.created, key_message=key_created_message(key), rows=len(table),
        patients=int(table["patient"].nunique()), counts=document["counts"],
        split_rows={s: int((table["split"] == s).sum()) for s in SPLITS},
        k_anonymity=document["k_anonymity"]["k"], warnings=tuple(messages), forbidden=forbidden,
    )


def _records_or_refuse(rows: list[dict], labels: list[LabelRow], disk: _Disk, labels_csv: Path) -> list[dict]:
    """The manifest records among the rows; none at all is an error (nothing is written)."""
    records = [r for r in rows if "id" in r]
    found = [(r["_row"], r["_reason"]) for r in rows if r.get("_path")]
    if not records and found:  # the rows named files that exist: say what was wrong with them
        raise InputError(
            f"{labels_csv.name} must have at least one usable row, not none (of {len(labels)} rows): "
            f"{_row_problems(found)}; fix these rows and rebuild; nothing was written")
    if not records:
        raise InputError(
            f"the data root must hold a study for at least one row of {labels_csv.name}, not none (of "
            f"{len(labels)} rows, {len(disk.files)} files seen); check that the labels CSV paths are relative to "
            f"the data root; nothing was written"
        )
    return records


def _check_build_settings(root: Path, fractions: Sequence[float], k_min: int) -> tuple[float, float, float]:
    """The data root exists, the fractions and k_min are usable; the checked fractions."""
    if not root.is_dir():
        raise InputError("data root must be an existing folder, not missing or a file; check the path given")
    if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
        raise ConfigError(f"k_min must be a positive integer, not {k_min!r}; the default is 11")
    return check_fractions(fractions)


@dataclass
class _MaskSettings:
    """DICOM masks of a build: the SEG/RTSTRUCT files, the segment map and what was found."""

    files: dict[str, str]  # rel -> "seg" | "rtstruct"
    segment_map: dict[str, int]
    masks_from_dicom: bool
    labels: list[LabelRow]  # with the masks found from DICOM filled in
    problems: dict[int, str]  # rows the search for DICOM masks could not serve
    loaded: dict = field(default_factory=dict)  # (rel, study) -> DicomMask | reason

    @classmethod
    def of(cls, disk: _Disk, labels: list[LabelRow], segment_map: dict[str, int], from_dicom: bool) -> _MaskSettings:
        # Headers of skipped files are read only when a row may use one as its mask.
        wanted = from_dicom or any(row.mask in disk.rejected for row in labels)
        files = dicom_mask_files(disk) if wanted else {}
        problems: dict[int, str] = {}
        if from_dicom:
            labels, problems = with_found_masks(disk, labels, files)
        return cls(files, segment_map, from_dicom, labels, problems)

    def used(self) -> list[DicomMask]:
        return [m for m in self.loaded.values() if isinstance(m, DicomMask)]

    def notes(self) -> list[str]:
        shown, hidden = unmapped_names(self.used())
        if not shown and not hidden:
            return []
        listed = ", ".join(repr(n) for n in shown) + (f" and {hidden} more not shown (not plain words)" if hidden
                                                     else "")
        return [f"{len(shown) + hidden} segment/ROI names of DICOM masks are not in the segment map and were left as "
                f"background: {listed or 'none shown'}; add them to data.segment_map (--segment-map) to train on them"]

    def sidecar(self) -> dict:
        shown, hidden = unmapped_names(self.used())
        return {"segment_map": dict(sorted(self.segment_map.items())), "masks_from_dicom": self.masks_from_dicom,
                "dicom_masks": {"used": len(self.used()), "unmapped_segment_names": shown,
                                "unmapped_segment_names_not_shown": hidden}}


def _match(disk: _Disk, labels: list[LabelRow], labels_csv: Path, dicom_files: Mapping[str, str]):
    """Studies each label row points at, its mask (a study index, or a DICOM mask's relative path),
    and the rows that cannot be used."""
    masks: dict[int, int | str] = {}
    problems: dict[int, str] = {}
    for row in labels:
        if row.mask in dicom_files:
            masks[row.number] = row.mask
        elif row.mask:
            found = disk.targets(row.mask)
            if found is None:
                problems[row.number] = "mask: no file or folder at this path"
            elif len(found) != 1:
                problems[row.number] = f"mask must resolve to one image, not {len(found)}"
            else:
                masks[row.number] = found[0]
    mask_studies = {m for m in masks.values() if isinstance(m, int)}
    targeted: dict[int, list[int]] = {}
    claimed: dict[int, int] = {}
    # Rows naming a copy of another file (served by that file's study) come last: a row naming
    # the original keeps it, the copy's row is then reported as not used.
    is_copy = {row.number: row.path in disk.rejected and disk.rejected[row.path].copy_of is not None for row in labels}
    for row in sorted(labels, key=lambda r: is_copy[r.number]):
        found = disk.targets(row.path)
        targeted[row.number] = [i for i in found or [] if i not in mask_studies]
        if is_copy[row.number] and any(i in claimed for i in targeted[row.number]):
            problems[row.number] = (f"its file is a copy of the image that labels CSV row "
                                    f"{claimed[targeted[row.number][0]]} names; keep one of the two rows")
            targeted[row.number] = []
            continue
        if found is None:
            problems.setdefault(row.number, "no file or folder at this path")
        elif not targeted[row.number]:
            problems.setdefault(row.number, "no usable image at this path (its files were quarantined or skipped)")
        elif row.mask and len(targeted[row.number]) > 1:
            problems.setdefault(row.number, f"a row with a mask must resolve to one image, not "
                                            f"{len(targeted[row.number])}")
        for index in targeted[row.number]:
            if index in claimed:
                raise InputError(f"{labels_csv.name} rows {claimed[index]} and {row.number} must not both cover "
                                 f"the same image; keep one row per file or folder")
            claimed[index] = row.number
    return targeted, masks, problems


def _rows(key: ProjectKey, disk: _Disk, labels: list[LabelRow], labels_csv: Path, progress: bool, workers: int,
          dicom: _MaskSettings):
    """Manifest records (and unused label rows), each study's (status, reason), and notes."""
    targeted, masks, problems = _match(disk, labels, labels_csv, dicom.files)
    problems = {**dicom.problems, **problems}
    fate: dict[int, tuple[str, str]] = {}
    mask_cache: dict[int, tuple[str, tuple[int, ...], tuple[int, ...]] | str] = {}
    rows: list[dict] = []
    work = [(row, i) for row in labels if row.number not in problems for i in targeted[row.number]]
    loaded = _loaded(disk, [index for _, index in work if index not in disk.pixels], workers)
    for row, index in tqdm(work, desc="hashing studies", unit="study", disable=not progress):
        # Known from discovery (the file is not read again), else loaded now.
        pixels = disk.pixels[index] if index in disk.pixels else next(loaded)
        if isinstance(pixels, str):  # the name of the error load_study raised
            fate[index] = ("quarantined", f"pixels could not be decoded ({pixels})")
            problems.setdefault(row.number, "its images could not be decoded")
            continue
        if not pixels.finite:
            fate[index] = ("quarantined", "non-finite pixel values (NaN or Inf)")
            problems.setdefault(row.number, "its pixels hold NaN or Inf values")
            continue
        mask = _row_mask(disk, row, index, masks, mask_cache, dicom, pixels.shape)
        if isinstance(mask, str):
            problems.setdefault(row.number, mask)
            continue
        fate[index] = ("used", "")
        if isinstance(masks.get(row.number), int):
            fate[masks[row.number]] = ("used", "mask")
        elif row.number in masks:
            disk.decided[masks[row.number]] = ("used", "mask")
        rows.append(_record(key, disk, row, index, pixels, mask))
    used = {r["_row"] for r in rows}
    for row in labels:
        if row.number in used:
            continue
        reason = problems.get(row.number, "its images could not be used")
        exists = disk.exists(row.path)
        rows.append({"_row": row.number, "_path": row.path if exists else "", "_reason": reason})
        for index in targeted[row.number]:
            fate.setdefault(index, ("skipped", f"labels CSV row {row.number} not used: {reason}"))
        if isinstance(masks.get(row.number), int):
            fate.setdefault(masks[row.number], ("skipped", f"mask of labels CSV row {row.number}, not used"))
        elif row.number in masks and masks[row.number] not in disk.decided:
            disk.decided[masks[row.number]] = ("skipped", f"mask of labels CSV row {row.number}, not used")
    for index, cached in mask_cache.items():
        if isinstance(cached, str):
            fate[index] = ("quarantined", cached)
    for index in range(len(disk.studies)):
        fate.setdefault(index, ("skipped", NO_LABEL_ROW))
    notes = dicom.notes()
    per_file = sum(1 for r in rows if r.get("_patient_source") == "one_per_file")
    if per_file:
        notes.append(f"{per_file} rows had no patient_id and no DICOM PatientID: each file was treated as its own "
                     f"patient; add a patient_id column to the labels CSV if some share a patient")
    tilted = tilt_corrected(disk, fate)
    if tilted:
        notes.append(f"{tilted} series had gantry tilt and were resampled onto an orthogonal grid (spacing = slice "
                     f"distance along the normal); see 'gantry_tilt_corrected' in the sidecar counts")
    return rows, fate, notes


def _loaded(disk: _Disk, indexes: list[int], workers: int) -> Iterator[PixelSummary | str]:
    """`study_pixels` of these studies, in order: in worker processes when they hold enough files."""
    studies = [disk.studies[i] for i in indexes]
    if workers == 1 or sum(len(s.files) for s in studies) < discovery.PARALLEL_MIN_FILES:
        return (discovery.study_pixels(study) for study in studies)
    # Imported before the workers are forked, so that they inherit MONAI instead of importing it each.
    import medtl.data.reader  # noqa: F401

    return discovery.map_in_workers(discovery.study_pixels, studies, workers)


def _row_mask(disk: _Disk, row: LabelRow, index: int, masks: dict, cache: dict, dicom: _MaskSettings,
              shape: tuple[int, ...]):
    """(sha256, shape, label values, SOP class) of a row's mask, None without one, or the reason it
    cannot be used. The SOP class is "" for a mask that is an image (NIfTI, ...)."""
    mask = masks.get(row.number)
    if not isinstance(mask, str):
        loaded = _load_mask(disk, mask, cache, shape)
        return loaded if loaded is None or isinstance(loaded, str) else (*loaded, "")
    found = load_dicom_mask(disk, mask, dicom.files[mask], index, dicom.segment_map, row.number, dicom.loaded)
    if isinstance(found, str):
        return found
    if found.shape != tuple(shape):
        return "its DICOM mask's grid must equal the image's, not differ; check that it was drawn on this series"
    return found.sha256, found.shape, found.labels, found.sop_class


def _load_mask(disk: _Disk, index: int | None, cache: dict, shape: tuple[int, ...]):
    """(sha256, shape, label values) of a mask, None without one, or the reason it cannot be used.

    The label values are the integers the mask holds (empty when it holds non-integer values).
    """
    if index is None:
        return None
    if index not in cache:
        try:
            array = discovery.load_study(disk.studies[index]).array
            values = np.unique(array)
            labels = tuple(int(v) for v in values) if np.all(values == np.round(values)) else ()
            cache[index] = (pixel_sha256(array), tuple(array.shape), labels)
        except Exception as err:  # noqa: BLE001 - as for images
            cache[index] = f"pixels could not be decoded ({type(err).__name__})"
    if isinstance(cache[index], str):
        return "its mask could not be decoded"
    if cache[index][1] != tuple(shape):
        return "mask shape must equal the image shape"
    return cache[index]


def _record(key: ProjectKey, disk: _Disk, row: LabelRow, index: int, pixels: PixelSummary, mask) -> dict:
    """One manifest row (plus `_`-prefixed working fields) for a study of a label row."""
    study, h = disk.studies[index], disk.studies[index].header
    identity = _series_identity(study, disk)
    dicom_patient = h.patient_id if h is not None and not placeholder_id(h.patient_id) else ""
    patient, source = row.patient_id, "labels_csv"
    if not patient and dicom_patient:
        patient, source = dicom_patient, "dicom_header"
    if not patient:
        patient, source = "file:" + disk.rel(study.files[0]), "one_per_file"
    if row.age:
        band = age_band(age=row.age)
    else:
        band = age_band(patient_age=h.age, birth_date=h.birth_date, study_date=h.study_date) if h else UNKNOWN
    if row.scanner:
        scanner = scanner_code(key, row.scanner)
    else:
        scanner = scanner_code(key, h.manufacturer if h else "", h.model if h else "")
    return {
        "id": _row_id(key, study, disk), "patient": key.pseudonym("patient", patient),
        "study": key.pseudonym("study", h.study_uid if h is not None and h.study_uid else identity),
        "series": key.pseudonym("series", identity), "key_id": key.key_id, "path": row.path, "kind": study.kind,
        "modality": study.modality or UNKNOWN, "n_files": len(study.files),
        "shape": "x".join(str(n) for n in pixels.shape),
        "spacing": "x".join(f"{round(v, 4):g}" for v in pixels.spacing), "orientation": pixels.orientation,
        "sha256": pixels.sha256, "label": row.label,
        "mask": row.mask if mask else "", "mask_sha256": mask[0] if mask else "",
        "mask_sop_class": mask[3] if mask else "",
        "sex": normalise_sex(row.sex or (h.sex if h else "")), "age_band": band,
        "site": site_code(key, row.site or (h.institution if h else "")), "scanner": scanner,
        "_row": row.number, "_extras": row.extras, "_split": row.split, "_patient_source": source,
        "_dicom_patient": dicom_patient, "_labels_patient": row.patient_id,
        "_constant": pixels.constant,
        "_mask_labels": mask[2] if mask else (),
        "_year": _study_year(h.study_date if h is not None else ""),
    }


def _study_year(study_date: str) -> int | None:
    """The year of a DICOM DA StudyDate (Safe Harbor keeps years only), None when absent or malformed."""
    text = (study_date or "").strip()
    if len(text) >= 4 and text[:4].isdigit() and 1900 <= int(text[:4]) <= 2100:
        return int(text[:4])
    return None


def placeholder_id(patient_id: str) -> bool:
    """True for a DICOM PatientID that names nobody ("ANONYMOUS", "TEST", "0", "00000"): treated as absent.

    De-identified public collections often give every file the same placeholder; used as an
    identity it would make one patient (and one split) of the whole data set. Only placeholder
    words and zeros count: "CASE-1", "12", "P01" or "SMITH" identify a patient.
    """
    text = (patient_id or "").strip()
    if text.casefold() in PLACEHOLDER_WORDS:
        return True
    tokens = words_of(text)
    return all(t in PLACEHOLDER_WORDS or (t.isdigit() and not t.strip("0")) for t in tokens)


def _table(records: list[dict], extras: list[str], seed: int, fractions, groups: SplitGroups) -> pd.DataFrame:
    table = pd.DataFrame(
        [{**{c: r[c] for c in MANIFEST_COLUMNS}, **dict(zip(extras, r["_extras"], strict=True))} for r in records],
        columns=[*MANIFEST_COLUMNS, *extras], dtype=object,
    )
    for column in extras:
        table[column] = [v or UNKNOWN for v in table[column]]
    check_given_splits(records, groups)
    # A given split holds for the whole split group: a row without one joins its group's split.
    given_by_group = {g: r["_split"] for g, r in zip(groups.group, records, strict=True) if r["_split"]}
    given = [given_by_group.get(g, "") for g in groups.group]
    labels = [str(v) for v in table["label"]]
    notes = []
    if any(given) and all(given) and "val" not in given and fractions[1] > 0:
        given, notes = _val_from_train(groups.group, labels, given, seed, fractions)
    table["split"] = assign_splits(groups.group, labels, seed=seed, fractions=fractions,
                                   given=given if any(given) else None)
    return table, notes


def _val_from_train(groups: list[str], labels: list[str], given: list[str], seed: int, fractions):
    """Given splits of train and test only (an official split): set val patients aside from train.

    The usual public export names train and test only, and a run needs a validation split to pick
    its best epoch and threshold. Train's split groups are divided in the proportion of the train
    and val fractions, stratified by label, with the same deterministic allocation as the splits;
    test is never touched.
    """
    train, val = fractions[0], fractions[1]
    rows = [i for i, split in enumerate(given) if split == "train"]
    if not rows:
        return given, []
    chosen = assign_splits([groups[i] for i in rows], [labels[i] for i in rows], seed=seed,
                           fractions=(train / (train + val), val / (train + val), 0.0))
    given = list(given)
    for i, split in zip(rows, chosen, strict=True):
        given[i] = split
    moved = len({groups[i] for i, split in zip(rows, chosen, strict=True) if split == "val"})
    note = (f"the split column names no val rows: {moved} of the {len({groups[i] for i in rows})} given train patients "
            f"(split groups) were set aside as val ({val / (train + val):.0%}, by the val and train fractions); the "
            f"given test rows are unchanged; give some rows the split val to choose them yourself")
    return given, [note]


def _class_names(labels: list[LabelRow]) -> tuple[str, ...]:
    """The class names: the outputs hold them by design, so a header value equal to one is no needle.

    Extra subgroup values get no such pass: a ward or group name that equals an identifying
    header value is refused, naming the row and column.
    """
    return tuple(sorted({row.label for row in labels if row.label}))


def _identifying_sources(disk: _Disk, labels: list[LabelRow], name=None) -> list[tuple[str, str]]:
    """(value, source) of every identifying value: DICOM headers and labels-CSV patient_id values.

    `name` turns a relative path into the name outputs use for it; without it the sources are
    blank (aliasing needs no labels, and the names need the aliasing).
    """
    sources = []
    kind_of = functools.cache(attribute_kind)  # a few dozen keywords, repeated in every header
    for study in disk.studies:
        if study.header is not None:
            where = f" of file {name(disk.rel(study.files[0]))}" if name else ""
            sources.extend((value, f"the DICOM {keyword}{where}" if name else "", kind_of(keyword))
                           for value, keyword in study.header.identifying_values)
    # A patient_id without digits ("Garcia, Maria") is a name: its parts count alone too.
    sources.extend((row.patient_id, f"the patient_id of labels CSV row {row.number}" if name else "",
                    "name" if any(c.isdigit() for c in row.patient_id) else "person")
                   for row in labels if row.patient_id)
    return sources


def _raw_values(disk: _Disk, labels: list[LabelRow], namer: PathNamer, allowed: tuple[str, ...]) -> dict[str, str]:
    """The identifying values as stored ("DOE^JANE"), beside their normalised needles ("doe jane"):
    later scans of MLflow runs match bytes, and a value may reach them in either form."""
    raw: dict[str, str] = {}
    has_needles: dict[tuple[str, str], bool] = {}  # the studies of a series repeat its header's values
    for value, label, kind in _identifying_sources(disk, labels, namer):
        if (value, kind) not in has_needles:
            has_needles[value, kind] = bool(needles_of(value, allowed=allowed, kind=kind))
        if has_needles[value, kind]:
            raw[value] = label  # the last source names it, as before
    return raw


def _first_of_each(sources: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The sources without repeats of a (value, kind): a repeat adds no needle, and the first label stays."""
    seen: set[tuple[str, str]] = set()
    firsts = []
    for value, source, kind in sources:
        if (value, kind) not in seen:
            seen.add((value, kind))
            firsts.append((value, source, kind))
    return firsts


def _namer(key: ProjectKey, disk: _Disk, labels: list[LabelRow], allowed: tuple[str, ...]) -> PathNamer:
    """The namer of this build's paths, checking every part against every needle the scan will use.

    The non-generic components of all paths are needles too (a folder "E1234567" makes a file
    "1234567.png" elsewhere identifying), and they are found before anything is named, so that no
    path written in clear can hold a needle the final scan looks for.
    """
    # The class names' words are generic in paths: a "pneumonia/" folder stays readable.
    words = tuple(sorted({w for name in allowed for w in words_of(name) if not w.isdigit()}))
    parts = {p for rel in (*disk.files, *(r.path for r in labels), *(r.mask for r in labels if r.mask))
             for p in PurePosixPath(rel).parts}
    flagged = sorted(p for p in parts if looks_identifying(p, words))
    sources = [*_identifying_sources(disk, labels), *((p, "", "name") for p in flagged)]
    namer = PathNamer(key, identifying_needles(_first_of_each(sources), allowed), words)
    namer.flagged.update(flagged)
    return namer


def _needles(disk: _Disk, labels: list[LabelRow], namer: PathNamer, allowed: tuple[str, ...]) -> Needles:
    """Every identifying value the outputs must not hold, each labelled with its file or row."""
    sources = _identifying_sources(disk, labels, namer)
    sources.extend((part, "an identifying file or folder name", "name") for part in sorted(namer.flagged))
    return identifying_needles(_first_of_each(sources), allowed)
