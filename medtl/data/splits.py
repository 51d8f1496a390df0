"""Patient-level, label-stratified, deterministic train/val/test splits, and the leakage check.

Why not scikit-learn's splitters: `StratifiedGroupKFold` cannot produce 70/15/15 fractions in
one pass, and every sklearn splitter draws from an RNG over the *row order*, so adding one
patient reshuffles everybody. Here each patient's place comes from a hash of the seed and its
keyed pseudonym: the same patient lands in the same place for the same seed, whatever else is
in the table, and no patient ever straddles two splits.

Example:
    >>> assign_splits(["P-a", "P-b", "P-c", "P-d"], ["0", "0", "1", "1"], fractions=(0.5, 0.5, 0.0))
    ... # doctest: +SKIP
    ['train', 'val', 'val', 'train']
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import pandas as pd

from medtl.errors import ConfigError, InputError, LeakageError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "tune": "val",
    "test": "test",
    "testing": "test",
    "holdout": "test",
}


def normalise_split(value: str | None) -> str:
    """Map a split name to train, val or test; empty stays empty.

    Raises:
        InputError: If the value names no split.
    """
    text = (value or "").strip().casefold()
    if not text:
        return ""
    if text not in _SPLIT_NAMES:
        raise InputError(f"split must be one of train, val, test (or empty), not {value!r}")
    return _SPLIT_NAMES[text]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions: three non-negative numbers summing to 1, train > 0.

    Raises:
        ConfigError: If the fractions are unusable.
    """
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"fractions must be three numbers, not {fractions!r}; e.g. (0.7, 0.15, 0.15)") from err
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise ConfigError(
            f"fractions must be three non-negative numbers (train > 0) summing to 1, not {fractions!r}; "
            f"e.g. (0.7, 0.15, 0.15)"
        )
    return values  # type: ignore[return-value]


def patient_strata(patients: Sequence[str], labels: Sequence[str]) -> dict[str, str]:
    """The stratum of each patient: its most frequent label, ties going to the first seen.

    Args:
        patients: Patient pseudonym of each row.
        labels: Label of each row ("" for rows without a class label, e.g. segmentation).

    Returns:
        Patient pseudonym -> stratum label.
    """
    per_patient: dict[str, Counter] = {}
    for patient, label in zip(patients, labels, strict=True):
        per_patient.setdefault(patient, Counter())[str(label)] += 1
    # Counter.most_common keeps insertion order among equal counts: ties go to the first label.
    return {patient: counts.most_common(1)[0][0] for patient, counts in per_patient.items()}


def allocate(patients: Sequence[str], *, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Split one stratum of patients by fractions, ordered by a hash of seed and pseudonym.

    Counts per split are the largest-remainder rounding of `fractions * len(patients)`.
    """
    train, val, test = check_fractions(fractions)
    ordered = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}\x00{p}".encode()).hexdigest())
    n = len(ordered)
    exact = [train * n, val * n, test * n]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    out: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts, strict=True):
        out.update(dict.fromkeys(ordered[start : start + count], split))
        start += count
    return out


def assign_splits(
    patients: Sequence[str],
    labels: Sequence[str],
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    given: Sequence[str] | None = None,
) -> list[str]:
    """The split of every row: given splits are kept, the other patients stratified by label.

    Args:
        patients: Patient pseudonym of each row.
        labels: Label of each row ("" when the row has none).
        seed: Changes the allocation; the same seed always gives the same splits.
        fractions: Train/val/test fractions for patients without a given split.
        given: Split of each row from the labels CSV ("" where not given), or None.

    Returns:
        "train", "val" or "test" for each row, in row order.

    Raises:
        LeakageError: If the given splits put a patient in more than one split.
        InputError: If a given split names no split.
    """
    fractions = check_fractions(fractions)
    fixed: dict[str, str] = {}
    if given is not None:
        table = pd.DataFrame(
            {"patient": list(patients), "split": [normalise_split(s) for s in given]}
        )
        stated = table[table["split"] != ""]
        check_leakage(stated, source="the given split column")
        fixed = dict(zip(stated["patient"], stated["split"], strict=True))
    strata = patient_strata(patients, labels)
    by_stratum: dict[str, list[str]] = {}
    for patient, stratum in strata.items():
        if patient not in fixed:
            by_stratum.setdefault(stratum, []).append(patient)
    chosen = dict(fixed)
    for stratum in sorted(by_stratum):
        chosen.update(allocate(by_stratum[stratum], seed=seed, fractions=fractions))
    return [chosen[p] for p in patients]


def check_leakage(
    df: pd.DataFrame, *, patient_col: str = "patient", split_col: str = "split", source: str = "the manifest"
) -> None:
    """Refuse a table in which any patient appears in more than one split.

    Args:
        df: One row per study, with patient pseudonyms and splits.
        patient_col: Column of patient pseudonyms.
        split_col: Column of splits.
        source: What the table is, for the message.

    Raises:
        LeakageError: Naming how many patient aliases are affected (never which).
    """
    if df.empty:
        return
    per_patient = df.groupby(patient_col, sort=False)[split_col].nunique()
    leaking = int((per_patient > 1).sum())
    if leaking:
        raise LeakageError(
            f"{leaking} patient aliases appear in more than one split in {source}; each patient must be in "
            f"exactly one split, not several; give all rows of a patient the same split, or leave the split "
            f"column empty so medtl assigns patient-level splits"
        )
