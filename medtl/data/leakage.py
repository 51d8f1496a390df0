"""Who must share a split: patients linked by identical images or by disagreeing patient IDs.

A patient-level split only prevents leakage if "patient" is right. Real exports break that in
two ways, both seen on public data: the same image is stored twice under different (or no)
patient IDs, and the labels CSV's `patient_id` disagrees with the DICOM PatientID. Rows are
therefore linked into *split groups* (union-find) by their patient pseudonym, their decoded-pixel
hash and their DICOM PatientID; every group is placed in one split as a whole. The manifest's
`patient` column is unchanged (labels `patient_id`, else DICOM PatientID, else the file): the
groups only decide splits, and the build warns with labels-CSV row numbers (never values).

Records are the manifest builder's in-memory rows: `patient` (pseudonym), `sha256` (pixels),
`_row` (labels CSV line), `_split` (given split or ""), `_dicom_patient` and `_labels_patient`
(raw identifiers, in memory only).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from medtl.errors import LeakageError

_SHOWN = 5  # row numbers quoted per warning; the sidecar has the counts


@dataclass(frozen=True)
class SplitGroups:
    """The split group of every record and what linked them.

    Attributes:
        group: One key per record (the smallest patient pseudonym of its group).
        warnings: Sentences for the build's warnings (row numbers and counts only).
        counts: For the sidecar's `leakage` field.
    """

    group: list[str]
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, item: Hashable) -> Hashable:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: Hashable, b: Hashable) -> None:
        self.parent[self.find(a)] = self.find(b)


def split_groups(records: Sequence[dict]) -> SplitGroups:
    """Link records that must share a split; see the module docstring.

    Args:
        records: The manifest builder's rows (with `patient`, `sha256`, `_row`, `_dicom_patient`,
            `_labels_patient`).

    Returns:
        The group of each record, the warnings and the counts.
    """
    links = _UnionFind()
    for index, record in enumerate(records):
        links.union(("row", index), ("patient", record["patient"]))
        if not record.get("_constant"):
            # A blank (constant) image is no evidence of one patient: blank exports would chain
            # unrelated patients into one split group.
            links.union(("row", index), ("pixels", record["sha256"]))
        if record.get("_dicom_patient"):
            links.union(("row", index), ("dicom", record["_dicom_patient"]))
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index in range(len(records)):
        members[links.find(("row", index))].append(index)
    key_of = {root: min(records[i]["patient"] for i in rows) for root, rows in members.items()}
    group = [key_of[links.find(("row", i))] for i in range(len(records))]
    duplicates = _pixel_duplicates(records)
    conflicts = _id_conflicts(records)
    merged = [rows for rows in members.values() if len({records[i]["patient"] for i in rows}) > 1]
    warnings = duplicates[0] + conflicts[0]
    if merged:
        warnings.append(
            f"{sum(len({records[i]['patient'] for i in rows}) for rows in merged)} patients in {len(merged)} groups "
            f"were kept together in one split each because identical images or a shared DICOM PatientID link them "
            f"(see 'leakage' in the sidecar)"
        )
    counts = {
        "split_groups": len(members),
        "linked_groups": len(merged),
        "linked_patients": sum(len({records[i]["patient"] for i in rows}) for rows in merged),
        **duplicates[1],
        **conflicts[1],
    }
    return SplitGroups(group, warnings, counts)


def _pixel_duplicates(records: Sequence[dict]) -> tuple[list[str], dict[str, int]]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if not record.get("_constant"):
            by_hash[record["sha256"]].append(index)
    across, within = [], []
    for rows in by_hash.values():
        if len(rows) > 1:
            (across if len({records[i]["patient"] for i in rows}) > 1 else within).append(rows)
    warnings = []
    if across:
        warnings.append(
            f"{sum(map(len, across))} rows hold images identical to an image of another patient ({len(across)} "
            f"groups; labels CSV rows {_rows_text(records, across)}): a copied file or one patient under two IDs; "
            f"their patients were put in one split"
        )
    if within:
        warnings.append(
            f"{sum(map(len, within))} rows of the same patient hold identical images ({len(within)} groups; labels "
            f"CSV rows {_rows_text(records, within)}): the image counts more than once in training or evaluation; "
            f"keep one row each"
        )
    counts = {"identical_pixels_across_patients": sum(map(len, across)),
              "identical_pixels_within_patient": sum(map(len, within))}
    return warnings, counts


def _id_conflicts(records: Sequence[dict]) -> tuple[list[str], dict[str, int]]:
    """Rows whose labels-CSV patient_id and DICOM PatientID tell different stories."""
    by_dicom: dict[str, list[int]] = defaultdict(list)
    by_labels: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record.get("_dicom_patient") and record.get("_labels_patient"):
            by_dicom[record["_dicom_patient"]].append(index)
            by_labels[record["_labels_patient"]].append(index)
    split_ids = [rows for rows in by_dicom.values() if len({records[i]["_labels_patient"] for i in rows}) > 1]
    merged_ids = [rows for rows in by_labels.values() if len({records[i]["_dicom_patient"] for i in rows}) > 1]
    warnings = []
    if split_ids:
        warnings.append(
            f"labels CSV patient_id disagrees with the DICOM PatientID: {_count(len(split_ids), 'DICOM patient')} "
            f"{'carries' if len(split_ids) == 1 else 'carry'} several patient_id values (labels CSV rows "
            f"{_rows_text(records, split_ids)}); their rows were kept in one "
            f"split; check the patient_id column"
        )
    if merged_ids:
        warnings.append(
            f"labels CSV patient_id disagrees with the DICOM PatientID: {_count(len(merged_ids), 'patient_id value')} "
            f"{'covers' if len(merged_ids) == 1 else 'cover'} several DICOM patients (labels CSV rows "
            f"{_rows_text(records, merged_ids)}); check the patient_id column"
        )
    return warnings, {"patient_id_conflicts": len(split_ids) + len(merged_ids)}


def check_given_splits(records: Sequence[dict], groups: SplitGroups) -> None:
    """Refuse given splits (labels CSV `split`) that put one patient or linked group in two splits.

    Raises:
        LeakageError: Naming the labels CSV rows concerned, never a value.
    """
    by_patient: dict[str, list[int]] = defaultdict(list)
    by_group: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record["_split"]:
            by_patient[record["patient"]].append(index)
            by_group[groups.group[index]].append(index)
    torn = [rows for rows in by_patient.values() if len({records[i]["_split"] for i in rows}) > 1]
    if torn:
        raise LeakageError(
            f"{len(torn)} patient aliases appear in more than one split in the given split column (labels CSV rows "
            f"{_rows_text(records, torn, splits=True)}); each patient must be in exactly one split, not several; "
            f"give all rows of a patient the same split, or leave the split column empty so medtl assigns "
            f"patient-level splits"
        )
    linked = [rows for rows in by_group.values() if len({records[i]["_split"] for i in rows}) > 1]
    if linked:
        raise LeakageError(
            f"{len(linked)} groups of linked patients are given more than one split (labels CSV rows "
            f"{_rows_text(records, linked, splits=True)}); rows with identical images, or with one DICOM PatientID "
            f"under several patient_id values, must be in one split, not several; give them the same split or "
            f"remove the duplicate rows"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _rows_text(records: Sequence[dict], groups: list[list[int]], *, splits: bool = False) -> str:
    shown = []
    for rows in groups[:_SHOWN]:
        numbers = sorted(rows, key=lambda i: records[i]["_row"])
        shown.append(" and ".join(
            f"{records[i]['_row']}" + (f" ({records[i]['_split']})" if splits else "") for i in numbers[:4])
            + (" ..." if len(numbers) > 4 else ""))
    more = f"; and {len(groups) - _SHOWN} more" if len(groups) > _SHOWN else ""
    return "; ".join(shown) + more
