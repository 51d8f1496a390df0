"""Calibration kernels scikit-learn lacks: recalibration slope and intercept, expected calibration error.

Both accept a stack of bootstrap weights (one row per replicate, see
medtl/evaluation/bootstrap.py), so a block of replicates costs one pass; with no weights they
give the point estimate. A fit that does not converge or a statistic without data is NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

# Scores of exactly 0 or 1 have infinite logits; clipping keeps the recalibration fit finite
# (logit(1e-7) = -16.1) without moving any realistic probability.
_LOGIT_EPS = 1e-7
_NEWTON_MAX_ITER = 50
_NEWTON_TOL = 1e-10
_NEWTON_MAX_STEP = 5.0


def _as_weights(weights: Any, n: int) -> tuple[np.ndarray, bool]:
    """Weights as a (b, n) float array, and whether the caller passed a single row."""
    if weights is None:
        return np.ones((1, n)), True
    w = np.asarray(weights, dtype=np.float64)
    return (w[None, :], True) if w.ndim == 1 else (w, False)


def _unstack(value: np.ndarray, single: bool) -> Any:
    return float(value[0]) if single else value


def calibration_slope_intercept(y_true: Any, y_score: Any, sample_weight: Any = None) -> tuple[Any, Any]:
    """Logistic recalibration: slope and intercept of the outcome on the score's logit.

    Slope `b` comes from fitting `logit P(y=1) = a + b * logit(p)`; the intercept
    ("calibration-in-the-large") from `logit P(y=1) = a + logit(p)` with the slope fixed at 1
    (Van Calster et al. 2016). Ideal values are 1 and 0. Written here because scikit-learn
    cannot fit a logistic model with an offset; the slope agrees with an unpenalised
    `LogisticRegression` (tested). Newton-Raphson runs on all weight rows at once so bootstrap
    replicates cost one pass; a fit that does not converge (e.g. separable data) gives NaN.

    Args:
        y_true: labels (0/1), shape (n,).
        y_score: probabilities, shape (n,); clipped to [1e-7, 1 - 1e-7] before the logit.
        sample_weight: None, shape (n,), or (b, n) for b weightings at once.

    Returns:
        `(slope, intercept)`: floats, or arrays of shape (b,) for 2-D weights.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_score, dtype=np.float64), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    x = np.log(p) - np.log1p(-p)
    w, single = _as_weights(sample_weight, y.size)
    out = []
    for fit_slope in (True, False):
        start = (0.0, 1.0)
        if w.shape[0] > 1:  # bootstrap rows: start from the unweighted fit, a few Newton steps away
            a0, b0 = _fit_recalibration(x, y, np.ones((1, y.size)), fit_slope=fit_slope, start=start)[:, 0]
            start = (a0, b0) if np.isfinite(a0) and np.isfinite(b0) else start
        out.append(_fit_recalibration(x, y, w, fit_slope=fit_slope, start=start))
    return _unstack(out[0][1], single), _unstack(out[1][0], single)


def _fit_recalibration(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, *, fit_slope: bool, start: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Newton-Raphson for `a + b*x` (or `a + x`) on each weight row; returns (a, b) of shape (2, b)."""
    a = np.full(w.shape[0], float(start[0]))
    b = np.full(w.shape[0], float(start[1]) if fit_slope else 1.0)
    done = np.zeros(w.shape[0], dtype=bool)
    todo = np.arange(w.shape[0])  # rows still iterating: converged or failed rows drop out
    with np.errstate(all="ignore"):
        for _ in range(_NEWTON_MAX_ITER):
            wt = w[todo]
            mu = expit(a[todo, None] + b[todo, None] * x)
            r = wt * (y - mu)
            h = wt * mu * (1.0 - mu)
            g0, h00 = r.sum(axis=1), h.sum(axis=1)
            if fit_slope:
                g1, h01, h11 = r @ x, h @ x, h @ (x * x)
                det = h00 * h11 - h01 * h01
                da = (h11 * g0 - h01 * g1) / det
                db = (h00 * g1 - h01 * g0) / det
            else:
                da, db = g0 / h00, np.zeros(todo.size)
            step = np.maximum(np.abs(da), np.abs(db))
            # Capping the step keeps plain Newton from overshooting into overflow on near-separable
            # replicates; a capped fit that keeps moving ends as "not converged" (NaN).
            scale = np.where(step > _NEWTON_MAX_STEP, _NEWTON_MAX_STEP / step, 1.0)
            a[todo] += scale * da
            b[todo] += scale * db
            done[todo] = step < _NEWTON_TOL
            todo = todo[np.isfinite(step) & (step >= _NEWTON_TOL)]
            if todo.size == 0:
                break
    ok = done & np.isfinite(a) & np.isfinite(b)
    return np.stack([np.where(ok, a, np.nan), np.where(ok, b, np.nan)])


def uniform_bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each probability: the equal-width bins of `calibration_curve(strategy="uniform")`."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p)


def expected_calibration_error(y_true: Any, y_score: Any, n_bins: int = 10, sample_weight: Any = None) -> Any:
    """Expected calibration error of positive-class probabilities over equal-width bins.

    `ECE = sum_b (n_b / n) * |mean(y)_b - mean(p)_b|` with the bins of scikit-learn's
    `calibration_curve(strategy="uniform")`. scikit-learn has no ECE; this is it.

    Args:
        y_true: labels (0/1), shape (n,).
        y_score: probabilities, shape (n,).
        n_bins: number of equal-width bins on [0, 1].
        sample_weight: None, (n,) or (b, n).

    Returns:
        ECE as a float, or an array (b,) for 2-D weights.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_score, dtype=np.float64)
    w, single = _as_weights(sample_weight, y.size)
    onehot = np.zeros((y.size, n_bins))
    onehot[np.arange(y.size), uniform_bins(p, n_bins)] = 1.0
    gap = w @ (onehot * (y - p)[:, None])  # per bin: sum of w * (outcome - probability)
    with np.errstate(invalid="ignore", divide="ignore"):
        ece = np.abs(gap).sum(axis=1) / w.sum(axis=1)
    return _unstack(ece, single)
