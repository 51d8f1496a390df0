"""`medtl run`'s audit step: settings checked before training, multi-class audits, the champion reference.

Real runs on synthetic demo radiographs (tiny images, one epoch) with a real MLflow store in the
test's folder. The from-scratch reference is covered by the demo runs (tests/test_workflow.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medtl.data.manifest import build_manifest
from medtl.data.synthetic import write_demo_data
from medtl.errors import ConfigError
from medtl.tracking import registry, store
from medtl.workflow.config import load_config
from medtl.workflow.run import run_workflow

TINY = ["data.image_size=[32, 32]", "train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=100"]
RADIOGRAPHS = {"name": "xr", "data": {"modalities": ["CR", "DX"], "intensity": "xray"},
               "tracking": {"experiment": "run-audit-tests"}}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """80 synthetic patients: the binary manifest and a three-class copy (label 2 = half of label 1's patients)."""
    work = tmp_path_factory.mktemp("run-audit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CONFIG_DIR", str(work / "config"))
        mp.delenv("MEDTL_KEY_FILE", raising=False)
        summary = write_demo_data(work / "demo_data", patients=80, seed=1, progress=False)
        built = build_manifest(work / "demo_data", summary.labels_csv, work / "binary.csv",
                               fractions=(0.5, 0.25, 0.25), progress=False)
    manifest = pd.read_csv(built.manifest_csv, dtype=str, keep_default_na=False)
    ones = sorted(manifest.loc[manifest["label"] == "1", "patient"].unique())
    relabel = manifest["patient"].isin(ones[::2]) & (manifest["label"] == "1")
    manifest.assign(label=manifest["label"].where(~relabel, "2")).to_csv(work / "three.csv", index=False)
    return {"root": work / "demo_data", "key": work / "config" / "keys" / "medtl.key",
            "binary": built.manifest_csv, "three": work / "three.csv"}


def _config(studies: dict[str, Path], manifest: str, *overrides: str):
    return load_config(None, [f"data.root={studies['root']}", f"data.manifest={studies[manifest]}",
                              f"data.key_file={studies['key']}", *TINY, *overrides], base=RADIOGRAPHS)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the embedded MLflow store is ./mlruns
    return tmp_path


def test_multiclass_run_without_a_positive_class_fails_before_training(studies, workdir):
    cfg = _config(studies, "three", "model.num_classes=3")
    with pytest.raises(ConfigError, match=r"'audit\.positive_class' must name the class .* \['0', '1', '2'\]"):
        run_workflow(cfg, workdir / "out", progress=False)
    assert not (workdir / "out" / "checkpoints").exists(), "the check must come before training"


def test_an_unknown_audit_attribute_fails_before_training(studies, workdir):
    cfg = _config(studies, "binary", "audit.attributes=[sex, ward]")
    with pytest.raises(ConfigError, match=r"'audit\.attributes' must name subgroup columns .*\['ward'\]"):
        run_workflow(cfg, workdir / "out", progress=False)
    assert not (workdir / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_multiclass_run_reports_macro_metrics_with_cis_and_audits_the_positive_class(studies, workdir):
    cfg = _config(studies, "three", "model.num_classes=3", "audit.positive_class=2", "audit.reference=none",
                  "tracking.register=false", "name=three_class")
    outputs = run_workflow(cfg, workdir / "out", progress=False)
    metrics = json.loads((outputs.output_dir / "metrics.json").read_text())
    for name in ("auroc_macro", "accuracy", "balanced_accuracy", "auroc_2"):
        lo, hi = metrics["test_ci"][name]
        assert lo <= metrics["test"][name] <= hi, name
    audit = json.loads((outputs.output_dir / "audit.json").read_text())
    assert audit["settings"]["positive_class"] == "2"
    predictions = pd.read_csv(outputs.output_dir / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    # One-vs-rest for class "2": its positives are the test studies of class index 2.
    assert audit["overall"]["n_positive"] == int((test["y_true"] == 2).sum())
    assert "tpr" in audit["overall"]["metrics"]
    assert audit["reference"] is None
    assert any(n.startswith("bias amplification: not computed (audit.reference is none)") for n in audit["notes"])


@pytest.mark.slow
def test_second_run_compares_its_gaps_with_the_promoted_champion(studies, workdir):
    # 20 test patients: smaller suppression and event limits than a real audit, so gaps exist at all.
    common = ["name=champion_test", "tracking.registered_model=champion_test", "audit.reference=champion",
              "audit.min_group_size=2", "audit.min_gap_events=2"]
    first = run_workflow(_config(studies, "binary", *common), workdir / "first", progress=False)
    first_audit = json.loads((first.output_dir / "audit.json").read_text())
    assert first_audit["reference"] is None
    assert any("has no champion version" in n for n in first_audit["notes"])
    store.tracking_uri()
    registry.set_audit_status("champion_test", first.model_version, "passed", {"reviewer": "test"})
    registry.promote("champion_test", first.model_version)

    second = run_workflow(_config(studies, "binary", *common, "seed=1"), workdir / "second", progress=False)
    audit = json.loads((second.output_dir / "audit.json").read_text())
    assert audit["reference"]["kind"] == "champion"
    assert audit["reference"]["label"] == f"champion (version {first.model_version})"
    assert audit["reference"]["paired"] is False
    assert audit["amplification"], "gaps defined in both audits must be compared"
    first_gaps = {(g["attribute"], g["metric"], g["kind"]): g["value"] for g in first_audit["gaps"]}
    for entry in audit["amplification"]:
        key = (entry["attribute"], entry["metric"], entry["kind"])
        assert entry["reference"] == pytest.approx(first_gaps[key])
        assert entry["direction"] in ("widened", "narrowed", "unchanged")
    html = second.report_path.read_text()
    amplification = html[html.index('id="amplification"'):html.index('id="limitations"')]
    assert f"champion (version {first.model_version})" in amplification and "unpaired" in amplification


def test_report_partition_counts_hide_what_the_audit_hides_and_nothing_follows_by_subtraction():
    from medtl.evaluation.suppression import determined, nesting_relations
    from medtl.workflow.prepare import PreparedData
    from medtl.workflow.report import _protected_splits

    rows = []
    for split, per_scanner in (("train", {"X": 60, "Y": 8, "Z": 30, "W": 25}), ("test", {"X": 20, "Y": 12, "Z": 15, "W": 9})):
        for scanner, n in per_scanner.items():
            site = "S1" if scanner in "XY" else "S2"  # scanners nest in sites
            rows += [{"id": f"{split}{scanner}{i}", "patient": f"p-{split}{scanner}{i}", "split": split, "label": str(i % 2),
                      "site": site, "scanner": scanner} for i in range(n)]
    manifest = pd.DataFrame(rows)
    data = PreparedData(manifest=manifest, manifest_path=Path("m.csv"), manifest_sha256="0" * 64, sidecar={},
                        root=Path("."), key_file=None, classes=["0", "1"], subgroups=["site", "scanner"])
    # The audit (test split) suppressed scanner W and withheld scanner Y's counts to protect it.
    audit = {"groups": [{"attribute": "scanner", "group": "W", "suppressed": True, "n": None},
                        {"attribute": "scanner", "group": "Y", "suppressed": False, "n": None},
                        {"attribute": "scanner", "group": "X", "suppressed": False, "n": 20}]}
    splits = _protected_splits(data, audit, k_min=11)
    assert splits["train"]["scanner"]["Y"] is None  # 8 < 11
    assert splits["test"]["scanner"]["W"] is None and splits["test"]["scanner"]["Y"] is None  # as in the audit
    assert splits["test"]["label"] == {"0": 29, "1": 27}  # labels stay exact
    for split, info in splits.items():
        part = manifest[manifest["split"] == split]
        hidden = {(c, v) for c in ("site", "scanner") for v, n in info[c].items() if n is None}
        relations = [(None, [(c, v) for v in info[c]]) for c in ("site", "scanner")]
        relations += nesting_relations({c: part[c].to_numpy() for c in ("site", "scanner")}, lambda a, g: (a, g))
        assert determined(hidden, relations) == set(), split
    assert splits["train"]["scanner"]["Z"] == 30 and splits["train"]["scanner"]["W"] == 25  # no more than needed


def test_docs_describe_the_console_summary_of_an_inconclusive_audit_as_printed(tmp_path):
    from medtl.cli import _audit_summary

    same = {"reason": "all 2 of its groups were suppressed", "remedy": "more test patients per group"}
    entries = [{"attribute": a, **same} for a in ("sex", "age_band", "site", "scanner", "sex&site", "sex&scanner")]
    entries.append({"attribute": "ward", "reason": "only one group", "remedy": "add test patients"})
    audit_json = tmp_path / "audit.json"
    audit_json.write_text(json.dumps({"status": "inconclusive", "unevaluated_attributes": entries}))
    lines = _audit_summary("inconclusive", False, audit_json, "registered m v1").splitlines()
    assert lines[1].startswith("  sex, age_band, site, scanner and 2 more; e.g. sex: ") and lines[2].startswith("  ward:")
    docs = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text()
    console = " ".join(docs.split("**The console**")[1].split("\n- ")[0].split())
    assert "one line per remedy: up to four of the unevaluated attributes" in console
    assert 'then "and N more"' in console
