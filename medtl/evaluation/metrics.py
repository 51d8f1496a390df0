"""Point estimates for classification: discrimination, operating point and calibration.

Functions take plain arrays (one row per image) and return floats or JSON-ready dicts; they
know nothing of models, manifests or patients. Discrimination and operating-point metrics come
from `sklearn.metrics`; the calibration slope/intercept and the expected calibration error, which
scikit-learn lacks, from medtl/evaluation/calibration.py. A metric that is undefined on the data
(AUROC with one class, PPV with no positive predictions, ...) is NaN, never 0 or 0.5; JSON
writes it as null.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)
from sklearn.preprocessing import label_binarize

from medtl.errors import ConfigError, InputError
from medtl.evaluation.calibration import calibration_slope_intercept, expected_calibration_error, uniform_bins
from medtl.vocabulary import THRESHOLD_RULES

#: Every binary metric medtl reports, in report order. Sensitivity is `tpr`, specificity `tnr`.
BINARY_METRICS: tuple[str, ...] = (
    "auroc", "auprc", "accuracy", "tpr", "tnr", "fpr", "fnr", "ppv", "npv", "brier",
    "calibration_slope", "calibration_intercept", "ece",
)
#: Metrics that need an operating threshold (the rest use the scores only).
THRESHOLD_METRICS: tuple[str, ...] = ("accuracy", "tpr", "tnr", "fpr", "fnr", "ppv", "npv")
#: Direction of "better": +1 higher is better, -1 lower is better. Calibration slope and
#: intercept have an ideal value instead (see CALIBRATION_IDEAL).
METRIC_DIRECTION: dict[str, int] = {
    "auroc": 1, "auprc": 1, "accuracy": 1, "tpr": 1, "tnr": 1, "fpr": -1, "fnr": -1, "ppv": 1, "npv": 1,
    "brier": -1, "ece": -1,
}
CALIBRATION_IDEAL: dict[str, float] = {"calibration_slope": 1.0, "calibration_intercept": 0.0}


def check_binary(y_true: Any, y_score: Any, *, name: str = "y_score") -> tuple[np.ndarray, np.ndarray]:
    """Validate binary labels and positive-class probabilities.

    Args:
        y_true: labels, 0/1 or booleans, shape (n,).
        y_score: probabilities of the positive class in [0, 1], shape (n,).
        name: what to call the scores in error messages (a column name).

    Returns:
        `(y_true, y_score)` as int64 and float64 arrays.

    Raises:
        InputError: on shape mismatch, labels outside {0, 1} or scores outside [0, 1].
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise InputError(
            f"y_true and {name} must be 1-D arrays of the same length, not shapes {y.shape} and "
            f"{s.shape}; pass one label and one score per image"
        )
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted({str(v) for v in np.unique(y) if v not in (0, 1)})[:5]
        raise InputError(
            f"binary y_true must hold 0/1, not {', '.join(bad)}; encode the positive class as 1 "
            "(or use the multi-class functions)"
        )
    if not np.isfinite(s).all():
        raise InputError(
            f"{name} must be finite, not NaN/inf in {int((~np.isfinite(s)).sum())} rows; "
            "drop or re-predict those rows"
        )
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise InputError(
            f"{name} must be probabilities in [0, 1], not values from {s.min():.3g} to {s.max():.3g}; "
            "apply a sigmoid/softmax before evaluating"
        )
    return y.astype(np.int64), s


def operating_point_index(tpr: np.ndarray, fpr: np.ndarray, rule: str, target: float | None) -> np.ndarray:
    """Index of the chosen point on ROC curves ordered by decreasing threshold.

    Every rule is "first index maximising a score", so ties go to the highest threshold and
    points that repeat the previous one (thresholds absent from a bootstrap replicate) are
    never chosen over it.

    Args:
        tpr: true-positive rates, shape (..., k), non-decreasing along the last axis.
        fpr: false-positive rates, same shape.
        rule: "youden" (max TPR - FPR), "sensitivity" (lowest FPR with TPR >= target) or
            "fpr" (highest TPR with FPR <= target).
        target: the sensitivity or FPR required by the rule; unused for "youden".

    Returns:
        Integer indices of shape `tpr.shape[:-1]`.

    Raises:
        ConfigError: for an unknown rule or a missing/invalid target.
    """
    check_threshold_rule(rule, target)
    if rule == "youden":
        score = tpr - fpr
    elif rule == "sensitivity":
        score = np.where(tpr >= target - 1e-12, -fpr, -np.inf)
    else:
        score = np.where(fpr <= target + 1e-12, tpr, -np.inf)
    return np.argmax(score, axis=-1)


def check_threshold_rule(rule: str, target: float | None) -> None:
    """Raise ConfigError unless `rule`/`target` name a valid threshold rule.

    Raises:
        ConfigError: naming the bad value.
    """
    if rule not in THRESHOLD_RULES:
        raise ConfigError(
            f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, not {rule!r}; fix "
            "the threshold rule in the workflow config"
        )
    if rule != "youden" and (target is None or not 0.0 < float(target) < 1.0):
        raise ConfigError(
            f"threshold target for rule {rule!r} must be a rate strictly between 0 and 1, not "
            f"{target!r}; set e.g. target=0.9 for 90% {'sensitivity' if rule == 'sensitivity' else 'FPR'}"
        )


def choose_threshold(y_true: Any, y_score: Any, rule: str = "youden", target: float | None = None) -> float:
    """Choose the operating threshold on validation predictions.

    A case is predicted positive when `y_score >= threshold` (scikit-learn's convention);
    candidate thresholds are the observed scores plus "nothing positive", which is returned as
    `above_every_score` (finite, so it survives strict JSON and reads back the same everywhere).

    Args:
        y_true: validation labels (0/1).
        y_score: validation positive-class probabilities.
        rule: "youden", "sensitivity" (fixed sensitivity) or "fpr" (fixed false-positive rate).
        target: required sensitivity or FPR for the fixed rules, e.g. 0.9 or 0.1.

    Returns:
        The threshold; above every score in [0, 1] when no score threshold does better than
        predicting every case negative (a model no better than chance on validation, or a "fpr"
        rule no observed score satisfies). A warning says so.

    Raises:
        InputError: when the validation labels lack a class.
        ConfigError: for an unknown rule or bad target.

    Example:
        >>> choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.8
    """
    check_threshold_rule(rule, target)
    y, s = check_binary(y_true, y_score)
    if y.min(initial=1) == y.max(initial=0):
        raise InputError(
            "validation labels must contain both classes to choose a threshold, not one class; "
            "add validation cases of both classes or pass a fixed threshold"
        )
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    threshold = float(thresholds[int(operating_point_index(tpr, fpr, rule, target))])
    if math.isfinite(threshold):
        return threshold
    warnings.warn(f"threshold rule {rule!r}: no score threshold on validation does better than predicting every "
                  "case negative, so the operating point predicts no positive case; check the labels, train longer "
                  "or choose another threshold rule", UserWarning, stacklevel=2)
    return above_every_score(s)


def above_every_score(y_score: Any) -> float:
    """The smallest float32 above 1 and every score: the finite threshold that predicts nothing positive.

    scikit-learn's ROC curve starts at +inf; infinity is not JSON, and the frozen threshold of a
    registered model travels in JSON files, so medtl uses this finite equivalent instead. It is a
    float32 step above, because NumPy compares float32 scores with a Python float in float32.
    """
    top = max(1.0, float(np.max(y_score, initial=1.0)))
    above = np.nextafter(np.float32(top), np.float32(np.inf))
    while float(above) <= top:  # float32 rounding of a score above 1 can land below it
        above = np.nextafter(above, np.float32(np.inf))
    return float(above)


def confusion_rates(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, Any]:
    """Operating-point metrics from confusion counts (scalars or arrays), NaN where undefined.

    Returns:
        Dict with accuracy, tpr, tnr, fpr, fnr, ppv, npv.
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "tpr": tp / (tp + fn),
            "tnr": tn / (tn + fp),
            "fpr": fp / (tn + fp),
            "fnr": fn / (tp + fn),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
        }
    return {k: (float(v) if v.ndim == 0 else v) for k, v in out.items()}


def reliability_curve(y_true: Any, y_score: Any, n_bins: int = 10) -> dict[str, list]:
    """Reliability diagram data: per equal-width bin, count, mean score and observed rate.

    Args:
        y_true: labels (0/1).
        y_score: positive-class probabilities.
        n_bins: number of equal-width bins.

    Returns:
        Dict of lists of length `n_bins`: bin_lower, bin_upper, count, mean_predicted,
        fraction_positive (None for empty bins).
    """
    y, s = check_binary(y_true, y_score)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(uniform_bins(s, n_bins), minlength=n_bins)
    mean_pred: list[float | None] = [None] * n_bins
    frac_pos: list[float | None] = [None] * n_bins
    if y.size and y.min() != y.max():
        prob_true, prob_pred = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
        for k, i in enumerate(np.flatnonzero(counts)):
            frac_pos[i], mean_pred[i] = float(prob_true[k]), float(prob_pred[k])
    else:  # calibration_curve refuses one-class input; the rates are still well defined
        for i in np.flatnonzero(counts):
            in_bin = uniform_bins(s, n_bins) == i
            frac_pos[i], mean_pred[i] = float(y[in_bin].mean()), float(s[in_bin].mean())
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "count": counts.tolist(),
        "mean_predicted": mean_pred,
        "fraction_positive": frac_pos,
    }


def _quiet(fn, *args, **kwargs) -> float:
    """Call a scikit-learn metric, returning NaN (not a warning or 0) where it is undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(fn(*args, **kwargs))
        except ValueError:
            return math.nan


def binary_auroc(y_true: Any, y_score: Any) -> float:
    """AUROC of positive-class probabilities (scikit-learn), NaN when a class is missing.

    medtl's one rule for an undefined AUROC: NaN in computation, `null` in JSON
    (`Estimate.to_dict`), never 0.5 or 0.

    Raises:
        InputError: on invalid labels/scores.

    Example:
        >>> binary_auroc([0, 0, 1], [0.1, 0.4, 0.8]), binary_auroc([1, 1], [0.2, 0.9])
        (1.0, nan)
    """
    y, s = check_binary(y_true, y_score)
    return _quiet(roc_auc_score, y, s)


def binary_metrics(
    y_true: Any,
    y_score: Any,
    threshold: float,
    *,
    metrics: Sequence[str] = BINARY_METRICS,
    n_bins: int = 10,
) -> dict[str, float]:
    """All binary metrics for one set of predictions at a given operating threshold.

    Args:
        y_true: labels (0/1).
        y_score: positive-class probabilities.
        threshold: predicted positive when `y_score >= threshold`.
        metrics: names from BINARY_METRICS to compute.
        n_bins: bins for the expected calibration error.

    Returns:
        Dict metric -> float (NaN where undefined on these data).

    Raises:
        InputError: on invalid labels/scores.
        ConfigError: on an unknown metric name.

    Example:
        >>> m = binary_metrics([0, 1, 1, 0], [0.2, 0.9, 0.6, 0.7], threshold=0.5)
        >>> m["tpr"], m["fpr"]
        (1.0, 0.5)
    """
    check_metric_names(metrics, BINARY_METRICS)
    y, s = check_binary(y_true, y_score)
    out: dict[str, float] = {}
    if "auroc" in metrics:
        out["auroc"] = binary_auroc(y, s)
    if "auprc" in metrics:
        out["auprc"] = _quiet(average_precision_score, y, s) if y.any() else math.nan
    if any(m in metrics for m in THRESHOLD_METRICS):
        tn, fp, fn, tp = confusion_matrix(y, (s >= threshold).astype(np.int64), labels=[0, 1]).ravel()
        rates = confusion_rates(tp, fp, tn, fn)
        out.update({m: rates[m] for m in THRESHOLD_METRICS if m in metrics})
    if "brier" in metrics:
        out["brier"] = _quiet(brier_score_loss, y, s, labels=[0, 1]) if y.size else math.nan
    if "calibration_slope" in metrics or "calibration_intercept" in metrics:
        slope, intercept = calibration_slope_intercept(y, s)
        out["calibration_slope"], out["calibration_intercept"] = slope, intercept
    if "ece" in metrics:
        out["ece"] = expected_calibration_error(y, s, n_bins)
    return {m: out[m] for m in metrics}


def check_metric_names(metrics: Sequence[str], known: Sequence[str]) -> None:
    """Raise ConfigError naming the first metric not in `known`."""
    for m in metrics:
        if m not in known:
            raise ConfigError(f"metric must be one of {', '.join(known)}, not {m!r}; fix the metric list")


def _check_scores_2d(y_score: Any, n_classes: int) -> np.ndarray:
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != n_classes:
        raise InputError(
            f"y_score must have shape (n, {n_classes}) (one column per class), not {s.shape}; "
            "pass the y_score_<class> columns in class order"
        )
    if not np.isfinite(s).all() or s.min(initial=0) < 0 or s.max(initial=1) > 1:
        raise InputError("y_score must be finite probabilities in [0, 1], not other values; re-predict")
    return s


def multiclass_metrics(
    y_true: Any, y_score: Any, classes: Sequence[Any], *, n_bins: int = 10
) -> dict[str, Any]:
    """Multi-class metrics: macro one-vs-rest discrimination, argmax decisions, calibration.

    Args:
        y_true: class labels, shape (n,).
        y_score: class probabilities, shape (n, k), columns in the order of `classes`.
        classes: the k class labels (k >= 3; use binary_metrics for two classes).
        n_bins: bins for the top-label expected calibration error.

    Returns:
        Dict with auroc_macro (OvR), auprc_macro (both over the classes present in y_true when
        one is absent), accuracy, balanced_accuracy, brier
        (multi-class, mean squared distance to the one-hot label), ece (top-label) and
        per_class: {class: {auroc, auprc, tpr, tnr, ppv, npv}} from one-vs-rest with argmax
        predictions.

    Raises:
        InputError: on mismatched shapes or labels not in `classes`.
    """
    classes = list(classes)
    s = _check_scores_2d(y_score, len(classes))
    y = np.asarray(y_true)
    if y.shape != (s.shape[0],) or not np.isin(y, classes).all():
        raise InputError(
            "y_true must be one label from `classes` per row, not other labels or lengths; "
            "check the class list against y_true"
        )
    onehot = label_binarize(y, classes=classes)
    y_pred = np.asarray(classes)[s.argmax(axis=1)]
    top_correct = (y_pred == y).astype(np.int64)
    out: dict[str, Any] = {
        "auroc_macro": _quiet(roc_auc_score, y, s, multi_class="ovr", average="macro", labels=classes),
        "auprc_macro": _quiet(average_precision_score, onehot, s, average="macro"),
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": _quiet(balanced_accuracy_score, y, y_pred),
        "brier": _quiet(brier_score_loss, y, s, labels=classes),
        "ece": expected_calibration_error(top_correct, s.max(axis=1), n_bins),
        "per_class": {},
    }
    for k, c in enumerate(classes):
        yk, pk = onehot[:, k], (s.argmax(axis=1) == k)
        tp, fp = int((yk & pk).sum()), int((~yk.astype(bool) & pk).sum())
        fn, tn = int(yk.sum()) - tp, int((1 - yk).sum()) - fp
        rates = confusion_rates(tp, fp, tn, fn)
        out["per_class"][str(c)] = {
            "auroc": _quiet(roc_auc_score, yk, s[:, k]),
            "auprc": _quiet(average_precision_score, yk, s[:, k]) if yk.any() else math.nan,
            **{m: rates[m] for m in ("tpr", "tnr", "ppv", "npv")},
        }
    present = [str(c) for k, c in enumerate(classes) if onehot[:, k].any()]
    if len(present) < len(classes):
        # scikit-learn's macro AUROC is undefined and its macro AP counts an absent class as 0:
        # average over the classes the data hold instead (equal to scikit-learn's when all are).
        for name in ("auroc", "auprc"):
            values = [out["per_class"][c][name] for c in present]
            out[f"{name}_macro"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    return out


def multilabel_metrics(
    y_true: Any, y_score: Any, labels: Sequence[str], thresholds: Sequence[float], *, n_bins: int = 10
) -> dict[str, Any]:
    """Multi-label metrics: every binary metric per label, plus macro and micro summaries.

    Args:
        y_true: indicator matrix (n, k) of 0/1.
        y_score: probabilities (n, k), columns in the order of `labels`.
        labels: the k label names.
        thresholds: one operating threshold per label (e.g. choose_threshold per column on
            validation).
        n_bins: bins for the expected calibration error.

    Returns:
        Dict with auroc_macro, auroc_micro, auprc_macro, auprc_micro, `<metric>_macro` (NaN-
        ignoring mean over labels) for every other binary metric, and per_label.

    Raises:
        InputError: on mismatched shapes or non-binary indicators.
    """
    s = _check_scores_2d(y_score, len(labels))
    y = np.asarray(y_true)
    if y.shape != s.shape or len(thresholds) != len(labels):
        raise InputError(
            f"y_true and thresholds must match y_score's {s.shape} and {len(labels)} labels, not "
            f"{y.shape} and {len(thresholds)}; pass one column and one threshold per label"
        )
    per_label = {
        str(lab): binary_metrics(y[:, k], s[:, k], thresholds[k], n_bins=n_bins)
        for k, lab in enumerate(labels)
    }
    out: dict[str, Any] = {
        "auroc_macro": _quiet(roc_auc_score, y, s, average="macro"),
        "auroc_micro": _quiet(roc_auc_score, y, s, average="micro"),
        "auprc_macro": _quiet(average_precision_score, y, s, average="macro"),
        "auprc_micro": _quiet(average_precision_score, y, s, average="micro"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        for m in BINARY_METRICS[2:]:
            out[f"{m}_macro"] = float(np.nanmean([per_label[str(lab)][m] for lab in labels]))
    out["per_label"] = per_label
    return out


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def _curves(y: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"roc": None, "pr": None}
    if y.min(initial=1) != y.max(initial=0):
        fpr, tpr, thr = roc_curve(y, s)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": _finite_or_none(thr)}
        precision, recall, thr = precision_recall_curve(y, s)
        out["pr"] = {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thr.tolist()}
    return out


def classification_report_data(
    y_true: Any,
    y_score: Any,
    threshold: float | None = None,
    *,
    classes: Sequence[Any] | None = None,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Everything the HTML report plots, as JSON-ready lists (no identifiers, no images).

    Args:
        y_true: labels (0/1 for binary, class labels for multi-class).
        y_score: positive-class probabilities (n,) or class probabilities (n, k).
        threshold: binary operating threshold (required for binary data).
        classes: the k class labels for multi-class data; None for binary.
        n_bins: bins of the reliability curve.

    Returns:
        Binary: {"threshold", "roc": {fpr, tpr, thresholds}, "pr": {precision, recall,
        thresholds}, "reliability": reliability_curve(...), "confusion_matrix": {"labels":
        [0, 1], "matrix": [[tn, fp], [fn, tp]]}}. Multi-class: {"classes", "per_class":
        {class: {roc, pr, reliability}}, "confusion_matrix": {"labels", "matrix"}} with
        argmax predictions. ROC thresholds are None where infinite.

    Raises:
        InputError: on invalid inputs or a missing binary threshold.
    """
    if classes is None:
        if threshold is None:
            raise InputError(
                "threshold must be a number for binary report data, not None; pass the operating threshold"
            )
        y, s = check_binary(y_true, y_score)
        cm = confusion_matrix(y, (s >= threshold).astype(np.int64), labels=[0, 1])
        return {
            "threshold": float(threshold) if np.isfinite(threshold) else None,
            **_curves(y, s),
            "reliability": reliability_curve(y, s, n_bins),
            "confusion_matrix": {"labels": [0, 1], "matrix": cm.tolist()},
        }
    classes = list(classes)
    s = _check_scores_2d(y_score, len(classes))
    y = np.asarray(y_true)
    onehot = label_binarize(y, classes=classes)
    y_pred = np.asarray(classes)[s.argmax(axis=1)]
    cm = confusion_matrix(y, y_pred, labels=classes)
    per_class = {
        str(c): {
            **_curves(onehot[:, k], s[:, k]),
            "reliability": reliability_curve(onehot[:, k], s[:, k], n_bins),
        }
        for k, c in enumerate(classes)
    }
    return {
        "classes": [str(c) for c in classes],
        "per_class": per_class,
        "confusion_matrix": {"labels": [str(c) for c in classes], "matrix": cm.tolist()},
    }
