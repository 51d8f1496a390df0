"""Patient bootstrap: weighted kernels equal scikit-learn on resamples, stratification, coverage."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from medtl.errors import ConfigError, InputError, LeakageError
from medtl.evaluation.bootstrap import (
    Estimate,
    bootstrap_binary,
    bootstrap_case_means,
    encode_patients,
    iter_bootstrap_counts,
    make_rng,
    patient_strata,
    percentile_ci,
    weighted_auroc,
    weighted_average_precision,
    weighted_binary_metrics,
    weighted_nanmean,
    weighted_thresholds,
)
from medtl.evaluation.metrics import binary_metrics, choose_threshold


def _data(n_patients: int = 150, seed: int = 0, ties: bool = True):
    """1-3 images per patient, one label per patient, rounded scores (ties) when asked."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    patient = np.repeat(np.arange(n_patients), per_patient)
    y = (rng.random(n_patients) < 0.35).astype(int)[patient]
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, patient.size) + 1.2 * (2 * y - 1))))
    if ties:
        s = np.round(s, 2)
    return y, s, np.array([f"pseudo-{p:04d}" for p in patient])


def _weights(y, patients, n_boot=6, seed=0):
    codes, n = encode_patients(patients, y.size)
    counts = next(iter_bootstrap_counts(patient_strata(codes, n, y), n_boot, make_rng(seed, "test")))
    return counts[:, codes].astype(float)


def test_weighted_kernels_equal_scikit_learn_on_the_materialised_resample():
    y, s, patients = _data()
    w = _weights(y, patients)
    auroc, ap = weighted_auroc(y, s, w), weighted_average_precision(y, s, w)
    metrics = weighted_binary_metrics(y, s, w, threshold=0.5)
    for b in range(w.shape[0]):
        idx = np.repeat(np.arange(y.size), w[b].astype(int))
        assert auroc[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), rel=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(y[idx], s[idx]), rel=1e-12)
        expected = binary_metrics(y[idx], s[idx], 0.5)
        for name, value in expected.items():
            assert metrics[name][b] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize(("rule", "target"), [("youden", None), ("sensitivity", 0.85), ("fpr", 0.2)])
def test_weighted_thresholds_equal_choose_threshold_on_each_resample(rule, target):
    y, s, patients = _data(seed=1)
    w = _weights(y, patients, n_boot=10)
    thresholds = weighted_thresholds(y, s, w, rule, target)
    for b in range(w.shape[0]):
        idx = np.repeat(np.arange(y.size), w[b].astype(int))
        assert thresholds[b] == choose_threshold(y[idx], s[idx], rule, target)


def test_resampling_draws_whole_patients_and_keeps_every_strata_size():
    y, s, patients = _data(seed=2)
    codes, n = encode_patients(patients, y.size)
    strata = patient_strata(codes, n, y)
    counts = np.concatenate(list(iter_bootstrap_counts(strata, 250, make_rng(0, "x"))))
    assert counts.shape == (250, n)
    for code in np.unique(strata):
        assert (counts[:, strata == code].sum(axis=1) == (strata == code).sum()).all()
    w = counts[:, codes]
    for p in range(5):  # every image of a patient carries the patient's draw count
        rows = np.flatnonzero(codes == p)
        assert (w[:, rows] == w[:, rows[:1]]).all()


def test_patient_with_mixed_labels_forms_its_own_stratum():
    patients = np.array(["a", "a", "b", "c", "d", "d"])
    y = np.array([0, 1, 0, 1, 1, 1])
    codes, n = encode_patients(patients, y.size)
    strata = patient_strata(codes, n, y)
    assert len(set(strata.tolist())) == 3  # {0}, {1}, {0, 1}
    assert strata[codes[0]] != strata[codes[2]] and strata[codes[3]] == strata[codes[4]]


def test_same_seed_gives_identical_intervals_and_another_seed_differs():
    y, s, patients = _data(seed=3)
    a = bootstrap_binary(y, s, patients, threshold=0.5, n_boot=200, seed=7, metrics=["auroc"])
    b = bootstrap_binary(y, s, patients, threshold=0.5, n_boot=200, seed=7, metrics=["auroc"])
    c = bootstrap_binary(y, s, patients, threshold=0.5, n_boot=200, seed=8, metrics=["auroc"])
    assert a == b and a["auroc"].ci != c["auroc"].ci
    assert a["auroc"].value == roc_auc_score(y, s)
    assert a["threshold"] == Estimate(0.5, None)


def test_bootstrap_binary_rederives_the_validation_threshold_and_reports_its_interval():
    y, s, patients = _data(seed=4)
    yv, sv, pv = _data(n_patients=120, seed=5)
    pv = np.array([p.replace("pseudo", "val") for p in pv])
    est = bootstrap_binary(y, s, patients, validation=(yv, sv, pv), n_boot=200, metrics=["tpr", "fpr"])
    assert est["threshold"].value == choose_threshold(yv, sv)
    lo, hi = est["threshold"].ci
    assert lo < hi  # the threshold varies across replicates
    assert est["tpr"].value == binary_metrics(y, s, est["threshold"].value)["tpr"]


def test_bootstrap_binary_refuses_patients_shared_by_validation_and_test():
    y, s, patients = _data(seed=6)
    with pytest.raises(LeakageError, match="one split only") as err:
        bootstrap_binary(y, s, patients, validation=(y, s, patients), n_boot=100)
    assert "pseudo-" not in str(err.value)  # never echoes a patient id


def test_bootstrap_inputs_are_checked_without_echoing_ids():
    y, s, patients = _data(seed=7)
    with pytest.raises(InputError, match="validation"):
        bootstrap_binary(y, s, patients, n_boot=100)
    with pytest.raises(InputError, match="one entry per prediction row") as err:
        bootstrap_binary(y, s, patients[:-1], threshold=0.5, n_boot=100)
    assert "pseudo-" not in str(err.value)
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_binary(y, s, patients, threshold=0.5, n_boot=10)


def test_percentile_ci_is_missing_when_the_statistic_is_mostly_undefined():
    assert percentile_ci(np.r_[np.full(60, np.nan), np.arange(40.0)], 0.95) is None
    lo, hi = percentile_ci(np.r_[np.full(10, np.nan), np.arange(90.0)], 0.9)
    assert lo == pytest.approx(4.45) and hi == pytest.approx(84.55)


def test_weighted_nanmean_ignores_undefined_cases():
    values = np.array([1.0, np.nan, 0.5])
    w = np.array([[1, 5, 1], [0, 1, 2]], dtype=float)
    assert weighted_nanmean(values, w).tolist() == [0.75, 0.5]


def test_bootstrap_auroc_interval_covers_the_true_auroc_about_95_percent_of_the_time():
    """200 simulated test sets with a known binormal AUROC, 400 patient-level replicates each."""
    start = time.perf_counter()
    d = 1.2
    true_auc = norm.cdf(d / np.sqrt(2))  # AUROC of N(0, 1) negatives vs N(d, 1) positives
    rng = np.random.default_rng(2024)
    y = np.r_[np.zeros(80, int), np.ones(60, int)]
    codes, n = encode_patients(np.arange(y.size), y.size)  # one image per patient
    strata = patient_strata(codes, n, y)
    covered = 0
    for k in range(200):
        s = rng.normal(0, 1, y.size) + d * y
        reps = np.concatenate(
            [
                weighted_auroc(y, s, c[:, codes].astype(float))
                for c in iter_bootstrap_counts(strata, 400, make_rng(k, "cov"))
            ]
        )
        lo, hi = percentile_ci(reps, 0.95)
        covered += lo <= true_auc <= hi
    coverage = covered / 200
    # Binomial SE at 95% over 200 trials is 1.5 points; percentile intervals run slightly narrow.
    assert 0.89 <= coverage <= 0.99, coverage
    assert time.perf_counter() - start < 30


def test_bootstrap_case_means_ignore_undefined_cases_and_resample_patients():
    import pandas as pd

    rng = np.random.default_rng(0)
    patients = np.repeat([f"pseudo-{i}" for i in range(60)], 2)  # two cases per patient
    dice = np.clip(rng.normal(0.8, 0.1, patients.size), 0, 1)
    dice[:4] = np.nan
    est = bootstrap_case_means(pd.DataFrame({"dice": dice, "hd95": 10 * (1 - dice)}), patients, n_boot=300)
    assert est["dice"].value == pytest.approx(np.nanmean(dice))
    lo, hi = est["dice"].ci
    assert lo < est["dice"].value < hi and hi - lo < 0.1
    assert est["hd95"].value == pytest.approx(10 * (1 - np.nanmean(dice)))
