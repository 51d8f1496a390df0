"""Bias audit: fairlearn cross-check, suppression, flags and pass/fail, amplification, audit.json."""

from __future__ import annotations

import json
import re
from functools import partial

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    equalized_odds_difference,
    false_negative_rate,
    false_positive_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, precision_score, roc_auc_score

from medtl.errors import ConfigError, InputError, LeakageError
from medtl.evaluation.audit import BiasAudit
from medtl.evaluation.audit_types import AuditRules
from medtl.evaluation.gaps import compare_gaps

FAST = {"n_boot": 200, "progress": False}


def _predictions(n_patients: int = 500, seed: int = 0, gap: float = 0.0, small_sites: bool = False):
    """predictions.csv-like frame: 1-2 images per patient, AUROC lowered for F by `gap`.

    The same seed gives the same ids, patients, labels and splits whatever `gap` is, so two
    calls make a model and a reference predicted on one manifest.
    """
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 3, n_patients)
    patient = np.repeat(np.arange(n_patients), per_patient)
    sex = rng.choice(["F", "M"], n_patients)[patient]
    age = rng.choice(["18-39", "40-64", "65+"], n_patients)[patient]
    site = rng.choice(["A", "B"], n_patients)[patient]
    y = (rng.random(n_patients) < 0.4).astype(int)[patient]
    split = np.where(rng.random(n_patients) < 0.3, "val", "test")[patient]
    noise = rng.normal(0, 1, patient.size)
    if small_sites:  # test-only sites: C = 10 patients x 1 image, D = 11 x 1, E = 9 patients x 2 images
        pool = iter(p for p in range(n_patients) if per_patient[p] == 1)
        pool2 = iter(p for p in range(n_patients) if per_patient[p] == 2)
        for name, members in (
            ("C", [next(pool) for _ in range(10)]),
            ("D", [next(pool) for _ in range(11)]),
            ("E", [next(pool2) for _ in range(9)]),
        ):
            for p in members:
                site[patient == p] = name
                split[patient == p] = "test"
    signal = 1.4 - gap * (sex == "F")
    score = 1 / (1 + np.exp(-(noise + signal * (2 * y - 1))))
    if small_sites:
        score[site == "C"] = 1 - score[site == "C"]  # terrible there: must not leak into any gap
    df = pd.DataFrame(
        {
            "id": [f"row-{i:05d}" for i in range(patient.size)],
            "split": split,
            "y_true": y,
            "y_score": score,
            "y_pred": (score >= 0.5).astype(int),
            "sex": sex,
            "age_band": age,
            "site": site,
        }
    )
    return df, np.array([f"pseudo-{p:05d}" for p in patient], dtype=object)


# -- fairlearn cross-check -----------------------------------------------------------------


def test_group_estimates_and_gaps_equal_fairlearn_metricframe_and_equalized_odds():
    df, pid = _predictions(seed=1)
    metrics = ("auroc", "accuracy", "tpr", "fpr", "fnr", "ppv", "equalized_odds")
    audit = BiasAudit(["sex", "age_band"], intersections=[("sex", "age_band")], gap_metrics=metrics, **FAST)
    result = audit.run(df, pid).to_dict()
    t = result["thresholds"]["value"]
    test = df[df["split"] == "test"]
    y, s = test["y_true"].to_numpy(), test["y_score"].to_numpy()
    pred = (s >= t).astype(int)
    hard = {
        "accuracy": accuracy_score,
        "tpr": true_positive_rate,
        "fpr": false_positive_rate,
        "fnr": false_negative_rate,
        "ppv": partial(precision_score, zero_division=np.nan),
    }
    for attribute, features in (
        ("sex", test[["sex"]]),
        ("age_band", test[["age_band"]]),
        ("sex&age_band", test[["sex", "age_band"]]),
    ):
        mf = MetricFrame(metrics=hard, y_true=y, y_pred=pred, sensitive_features=features)
        mf_auc = MetricFrame(
            metrics={"auroc": roc_auc_score}, y_true=y, y_pred=s, sensitive_features=features
        )
        by_group = mf.by_group.join(mf_auc.by_group)
        groups = {g["group"]: g for g in result["groups"] if g["attribute"] == attribute}
        assert len(groups) == len(by_group) and not any(g["suppressed"] for g in groups.values())
        for key, row in by_group.iterrows():
            name = "&".join(key) if isinstance(key, tuple) else key
            for metric in [*hard, "auroc"]:
                assert groups[name]["metrics"][metric]["value"] == pytest.approx(
                    row[metric], rel=1e-12, abs=1e-15
                )
        gaps = {(g["metric"], g["kind"]): g["value"] for g in result["gaps"] if g["attribute"] == attribute}
        for metric, diff in [*mf.difference().items(), *mf_auc.difference().items()]:
            assert gaps[(metric, "difference")] == pytest.approx(diff, rel=1e-12, abs=1e-15)
        for metric, ratio in [*mf.ratio().items(), *mf_auc.ratio().items()]:
            assert gaps[(metric, "ratio")] == pytest.approx(ratio, rel=1e-12, abs=1e-15)
        eod = equalized_odds_difference(y, pred, sensitive_features=features)
        assert gaps[("equalized_odds", "difference")] == pytest.approx(eod, rel=1e-12, abs=1e-15)
    assert result["overall"]["metrics"]["auroc"]["value"] == pytest.approx(mf_auc.overall["auroc"], rel=1e-12)


# -- small groups --------------------------------------------------------------------------


def test_a_group_with_too_few_events_is_reported_but_left_out_of_the_gap():
    df, pid = _predictions(seed=2, small_sites=True)
    audit = BiasAudit(["site"], intersections=False, gap_metrics=("auroc", "fpr"), min_gap_events=10, **FAST)
    result = audit.run(df, pid).to_dict()
    groups = {g["group"]: g for g in result["groups"]}
    d = groups["D"]  # 11 patients: reported, but with fewer than 10 positives or negatives
    assert d["suppressed"] is False and min(d["n_positive"], d["n_negative"]) < 10
    assert d["metrics"]["auroc"]["ci"] is not None
    reported = [groups[k]["metrics"]["auroc"]["value"] for k in ("A", "B")]
    gap = next(g for g in result["gaps"] if g["metric"] == "auroc" and g["kind"] == "difference")
    assert gap["value"] == pytest.approx(max(reported) - min(reported))
    assert "D" not in (gap["worst_group"], gap["best_group"])
    assert any("D left out of the auroc gaps" in n for n in result["notes"]), result["notes"]
    assert result["settings"]["min_gap_events"] == 10


def test_groups_of_at_most_ten_patients_are_suppressed_and_never_shown_as_numbers():
    df, pid = _predictions(seed=2, small_sites=True)
    audit = BiasAudit(["site"], intersections=False, gap_metrics=("auroc",), min_gap_events=0, **FAST).run(df, pid)
    result = audit.to_dict()
    groups = {g["group"]: g for g in result["groups"]}
    for name, note in (("C", "suppressed, n <= 10"), ("E", "suppressed, patients <= 10")):
        g = groups[name]
        assert g["suppressed"] is True and g["metrics"] == {} and g["note"] == note
        assert all(g[k] is None for k in ("n", "n_patients", "n_positive", "n_negative", "imprecise"))
        numbers = [
            v for k, v in g.items() if k != "note" and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        assert numbers == []
    assert groups["D"]["suppressed"] is False and groups["D"]["n_patients"] == 11  # 11 is reported...
    assert groups["D"]["imprecise"] is True  # ...but labelled imprecise (< 100 positives)
    # C (scores inverted) is excluded: the AUROC difference spans only the reported groups.
    reported = [groups[k]["metrics"]["auroc"]["value"] for k in ("A", "B", "D")]
    gap = next(g for g in result["gaps"] if g["metric"] == "auroc" and g["kind"] == "difference")
    assert gap["value"] == pytest.approx(max(reported) - min(reported))
    assert gap["worst_group"] != "C" and any("suppressed" in n for n in result["notes"])
    frame = audit.result_.groups_frame()  # the report's tidy table keeps the row, not the numbers
    row = frame[frame["group"] == "C"]
    assert len(row) == 1 and row["n"].isna().all() and row["value"].isna().all()


def test_groups_with_fewer_than_min_events_are_labelled_imprecise():
    df, pid = _predictions(n_patients=400, seed=3)
    result = BiasAudit(["sex"], intersections=False, **FAST).run(df, pid).to_dict()
    for g in result["groups"]:
        assert g["imprecise"] is (min(g["n_positive"], g["n_negative"]) < 100)
    assert any(g["imprecise"] for g in result["groups"])


# -- flags, multiplicity, pass/fail --------------------------------------------------------


def test_a_large_auroc_gap_is_flagged_and_fails_the_audit():
    df, pid = _predictions(n_patients=800, seed=4, gap=1.2)
    audit = BiasAudit(["sex"], intersections=False, **FAST).run(df, pid)
    gap = next(g for g in audit.to_dict()["gaps"] if g["metric"] == "auroc" and g["kind"] == "difference")
    assert gap["flagged"] is True and gap["status"] == "flagged" and gap["ci"][0] > gap["tolerance"] == 0.05
    assert gap["worst_group"] == "F" and gap["best_group"] == "M"
    assert audit.result_.passed is False and audit.result_.status == "failed"
    lenient = AuditRules(fail_on_flagged=False)
    assert BiasAudit(["sex"], intersections=False, config=lenient, **FAST).run(df, pid).result_.passed is True


def test_without_a_real_gap_nothing_is_flagged_and_the_audit_passes():
    df, pid = _predictions(n_patients=800, seed=5, gap=0.0)
    audit = BiasAudit(["sex", "age_band"], intersections=False, **FAST).run(df, pid)
    assert audit.result_.passed is True and audit.result_.status == "passed"
    assert not any(g["flagged"] for g in audit.to_dict()["gaps"])
    assert audit.to_dict()["unevaluated_attributes"] == []


def test_bonferroni_widens_tested_gap_intervals_over_the_number_of_tested_gaps():
    df, pid = _predictions(seed=6)
    result = BiasAudit(["sex", "age_band"], intersections=True, **FAST).run(df, pid).to_dict()
    tested = [g for g in result["gaps"] if g["tolerance"] is not None]
    m = result["correction"]["tested"]
    assert m == len(tested) == 3 * 3  # auroc, fnr, equalized_odds x (sex, age_band, sex&age_band)
    assert all(g["ci_level"] == pytest.approx(1 - 0.05 / m) for g in tested)
    assert all(g["ci_level"] == 0.95 for g in result["gaps"] if g["tolerance"] is None)
    plain = (
        BiasAudit(["sex", "age_band"], config=AuditRules(correction="none"), **FAST).run(df, pid).to_dict()
    )
    a = next(g for g in result["gaps"] if g["tolerance"] is not None)
    b = next(
        g
        for g in plain["gaps"]
        if (g["attribute"], g["metric"], g["kind"]) == (a["attribute"], a["metric"], a["kind"])
    )
    assert b["ci_level"] == 0.95 and b["ci"][1] - b["ci"][0] < a["ci"][1] - a["ci"][0]



def test_audit_intervals_for_a_seed_are_pinned_to_the_values_recorded_before_the_audit_was_split_into_steps():
    # Recorded with the single-method BiasAudit.run/_audit_attribute: same data and seed, same CIs.
    df, pid = _predictions(seed=6)
    result = BiasAudit(["sex", "age_band"], intersections=True, **FAST).run(df, pid).to_dict()
    gaps = {(g["attribute"], g["metric"], g["kind"]): g for g in result["gaps"]}
    assert gaps["sex", "auroc", "difference"]["ci"] == pytest.approx([-0.016666098001733777, 0.03066067716390194],
                                                                     rel=1e-9)
    assert gaps["sex", "fnr", "difference"]["ci"] == pytest.approx([-0.08885667187750526, 0.15609184622981254],
                                                                   rel=1e-9)
    assert result["thresholds"]["ci"] == pytest.approx([0.4232376702799718, 0.6271072870003846], rel=1e-9)
    group_f = next(g for g in result["groups"] if g["attribute"] == "sex" and g["group"] == "F")
    assert group_f["metrics"]["auroc"]["ci"] == pytest.approx([0.962286410435838, 0.9894016906407622], rel=1e-9)
    assert group_f["metrics"]["fnr"]["ci"] == pytest.approx([0.01, 0.2315906708595388], rel=1e-9)

# -- status: passed, failed, inconclusive --------------------------------------------------


def _small_test_set(n_test: int = 18, n_val: int = 20, seed: int = 0):
    """A real-world-sized test set: every sex and age group has at most 10 patients (one image each)."""
    rng = np.random.default_rng(seed)
    n = n_test + n_val
    y = np.tile([0, 1], n // 2 + 1)[:n]
    score = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.4 * (2 * y - 1))))
    df = pd.DataFrame({"id": [f"row-{i:03d}" for i in range(n)], "split": ["test"] * n_test + ["val"] * n_val,
                       "y_true": y, "y_score": score, "sex": np.tile(["F", "M"], n // 2 + 1)[:n],
                       "age_band": rng.choice(["18-39", "40-64", "65+"], n)})
    return df, np.array([f"pseudo-{i:03d}" for i in range(n)], dtype=object)


def test_an_audit_whose_groups_are_all_suppressed_is_inconclusive_not_passed():
    df, pid = _small_test_set()
    doc = BiasAudit(["sex", "age_band"], **FAST).run(df, pid).to_dict()
    assert all(g["suppressed"] for g in doc["groups"]) and not any(g["flagged"] for g in doc["gaps"])
    assert doc["status"] == "inconclusive" and doc["passed"] is False
    assert doc["evaluated_attributes"] == []
    unevaluated = {u["attribute"]: u for u in doc["unevaluated_attributes"]}
    assert list(unevaluated) == ["sex", "age_band", "sex&age_band"]
    assert "all 2 of its groups were suppressed (at most 10 patients each)" in unevaluated["sex"]["reason"]
    assert "more test patients per group" in unevaluated["sex"]["remedy"]
    assert "audit.min_group_size" in unevaluated["sex"]["remedy"]
    assert any(n.startswith("audit inconclusive") for n in doc["notes"])
    assert json.loads(BiasAudit(["sex"], **FAST).run(df, pid).to_json())["status"] == "inconclusive"


def test_an_audit_without_any_tolerance_or_measurable_gap_is_inconclusive():
    df, pid = _small_test_set(n_test=60, n_val=20)  # 30 patients per sex: reported
    untested = BiasAudit(["sex"], intersections=False, config=AuditRules(tolerances={}), **FAST).run(df, pid)
    assert untested.result_.status == "inconclusive"
    assert "no audited gap metric has a tolerance" in untested.to_dict()["unevaluated_attributes"][0]["reason"]
    few = BiasAudit(["sex"], intersections=False, min_gap_events=20, **FAST).run(df, pid).to_dict()
    assert few["status"] == "inconclusive"  # 15 positives and 15 negatives per sex: no group enters a gap
    assert "audit.min_gap_events" in few["unevaluated_attributes"][0]["remedy"]


def test_status_follows_the_evaluated_attributes_and_lists_the_others():
    df, pid = _predictions(n_patients=800, seed=5, gap=0.0)
    df["ward"] = "W1"  # one group only: nothing to compare
    doc = BiasAudit(["sex", "ward"], intersections=False, **FAST).run(df, pid).to_dict()
    assert doc["status"] == "passed" and doc["passed"] is True
    assert doc["evaluated_attributes"] == ["sex"]
    assert [u["attribute"] for u in doc["unevaluated_attributes"]] == ["ward"]
    assert "only one group" in doc["unevaluated_attributes"][0]["reason"]
    flagged_df, flagged_pid = _predictions(n_patients=800, seed=4, gap=1.2)
    flagged_df["ward"] = "W1"
    failed = BiasAudit(["sex", "ward"], intersections=False, **FAST).run(flagged_df, flagged_pid).to_dict()
    assert failed["status"] == "failed" and failed["passed"] is False
    assert [u["attribute"] for u in failed["unevaluated_attributes"]] == ["ward"]


def _sex_auroc_gap(df, pid) -> float:
    doc = BiasAudit(["sex"], intersections=False, config=AuditRules(tolerances={"auroc": 0.05}), **FAST).run(df, pid)
    return next(g.value for g in doc.result_.gaps if (g.metric, g.kind) == ("auroc", "difference"))


def test_an_audit_whose_tested_gaps_are_all_inconclusive_is_inconclusive_not_passed():
    # A tolerance at the gap's own point value: its CI straddles it, so the gap is measured but undecided.
    df, pid = _predictions(n_patients=300, seed=5, gap=0.3)
    at_gap = AuditRules(tolerances={"auroc": _sex_auroc_gap(df, pid)})
    doc = BiasAudit(["sex"], intersections=False, config=at_gap, **FAST).run(df, pid).to_dict()
    tested = [g for g in doc["gaps"] if g["tolerance"] is not None]
    assert tested and {g["status"] for g in tested} == {"inconclusive"}
    assert doc["status"] == "inconclusive" and doc["passed"] is False and doc["evaluated_attributes"] == []
    (entry,) = doc["unevaluated_attributes"]
    assert entry["attribute"] == "sex" and "all contain the tolerance" in entry["reason"]
    assert "more test patients per group" in entry["remedy"]
    assert any(n.startswith("audit inconclusive") and "decided" in n for n in doc["notes"])
    # One gap shown within its tolerance decides the attribute: the audit passes.
    decided = AuditRules(tolerances={"auroc": at_gap.tolerances["auroc"], "fnr": 1.0})
    doc = BiasAudit(["sex"], intersections=False, config=decided, **FAST).run(df, pid).to_dict()
    assert {g["metric"]: g["status"] for g in doc["gaps"] if g["tolerance"] is not None} == {
        "auroc": "inconclusive", "fnr": "within"}
    assert doc["status"] == "passed" and doc["evaluated_attributes"] == ["sex"]


def test_an_intersection_with_a_single_valued_attribute_is_left_out_of_the_tested_family():
    df, pid = _predictions(n_patients=800, seed=5)
    df["age_band"] = "0-17"  # every test patient a child: sex&age_band would repeat sex
    doc = BiasAudit(["sex", "age_band"], **FAST).run(df, pid).to_dict()
    assert not any(g["attribute"] == "sex&age_band" for g in [*doc["groups"], *doc["gaps"]])
    assert doc["correction"]["tested"] == 3  # auroc, fnr, equalized_odds of sex only
    (left_out,) = doc["left_out_intersections"]
    assert left_out["attribute"] == "sex&age_band"
    assert "age_band has one value for every test patient, so its groups are those of sex" in left_out["reason"]
    assert any(n.startswith("sex&age_band: not audited") for n in doc["notes"])
    assert [u["attribute"] for u in doc["unevaluated_attributes"]] == ["age_band"]
    both = BiasAudit(["sex", "age_band"], **FAST).run(df.assign(age_band=df["sex"].map({"F": "40-64", "M": "65+"})),
                                                       pid).to_dict()
    assert both["left_out_intersections"] == [] and both["correction"]["tested"] == 9


def test_an_attribute_unknown_for_every_test_patient_says_how_to_provide_it():
    # A PNG export without sex, age or site columns: the manifest writes U and unknown everywhere.
    df, pid = _predictions(n_patients=800, seed=5)
    df = df.assign(sex="U", age_band="unknown", scanner=np.nan)
    doc = BiasAudit(["sex", "age_band", "site", "scanner"], **FAST).run(df, pid).to_dict()
    reasons = {u["attribute"]: u for u in doc["unevaluated_attributes"]}
    assert list(reasons) == ["sex", "age_band", "scanner"] and doc["evaluated_attributes"] == ["site"]
    for attribute in reasons:
        assert "unknown for every test patient" in reasons[attribute]["reason"], attribute
        assert "only one group" not in reasons[attribute]["reason"]
        assert "add test patients" not in reasons[attribute]["remedy"]
    assert "a sex column" in reasons["sex"]["remedy"] and "labels CSV" in reasons["sex"]["remedy"]
    assert "PatientSex" in reasons["sex"]["remedy"]
    assert "an age column" in reasons["age_band"]["remedy"] and "PatientBirthDate" in reasons["age_band"]["remedy"]
    assert "a scanner column" in reasons["scanner"]["remedy"]
    # Their intersections would repeat site (or nothing at all): none is audited.
    assert {u["attribute"] for u in doc["left_out_intersections"]} == {
        "sex&age_band", "sex&site", "sex&scanner", "age_band&site", "age_band&scanner", "site&scanner"}


def test_the_audit_statuses_have_one_source():
    import ast
    from pathlib import Path

    from medtl import vocabulary
    from medtl.evaluation import audit_types
    from medtl.tracking import registry

    assert audit_types.AUDIT_STATUSES is vocabulary.AUDIT_STATUSES
    assert registry.VERSION_AUDIT_STATUSES == ("pending", *vocabulary.AUDIT_STATUSES)
    package = Path(vocabulary.__file__).parent
    spelled = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if set(vocabulary.AUDIT_STATUSES) <= words:
                    spelled.append(path.relative_to(package).as_posix())
    assert spelled == ["vocabulary.py"], "spell the audit statuses only in medtl.vocabulary"


def test_the_evaluation_layer_reads_tasks_and_threshold_rules_from_the_vocabulary_and_the_docs_name_them():
    import ast
    from pathlib import Path

    from medtl import vocabulary
    from medtl.evaluation import audit, metrics

    assert audit.TASKS is vocabulary.TASKS and metrics.THRESHOLD_RULES is vocabulary.THRESHOLD_RULES
    package = Path(audit.__file__).parent
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                for name in ("TASKS", "THRESHOLD_RULES"):
                    assert not set(getattr(vocabulary, name)) <= words, f"{path.name} spells {name} again"
    docs = (package.parents[1] / "docs" / "audit.md").read_text()
    rules = docs.split("## The operating threshold")[1].split("\n## ")[0]
    for rule in vocabulary.THRESHOLD_RULES:
        assert f"- `{rule}`:" in rules, rule


# -- bias amplification --------------------------------------------------------------------


def test_paired_amplification_says_transfer_widened_a_gap_the_reference_did_not_have():
    model, pid = _predictions(n_patients=800, seed=7, gap=1.2)
    reference, _ = _predictions(n_patients=800, seed=7, gap=0.0)
    audit = BiasAudit(["sex"], intersections=False, gap_metrics=("auroc",), **FAST)
    result = audit.run(model, pid, reference_predictions=reference, reference_label="from-scratch").to_dict()
    assert result["reference"] == {"label": "from-scratch", "paired": True}
    amp = {a["kind"]: a for a in result["amplification"] if a["metric"] == "auroc"}
    assert amp["difference"]["direction"] == "widened" and amp["difference"]["ci"][0] > 0
    assert amp["ratio"]["direction"] == "widened" and amp["ratio"]["delta"] < 0  # lower ratio = wider gap
    swapped = audit.run(reference, pid, reference_predictions=model).to_dict()
    assert {a["direction"] for a in swapped["amplification"]} == {"narrowed"}


def test_compare_gaps_from_two_audit_documents():
    def doc(values):
        return {
            "gaps": [{"attribute": "sex", "metric": m, "kind": k, "value": v} for (m, k), v in values.items()]
        }

    model = doc(
        {
            ("auroc", "difference"): 0.10,
            ("tpr", "difference"): 0.02,
            ("fnr", "difference"): 0.050,
            ("auroc", "ratio"): 0.80,
        }
    )
    reference = doc(
        {
            ("auroc", "difference"): 0.04,
            ("tpr", "difference"): 0.09,
            ("fnr", "difference"): 0.045,
            ("auroc", "ratio"): 0.95,
        }
    )
    out = {(a["metric"], a["kind"]): a for a in compare_gaps(model, reference)}
    assert out[("auroc", "difference")]["direction"] == "widened"
    assert out[("auroc", "difference")]["delta"] == pytest.approx(0.06)
    assert out[("tpr", "difference")]["direction"] == "narrowed"
    assert out[("fnr", "difference")]["direction"] == "unchanged"  # within min_change=0.01
    assert out[("auroc", "ratio")]["direction"] == "widened"
    with pytest.raises(InputError, match="gaps"):
        compare_gaps({"groups": []}, reference)


def test_reference_audit_document_gives_unpaired_amplification():
    df, pid = _predictions(n_patients=600, seed=8, gap=1.0)
    champion = (
        BiasAudit(["sex"], intersections=False, **FAST).run(_predictions(600, seed=8)[0], pid).to_dict()
    )
    result = (
        BiasAudit(["sex"], intersections=False, **FAST)
        .run(df, pid, reference_audit=champion, reference_label="champion")
        .to_dict()
    )
    assert result["reference"] == {"label": "champion", "paired": False}
    auroc = next(a for a in result["amplification"] if (a["metric"], a["kind"]) == ("auroc", "difference"))
    assert auroc["direction"] == "widened" and "ci" not in auroc


# -- audit.json ----------------------------------------------------------------------------


def test_audit_json_has_the_stable_schema_and_no_identifiers():
    df, pid = _predictions(seed=9)
    audit = BiasAudit(["sex", "age_band"], **FAST).run(df, pid)
    text = audit.to_json()
    doc = json.loads(text)
    assert {"passed", "status", "reference", "groups", "gaps"} <= set(doc) and isinstance(doc["passed"], bool)
    assert doc["passed"] == (doc["status"] == "passed")
    g = doc["groups"][0]
    assert {"attribute", "group", "n", "n_patients", "suppressed", "metrics"} <= set(g)
    assert (
        isinstance(g["n"], int)
        and set(g["metrics"]["auroc"]) == {"value", "ci"}
        and len(g["metrics"]["tpr"]["ci"]) == 2
    )
    assert {"tpr", "fpr", "auroc"} <= set(g["metrics"])
    assert {"sex", "age_band", "sex&age_band"} == {x["attribute"] for x in doc["groups"]}
    assert all(
        re.fullmatch(r"(F|M)&(18-39|40-64|65\+)", x["group"])
        for x in doc["groups"]
        if x["attribute"] == "sex&age_band"
    )
    assert {"attribute", "metric", "value", "ci", "flagged"} <= set(doc["gaps"][0])
    assert "pseudo-" not in text and "row-" not in text  # no patient or row pseudonyms
    assert BiasAudit(["sex", "age_band"], **FAST).run(df, pid).to_json() == text  # seeded: reproducible


def test_validation_threshold_is_recorded_with_its_interval():
    df, pid = _predictions(seed=10)
    doc = (
        BiasAudit(["sex"], intersections=False, threshold_rule="sensitivity", threshold_target=0.9, **FAST)
        .run(df, pid)
        .to_dict()
    )
    t = doc["thresholds"]
    assert (
        t["source"] == "validation" and t["rule"] == "sensitivity" and t["ci"][0] <= t["value"] <= t["ci"][1]
    )
    fixed = (
        BiasAudit(["sex"], intersections=False, **FAST).run(df, pid, threshold=0.5).to_dict()["thresholds"]
    )
    assert fixed == {"source": "fixed", "rule": None, "target": None, "value": 0.5, "ci": None}


# -- other tasks ---------------------------------------------------------------------------


def test_multiclass_predictions_are_audited_one_vs_rest_for_the_positive_class():
    df, pid = _predictions(seed=11)
    rng = np.random.default_rng(0)
    labels = np.where(df["y_true"] == 1, "covid", rng.choice(["normal", "pneumonia"], len(df)))
    other = (1 - df["y_score"]) / 2
    multi = df.drop(columns=["y_score"]).assign(
        y_true=labels, y_score_covid=df["y_score"], y_score_normal=other, y_score_pneumonia=other
    )
    doc = BiasAudit(["sex"], intersections=False, positive_class="covid", **FAST).run(multi, pid).to_dict()
    test = df[df["split"] == "test"]
    f = test[test["sex"] == "F"]
    group_f = next(g for g in doc["groups"] if g["group"] == "F")
    assert group_f["metrics"]["auroc"]["value"] == roc_auc_score(f["y_true"], f["y_score"])
    with pytest.raises(ConfigError, match="positive_class"):
        BiasAudit(["sex"], **FAST).run(multi, pid)


def test_segmentation_audit_uses_per_case_dice_means_and_gaps():
    df, pid = _predictions(seed=12)
    rng = np.random.default_rng(1)
    dice = np.clip(np.where(df["sex"] == "F", 0.70, 0.85) + rng.normal(0, 0.05, len(df)), 0, 1)
    seg = df[["id", "split", "sex"]].assign(
        dice_1=dice, dice=dice, hd95_1=5 * (1 - dice), hd95=5 * (1 - dice)
    )
    seg.loc[seg.index[:3], "dice_1"] = np.nan  # undefined cases are ignored, not zeros
    doc = (
        BiasAudit(["sex"], intersections=False, task="segmentation", gap_metrics=("dice", "hd95"), **FAST)
        .run(seg, pid)
        .to_dict()
    )
    test = seg[seg["split"] == "test"]
    means = test.groupby("sex")["dice"].mean()
    group_m = next(g for g in doc["groups"] if g["group"] == "M")
    assert group_m["metrics"]["dice"]["value"] == pytest.approx(means["M"]) and group_m["n_positive"] is None
    gap = next(g for g in doc["gaps"] if g["metric"] == "dice" and g["kind"] == "difference")
    assert gap["value"] == pytest.approx(means["M"] - means["F"]) and gap["flagged"] and not doc["passed"]
    assert doc["thresholds"] is None


# -- contract and errors -------------------------------------------------------------------


def test_init_only_stores_arguments_and_run_validates_them():
    audit = BiasAudit(["sex"], n_boot=-5, task="detection")
    assert audit.n_boot == -5 and audit.task == "detection" and not hasattr(audit, "result_")
    with pytest.raises(InputError, match="run"):
        audit.to_json()
    df, pid = _predictions(seed=13)
    with pytest.raises(ConfigError, match="task"):
        audit.run(df, pid)
    with pytest.raises(ConfigError, match="gap metric"):
        BiasAudit(["sex"], gap_metrics=("dice",), **FAST).run(df, pid)


def test_audit_config_errors_name_the_bad_key():
    # The close matches come from medtl.errors.did_you_mean, the one "did you mean" helper.
    with pytest.raises(ConfigError, match=r"audit\.tolerances\.aurocc must name a gap metric.*did you mean 'auroc'"):
        AuditRules(tolerances={"aurocc": 0.05})
    with pytest.raises(ConfigError, match=r"audit\.tolerances\.fnr must be a number >= 0"):
        AuditRules(tolerances={"fnr": -1})
    with pytest.raises(ConfigError, match=r"audit\.tolerance .*did you mean 'audit\.tolerances'\?"):
        AuditRules.from_mapping({"tolerance": {"auroc": 0.05}})
    with pytest.raises(ConfigError, match=r"audit\.correction"):
        AuditRules.from_mapping({"correction": "holm"})
    cfg = AuditRules.from_mapping({"tolerances": {"auroc": 0.03}, "alpha": 0.1})
    assert dict(cfg.tolerances) == {"auroc": 0.03} and cfg.alpha == 0.1 and cfg.fail_on_flagged is True


def test_patients_in_validation_and_test_are_refused():
    df, pid = _predictions(seed=14)
    pid = pid.copy()
    val_row = np.flatnonzero(df["split"].to_numpy() == "val")[0]
    pid[val_row] = pid[np.flatnonzero(df["split"].to_numpy() == "test")[0]]
    with pytest.raises(LeakageError, match="one split only"):
        BiasAudit(["sex"], **FAST).run(df, pid)


def test_input_errors_name_the_column_and_never_a_patient():
    df, pid = _predictions(seed=15)
    with pytest.raises(InputError, match="'scanner' column"):
        BiasAudit(["scanner"], **FAST).run(df, pid)
    with pytest.raises(InputError, match="one entry per prediction row") as err:
        BiasAudit(["sex"], **FAST).run(df, pid[:-3])
    assert "pseudo-" not in str(err.value)
    with pytest.raises(InputError, match="categorical"):
        BiasAudit(["age"], **FAST).run(df.assign(age=np.arange(len(df))), pid)


def _published_relations(result: dict) -> tuple[set, list]:
    """Hidden group counts of an audit.json and the sum relations it publishes (overall, marginals)."""
    groups = {(g["attribute"], g["group"]): g for g in result["groups"]}
    hidden = {key for key, g in groups.items() if g["n"] is None}
    attributes = sorted({a for a, _ in groups})
    relations = [(None, [key for key in groups if key[0] == a]) for a in attributes]
    for a in (a for a in attributes if "&" in a):
        for position, side in enumerate(a.split("&")):
            for _, value in [key for key in groups if key[0] == side]:
                relations.append(((side, value), [key for key in groups if key[0] == a
                                                  and key[1].split("&")[position] == value]))
    return hidden, relations


def test_suppressed_groups_cannot_be_recovered_and_protecting_groups_keep_their_metrics():
    from medtl.evaluation.suppression import WITHHELD_NOTE, determined

    df, pid = _predictions(n_patients=400, seed=6)
    test_patients = sorted(set(pid[df["split"].to_numpy() == "test"]))
    ward = pd.Series("A", index=df.index)
    for name, members in (("B", test_patients[:6]), ("C", test_patients[6:20])):
        ward[np.isin(pid, members)] = name
    df = df.assign(ward=ward.to_numpy())
    result = BiasAudit(["ward", "sex"], intersections=True, gap_metrics=("auroc",), **FAST).run(df, pid).to_dict()
    groups = {(g["attribute"], g["group"]): g for g in result["groups"]}
    b, c = groups[("ward", "B")], groups[("ward", "C")]
    assert b["suppressed"] and b["metrics"] == {} and b["n"] is None
    # Overall - A - C would give B: C's counts are withheld, but C (14 patients) keeps its metrics and gaps.
    assert c["suppressed"] is False and c["note"] == WITHHELD_NOTE and c["metrics"]["auroc"]["value"] is not None
    assert all(c[k] is None for k in ("n", "n_patients", "n_positive", "n_negative"))
    assert groups[("ward", "A")]["n"] is not None
    hidden, relations = _published_relations(result)
    assert ("ward", "B") in hidden and determined(hidden, relations) == set()
    assert any("withheld" in n for n in result["notes"])


def test_nested_scanners_and_sites_leave_no_suppressed_scanner_recoverable():
    from medtl.evaluation.suppression import audit_suppression, determined, nesting_relations

    site = np.array(["S1"] * 45 + ["S2"] * 55)
    scanner = np.array(["X"] * 40 + ["Y"] * 5 + ["Z"] * 30 + ["W"] * 25)  # Y: 5 patients, inside S1
    patient = np.arange(100)
    for intersections in (False, True):
        specs = [("site", site), ("scanner", scanner)]
        if intersections:
            specs.append(("site&scanner", np.char.add(np.char.add(site, "&"), scanner)))
        out = audit_suppression(specs, patient, 10)
        assert out["scanner"]["Y"].startswith("suppressed")
        assert "X" in out["scanner"], "S1 - X would give Y"
        assert "S2" not in out.get("site", {}) and "Z" not in out["scanner"], "nothing more than needed"
        hidden = {("scanner", g) for g in out["scanner"]}
        relations = [(None, [("site", "S1"), ("site", "S2")]), (None, [("scanner", g) for g in "XYZW"]),
                     *nesting_relations({"site": site, "scanner": scanner}, lambda a, g: (a, g))]
        assert determined(hidden, relations) == set()


def test_protect_leaves_no_hidden_cell_of_a_two_way_table_determined():
    from medtl.evaluation.suppression import determined, protect

    # Greedy "no sum with one hidden member" is not enough here: (0, 2) follows from the row and
    # column sums of the hidden cells. protect checks recoverability with linear algebra.
    values = np.array([[7, 30, 7, 40], [25, 8, 35, 30], [30, 40, 6, 25], [20, 30, 45, 9]])
    cells = {(i, j): int(values[i, j]) for i in range(4) for j in range(4)}
    sizes = {**cells, **{("row", i): int(values[i].sum()) for i in range(4)},
             **{("col", j): int(values[:, j].sum()) for j in range(4)}}
    relations = [*((("row", i), [(i, j) for j in range(4)]) for i in range(4)),
                 *((("col", j), [(i, j) for i in range(4)]) for j in range(4)),
                 (None, [("row", i) for i in range(4)])]
    small = {c for c, n in cells.items() if n < 11}
    # determined() itself: rows 0 and 1 with two hidden cells each, but columns 0 and 1 with
    # (0, 0), (1, 0) and (0, 1), (1, 1): the four form a 2x2 block whose sums do not fix any cell...
    block = {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert determined(block, relations) == set()
    # ...while a lone hidden cell in a row is fixed by that row's sum, and so is its partner below.
    assert determined({(0, 0), (1, 0)}, relations) == {(0, 0), (1, 0)}
    hidden = protect(sizes, small, relations)
    assert small <= hidden and determined(hidden, relations) == set()
    assert not any(isinstance(c, tuple) and c[0] in ("row", "col") for c in hidden), "totals stay shown"


def test_every_audit_status_is_documented():
    from pathlib import Path

    from medtl.vocabulary import AUDIT_STATUSES

    docs = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text()
    for status in AUDIT_STATUSES:
        assert f"**`{status}`**" in docs, status
