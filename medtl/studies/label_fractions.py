"""Nested, patient-level, label-stratified subsets of a manifest's training split.

A data-efficiency curve compares training runs on 5 %, 10 %, ... of the labelled patients. The
subsets are nested (every smaller one inside every larger one) so that the curve measures the
effect of *more* labels rather than of *different* labels, and patient-level so that no patient's
second study leaks into a subset on its own. Validation and test splits are never touched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import pandas as pd

from medtl.data.splits import patient_strata
from medtl.errors import ConfigError, InputError


def fraction_key(fraction: float) -> str:
    """The JSON key of a label fraction: the shortest float text, e.g. "0.1", "1.0"."""
    return str(float(fraction))


def check_label_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Validate label fractions and return them sorted without duplicates.

    Args:
        fractions: Fractions of the training patients, each in (0, 1].

    Returns:
        The fractions as sorted, distinct floats.

    Raises:
        ConfigError: when the list is empty or a value is not a number in (0, 1].
    """
    try:
        values = sorted({float(f) for f in fractions})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"fractions must be numbers in (0, 1], not {fractions!r}; e.g. --fractions 0.1,1.0") from err
    if not values or any(not math.isfinite(v) or v <= 0 or v > 1 for v in values):
        raise ConfigError(f"fractions must be one or more numbers in (0, 1], not {list(fractions)!r}; "
                          "e.g. --fractions 0.05,0.25,1.0")
    return tuple(values)


def _order(patients: Sequence[str], seed: int) -> list[str]:
    # A keyed order (like medtl.data.splits.allocate) instead of an RNG permutation: a patient's place
    # depends only on the seed and its own pseudonym, so adding studies does not reshuffle everyone.
    return sorted(patients, key=lambda p: hashlib.sha256(f"{seed}\x00label-fraction\x00{p}".encode()).hexdigest())


def nested_label_subsets(
    manifest: pd.DataFrame,
    fractions: Sequence[float],
    *,
    seed: int,
    stratify: bool = True,
    target_column: str | None = None,
) -> dict[float, frozenset[str]]:
    """Manifest row ids of the training split kept at each label fraction.

    Within each label stratum (a patient's most frequent label, as for the splits) patients are put
    in a seeded order and the first ceil(fraction x n) are kept, at least one per stratum, so every
    class stays present and a smaller fraction is a prefix of, hence inside, a larger one. All rows
    (studies) of a kept patient are kept.

    Args:
        manifest: The manifest with `id`, `patient`, `split` and `label` columns.
        fractions: Label fractions in (0, 1].
        seed: Orders the patients; each seed gives its own nested chain.
        stratify: Stratify by label (classification); False treats all patients as one stratum.
        target_column: Column whose empty cells mark unlabelled rows ("label" or "mask"), e.g. the
            target-domain studies domain adaptation keeps; they cost no labelling, so every subset
            keeps them and the fractions count labelled patients only. None: every row is labelled.

    Returns:
        Fraction -> frozenset of manifest `id`s of training rows.

    Raises:
        ConfigError: when a fraction is not in (0, 1].
        InputError: when the manifest lacks a column, or has no training rows or no labelled ones.

    Example:
        >>> subsets = nested_label_subsets(manifest, (0.1, 1.0), seed=0)  # doctest: +SKIP
        >>> subsets[0.1] <= subsets[1.0]  # doctest: +SKIP
        True
    """
    values = check_label_fractions(fractions)
    needed = list(dict.fromkeys(["id", "patient", "split"] + (["label"] if stratify else [])
                                + ([target_column] if target_column else [])))
    missing = [c for c in needed if c not in manifest.columns]
    if missing:
        raise InputError(f"the manifest must have columns {needed}, not lack {missing}; rebuild it with medtl")
    train = manifest[manifest["split"].astype(str) == "train"]
    if train.empty:
        raise InputError("the manifest must have 'train' rows, not none; give the labels CSV's split column "
                         "'train' rows, or leave it out and let data.fractions draw the split")
    free = frozenset()
    if target_column:
        unlabelled = train[target_column].astype(str).str.strip() == ""
        free = frozenset(train.loc[unlabelled, "id"].astype(str))
        train = train[~unlabelled]
        if train.empty:
            # Label fractions subsample labelled training studies; only labelling some fixes this.
            raise InputError(f"the manifest must have 'train' rows with a {target_column}, not only unlabelled "
                             f"ones; fill the {target_column} column of training studies in the labels CSV that "
                             "data.labels names, and check that data.modalities keeps them")
    patients = train["patient"].astype(str).tolist()
    labels = train["label"].astype(str).tolist() if stratify else [""] * len(patients)
    by_stratum: dict[str, list[str]] = {}
    for patient, stratum in patient_strata(patients, labels).items():
        by_stratum.setdefault(stratum, []).append(patient)
    ordered = [_order(members, seed) for _, members in sorted(by_stratum.items())]
    out: dict[float, frozenset[str]] = {}
    for fraction in values:
        kept: set[str] = set()
        for members in ordered:
            # round() first: 0.1 * 10 is 1.0000000000000002 in binary, whose ceil would be 2.
            count = max(1, math.ceil(round(fraction * len(members), 9)))
            kept.update(members[:count])
        out[fraction] = free | frozenset(train.loc[train["patient"].astype(str).isin(kept), "id"].astype(str))
    return out
