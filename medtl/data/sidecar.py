"""The manifest's sidecar: what became of every file, how the splits look, and what to warn about.

Internal to `medtl.data.manifest`: `build_manifest` collects its facts in a `BuildFacts` and
`sidecar` turns them into the JSON document (docs/data.md, "The sidecar") and the warnings the
build emits. Files are named by `medtl.data.needles.PathNamer` (the relative path, or its alias),
patients only by counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from medtl.data import discover as discovery
from medtl.data.inventory import _Disk, _inside, file_sha256
from medtl.data.needles import PathNamer
from medtl.data.privacy import ProjectKey
from medtl.data.splits import SPLITS

SCHEMA_VERSION = 1
SUBGROUPS = ("sex", "age_band", "site", "scanner")
QUASI_IDENTIFIERS = ("sex", "age_band", "site")
DEID_PROFILE = (
    "DICOM PS3.15 Annex E Basic Profile; keyed HMAC-SHA-256 pseudonyms; ages top-coded at 90; dates removed (study "
    "years kept); site/scanner coded; identifying paths aliased"
)
NO_LABEL_ROW = "no row in the labels CSV"
TILT_NOTE = "gantry tilt"  # how discovery's notes on resampled gantry-tilted stacks begin


@dataclass(frozen=True)
class BuildFacts:
    """What a manifest build found, for its sidecar (in memory only: rows hold raw values)."""

    key: ProjectKey = field(repr=False)
    disk: _Disk = field(repr=False)
    labels: Sequence = field(repr=False)  # LabelRow of the labels CSV
    labels_csv: Path = field(repr=False)
    rows: list[dict] = field(repr=False)  # manifest records and unused label rows (`_reason`)
    fate: dict[int, tuple[str, str]] = field(repr=False)  # study index -> (status, reason)
    extras: list[str] = field(default_factory=list)
    namer: PathNamer | None = field(default=None, repr=False)
    seed: int = 0
    fractions: tuple[float, ...] = (0.7, 0.15, 0.15)
    k_min: int = 11
    progress: bool = True


@dataclass
class _Files:
    """Every file under the root: counts by status, and the lists the sidecar names them in."""

    counts: Counter = field(default_factory=lambda: Counter({"used": 0, "quarantined": 0, "skipped": 0}))
    not_used: list[dict] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    unaccounted: list[str] = field(default_factory=list)
    inventory: list[dict] = field(default_factory=list)


def sidecar(facts: BuildFacts, table: pd.DataFrame, notes: Sequence[str]) -> tuple[dict, list[str]]:
    """The sidecar document and the warnings to emit (the build's `notes` first).

    Args:
        facts: What the build found.
        table: The manifest table (with its `split` column).
        notes: Warnings the build already has (patients, leakage, splits).

    Returns:
        (sidecar, messages); `manifest_sha256` is filled in when the CSV is written.
    """
    files = _files(facts)
    unused_rows = _unused_rows(facts)
    # Rows with neither label nor mask that are in the manifest (a row left out is counted as such).
    unused = {r["_row"] for r in facts.rows if "_reason" in r}
    unlabelled_rows = int(sum(1 for r in facts.labels if not r.label and not r.mask and r.number not in unused))
    k_info = k_anonymity(table, facts.k_min)
    counted = _counts(facts, table, files, len(unused_rows), unlabelled_rows)
    messages = [*notes, *_warnings(facts, table, files, counted, k_info)]
    document = {
        "schema_version": SCHEMA_VERSION, "key_id": facts.key.key_id, "deidentification": DEID_PROFILE,
        "manifest_sha256": "", "labels_csv_sha256": file_sha256(facts.labels_csv), "columns": list(table.columns),
        "subgroup_columns": [*SUBGROUPS, *facts.extras], "seed": facts.seed, "fractions": list(facts.fractions),
        "classes": sorted({str(v) for v in table["label"] if str(v)}, key=_class_key),
        "counts": counted, "patient_source": _patient_sources(facts), "splits": _splits(table, facts.extras),
        "k_anonymity": k_info, "study_years": _study_years(facts), "warnings": messages,
        "label_rows_not_used": unused_rows, "unlabeled_files": sorted(files.unlabeled),
        "files_not_used": sorted(files.not_used, key=lambda e: e["file"]), "unaccounted_files": sorted(files.unaccounted),
        "inventory": sorted(files.inventory, key=lambda e: e["token"]),
    }
    return document, messages


def tilt_corrected(disk: _Disk, fate: dict[int, tuple[str, str]]) -> int:
    """How many used studies discovery resampled to remove gantry tilt (from their notes)."""
    return sum(1 for i, (state, _) in fate.items()
               if state == "used" and any(n.startswith(TILT_NOTE) for n in disk.studies[i].notes))


def k_anonymity(table: pd.DataFrame, k_min: int) -> dict:
    """Smallest number of patients sharing one (sex, age_band, site) combination."""
    classes = table.groupby(list(QUASI_IDENTIFIERS))["patient"].nunique() if len(table) else pd.Series(dtype=int)
    k = int(classes.min()) if len(classes) else None
    return {
        "quasi_identifiers": list(QUASI_IDENTIFIERS), "k": k, "k_min": k_min,
        "equivalence_classes": len(classes), "classes_below_k_min": int((classes < k_min).sum()),
        "ok": k is not None and k >= k_min,
    }


def _status(facts: BuildFacts) -> dict[str, tuple[str, str]]:
    """(status, reason) of every file discovery or the build decided about."""
    disk = facts.disk
    status: dict[str, tuple[str, str]] = {r: (j.status, j.reason) for r, j in disk.rejected.items()}
    status.update(disk.decided)
    for index, study in enumerate(disk.studies):
        status.update(dict.fromkeys((disk.rel(f) for f in study.files), facts.fate[index]))
    labels_rel = _inside(disk.root, facts.labels_csv)
    if labels_rel is not None:
        status[labels_rel] = ("used", "labels CSV")
    return status


def _files(facts: BuildFacts) -> _Files:
    """Every file under the root, hashed for the inventory and counted by its status."""
    status, disk, files = _status(facts), facts.disk, _Files()
    for rel in tqdm(disk.files, desc="hashing files", unit="file", disable=not facts.progress):
        name = facts.namer(rel)
        # FIFOs, sockets, broken links and links out of the root are listed, never opened.
        readable = discovery.regular_file(disk.root / rel, disk.root)
        files.inventory.append({"token": facts.key.pseudonym("path", rel), "file": name,
                                "sha256": file_sha256(disk.root / rel) if readable else ""})
        if rel not in status:
            files.unaccounted.append(name)
            continue
        state, reason = status[rel]
        files.counts[state] += 1
        if state != "used":
            files.not_used.append({"file": name, "status": state, "reason": reason})
            if reason == NO_LABEL_ROW:
                files.unlabeled.append(name)
    return files


def _unused_rows(facts: BuildFacts) -> list[dict]:
    # A row whose path is missing is named by its row number only: its path identified no study.
    return [{"row": r["_row"], **({"path": facts.namer(r["_path"])} if r["_path"] else {}), "reason": r["_reason"]}
            for r in facts.rows if "_reason" in r]


def _counts(facts: BuildFacts, table: pd.DataFrame, files: _Files, unused_rows: int, unlabelled_rows: int) -> dict:
    return {
        "files_seen": len(facts.disk.files), "used": files.counts["used"], "quarantined": files.counts["quarantined"],
        "skipped": files.counts["skipped"], "unaccounted": len(files.unaccounted),
        "unlabeled_files": len(files.unlabeled), "label_rows": len(facts.labels), "label_rows_not_used": unused_rows,
        "unlabelled_rows": unlabelled_rows, "manifest_rows": len(table), "aliased_paths": len(facts.namer.aliases),
        "gantry_tilt_corrected": tilt_corrected(facts.disk, facts.fate),
        "patients": int(table["patient"].nunique()),
    }


def _warnings(facts: BuildFacts, table: pd.DataFrame, files: _Files, counted: dict, k_info: dict) -> list[str]:
    """What the build warns about, by count; the sidecar's lists name the files."""
    messages = []
    if files.unaccounted:
        messages.append(f"{len(files.unaccounted)} files under the data root were neither used nor reported by "
                        f"discovery (see 'unaccounted_files' in the sidecar); this is a medtl bug, please report it")
    if counted["unlabelled_rows"]:
        messages.append(f"{counted['unlabelled_rows']} labels CSV rows have neither label nor mask: they are listed "
                        "as unlabelled studies (used only by domain adaptation; training and evaluation leave them out)")
    if counted["label_rows_not_used"]:
        messages.append(f"{counted['label_rows_not_used']} labels CSV rows were not used (see 'label_rows_not_used' "
                        f"in the sidecar)")
    if files.unlabeled:
        messages.append(f"{len(files.unlabeled)} image files have no row in the labels CSV (see 'unlabeled_files')")
    if counted["quarantined"]:
        messages.append(f"{counted['quarantined']} files were quarantined as bad input (see 'files_not_used')")
    messages.extend(_split_and_k_warnings(facts, table, k_info))
    # The books must balance: every file is used, quarantined, skipped or reported unaccounted.
    if sum(counted[s] for s in ("used", "quarantined", "skipped", "unaccounted")) != counted["files_seen"]:
        messages.append("file counts do not add up; this is a medtl bug, please report it")
    return messages


def _split_and_k_warnings(facts: BuildFacts, table: pd.DataFrame, k_info: dict) -> list[str]:
    messages = []
    empty = [s for s in SPLITS if not (table["split"] == s).any()]
    if empty:
        messages.append(
            f"no rows in split {' and '.join(empty)}: {table['patient'].nunique()} patients (split groups) are too few "
            f"for the fractions {'/'.join(f'{f:g}' for f in facts.fractions)}, or the split column names none; a "
            f"workflow run needs train, val and test rows")
    k_min = facts.k_min
    if k_info["k"] is not None and k_info["k"] < k_min:
        messages.append(
            f"k-anonymity over ({', '.join(QUASI_IDENTIFIERS)}) is {k_info['k']}, below k_min={k_min}: "
            f"{k_info['classes_below_k_min']} of {k_info['equivalence_classes']} classes hold fewer than {k_min} "
            f"patients; coarsen or drop a quasi-identifier before sharing the manifest")
    return messages


def _splits(table: pd.DataFrame, extras: Sequence[str]) -> dict:
    """Per split: rows, patients, and counts of every label and subgroup value."""
    per_split = {}
    for split in SPLITS:
        part = table[table["split"] == split]
        per_split[split] = {"rows": len(part), "patients": int(part["patient"].nunique())}
        for column in ("label", *SUBGROUPS, *extras):
            per_split[split][column] = dict(sorted(Counter(str(v) for v in part[column]).items()))
    return per_split


def _patient_sources(facts: BuildFacts) -> dict[str, int]:
    sources = Counter(r["_patient_source"] for r in facts.rows if "_patient_source" in r)
    return dict(sorted(sources.items()))


def _study_years(facts: BuildFacts) -> dict:
    """First and last study year, and how many rows are dated (years only: Safe Harbor)."""
    years = [r["_year"] for r in facts.rows if "id" in r and r.get("_year") is not None]
    return {"first": min(years, default=None), "last": max(years, default=None), "dated": len(years),
            "undated": sum(1 for r in facts.rows if "id" in r) - len(years)}


def _class_key(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)
