"""Transfer methods wired into workflows: AdaBN, DANN, continual fine-tuning, few-shot, multi-task.

The slow tests run real workflows (tiny images, one epoch) on one set of synthetic demo studies:
each checks what a hospital team relies on — the extra metrics in metrics.json and MLflow, which
weights changed, and that the registry records where a model came from. The fast tests check the
data rules (unlabelled target rows, an unseen old test set) on small hand-written manifests.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medtl.data.manifest import build_manifest
from medtl.data.synthetic import write_demo_data
from medtl.engine.checkpoint import load_weights
from medtl.errors import ConfigError, InputError, LeakageError
from medtl.studies.few_shot import few_shot_summary, run_few_shot
from medtl.tracking import store
from medtl.workflow.config import load_config
from medtl.workflow.methods import check_old_test_unseen, load_registered_weights, prepare_old_data
from medtl.workflow.prepare import PreparedData, prepare_data
from medtl.workflow.run import run_workflow
from medtl.workflow.train import build_model, load_initial_state

TINY = ["data.image_size=[32, 32]", "train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=100"]
RADIOGRAPHS = {"name": "xr", "data": {"modalities": ["CR", "DX"], "intensity": "xray"},
               "tracking": {"experiment": "adaptation-tests"}}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class Demo:
    root: Path
    key: Path
    manifests: dict[str, Path]
    target: str  # the radiograph site used as the adaptation target
    phi: dict[str, str]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """100 synthetic patients, one manifest, and manifests derived from it for each method."""
    work = tmp_path_factory.mktemp("adaptation")
    with pytest.MonkeyPatch.context() as mp:  # the key and its alias map stay in this folder
        mp.setenv("MEDTL_CONFIG_DIR", str(work / "config"))
        mp.delenv("MEDTL_KEY_FILE", raising=False)
        summary = write_demo_data(work / "demo_data", patients=100, seed=0, progress=False)
        built = build_manifest(work / "demo_data", summary.labels_csv, work / "manifests" / "all.csv",
                               fractions=(0.5, 0.25, 0.25), progress=False)
    sidecar = json.loads(built.sidecar_json.read_text())
    manifest = pd.read_csv(built.manifest_csv, dtype=str, keep_default_na=False)
    xr = manifest[manifest["modality"] != "CT"]
    target = xr[xr["split"] == "test"]["site"].value_counts().index[0]
    patients = sorted(manifest["patient"].unique())
    ct = manifest[manifest["modality"] == "CT"].sort_values(["label", "patient"])
    # Few CT series: fixed patient-level splits with both classes in each (a random split could
    # leave a split empty or of one class).
    ct_split = {p: ("train", "val", "test", "train")[i % 4] for group in ct.groupby("label")["patient"]
                for i, p in enumerate(group[1].unique())}
    derived = {
        # The target site's training radiographs lose their labels, as at a new site.
        "unlabelled_target": manifest.assign(label=manifest["label"].where(
            ~((manifest["site"] == target) & (manifest["split"] == "train") & (manifest["modality"] != "CT")), "")),
        "old": manifest[manifest["patient"].isin(patients[::2])],
        "new": manifest[~manifest["patient"].isin(patients[::2])],
        "ct": ct.assign(split=ct["patient"].map(ct_split)),
    }
    paths = {"all": built.manifest_csv}
    for name, table in derived.items():
        paths[name] = work / "manifests" / f"{name}.csv"
        table.to_csv(paths[name], index=False)
        paths[name].with_suffix(".json").write_text(json.dumps({"k_anonymity": sidecar["k_anonymity"]}))
    return Demo(root=work / "demo_data", key=work / "config" / "keys" / "medtl.key", manifests=paths,
                target=target, phi={s: "demo PHI" for s in summary.phi_strings})


def _config(demo: Demo, manifest: str, name: str, *overrides: str, base: dict = RADIOGRAPHS):
    return load_config(None, [f"data.root={demo.root}", f"data.manifest={demo.manifests[manifest]}",
                              f"data.key_file={demo.key}", f"tracking.registered_model={name}", f"name={name}",
                              *TINY, *overrides], base=base)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The test's folder as working directory, so MLflow's embedded store is tmp_path/mlruns.

    MLflow exports the URI it resolves as MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI; setting them
    first through monkeypatch makes teardown remove them, so no later test inherits this store.
    """
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return tmp_path


def _mlflow_run(run_id: str):
    store.tracking_uri()
    return store.client().get_run(run_id).data


def _auroc(table: pd.DataFrame, rows) -> float:
    """AUROC of the given rows of a predictions table, recomputed with scikit-learn."""
    from sklearn.metrics import roc_auc_score

    part = table[rows]
    return float(roc_auc_score(part["y_true"], part["y_score"]))


def _side_by_side(report: Path) -> str:
    """The HTML of the report's "Test sets side by side" table (fails when it is missing)."""
    match = re.search(r'<h3 id="test-sets">.*?</table>', report.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert match, "the report must show the extra test sets side by side"
    return match.group(0)


@pytest.mark.slow
@pytest.mark.usefixtures("workdir")
def test_adabn_run_reports_target_and_source_test_and_changes_only_batchnorm_statistics(demo, tmp_path):
    cfg = _config(demo, "all", "xr_adabn", "adaptation.method=adabn", f"adaptation.target={demo.target}")
    out = run_workflow(cfg, tmp_path / "run", progress=False, extra_forbidden=demo.phi)

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["adaptation"]["bn_layers"] > 0 and metrics["adaptation"]["target_images"] >= 2
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    test, target = predictions["split"] == "test", predictions["site"] == demo.target
    # Each test set's AUROC is the one of its own rows: all test rows, the target site's, the others'.
    for key, rows in (("test", test), ("target_test", test & target), ("source_test", test & ~target)):
        assert metrics[key]["auroc"] == pytest.approx(_auroc(predictions, rows), abs=1e-9), key
    assert demo.target not in set(predictions.loc[predictions["split"] == "val", "site"]), "target rows left val"
    assert demo.target in set(predictions.loc[predictions["split"] == "test", "site"])
    logged = _mlflow_run(out.run_id).metrics
    assert {"target_test.auroc", "source_test.auroc", "adaptation.bn_layers"} <= set(logged)
    target_n = int(((predictions["split"] == "test") & (predictions["site"] == demo.target)).sum())
    table = _side_by_side(tmp_path / "run" / "report.html")
    assert f"Target-site test (n = {target_n})" in table and "Source test (n = " in table
    assert f"{metrics['target_test']['auroc']:.3f}" in table and f"{metrics['source_test']['auroc']:.3f}" in table

    before = load_weights(next((tmp_path / "run" / "checkpoints").glob("best-*.pt")))
    after = load_registered_weights(f"models:/xr_adabn/{out.model_version}").state
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "AdaBN must change the BatchNorm statistics"
    assert all(k.endswith(BN_STATS) for k in changed), sorted(k for k in changed if not k.endswith(BN_STATS))[:3]


@pytest.mark.slow
@pytest.mark.usefixtures("workdir")
def test_dann_run_trains_with_unlabelled_target_studies_and_registers_a_plain_classifier(demo, tmp_path):
    cfg = _config(demo, "unlabelled_target", "xr_dann", "adaptation.method=dann", f"adaptation.target={demo.target}")
    data = prepare_data(cfg, tmp_path, progress=False)
    unlabelled = int((data.manifest["label"] == "").sum())
    assert unlabelled > 0, "the target's unlabelled training rows must be kept for DANN"

    out = run_workflow(cfg, tmp_path / "run", progress=False, extra_forbidden=demo.phi)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["adaptation"]["target_images"] == unlabelled
    assert metrics["strategy"] == "finetune"  # read through DANN's wrapper of the strategy's plan
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    on_target = (predictions["split"] == "test") & (predictions["site"] == demo.target)
    assert metrics["target_test"]["auroc"] == pytest.approx(_auroc(predictions, on_target), abs=1e-9)
    checkpoint = load_weights(next((tmp_path / "run" / "checkpoints").glob("best-*.pt")))
    assert any(k.startswith("domain_head.") for k in checkpoint), "the domain classifier trained with the model"
    registered = load_registered_weights(f"models:/xr_dann/{out.model_version}").state
    assert not any(k.startswith(("domain_head.", "grl.")) for k in registered)
    load_initial_state(build_model(cfg, weights="none").model, registered)  # a plain classifier's weights


@pytest.mark.slow
@pytest.mark.usefixtures("workdir")
def test_continual_run_records_both_test_sets_and_starts_from_the_registered_version(demo, tmp_path):
    first = run_workflow(_config(demo, "old", "xr_continual"), tmp_path / "first", progress=False,
                         extra_forbidden=demo.phi)
    cfg = _config(demo, "new", "xr_continual", "train.strategy=linear_probe",
                  f"continual.from_model=models:/xr_continual/{first.model_version}",
                  f"continual.old_manifest={demo.manifests['old']}")
    out = run_workflow(cfg, tmp_path / "second", progress=False, extra_forbidden=demo.phi)

    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert metrics["continual"]["from_model"] == f"xr_continual/{first.model_version}"
    old_ids = set(pd.read_csv(demo.manifests["old"]).query("split == 'test' and modality != 'CT'")["id"])
    old_predictions = pd.read_csv(tmp_path / "second" / "old_predictions.csv")
    new_predictions = pd.read_csv(tmp_path / "second" / "predictions.csv")
    # Both test sets are scored by the new model, each on its own rows.
    assert metrics["old_test"]["auroc"] == pytest.approx(
        _auroc(old_predictions, old_predictions["split"] == "test"), abs=1e-9)
    assert metrics["test"]["auroc"] == pytest.approx(
        _auroc(new_predictions, new_predictions["split"] == "test"), abs=1e-9)
    assert set(old_predictions.loc[old_predictions["split"] == "test", "id"]) == old_ids
    run = _mlflow_run(out.run_id)
    assert {"old_test.auroc", "test.auroc", "old_test.auroc.ci_lo"} <= set(run.metrics)
    table = _side_by_side(tmp_path / "second" / "report.html")
    assert "New test (n = " in table and f"Old test (n = {len(old_ids)})" in table
    assert f"{metrics['old_test']['auroc']:.3f}" in table and f"{metrics['test']['auroc']:.3f}" in table
    assert run.tags["medtl.continual_from"] == f"xr_continual/{first.model_version}"
    version = store.client().get_model_version("xr_continual", out.model_version)
    assert version.tags["continual_from"] == f"xr_continual/{first.model_version}"
    assert version.tags["strategy"] == metrics["strategy"] == "linear_probe"  # the strategy trained with

    # A linear probe keeps the encoder frozen: its weights are the registered version's, not ImageNet's.
    parent = load_registered_weights(f"models:/xr_continual/{first.model_version}").state
    child = load_registered_weights(f"models:/xr_continual/{out.model_version}").state
    imagenet = build_model(cfg).model.state_dict()
    encoder = [k for k in parent if k.startswith("encoder.") and k.endswith("weight")]
    assert all(torch.equal(parent[k], child[k]) for k in encoder)
    assert any(not torch.equal(parent[k], imagenet[k]) for k in encoder)


@pytest.mark.slow
@pytest.mark.usefixtures("workdir")
def test_few_shot_study_writes_every_k_and_logs_to_mlflow(demo, tmp_path):
    cfg = _config(demo, "all", "xr_fewshot")
    result = run_few_shot(cfg, tmp_path / "fs", ks=[1, 3, 500], draws=2, progress=False, extra_forbidden=demo.phi)

    written = json.loads((tmp_path / "fs" / "few_shot.json").read_text())
    assert written == result
    assert written["ks"] == [1, 3, 500] and written["skipped_ks"] == [500]
    for method in ("prototype", "linear_probe"):
        assert set(written["results"][method]) == {"1", "3"}
        assert len(written["results"][method]["3"]["auroc"]) == 2
        assert written["results"][method]["3"]["n_support"] == 6
    logged = _mlflow_run(written["run_id"])
    assert "fewshot.prototype.k3.auroc_mean" in logged.metrics
    assert logged.params["fewshot.ks"] == "[1, 3, 500]"
    assert len(few_shot_summary(result)) == 2 * 2 + 1  # methods x usable ks, then the skipped k


@pytest.mark.slow
@pytest.mark.usefixtures("workdir")
def test_multitask_run_reports_dice_and_class_auroc(demo, tmp_path):
    base = {"name": "ct_mt", "task": "segmentation", "tracking": {"experiment": "adaptation-tests"},
            "data": {"modalities": ["CT"], "intensity": "ct", "spacing": [1.5, 1.5, 2.5], "ct_window": [-200, 300]},
            "model": {"spatial_dims": 3, "num_classes": 3}}
    cfg = _config(demo, "ct", "ct_mt", "data.image_size=[32, 32, 16]", "train.batch_size=2",
                  "multitask.enabled=true", "multitask.cls_weight=0.5", base=base)
    out = run_workflow(cfg, tmp_path / "run", progress=False, extra_forbidden=demo.phi)

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "auroc" in metrics["test_ci"]
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert {"y_true", "y_score", "y_pred", "dice"} <= set(predictions.columns)
    assert set(predictions["y_true"]) <= {-1, 0, 1}
    test = predictions["split"] == "test"
    # The mask metric is the mean of the test cases' Dice; the class head's AUROC is over the test
    # studies that carry a class label (null when they hold one class only).
    assert metrics["test"]["dice"] == pytest.approx(float(np.nanmean(predictions.loc[test, "dice"])), abs=1e-9)
    labelled = test & (predictions["y_true"] >= 0)
    if predictions.loc[labelled, "y_true"].nunique() == 2:
        assert metrics["test"]["auroc"] == pytest.approx(_auroc(predictions, labelled), abs=1e-9)
    else:
        assert metrics["test"]["auroc"] is None
    assert store.client().get_model_version("ct_mt", out.model_version).tags["multitask"].startswith("outputs 3")


# ---------------------------------------------------------------------------------------- fast
def _handmade_manifest(path: Path) -> Path:
    """Rows prepare_data can filter without reading an image: 3 sites with every split, 2 unlabelled rows."""
    rows = []
    for i in range(24):
        site, split = f"SITE-{i // 8}", ("train",) * 4 + ("val",) * 2 + ("test",) * 2
        label = "" if (i // 8 == 2 and 2 <= i % 8 < 4) else str(i % 2)
        rows.append({"id": f"R-{i}", "patient": f"P-{i}", "split": split[i % 8], "label": label, "mask": "",
                     "modality": "DX", "site": site, "sha256": f"{i:064x}", "key_id": "k1"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_unlabelled_rows_of_the_target_domain_are_kept_only_under_adaptation(tmp_path):
    manifest = _handmade_manifest(tmp_path / "m.csv")
    plain = load_config(None, [f"data.manifest={manifest}", f"data.root={tmp_path}"])
    assert (prepare_data(plain, tmp_path, progress=False).manifest["label"] != "").all()
    adapted = dataclasses.replace(plain, adaptation=dataclasses.replace(plain.adaptation, method="dann",
                                                                        target="SITE-2"))
    kept = prepare_data(adapted, tmp_path, progress=False).manifest
    unlabelled = kept[kept["label"] == ""]
    assert len(unlabelled) == 2 and set(unlabelled["site"]) == {"SITE-2"} and set(unlabelled["split"]) == {"train"}


def test_an_unknown_target_or_domain_column_names_the_key(tmp_path):
    manifest = _handmade_manifest(tmp_path / "m.csv")
    common = [f"data.manifest={manifest}", f"data.root={tmp_path}", "adaptation.method=adabn"]
    with pytest.raises(ConfigError, match=r"'adaptation\.target' must be a value of column 'site'.*SITE-0"):
        prepare_data(load_config(None, [*common, "adaptation.target=SITE-9"]), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"'adaptation\.domain_column' must name a column"):
        prepare_data(load_config(None, [*common, "adaptation.target=SITE-1", "adaptation.domain_column=ward"]),
                     tmp_path, progress=False)


def _prepared(manifest: pd.DataFrame) -> PreparedData:
    return PreparedData(manifest=manifest, manifest_path=Path("m.csv"), manifest_sha256="0" * 64, sidecar={},
                        root=Path("."), key_file=None, classes=["0", "1"], subgroups=[])


def test_continual_refuses_new_training_studies_from_the_old_test_set(tmp_path):
    old = pd.read_csv(_handmade_manifest(tmp_path / "old.csv"), dtype=str, keep_default_na=False)
    new = old.assign(sha256=old["sha256"].str.replace("0", "f"), patient=old["patient"] + "-new")
    check_old_test_unseen(_prepared(new), _prepared(old))  # disjoint studies and patients pass
    leaked = new.copy()
    leaked.loc[leaked.index[0], ["sha256", "split"]] = [old.loc[old["split"] == "test", "sha256"].iloc[0], "train"]
    with pytest.raises(LeakageError, match="1 studies and 0 patient aliases of the old test set"):
        check_old_test_unseen(_prepared(leaked), _prepared(old))
    same_patient = new.copy()
    same_patient.loc[same_patient.index[0], ["patient", "split"]] = [
        old.loc[old["split"] == "test", "patient"].iloc[0], "val"]
    with pytest.raises(LeakageError, match="0 studies and 1 patient aliases"):
        check_old_test_unseen(_prepared(same_patient), _prepared(old))


def test_starting_weights_must_fit_the_built_model():
    cfg = load_config(None, ["data.manifest=m.csv", "data.root=.", "model.weights=none"])
    model = build_model(cfg).model
    state = {k: v.clone() + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    load_initial_state(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(InputError, match="must fit the model of this workflow"):
        load_initial_state(model, {k: v for k, v in state.items() if not k.startswith("head.")})


def test_the_old_manifest_of_a_continual_run_is_read_without_a_second_preflight(tmp_path, monkeypatch):
    import medtl.workflow.prepare

    old = _handmade_manifest(tmp_path / "old.csv")
    cfg = load_config(None, [f"data.manifest={old}", f"data.root={tmp_path}", "continual.from_model=models:/xr@champion",
                             f"continual.old_manifest={old}"])

    def second_preflight(cfg):
        raise AssertionError("run_workflow's preflight already checked continual.old_manifest and old_root")

    monkeypatch.setattr(medtl.workflow.prepare, "preflight", second_preflight)
    prepared = prepare_old_data(cfg, tmp_path / "old", progress=False)
    assert (prepared.manifest["split"] == "test").any()
