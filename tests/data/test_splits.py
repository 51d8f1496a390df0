"""Patient-level, stratified, deterministic splits and the leakage check."""

from __future__ import annotations

import random
from collections import Counter

import pandas as pd
import pytest

from medtl.data.splits import assign_splits, check_leakage, patient_strata
from medtl.errors import ConfigError, InputError, LeakageError


def _cohort(n_patients: int = 200, positive_every: int = 4) -> tuple[list[str], list[str]]:
    """Rows of a cohort: every third patient has two studies; every `positive_every`-th is positive."""
    patients, labels = [], []
    for i in range(n_patients):
        studies = 2 if i % 3 == 0 else 1
        patients += [f"P-{i:016x}"] * studies
        labels += ["1" if i % positive_every == 0 else "0"] * studies
    return patients, labels


def test_no_patient_is_in_two_splits():
    patients, labels = _cohort()
    splits = assign_splits(patients, labels, seed=0)
    per_patient = pd.DataFrame({"patient": patients, "split": splits}).groupby("patient")["split"].nunique()
    assert per_patient.max() == 1


def test_splits_follow_the_fractions_within_each_label_stratum():
    patients, labels = _cohort(200, positive_every=4)
    splits = assign_splits(patients, labels, seed=0, fractions=(0.7, 0.15, 0.15))
    first = {}
    for patient, label, split in zip(patients, labels, splits, strict=True):
        first.setdefault(patient, (label, split))
    by_label = Counter(first.values())
    assert (by_label[("1", "train")], by_label[("1", "val")], by_label[("1", "test")]) == (35, 8, 7)
    assert (by_label[("0", "train")], by_label[("0", "val")], by_label[("0", "test")]) == (105, 23, 22)  # ties go to val


def test_splits_are_deterministic_independent_of_row_order_and_change_with_the_seed():
    patients, labels = _cohort()
    base = dict(zip(patients, assign_splits(patients, labels, seed=3), strict=True))
    order = list(range(len(patients)))
    random.Random(0).shuffle(order)
    shuffled_p, shuffled_l = [patients[i] for i in order], [labels[i] for i in order]
    again = dict(zip(shuffled_p, assign_splits(shuffled_p, shuffled_l, seed=3), strict=True))
    assert again == base
    other = dict(zip(patients, assign_splits(patients, labels, seed=4), strict=True))
    assert other != base


def test_a_patient_with_mixed_labels_is_stratified_by_its_majority_then_first_label():
    strata = patient_strata(["a", "a", "a", "b", "b"], ["0", "1", "1", "1", "0"])
    assert strata == {"a": "1", "b": "1"}


def test_given_splits_are_kept_and_the_rest_assigned_by_patient():
    patients = ["a", "a", "b", "c", "d"]
    splits = assign_splits(patients, ["0"] * 5, given=["test", "", "val", "", ""])
    assert splits[:3] == ["test", "test", "val"]


def test_a_given_split_that_leaks_patients_is_refused_with_the_number_of_aliases():
    patients = ["a", "a", "b", "b", "c", "c", "d"]
    given = ["train", "test", "val", "train", "test", "val", "train"]
    with pytest.raises(LeakageError, match="^3 patient aliases appear in more than one split"):
        assign_splits(patients, ["0"] * 7, given=given)


def test_check_leakage_accepts_clean_tables_and_counts_leaking_patients():
    check_leakage(pd.DataFrame({"patient": ["a", "a", "b"], "split": ["train", "train", "test"]}))
    with pytest.raises(LeakageError, match="1 patient aliases"):
        check_leakage(pd.DataFrame({"patient": ["a", "a", "b"], "split": ["train", "val", "test"]}))


def test_bad_fractions_and_split_names_are_refused():
    with pytest.raises(ConfigError, match="fractions"):
        assign_splits(["a"], ["0"], fractions=(0.5, 0.5, 0.5))
    with pytest.raises(InputError, match="split must be"):
        assign_splits(["a"], ["0"], given=["holdin"])
