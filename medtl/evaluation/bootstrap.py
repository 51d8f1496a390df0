"""Patient-level, stratified bootstrap with vectorised metrics.

Images of one patient are correlated, so the resampling unit is the patient: a replicate
draws patients with replacement inside each stratum (label, and subgroup for subgroup CIs)
and every row of a drawn patient enters with the patient's draw count as its weight. A
replicate is therefore a weight vector over rows, and metrics on weighted rows equal the
metrics on the materialised resample (tested against scikit-learn).

Why not `sklearn.utils.resample` or fairlearn's bootstrap: both resample rows (images), not
patients, and unstratified; and calling scikit-learn 2,000 times per group and metric costs
minutes. The kernels below compute a whole block of replicates with a few matrix operations.
Percentile intervals; operating thresholds chosen on validation are re-derived in every
replicate from a resample of the validation patients.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medtl.errors import ConfigError, InputError, LeakageError
from medtl.evaluation.calibration import calibration_slope_intercept, expected_calibration_error
from medtl.evaluation.metrics import (
    BINARY_METRICS,
    THRESHOLD_METRICS,
    above_every_score,
    binary_metrics,
    check_binary,
    check_metric_names,
    check_threshold_rule,
    choose_threshold,
    confusion_rates,
    multiclass_metrics,
    operating_point_index,
)

#: Replicates computed per block. Fixed (not sized to the data) so a seed gives the same
#: replicates whatever the table size; 100 x 10,000 rows of float64 weights is 8 MB.
BLOCK = 100
#: A CI needs the metric defined in at least this share of replicates, else it is reported missing.
MIN_DEFINED = 0.5


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap interval (None when not estimable)."""

    value: float
    ci: tuple[float, float] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: `{"value": float | None, "ci": [lo, hi] | None}` (NaN becomes None)."""
        value = float(self.value) if math.isfinite(self.value) else None
        return {"value": value, "ci": list(self.ci) if self.ci is not None else None}


def make_rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one named bootstrap, so adding an attribute never changes another's CIs."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def encode_patients(patient_ids: Any, n_rows: int) -> tuple[np.ndarray, int]:
    """Integer patient code per row and the number of patients.

    Args:
        patient_ids: one patient pseudonym per row, aligned with the predictions.
        n_rows: the number of prediction rows.

    Returns:
        `(codes, n_patients)` with codes in 0..n_patients-1.

    Raises:
        InputError: on a length mismatch or missing ids (no id is ever echoed).
    """
    ids = pd.Series(np.asarray(patient_ids, dtype=object))
    if len(ids) != n_rows:
        raise InputError(
            f"patient_ids must have one entry per prediction row ({n_rows}), not {len(ids)}; "
            "join the manifest's patient column on id in the predictions' row order"
        )
    codes, uniques = pd.factorize(ids, sort=False)
    if (codes < 0).any():
        raise InputError(
            f"patient_ids must be set for every row, not missing in {int((codes < 0).sum())} rows; "
            "join the manifest's patient column on id"
        )
    return codes.astype(np.int64), len(uniques)


def patient_strata(row_patient: np.ndarray, n_patients: int, *row_keys: np.ndarray) -> np.ndarray:
    """Stratum code per patient: the set of (key, ...) combinations over the patient's rows.

    A patient whose images all share a label (and subgroup) lands in that cell; one with mixed
    rows forms a stratum of the mixture, so resampling preserves every cell's patient count.

    Args:
        row_patient: patient code per row (from encode_patients).
        n_patients: number of patients.
        *row_keys: per-row keys to stratify on (labels, group codes).

    Returns:
        Integer stratum code per patient, shape (n_patients,).
    """
    if not row_keys:
        return np.zeros(n_patients, dtype=np.int64)
    frame = pd.DataFrame({f"k{i}": np.asarray(k) for i, k in enumerate(row_keys)})
    row_cell = frame.groupby(list(frame.columns), sort=True, dropna=False).ngroup().to_numpy()
    cells = pd.DataFrame({"p": row_patient, "c": row_cell}).drop_duplicates().sort_values(["p", "c"])
    per_patient = cells.groupby("p")["c"].agg(tuple)
    codes = pd.factorize(per_patient, sort=True)[0]
    out = np.empty(n_patients, dtype=np.int64)
    out[per_patient.index.to_numpy()] = codes
    return out


def iter_bootstrap_counts(strata: np.ndarray, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of patient draw counts, stratified: shape (<= BLOCK, n_patients), int32.

    Each stratum keeps its number of patients in every replicate.

    Args:
        strata: stratum code per patient (from patient_strata).
        n_boot: total number of replicates.
        rng: the random generator (from make_rng).

    Yields:
        Count blocks; their rows sum per stratum to the stratum's size.
    """
    members = [np.flatnonzero(strata == code) for code in np.unique(strata)]
    for start in range(0, n_boot, BLOCK):
        b = min(BLOCK, n_boot - start)
        counts = np.zeros((b, strata.size), dtype=np.int32)
        for idx in members:
            k = idx.size
            draws = rng.integers(0, k, size=(b, k)) + (np.arange(b) * k)[:, None]
            counts[:, idx] = np.bincount(draws.ravel(), minlength=b * k).reshape(b, k)
        yield counts


def percentile_ci(replicates: np.ndarray, level: float) -> tuple[float, float] | None:
    """Percentile interval over the replicates where the statistic is defined.

    Args:
        replicates: statistic per replicate, NaN where undefined.
        level: coverage, e.g. 0.95.

    Returns:
        `(lo, hi)`, or None when fewer than MIN_DEFINED of the replicates are finite.
    """
    r = np.asarray(replicates, dtype=np.float64)
    finite = r[np.isfinite(r)]
    if r.size == 0 or finite.size < MIN_DEFINED * r.size:
        return None
    lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def check_disjoint_patients(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Raise LeakageError if any patient id appears in both arrays (ids are never echoed)."""
    shared = np.intersect1d(
        pd.unique(np.asarray(a, dtype=object)).astype(str), pd.unique(np.asarray(b, dtype=object)).astype(str)
    )
    if shared.size:
        raise LeakageError(
            f"patients must belong to one split only, not {shared.size} patients in both {what}; "
            "rebuild the manifest splits by patient before evaluating"
        )


class Replicates:
    """Collects replicate blocks per (group, metric, model or reference) and stacks them at the end.

    Args:
        groups: the reported groups (every metric is collected for their CIs).
        needed: the gap metrics (also collected on the whole set and for the reference).
        with_ref: whether a reference model's replicates are collected too.
    """

    def __init__(self, groups: Sequence[str], needed: Sequence[str], with_ref: bool) -> None:
        self.groups = list(groups)
        self.needed = list(needed)
        self.with_ref = with_ref
        self._blocks: dict[tuple[str, str, bool], list[np.ndarray]] = {}

    def add(self, group: str, values: Mapping[str, np.ndarray], ref: bool = False) -> None:
        """Append one block of replicates per metric."""
        for metric, v in values.items():
            self._blocks.setdefault((group, metric, ref), []).append(np.asarray(v, dtype=np.float64))

    def get(self, group: str, metric: str, ref: bool = False) -> np.ndarray:
        """Every replicate of one group and metric, in draw order (empty when none were added)."""
        blocks = self._blocks.get((group, metric, ref))
        return np.concatenate(blocks) if blocks else np.zeros(0)

    def stack(self, metric: str, ref: bool = False) -> np.ndarray:
        """Replicates of every group side by side, shape (n_boot, n_groups)."""
        return np.stack([self.get(g, metric, ref) for g in self.groups], axis=1)


# --- vectorised kernels: w has shape (b, n), one weighting per replicate -------------------


def _ranked(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, descending: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score (b, k), and the distinct scores (k,)."""
    order = np.argsort(-s if descending else s, kind="stable")
    ss, ys, ws = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if ss.size else np.zeros(0, dtype=np.int64)
    pos = np.add.reduceat(ws * ys, starts, axis=1) if ss.size else np.zeros((w.shape[0], 0))
    neg = np.add.reduceat(ws * (1 - ys), starts, axis=1) if ss.size else np.zeros((w.shape[0], 0))
    return pos, neg, ss[starts]


def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC per weight row (ties count one half), NaN when a class has no weight.

    Args:
        y: labels (0/1), shape (n,).
        s: scores, shape (n,).
        w: weights, shape (b, n).

    Returns:
        Shape (b,).
    """
    pos, neg, _ = _ranked(y, s, w, descending=False)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def weighted_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's step-wise definition) per weight row; NaN without positives."""
    pos, neg, _ = _ranked(y, s, w, descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return (pos * precision).sum(axis=1) / pos.sum(axis=1)


def weighted_thresholds(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, rule: str, target: float | None
) -> np.ndarray:
    """The operating threshold choose_threshold would pick on each weighted resample, shape (b,)."""
    pos, neg, values = _ranked(y, s, w, descending=True)
    zero = np.zeros((w.shape[0], 1))
    tp, fp = (
        np.concatenate([zero, np.cumsum(pos, axis=1)], 1),
        np.concatenate([zero, np.cumsum(neg, axis=1)], 1),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    return np.r_[above_every_score(s), values][operating_point_index(tpr, fpr, rule, target)]


def weighted_binary_metrics(
    y: np.ndarray,
    s: np.ndarray,
    w: np.ndarray,
    threshold: float | np.ndarray,
    metrics: Sequence[str] = BINARY_METRICS,
    n_bins: int = 10,
) -> dict[str, np.ndarray]:
    """Every requested binary metric per weight row.

    Args:
        y: labels (0/1), shape (n,).
        s: probabilities, shape (n,).
        w: weights, shape (b, n).
        threshold: one threshold, or one per row of `w` (shape (b,)).
        metrics: names from BINARY_METRICS.
        n_bins: bins for the ECE.

    Returns:
        Dict metric -> array (b,), NaN where undefined.
    """
    out: dict[str, np.ndarray] = {}
    if "auroc" in metrics:
        out["auroc"] = weighted_auroc(y, s, w)
    if "auprc" in metrics:
        out["auprc"] = weighted_average_precision(y, s, w)
    if any(m in metrics for m in THRESHOLD_METRICS):
        t = np.asarray(threshold, dtype=np.float64)
        pred = (s[None, :] >= t[:, None]) if t.ndim else (s >= t)[None, :]
        wp, wn = w * y, w * (1 - y)
        tp, fn = (wp * pred).sum(axis=1), (wp * ~pred).sum(axis=1)
        fp, tn = (wn * pred).sum(axis=1), (wn * ~pred).sum(axis=1)
        rates = confusion_rates(tp, fp, tn, fn)
        out.update({m: rates[m] for m in THRESHOLD_METRICS if m in metrics})
    with np.errstate(invalid="ignore", divide="ignore"):
        if "brier" in metrics:
            out["brier"] = (w * (s - y) ** 2).sum(axis=1) / w.sum(axis=1)
    if "calibration_slope" in metrics or "calibration_intercept" in metrics:
        out["calibration_slope"], out["calibration_intercept"] = calibration_slope_intercept(y, s, w)
    if "ece" in metrics:
        out["ece"] = expected_calibration_error(y, s, n_bins, w)
    return {m: out[m] for m in metrics}


def weighted_nanmean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mean of per-case values ignoring NaN, per weight row; shape (b,)."""
    v = np.asarray(values, dtype=np.float64)
    defined = np.isfinite(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w[:, defined] @ v[defined]) / w[:, defined].sum(axis=1)


def bootstrap_binary(
    y_true: Any, y_score: Any, patient_ids: Any, *, threshold: float | None = None,
    validation: tuple[Any, Any, Any] | None = None, rule: str = "youden", target: float | None = None,
    metrics: Sequence[str] = BINARY_METRICS, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
    n_bins: int = 10, progress: bool = False,
) -> dict[str, Estimate]:
    """Binary metrics with patient-level bootstrap CIs, stratified by label.

    Args:
        y_true: test labels (0/1).
        y_score: test positive-class probabilities.
        patient_ids: test patient pseudonym per row.
        threshold: a fixed operating threshold; if None it is chosen on `validation` with
            `rule` and re-derived in every replicate from resampled validation patients.
        validation: `(y_true, y_score, patient_ids)` of the validation split.
        rule: threshold rule ("youden", "sensitivity", "fpr"), see choose_threshold.
        target: the rule's target rate.
        metrics: names from BINARY_METRICS.
        n_boot: number of replicates.
        seed: random seed (same seed, same intervals).
        level: interval coverage.
        n_bins: bins for the ECE.
        progress: show a progress bar.

    Returns:
        Dict metric -> Estimate (point estimate from scikit-learn), plus "threshold" (its CI
        only when derived from validation).

    Raises:
        InputError: invalid inputs, or neither a threshold nor validation data.
        LeakageError: a patient in both the validation and the test data.
        ConfigError: bad rule, target, metric, n_boot or level.

    Example:
        >>> est = bootstrap_binary(y, p, patients, validation=(y_val, p_val, patients_val))  # doctest: +SKIP
        >>> est["auroc"].value, est["auroc"].ci  # doctest: +SKIP
    """
    check_metric_names(metrics, BINARY_METRICS)
    check_bootstrap_settings(n_boot, level)
    y, s = check_binary(y_true, y_score)
    row_patient, n_patients = encode_patients(patient_ids, y.size)
    derived = threshold is None
    if derived:
        threshold, thresholds = _validation_thresholds(validation, patient_ids, rule, target, n_boot, seed)
    else:
        thresholds = itertools.repeat(threshold)
    point = binary_metrics(y, s, threshold, metrics=metrics, n_bins=n_bins)
    blocks = iter_bootstrap_counts(patient_strata(row_patient, n_patients, y), n_boot, make_rng(seed, "overall"))
    blocks = tqdm(blocks, total=math.ceil(n_boot / BLOCK), disable=not progress, desc="bootstrap")
    reps: dict[str, list[np.ndarray]] = {m: [] for m in [*metrics, "threshold"]}
    for counts, t_rep in zip(blocks, thresholds, strict=False):
        for m, v in weighted_binary_metrics(y, s, counts[:, row_patient], t_rep, metrics, n_bins).items():
            reps[m].append(v)
        reps["threshold"].append(np.broadcast_to(np.asarray(t_rep, dtype=np.float64), (counts.shape[0],)))
    out = {m: Estimate(point[m], percentile_ci(np.concatenate(reps[m]), level)) for m in metrics}
    out["threshold"] = Estimate(
        float(threshold), percentile_ci(np.concatenate(reps["threshold"]), level) if derived else None
    )
    return out


def _validation_thresholds(
    validation: tuple[Any, Any, Any] | None, test_patients: Any, rule: str, target: float | None, n_boot: int,
    seed: int,
) -> tuple[float, Iterator[np.ndarray]]:
    """The threshold chosen on the validation split, and per block of replicates its re-derived values.

    Each block's thresholds come from a resample of the validation patients (stratified by
    label) with the seed's "validation" stream, one per replicate.
    """
    if validation is None:
        raise InputError(
            "validation must be (y_true, y_score, patient_ids) when threshold is None; pass one of them"
        )
    check_threshold_rule(rule, target)
    yv, sv = check_binary(validation[0], validation[1], name="validation y_score")
    check_disjoint_patients(validation[2], test_patients, "validation and test data")
    val_patient, n_val = encode_patients(validation[2], yv.size)
    threshold = choose_threshold(yv, sv, rule, target)
    blocks = iter_bootstrap_counts(patient_strata(val_patient, n_val, yv), n_boot, make_rng(seed, "validation"))
    return threshold, (weighted_thresholds(yv, sv, counts[:, val_patient], rule, target) for counts in blocks)


#: The multi-class metrics bootstrap_multiclass gives CIs for (keys of multiclass_metrics).
MULTICLASS_METRICS: tuple[str, ...] = ("auroc_macro", "auprc_macro", "accuracy", "balanced_accuracy", "brier", "ece")


def bootstrap_multiclass(
    y_true: Any,
    y_score: Any,
    classes: Sequence[Any],
    patient_ids: Any,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
) -> dict[str, Estimate]:
    """Multi-class metrics (macro one-vs-rest, argmax decisions) with patient-level bootstrap CIs.

    The same resampling as bootstrap_binary (patients, stratified by label); no threshold is
    involved (decisions are the argmax). Point estimates come from multiclass_metrics
    (scikit-learn); replicates from the weighted kernels, class by class.

    Args:
        y_true: class labels, shape (n,).
        y_score: class probabilities, shape (n, k), columns in the order of `classes`.
        classes: the k >= 3 class labels.
        patient_ids: patient pseudonym per row.
        n_boot: number of replicates.
        seed: random seed.
        level: interval coverage.
        n_bins: bins for the top-label ECE.

    Returns:
        Dict metric (MULTICLASS_METRICS) -> Estimate, plus "auroc_<class>" per class (one-vs-rest).

    Raises:
        InputError: mismatched shapes, labels not in `classes`, misaligned patient ids.
        ConfigError: bad n_boot or level.

    Example:
        >>> est = bootstrap_multiclass(y, probs, ["a", "b", "c"], patients)  # doctest: +SKIP
        >>> est["auroc_macro"].ci  # doctest: +SKIP
    """
    check_bootstrap_settings(n_boot, level)
    classes = list(classes)
    point = multiclass_metrics(y_true, y_score, classes, n_bins=n_bins)  # validates shapes and labels
    index = {c: k for k, c in enumerate(classes)}
    code = np.array([index[v] for v in np.asarray(y_true).tolist()], dtype=np.int64)
    row_patient, n_patients = encode_patients(patient_ids, code.size)
    names = [*MULTICLASS_METRICS, *(f"auroc_{c}" for c in classes)]
    reps: dict[str, list[np.ndarray]] = {m: [] for m in names}
    kernel = _MulticlassKernel.of(code, np.asarray(y_score, dtype=np.float64), n_bins)
    strata = patient_strata(row_patient, n_patients, code)
    for counts in iter_bootstrap_counts(strata, n_boot, make_rng(seed, "overall")):
        block = kernel(counts[:, row_patient].astype(np.float64))
        for m in MULTICLASS_METRICS:
            reps[m].append(block[m])
        for c, a in zip(classes, block["per_class_auroc"], strict=True):
            reps[f"auroc_{c}"].append(a)
    values = {m: point[m] for m in MULTICLASS_METRICS}
    values.update({f"auroc_{c}": point["per_class"][str(c)]["auroc"] for c in classes})
    return {m: Estimate(float(values[m]), percentile_ci(np.concatenate(reps[m]), level)) for m in names}


@dataclass(frozen=True)
class _MulticlassKernel:
    """The multi-class metrics of a block of weight rows (see bootstrap_multiclass)."""

    code: np.ndarray  # class index per row
    s: np.ndarray  # class probabilities, (n, k)
    onehot: np.ndarray  # one-hot labels, (n, k)
    correct: np.ndarray  # 1.0 where the argmax is the label
    squared: np.ndarray  # per row: squared distance of the probabilities to the one-hot label
    present: tuple[int, ...]  # classes the test data hold
    n_bins: int

    @classmethod
    def of(cls, code: np.ndarray, s: np.ndarray, n_bins: int) -> _MulticlassKernel:
        onehot = np.eye(s.shape[1])[code]
        # Macro averages run over the classes the test data hold (as multiclass_metrics does);
        # stratification by label keeps every such class in every replicate.
        present = tuple(k for k in range(s.shape[1]) if (code == k).any())
        return cls(code, s, onehot, (s.argmax(axis=1) == code).astype(np.float64), ((s - onehot) ** 2).sum(axis=1),
                   present, n_bins)

    def __call__(self, w: np.ndarray) -> dict[str, Any]:
        total = w.sum(axis=1)
        aurocs = [weighted_auroc(self.onehot[:, k], self.s[:, k], w) for k in range(self.s.shape[1])]
        rows = [self.code == k for k in self.present]
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls = [(w[:, r] @ self.correct[r]) / w[:, r].sum(axis=1) for r in rows]
            accuracy, brier = w @ self.correct / total, w @ self.squared / total
        precision = [weighted_average_precision(self.onehot[:, k], self.s[:, k], w) for k in self.present]
        return {
            "auroc_macro": np.mean([aurocs[k] for k in self.present], axis=0),
            "auprc_macro": np.mean(precision, axis=0),
            "accuracy": accuracy,
            "balanced_accuracy": np.mean(recalls, axis=0),
            "brier": brier,
            "ece": expected_calibration_error(self.correct, self.s.max(axis=1), self.n_bins, w),
            "per_class_auroc": aurocs,
        }


def check_bootstrap_settings(n_boot: Any, level: Any) -> None:
    """Raise ConfigError unless n_boot is an int >= 100 and 0 < level < 1."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 100:
        raise ConfigError(f"n_boot must be an integer >= 100 (2000 recommended), not {n_boot!r}; raise it")
    if not isinstance(level, float | int) or not 0.0 < float(level) < 1.0:
        raise ConfigError(f"CI level must be between 0 and 1 (e.g. 0.95), not {level!r}; fix it")


def bootstrap_case_means(
    values: pd.DataFrame,
    patient_ids: Any,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """Means of per-case values (segmentation Dice, HD95, ...) with patient-level bootstrap CIs.

    Cases whose value is NaN (e.g. Dice with an empty reference) are left out of that column's
    mean, in the point estimate and in every replicate alike.

    Args:
        values: one row per case, one numeric column per metric (e.g. the metric columns of
            segmentation_case_metrics).
        patient_ids: patient pseudonym per row.
        n_boot: number of replicates.
        seed: random seed.
        level: interval coverage.

    Returns:
        Dict column -> Estimate.

    Raises:
        InputError: misaligned patient ids.
        ConfigError: bad n_boot or level.
    """
    check_bootstrap_settings(n_boot, level)
    table = values.to_numpy(dtype=np.float64)
    row_patient, n_patients = encode_patients(patient_ids, table.shape[0])
    reps: list[list[np.ndarray]] = [[] for _ in range(table.shape[1])]
    for counts in iter_bootstrap_counts(
        np.zeros(n_patients, dtype=np.int64), n_boot, make_rng(seed, "cases")
    ):
        w = counts[:, row_patient].astype(np.float64)
        for k in range(table.shape[1]):
            reps[k].append(weighted_nanmean(table[:, k], w))
    out = {}
    for k, column in enumerate(values.columns):
        point = weighted_nanmean(table[:, k], np.ones((1, table.shape[0])))[0]
        out[str(column)] = Estimate(float(point), percentile_ci(np.concatenate(reps[k]), level))
    return out
