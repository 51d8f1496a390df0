"""Fixtures of the evaluation tests: realistic synthetic report inputs and a headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
from scipy.special import expit

from medtl.evaluation.metrics import binary_metrics, classification_report_data
from medtl.evaluation.report import find_chromium
from medtl.evaluation.report_types import (
    DataProvenance,
    EvaluationMethods,
    Identification,
    ModelTransfer,
    ReportInputs,
    Results,
)
from tests.processes import apt_get_install

#: Strings planted where the report must not look (per-patient fields of the inputs).
PLANTED_PATIENT = "P-PLANTED9f3ac1d2e"
PLANTED_FOLDER = "dr_jane_doe_1961"
APT_TIMEOUT_S = 600


def binary_risks(n: int = 400, seed: int = 0, slope: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from known risks; scores are the risks' logits times 1/slope."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-0.3, 1.5, n)
    y = (rng.random(n) < expit(true_logit)).astype(int)
    return y, expit(true_logit / slope)


def _estimate(value: float, half_width: float) -> dict:
    return {"value": float(value), "ci": [float(value - half_width), float(value + half_width)]}


def _group(attribute: str, group: str, n: int, patients: int, auroc: float, tpr: float, fpr: float,
           *, imprecise: bool = False) -> dict:
    wide = 0.12 if imprecise else 0.05
    return {"attribute": attribute, "group": group, "n": n, "n_patients": patients, "n_positive": n // 3,
            "n_negative": n - n // 3, "suppressed": False, "imprecise": imprecise, "note": None,
            "metrics": {"auroc": _estimate(auroc, wide), "tpr": _estimate(tpr, wide + 0.03),
                        "fpr": _estimate(fpr, wide), "ece": _estimate(0.04, 0.02)}}


def _suppressed(attribute: str, group: str) -> dict:
    # audit.json carries no numbers for suppressed groups; the planted ones check that the report
    # would not print them even if a caller left some behind.
    return {"attribute": attribute, "group": group, "n": None, "n_patients": None, "n_positive": None,
            "n_negative": None, "suppressed": True, "imprecise": None, "note": None,
            "metrics": {"auroc": {"value": 0.4321987, "ci": [0.3, 0.5]}},
            "patient_ids": [PLANTED_PATIENT]}


def _gap(attribute: str, metric: str, value: float, lo: float, hi: float, tolerance: float | None, *,
         kind: str = "difference") -> dict:
    if tolerance is None:
        status = "not_tested"
    else:
        status = "flagged" if lo > tolerance else "within" if hi <= tolerance else "inconclusive"
    return {"attribute": attribute, "metric": metric, "kind": kind, "value": value, "ci": [lo, hi],
            "ci_level": 0.99 if tolerance is not None else 0.95, "tolerance": tolerance,
            "flagged": status == "flagged", "status": status, "worst_group": "80-89" if "age" in attribute else "F",
            "best_group": "30-39" if "age" in attribute else "M"}


def make_audit() -> dict:
    groups = [
        _group("sex", "F", 212, 101, 0.905, 0.81, 0.14), _group("sex", "M", 188, 96, 0.922, 0.86, 0.12),
        _group("age_band", "18-29", 41, 22, 0.93, 0.88, 0.10, imprecise=True),
        _group("age_band", "30-39", 97, 48, 0.94, 0.90, 0.09), _group("age_band", "60-69", 160, 77, 0.90, 0.80, 0.15),
        _group("age_band", "80-89", 96, 45, 0.86, 0.68, 0.18), _suppressed("age_band", "90+"),
        _group("site", "SITE-3fa21c", 250, 120, 0.915, 0.84, 0.13), _group("site", "SITE-9b0e77", 150, 77, 0.91, 0.83, 0.13),
        _group("sex&age_band", "F&80-89", 52, 24, 0.84, 0.64, 0.19, imprecise=True), _suppressed("sex&age_band", "M&90+"),
    ]
    gaps = [
        _gap("sex", "auroc", 0.017, -0.02, 0.05, 0.05), _gap("sex", "fnr", 0.05, -0.03, 0.12, 0.10),
        _gap("age_band", "auroc", 0.08, 0.01, 0.15, 0.05), _gap("age_band", "fnr", 0.22, 0.12, 0.31, 0.10),
        _gap("site", "auroc", 0.005, -0.03, 0.04, 0.05), _gap("sex&age_band", "auroc", 0.09, -0.01, 0.18, 0.05),
        _gap("sex", "auroc", 0.011, 0.0, 0.03, None, kind="worst_vs_overall"),
        _gap("age_band", "tpr", 0.22, 0.12, 0.31, None),
    ]
    amplification = [
        {"attribute": "age_band", "metric": "auroc", "kind": "difference", "model": 0.08, "reference": 0.05,
         "delta": 0.03, "ci": [0.01, 0.05], "direction": "widened"},
        {"attribute": "sex", "metric": "auroc", "kind": "difference", "model": 0.017, "reference": 0.03,
         "delta": -0.013, "ci": [-0.04, 0.01], "direction": "unchanged"},
    ]
    return {"passed": False, "task": "classification", "reference": {"label": "from-scratch", "paired": True},
            "overall": _group("overall", "all", 400, 197, 0.913, 0.84, 0.13), "groups": groups, "gaps": gaps,
            "amplification": amplification, "thresholds": {"model": 0.41},
            "tolerance": {"auroc": 0.05, "fnr": 0.1, "equalized_odds": 0.1},
            "correction": {"method": "bonferroni", "alpha": 0.05, "tested": 6, "ci_level": 0.99},
            "settings": {"n_boot": 2000, "seed": 0, "min_group_size": 10, "min_events": 100, "split": "test"},
            "notes": ["operating threshold chosen on the validation split and re-derived per replicate"],
            "per_patient": [{"patient": PLANTED_PATIENT, "y_score": 0.93}]}


def _common(task: str, metrics: dict, curves: dict | None, audit: dict, **results) -> ReportInputs:
    ident = Identification(model_name="chest_xray_pneumonia", task=task,
                           intended_use="Research use: flag frontal chest radiographs of adults for possible "
                                        "pneumonia <b>before</b> radiologist review. Not for diagnosis.",
                           run_id="3f9c2e1ab04d4c7e9d1e5a6b7c8d9e0f", created="2025-11-20",
                           code_version="medtl 0.1.0 (git 934a9b6)", model_version="3",
                           out_of_scope="Children, lateral views, CT.", developers="Radiology AI group")
    splits = {s: {"n_patients": p, "n_studies": n, "label": {"0": n - n // 3, "1": n // 3},
                  "sex": {"F": n // 2 + 3, "M": n - n // 2 - 3}, "age_band": {"18-29": 40, "80-89": 51, "90+": 4}}
              for s, p, n in (("train", 921, 1862), ("val", 197, 398), ("test", 197, 400))}
    data = DataProvenance(
        n_files=5230, n_studies=2660, n_patients=1315, manifest_sha256="a" * 64, source="two hospital PACS exports",
        modalities={"CR": 1980, "DX": 680}, sites={"SITE-3fa21c": 1700, "SITE-9b0e77": 960}, years="2014-2021",
        quarantined={"burned-in text in pixels": 12, "PHI in file name": 3}, skipped={"not a study (DICOMDIR)": 2,
                                                                                      "unreadable": 4},
        deid_profile="DICOM PS3.15 Basic Profile; dates kept to the year", key_id="K-7d1e0a",
        k_anonymity={"k": 14, "k_min": 11, "quasi_identifiers": ["sex", "age_band", "site"], "passed": True},
        phi_scan={"passed": True, "n_findings": 0}, splits=splits,
        leakage={"passed": True, "level": "patient", "n_shared": 0})
    model = ModelTransfer(
        encoder="efficientnet_lite0", strategy="lp_ft", head="linear (1280 -> 2)", spatial_dims=2,
        weights={"source": "imagenet", "origin": f"/home/{PLANTED_FOLDER}/weights/efficientnet_lite0.pth",
                 "licence": "Apache-2.0", "sha256": "b" * 64, "input_size": [3, 224, 224],
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        load_report={"matched": 294, "missing": [], "unexpected": ["_fc.weight", "_fc.bias"],
                     "adapted": ["_conv_stem.weight (3 -> 1 channels, summed)"]},
        frozen_layers=["_conv_stem", "_bn0", "_blocks.0", "_blocks.1"],
        preprocessing={"image_size": [96, 96], "intensity": "xray", "normalise": "imagenet mean/std"},
        hyperparameters={"epochs": 8, "batch_size": 32, "lr": 0.001, "optimizer": "adamw", "weight_decay": 1e-4},
        library_versions={"torch": "2.14.1", "monai": "1.6.1", "timm": "1.0.31", "mlflow": "3.17.2"})
    methods = EvaluationMethods(
        metrics=["auroc", "tpr", "fpr", "ece"] if task == "classification" else ["dice", "hd95"],
        threshold_rule="youden", threshold=0.41 if task == "classification" else None,
        ci_method="patient-level stratified bootstrap, percentile intervals", n_boot=2000,
        tolerances={"auroc": 0.05, "fnr": 0.1})
    return ReportInputs(identification=ident, data=data, model=model, methods=methods,
                        results=Results(metrics=metrics, n_cases=400, n_patients=197, curves=curves, **results),
                        audit=audit, limitations=("Labels come from radiology reports (NLP), not adjudicated reads.",))


@pytest.fixture(scope="session")
def classification_inputs() -> ReportInputs:
    """A binary pneumonia classifier's report inputs with curves computed by medtl's own metrics."""
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.33).astype(int)
    score = np.clip(rng.normal(0.3 + 0.38 * y, 0.17), 0.001, 0.999)
    curves = classification_report_data(y, score, threshold=0.41)
    grid = np.linspace(0, 1, 51)
    tpr = np.interp(grid, curves["roc"]["fpr"], curves["roc"]["tpr"])
    curves["roc"] = {"fpr": grid.tolist(), "tpr": tpr.tolist(), "tpr_lo": np.clip(tpr - 0.06, 0, 1).tolist(),
                     "tpr_hi": np.clip(tpr + 0.05, 0, 1).tolist()}
    point = binary_metrics(y, score, 0.41)
    metrics = {k: _estimate(v, 0.03) for k, v in point.items()}
    inputs = _common("classification", metrics, curves, make_audit())
    benefit = {arm: {f: {"mean": base + gain * np.log10(f * 100) / 2, "sd": 0.02}
                     for f in (0.01, 0.1, 0.25, 1.0)} for arm, base, gain in
               (("imagenet", 0.78, 0.13), ("scratch", 0.62, 0.2))}
    return dataclasses.replace(inputs, transfer_benefit=benefit)


@pytest.fixture(scope="session")
def segmentation_inputs() -> ReportInputs:
    """A two-class 3D segmentation model's report inputs: class metrics and per-case Dice."""
    rng = np.random.default_rng(1)
    per_case = {"liver": np.clip(rng.normal(0.91, 0.04, 60), 0, 1).round(7).tolist(),
                "tumour": np.clip(rng.beta(5, 2.2, 60), 0, 1).round(7).tolist()}
    metrics = {"dice": _estimate(0.81, 0.03), "hd95": _estimate(7.9, 1.4),
               "dice_liver": _estimate(0.91, 0.01), "hd95_liver": _estimate(4.2, 0.8),
               "dice_tumour": _estimate(0.70, 0.05), "hd95_tumour": _estimate(11.6, 2.5)}
    audit = make_audit()
    for g in audit["groups"]:
        if not g["suppressed"]:
            g["metrics"] = {"dice": _estimate(0.8, 0.04), "hd95": _estimate(8.1, 1.9)}
    audit["gaps"] = [_gap("sex", "dice", 0.02, -0.01, 0.05, 0.05), _gap("age_band", "dice", 0.06, 0.01, 0.11, 0.05)]
    audit["task"], audit["tolerance"] = "segmentation", {"dice": 0.05}
    return _common("segmentation", metrics, None, audit, dice_per_case=per_case)


@pytest.fixture(scope="session")
def continual_inputs(classification_inputs) -> ReportInputs:
    """The classifier after continual fine-tuning: its new test split beside the registered version's old one."""
    old = {"metrics": {"auroc": _estimate(0.871, 0.04), "tpr": _estimate(0.772, 0.06), "tnr": _estimate(0.843, 0.05),
                       "accuracy": _estimate(0.818, 0.04), "brier": _estimate(0.142, 0.02)},
           "n_cases": 180, "n_patients": 90,
           # A per-patient table a caller might leave in the block: the report must not read it.
           "cases": [{"patient": PLANTED_PATIENT, "y_score": 0.93}]}
    results = dataclasses.replace(classification_inputs.results, test_sets={"old_test": old})
    return dataclasses.replace(classification_inputs, results=results)


@pytest.fixture(scope="session")
def adaptation_inputs(classification_inputs) -> ReportInputs:
    """A domain-adapted classifier: the test split cut into the source sites and the target site."""
    source = {"metrics": {"auroc": _estimate(0.947, 0.02), "accuracy": _estimate(0.905, 0.03),
                          "brier": _estimate(0.081, 0.01)}, "n_cases": 42, "n_patients": 40}
    # The target block has no Brier score and an accuracy without CI: both must show as such.
    target = {"metrics": {"auroc": _estimate(0.630, 0.15), "accuracy": {"value": 0.583, "ci": None}}, "n_cases": 12}
    results = dataclasses.replace(classification_inputs.results,
                                  test_sets={"target_test": target, "source_test": source})
    return dataclasses.replace(classification_inputs, results=results)


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium executable: found on PATH, else installed with apt-get (root only)."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root; run `apt-get install chromium`")
    if shutil.which("apt-get") is None:
        pytest.fail("chromium is not installed and apt-get is missing; install a Chromium build by hand")
    failed = apt_get_install(["chromium"], installed=lambda: find_chromium() is not None, timeout=APT_TIMEOUT_S)
    if failed:
        pytest.fail(f"{failed}; install chromium by hand")
    found = find_chromium()
    if not found:
        pytest.fail("apt-get installed chromium but no chromium executable is on PATH")
    return found
