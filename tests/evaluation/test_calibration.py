"""Calibration kernels: the slope equals logistic regression, weight rows equal repeated rows, ECE equals its bins."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logit
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression

from medtl.evaluation.calibration import calibration_slope_intercept, expected_calibration_error
from tests.evaluation.conftest import binary_risks


def test_calibration_slope_equals_unpenalised_logistic_regression_on_the_logit():
    y, s = binary_risks(n=600, seed=4, slope=0.6)
    slope, _ = calibration_slope_intercept(y, s)
    lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10_000).fit(logit(s)[:, None], y)
    assert slope == pytest.approx(lr.coef_[0, 0], rel=1e-5)


def test_calibration_slope_and_intercept_recover_known_miscalibration():
    y, s = binary_risks(n=20_000, seed=5, slope=1.0)
    slope, intercept = calibration_slope_intercept(y, s)
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.05)
    y, s = binary_risks(n=20_000, seed=5, slope=0.5)  # overconfident: logits doubled
    slope, _ = calibration_slope_intercept(y, s)
    assert slope == pytest.approx(0.5, abs=0.03)


def test_calibration_with_weight_rows_equals_calibration_of_the_repeated_rows():
    y, s = binary_risks(n=200, seed=6)
    w = np.random.default_rng(0).integers(0, 3, size=(3, y.size))
    slopes, intercepts = calibration_slope_intercept(y, s, w)
    for k in range(3):
        idx = np.repeat(np.arange(y.size), w[k])
        slope, intercept = calibration_slope_intercept(y[idx], s[idx])
        assert slopes[k] == pytest.approx(slope, rel=1e-9) and intercepts[k] == pytest.approx(
            intercept, abs=1e-9
        )


def test_calibration_on_separable_data_is_nan_not_a_huge_number():
    slope, _ = calibration_slope_intercept([0, 0, 1, 1], [0.2, 0.3, 0.7, 0.8])
    assert np.isnan(slope)


def test_expected_calibration_error_matches_calibration_curve_bins():
    y, s = binary_risks(seed=7, slope=0.7)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], s), minlength=10)
    expected = np.sum(counts[counts > 0] / y.size * np.abs(prob_true - prob_pred))
    assert expected_calibration_error(y, s, 10) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
