"""Point metrics: agreement with scikit-learn/MONAI, threshold rules, calibration, report data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from medtl.errors import ConfigError, InputError
from medtl.evaluation.metrics import (
    BINARY_METRICS,
    binary_metrics,
    choose_threshold,
    classification_report_data,
    multiclass_metrics,
    multilabel_metrics,
    reliability_curve,
)
from medtl.evaluation.segmentation import segmentation_case_metrics, segmentation_summary
from tests.evaluation.conftest import binary_risks

# -- thresholds ----------------------------------------------------------------------------


def test_choose_threshold_youden_maximises_tpr_minus_fpr_on_the_roc_curve():
    y, s = binary_risks()
    t = choose_threshold(y, s, "youden")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    assert t == thr[np.argmax(tpr - fpr)]
    assert np.isfinite(t)


def test_choose_threshold_fixed_sensitivity_reaches_the_target_with_the_lowest_fpr():
    y, s = binary_risks(seed=1)
    t = choose_threshold(y, s, "sensitivity", 0.9)
    pred = s >= t
    assert recall_score(y, pred) >= 0.9
    # The next higher observed score would miss the target: t is the highest threshold that meets it.
    higher = np.unique(s[s > t])
    assert higher.size == 0 or recall_score(y, s >= higher[0]) < 0.9


def test_choose_threshold_fixed_fpr_stays_under_the_target_with_the_highest_tpr():
    y, s = binary_risks(seed=2)
    t = choose_threshold(y, s, "fpr", 0.1)

    def rates(th):
        return ((s >= th) & (y == 1)).sum() / (y == 1).sum(), ((s >= th) & (y == 0)).sum() / (y == 0).sum()

    tpr, fpr = rates(t)
    assert fpr <= 0.1
    # No other threshold under the FPR target has a higher TPR; ties go to the higher threshold.
    for other in np.unique(s):
        o_tpr, o_fpr = rates(other)
        if o_fpr <= 0.1:
            assert o_tpr < tpr or (o_tpr == tpr and other <= t)


def test_choose_threshold_small_example_ties_go_to_the_higher_threshold():
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8


@pytest.mark.parametrize(("rule", "target"), [("youdn", None), ("sensitivity", None), ("fpr", 1.5)])
def test_choose_threshold_rejects_bad_rules_and_targets_with_config_error(rule, target):
    with pytest.raises(ConfigError, match="threshold"):
        choose_threshold([0, 1], [0.2, 0.8], rule, target)


@pytest.mark.parametrize(("rule", "target"), [("youden", None), ("fpr", 0.01)])
def test_a_threshold_that_predicts_nothing_positive_is_finite_and_survives_strict_json(rule, target):
    # Scores that rank every negative above every positive: no threshold beats "all negative".
    y, s = np.array([0, 0, 0, 1, 1, 1]), np.array([0.9, 0.8, 1.0, 0.1, 0.2, 0.3], dtype=np.float32)
    with pytest.warns(UserWarning, match="predicts no positive case"):
        threshold = choose_threshold(y, s, rule, target)
    assert np.isfinite(threshold) and threshold > 1.0 and not (s >= threshold).any()
    assert json.loads(json.dumps(threshold, allow_nan=False)) == threshold
    assert binary_metrics(y, s, threshold)["tpr"] == 0.0


def test_choose_threshold_needs_both_classes_in_validation():
    with pytest.raises(InputError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.8])


# -- binary metrics ------------------------------------------------------------------------


def test_binary_metrics_equal_scikit_learn():
    y, s = binary_risks(seed=3)
    t = 0.4
    m = binary_metrics(y, s, t)
    pred = (s >= t).astype(int)
    assert list(m) == list(BINARY_METRICS)
    assert m["auroc"] == roc_auc_score(y, s)
    assert m["auprc"] == average_precision_score(y, s)
    assert m["brier"] == brier_score_loss(y, s)
    assert m["tpr"] == pytest.approx(recall_score(y, pred), abs=1e-15)
    assert m["tnr"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-15)
    assert m["ppv"] == pytest.approx(precision_score(y, pred), abs=1e-15)
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0), abs=1e-15)
    assert m["fpr"] == pytest.approx(1 - m["tnr"]) and m["fnr"] == pytest.approx(1 - m["tpr"])
    assert m["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-15)


def test_binary_metrics_are_nan_not_zero_where_undefined():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.9)
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"]) and np.isnan(m["tpr"]) and np.isnan(m["ppv"])
    assert m["tnr"] == 1.0


def test_binary_metrics_rejects_scores_outside_0_1_and_non_binary_labels():
    with pytest.raises(InputError, match=r"probabilities in \[0, 1\]"):
        binary_metrics([0, 1], [-0.5, 2.0], 0.5)
    with pytest.raises(InputError, match="0/1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ConfigError, match="metric"):
        binary_metrics([0, 1], [0.1, 0.2], 0.5, metrics=["aucroc"])


# -- report data ---------------------------------------------------------------------------


def test_reliability_curve_has_one_entry_per_bin_and_none_for_empty_bins():
    y, s = np.array([0, 1, 1, 0]), np.array([0.05, 0.95, 0.9, 0.15])
    rc = reliability_curve(y, s, n_bins=10)
    assert len(rc["count"]) == 10 and sum(rc["count"]) == 4
    assert rc["fraction_positive"][0] == 0.0 and rc["fraction_positive"][9] == 1.0
    assert rc["mean_predicted"][5] is None


# -- multi-class and multi-label -----------------------------------------------------------


def _multiclass(n: int = 300, seed: int = 8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_multiclass_metrics_macro_auroc_and_brier_equal_scikit_learn():
    y, p = _multiclass()
    m = multiclass_metrics(y, p, classes=[0, 1, 2])
    assert m["auroc_macro"] == roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["brier"] == pytest.approx(np.mean(np.sum((np.eye(3)[y] - p) ** 2, axis=1)))
    assert m["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["per_class"]["1"]["auroc"] == roc_auc_score(y == 1, p[:, 1])
    assert m["per_class"]["2"]["tpr"] == pytest.approx(((p.argmax(1) == 2) & (y == 2)).sum() / (y == 2).sum())


def test_multilabel_metrics_per_label_equal_binary_metrics():
    y, p = _multiclass(seed=9)
    indicators = np.eye(3, dtype=int)[y]
    indicators[::7, 0] = 1  # a second label on some rows
    m = multilabel_metrics(indicators, p, labels=["a", "b", "c"], thresholds=[0.3, 0.3, 0.3])
    assert m["per_label"]["b"] == binary_metrics(indicators[:, 1], p[:, 1], 0.3)
    assert m["auroc_macro"] == roc_auc_score(indicators, p, average="macro")
    assert m["tpr_macro"] == pytest.approx(np.mean([m["per_label"][k]["tpr"] for k in "abc"]))


# -- report data ---------------------------------------------------------------------------


def test_classification_report_data_is_strict_json_with_curves_and_confusion_matrix():
    y, s = binary_risks(seed=10)
    data = classification_report_data(y, s, threshold=0.5)
    json.dumps(data, allow_nan=False)
    tn = int(((s < 0.5) & (y == 0)).sum())
    assert data["confusion_matrix"]["matrix"][0][0] == tn
    assert data["roc"]["thresholds"][0] is None  # +inf start of the ROC curve
    assert len(data["roc"]["fpr"]) == len(data["roc"]["tpr"])
    yc, p = _multiclass()
    multi = classification_report_data(yc, p, classes=[0, 1, 2])
    json.dumps(multi, allow_nan=False)
    assert np.sum(multi["confusion_matrix"]["matrix"]) == yc.size and set(multi["per_class"]) == {
        "0",
        "1",
        "2",
    }


# -- segmentation (MONAI) ------------------------------------------------------------------


def test_segmentation_case_metrics_dice_hd95_and_surface_dice_per_case():
    gt = np.zeros((20, 20), dtype=int)
    gt[5:15, 5:15] = 1
    shifted = np.roll(gt, 2, axis=0)  # 2 voxels = 1 mm at 0.5 mm spacing
    table = segmentation_case_metrics(
        [gt, shifted], [gt, gt], num_classes=2, ids=["a", "b"], spacing=(0.5, 0.5), tolerance_mm=0.5
    )
    assert table["id"].tolist() == ["a", "b"]
    assert (
        table.loc[0, "dice_1"] == 1.0
        and table.loc[0, "hd95_1"] == 0.0
        and table.loc[0, "surface_dice_1"] == 1.0
    )
    assert table.loc[1, "dice_1"] == pytest.approx(2 * 80 / 200)
    assert table.loc[1, "hd95_1"] == pytest.approx(1.0)
    assert 0.0 < table.loc[1, "surface_dice_1"] < 1.0


def test_segmentation_empty_reference_class_gives_nan_and_summary_ignores_it():
    gt = np.zeros((10, 10, 4), dtype=int)
    gt[2:6, 2:6, 1:3] = 1
    table = segmentation_case_metrics([gt, gt], [gt, np.zeros_like(gt)], num_classes=2)
    assert table.loc[0, "dice_1"] == 1.0 and np.isnan(table.loc[1, "dice_1"])
    assert segmentation_summary(table)["dice_1"] == 1.0


def test_segmentation_rejects_labels_beyond_num_classes():
    with pytest.raises(InputError, match="num_classes"):
        segmentation_case_metrics([np.full((4, 4), 3)], [np.zeros((4, 4), int)], num_classes=2)
