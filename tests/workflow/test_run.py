"""The main job end to end: demo studies -> manifest -> fine-tune -> audit -> MLflow -> report.

One small real run (tiny images, one epoch) checks the stable outputs (metrics.json,
predictions.csv, audit.json, registry tags and aliases) and that nothing identifying from the
demo studies — fake PHI or the data folder's absolute path — reached MLflow or the outputs.
The steps before training (preflight, row selection, manifest staging and publishing, the disk
cache) are checked on their own, on real PNG and NIfTI files, without training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medtl.cli import main
from medtl.data.dataset import Augmentation, manifest_items
from medtl.errors import ConfigError, InputError, WeightsError
from medtl.tracking import phi_guard, registry, store
from medtl.workflow.config import load_config
from medtl.workflow.prepare import positive_class, preflight, prepare_data, publish_manifest, staged_manifest
from medtl.workflow.record import WITHHELD_NAME, config_dict
from medtl.workflow.train import build_model, datasets_for, preprocessing_for
from tests.exports import write_nifti_exports, write_png_exports
from tests.workflow.conftest import DEMO_STORE

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def _test_auroc(predictions_csv: Path) -> float:
    """The test AUROC recomputed from predictions.csv with scikit-learn."""
    from sklearn.metrics import roc_auc_score

    table = pd.read_csv(predictions_csv)
    test = table[table["split"] == "test"]
    return float(roc_auc_score(test["y_true"], test["y_score"]))


def demo_store() -> str:
    return DEMO_STORE["uri"]


@pytest.mark.slow
def test_demo_run_writes_the_stable_outputs(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    metrics = json.loads((outputs.output_dir / "metrics.json").read_text())
    assert metrics["test"]["auroc"] == pytest.approx(_test_auroc(outputs.output_dir / "predictions.csv"), abs=1e-9)
    assert metrics["run_id"] == outputs.run_id
    assert metrics["positive_class"] == "1"  # integer labels: 1 of 0/1
    assert metrics["passes_per_epoch"] == 1  # TINY turns train.min_steps off (the engine's tests cover the passes)
    assert metrics["strategy"] == "finetune"  # one pass: train.small_data_strategy does not apply
    assert {"train_seconds", "manifest_seconds"} <= set(metrics["timings"])
    predictions = pd.read_csv(outputs.output_dir / "predictions.csv")
    assert list(predictions.columns) == ["id", "split", "y_true", "y_score", "y_pred", "sex", "age_band", "site", "scanner"]
    assert set(predictions["split"]) == {"val", "test"}
    assert predictions["id"].str.startswith("R-").all()
    # y_pred is the class at metrics.json's operating threshold (chosen on validation), not the argmax.
    expected = (predictions["y_score"] >= metrics["threshold"]).astype(int)
    assert (predictions["y_pred"] == expected).all() and metrics["threshold"] != 0.5
    audit = json.loads((outputs.output_dir / "audit.json").read_text())
    assert isinstance(audit["passed"], bool) and audit["groups"] and "gaps" in audit
    assert (work / "mlruns" / "mlflow.db").is_file()
    report = (outputs.output_dir / "report.html").read_text()
    assert outputs.run_id in report and f"{metrics['test']['auroc']:.3f}" in report  # this run's numbers
    for section in ('id="identification"', 'id="results"', 'id="subgroups"', 'id="limitations"', 'id="sign-off"'):
        assert section in report, section


@pytest.mark.slow
def test_demo_run_is_registered_with_the_documented_tags(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)  # restored after the test
    store.tracking_uri(demo_store())
    version = registry.get_model_version(outputs.model_name, outputs.model_version)
    for tag in ("task", "encoder", "weights_origin", "strategy", "manifest_sha256", "audit_status", "report_sha256"):
        assert tag in version.tags, tag
    # 48 demo patients leave a dozen radiograph patients in the test split: no subgroup has more
    # than audit.min_group_size (10), every one is suppressed, no gap can be measured.
    audit = json.loads((outputs.output_dir / "audit.json").read_text())
    assert all(g["suppressed"] for g in audit["groups"]) and audit["evaluated_attributes"] == []
    assert version.tags["audit_status"] == "inconclusive"
    assert store.client().get_run(outputs.run_id).data.metrics["train.passes_per_epoch"] == 1.0
    assert version.tags["strategy"] == "finetune"  # the strategy trained with (train.small_data_strategy did not apply)
    aliases = store.client().get_registered_model(outputs.model_name).aliases
    assert str(aliases.get("candidate")) == outputs.model_version


@pytest.mark.slow
def test_the_audit_verdict_reaches_the_run_and_the_registry_version(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)  # restored after the test
    store.tracking_uri(demo_store())
    audit = json.loads((outputs.output_dir / "audit.json").read_text())
    version = registry.get_model_version(outputs.model_name, outputs.model_version)
    # The verdict of audit.json: "inconclusive" when every subgroup was suppressed (nothing measured).
    assert version.tags["audit_status"] == audit.get("status", "passed" if audit["passed"] else "failed")
    assert int(version.tags["audit.flagged_gaps"]) == sum(g["flagged"] for g in audit["gaps"])
    assert version.tags["report_artifact"] == f"runs:/{outputs.run_id}/report.html"
    run = store.client().get_run(outputs.run_id)
    assert run.data.metrics["audit.passed"] == float(audit["passed"])
    assert run.data.metrics["audit.flagged_gaps"] == sum(g["flagged"] for g in audit["gaps"])
    tested = [g for g in audit["gaps"] if g["tolerance"] is not None and g["value"] is not None]
    for gap in tested:
        key = f"audit.gap.{gap['attribute']}.{gap['metric']}.{gap['kind']}".replace("&", "_")
        assert run.data.metrics[key] == pytest.approx(gap["value"]), key
    logged = {a.path for a in store.client().list_artifacts(outputs.run_id)}
    assert {"audit.json", "report.html", "report_inputs.json", "metrics.json", "predictions.csv"} <= logged


@pytest.mark.slow
def test_the_run_records_every_preprocessing_and_augmentation_setting(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)
    store.tracking_uri(demo_store())
    params = store.client().get_run(outputs.run_id).data.params
    assert params["preprocessing.image_size"] == "[32, 32]"  # TINY's data.image_size
    assert params["preprocessing.normalization"] == "imagenet"  # from the encoder's weight record
    assert params["augmentation.enabled"] == "True"
    for field, value in dataclasses.asdict(Augmentation()).items():
        expected = json.dumps(list(value)) if isinstance(value, tuple) else str(value)
        assert params[f"augmentation.{field}"] == expected, field


@pytest.mark.slow
def test_the_demo_compares_its_gaps_with_the_same_model_trained_from_scratch(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    audit = json.loads((outputs.output_dir / "audit.json").read_text())
    reference = audit["reference"]
    assert reference["kind"] == "scratch" and reference["paired"] is True
    assert reference["label"].startswith("from scratch")
    # The twin was scored on the same test studies: a real AUROC, and (48 tiny patients, one epoch)
    # not the model's own number copied over.
    assert reference["test"]["auroc"]["value"] is not None
    assert reference["test"]["auroc"]["value"] != json.loads((outputs.output_dir / "metrics.json").read_text())["test"]["auroc"]
    assert (outputs.output_dir / "reference_scratch" / "checkpoints").is_dir()
    for entry in audit["amplification"]:
        assert entry["direction"] in ("widened", "narrowed", "unchanged")
        assert entry["delta"] == pytest.approx(entry["model"] - entry["reference"])
    html = outputs.report_path.read_text()
    section = html[html.index('id="amplification"'):html.index('id="limitations"')]
    assert "from scratch" in section and "paired: both models" in section
    assert "Reference and model on the same test set" in section
    # A reference no better than chance has no gaps to widen: the report must say so (and only then).
    near_chance = reference["test"]["auroc"]["ci"][0] <= 0.5
    assert ("does not discriminate better than chance" in section) is near_chance


@pytest.mark.slow
def test_the_report_states_synthetic_data_the_phi_scan_and_the_code_version(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)  # restored after the test
    store.tracking_uri(demo_store())
    html = outputs.report_path.read_text()
    data = html[html.index('id="data"'):html.index('id="partitions"')]
    assert re.search(r"Synthetic data</t[hd]>\s*<td>yes", data), "the demo's report must say its data are synthetic"
    assert "The data are synthetic" in html  # and list it among the limitations
    assert "PHI scan of outputs" in data and "the MLflow run, its artifacts and model, and this report" in data
    assert re.search(r"Acquisition years</t[hd]>\s*<td>\d{4}", data), "study years from the manifest sidecar"
    commit = store.client().get_run(outputs.run_id).data.tags.get("medtl.git_commit")
    assert (f"medtl 0.1.0, git {commit[:12]}" if commit else "medtl 0.1.0") in html


@pytest.mark.slow
def test_nothing_identifying_reaches_mlflow_or_the_outputs(demo_run, monkeypatch):
    work, outputs, phi = demo_run
    monkeypatch.chdir(work)  # restored after the test
    store.tracking_uri(demo_store())
    data_root = (work / "out" / "demo_data").resolve()
    strings = sorted(s for s in phi if not s.startswith("date:"))
    dates = sorted(s.removeprefix("date:") for s in phi if s.startswith("date:"))
    assert strings and dates, "the demo must carry fake PHI for this test to mean anything"
    assert phi_guard.scan_run(outputs.run_id, strings, [data_root]) == []
    assert phi_guard.scan_registered_version(outputs.model_name, outputs.model_version, strings, [data_root]) == []
    texts = {p.name: p.read_text(errors="ignore").lower() for p in outputs.output_dir.glob("*") if p.is_file()}
    for manifest in (work / "out" / "data_manifests").glob("*"):
        texts[manifest.name] = manifest.read_text().lower()
    texts["stdout"] = (work / "printed.txt").read_text().lower()
    for name, text in texts.items():
        if name != "stdout":  # the console may name the folders the user chose; files never do
            assert str(data_root).lower() not in text, name
        # Long values as substrings; short ones and dates as whole tokens (they occur inside hex).
        leaked = [s for s in strings if len(s) >= 6 and s.lower() in text]
        leaked += [s for s in strings + dates if len(s) < 6 or s in dates
                   if re.search(rf"(?<![0-9a-z]){re.escape(s.lower())}(?![0-9a-z])", text)]
        assert not leaked, f"{name} holds {len(leaked)} fake identifiers"


@pytest.mark.slow
def test_promote_requires_a_passed_audit(demo_run, capsys, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)  # restored after the test
    store.tracking_uri(demo_store())
    registry.set_audit_status(outputs.model_name, outputs.model_version, "failed", {"reason": "test"})
    assert main(["registry", "promote", outputs.model_name, outputs.model_version]) == 2
    assert "audit" in capsys.readouterr().err
    with pytest.raises(InputError):
        registry.promote(outputs.model_name, outputs.model_version)
    store.client().delete_model_version_tag(outputs.model_name, outputs.model_version, "audit_status")
    assert main(["registry", "promote", outputs.model_name, outputs.model_version]) == 2
    assert "not missing" in capsys.readouterr().err
    registry.set_audit_status(outputs.model_name, outputs.model_version, "passed", {"reason": "test"})
    assert main(["registry", "promote", outputs.model_name, outputs.model_version]) == 0
    aliases = store.client().get_registered_model(outputs.model_name).aliases
    assert str(aliases.get("champion")) == outputs.model_version


@pytest.mark.slow
def test_report_rerenders_from_the_run(demo_run, tmp_path, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)  # the run's embedded MLflow store is ./mlruns there; restored after the test
    assert main(["report", outputs.run_id, "--output", str(tmp_path / "again.html")]) == 0
    html = (tmp_path / "again.html").read_text()
    assert 'id="subgroups"' in html and outputs.run_id in html


@pytest.mark.slow
def test_rows_left_out_of_the_run_are_counted_in_mlflow(demo_run, monkeypatch):
    work, outputs, _ = demo_run
    monkeypatch.chdir(work)  # restored after the test
    store.tracking_uri(demo_store())
    params = store.client().get_run(outputs.run_id).data.params
    # The demo's CT series are not radiographs: the classify_2d run leaves them out and says so.
    assert int(params["data.rows_left_out.other_modality"]) > 0


def _png_config(tmp_path: Path, *extra: str, workflow: str = "classify_2d"):
    data = tmp_path / "exports"
    labels = write_png_exports(data) if not (data / "labels.csv").is_file() else data / "labels.csv"
    return load_config(WORKFLOWS / f"{workflow}.yaml", [
        f"data.root={data}", f"data.labels={labels}", f"data.manifest_out={tmp_path / 'manifests' / 'm.csv'}", *extra])


def test_exports_without_a_modality_are_kept_when_their_dimensionality_fits_the_model(tmp_path, caplog):
    data = tmp_path / "exports"
    labels = write_png_exports(data)
    (data / "volumes").mkdir()
    extra = []
    for i in range(3):  # 3D NIfTI volumes: no modality either, but a 2D model cannot take them
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((16, 16, 8)).astype(np.float32), np.eye(4)),
                 data / "volumes" / f"vol_{i}.nii.gz")
        extra.append({"path": f"volumes/vol_{i}.nii.gz", "label": i % 2, "split": "train"})
    pd.concat([pd.read_csv(labels), pd.DataFrame(extra)]).to_csv(labels, index=False)
    cfg = _png_config(tmp_path)
    assert cfg.data.modalities == ("CR", "DX")  # the shipped workflow, unchanged

    with caplog.at_level(logging.WARNING, logger="medtl.workflow"):
        prepared = prepare_data(cfg, tmp_path / "out", progress=False)
    assert len(prepared.manifest) == 60 and set(prepared.manifest["kind"]) == {"image2d"}
    assert prepared.kept_without_modality == 60
    assert prepared.dropped == {"other dimensionality": 3}
    assert "60 studies have no DICOM modality" in caplog.text and "2D like model.spatial_dims" in caplog.text


def test_the_manifest_is_built_in_the_output_folder_and_published_only_when_asked(tmp_path):
    cfg = _png_config(tmp_path)
    out = tmp_path / "out"
    prepared = prepare_data(cfg, out, progress=False)
    published = Path(cfg.data.manifest_out)
    assert prepared.manifest_path == staged_manifest(cfg, out) == out / "manifest.csv"
    assert not published.exists()  # a run that fails from here on leaves data.manifest_out alone

    assert publish_manifest(prepared, cfg) == published
    for staged, final in ((prepared.manifest_path, published), (out / "manifest.json", published.with_suffix(".json"))):
        assert final.read_bytes() == staged.read_bytes()
    assert sorted(p.name for p in published.parent.iterdir()) == ["m.csv", "m.json"]  # no temporary files left
    json.loads(published.with_suffix(".json").read_text())

    reused = load_config(None, [f"data.root={cfg.data.root}", f"data.manifest={published}",
                                f"data.manifest_out={tmp_path / 'other.csv'}"], base={"name": "again"})
    again = prepare_data(reused, tmp_path / "out2", progress=False)
    assert again.manifest_path == published == staged_manifest(reused, tmp_path / "out2")
    assert publish_manifest(again, reused) is None and not (tmp_path / "other.csv").exists()


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["model.weights=missing.pth"], WeightsError, r"config key 'model\.weights' file missing\.pth must be an existing"),
        (["model.encoder=resnet19"], ConfigError, r"config key 'model\.encoder' .* did you mean 'resnet18'"),
        (["model.encoder=densenet121", "model.weights=none", "data.image_size=[16, 16]"], ConfigError,
         r"config key 'data\.image_size' must be large enough for encoder 'densenet121'.*use e\.g\. \[32, 32\]"),
        (["model.encoder=medicalnet_resnet18"], ConfigError, r"config key 'model\.spatial_dims' must be 3"),
        (["data.labels=nowhere.csv"], ConfigError, r"config key 'data\.labels' must name an existing file, not "
                                                   r"missing \(nowhere\.csv\)"),
    ],
)
def test_prepare_data_runs_the_preflight_before_building_anything(tmp_path, extra, error, message):
    cfg = _png_config(tmp_path, *extra)
    with pytest.raises(error, match=message):
        prepare_data(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_preflight_says_where_to_put_medicalnet_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = _png_config(tmp_path, "model.encoder=medicalnet_resnet18", "model.weights=medicalnet",
                      workflow="classify_3d")
    with pytest.raises(WeightsError, match=r"config key 'model\.weights' \(medicalnet\): medicalnet weights for "
                                           r"encoder 'medicalnet_resnet18' must be a local file, not missing; put "
                                           r"resnet_18_23dataset\.pth"):
        preflight(cfg)


def test_preflight_accepts_the_shipped_workflows_with_their_bundled_weights(tmp_path):
    for workflow in ("classify_2d", "classify_3d", "segment_3d"):
        preflight(_png_config(tmp_path, workflow=workflow))


def test_disk_cache_fills_the_run_output_folder_and_serves_the_next_epoch(tmp_path):
    cfg = _png_config(tmp_path, "data.cache=disk", "data.image_size=[32, 32]", "data.modalities=[]")
    out = tmp_path / "out"
    prepared = prepare_data(cfg, out, progress=False)
    prep = preprocessing_for(cfg, build_model(cfg))
    val = datasets_for(cfg, prepared, prep, progress=False, splits=("val",))["val"]
    first = [val[i]["image"] for i in range(len(val))]
    assert len(list((out / "cache").glob("*.safetensors"))) == len(val) == 12

    shutil.rmtree(cfg.data.root)  # the studies are gone: the second epoch can only read the cache
    second = [val[i]["image"] for i in range(len(val))]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# -- what a run logs, and what prepare_data refuses or warns about before training ------------


def test_config_dict_logs_generic_file_names_and_withholds_the_others():
    cfg = load_config(WORKFLOWS / "classify_2d.yaml", [
        "data.root=/data/garcia_maria_cxr", "data.labels=/data/garcia_maria_cxr/labels.csv",
        "data.manifest_out=/srv/manifests/classify_2d.csv", "data.key_file=/keys/medtl.key",
        "continual.from_model=models:/classify_2d@champion", "continual.old_manifest=/srv/old/kowalski_2019.csv",
        "continual.old_root=/data/train"])
    logged = config_dict(cfg)
    assert logged["data"]["root"] == WITHHELD_NAME == "(name withheld: not generic)"
    assert logged["continual"]["old_manifest"] == WITHHELD_NAME
    assert (logged["data"]["labels"], logged["data"]["manifest_out"], logged["data"]["key_file"]) == (
        "labels.csv", "classify_2d.csv", "medtl.key")
    assert logged["continual"]["old_root"] == "train" and logged["continual"]["from_model"] == "classify_2d@champion"
    assert "garcia" not in json.dumps(logged) and "kowalski" not in json.dumps(logged)


def _nifti_config(tmp_path: Path, *extra: str, mask_labels: int = 3):
    data = tmp_path / "volumes"
    labels = write_nifti_exports(data, mask_labels=mask_labels)
    return load_config(WORKFLOWS / "segment_3d.yaml", [
        f"data.root={data}", f"data.labels={labels}", "data.image_size=[16, 16, 8]", *extra])


def test_masks_with_more_labels_than_num_classes_are_refused_before_training(tmp_path):
    cfg = _nifti_config(tmp_path, "model.num_classes=2")
    with pytest.raises(ConfigError) as caught:
        prepare_data(cfg, tmp_path / "out", progress=False)
    assert str(caught.value).startswith(
        "the masks of manifest manifest.csv hold labels 0-2, so config key 'model.num_classes' must be at least 3, "
        "not 2; set --set model.num_classes=3")
    assert len(prepare_data(_nifti_config(tmp_path / "ok"), tmp_path / "out3", progress=False).manifest) == 12


def test_volumes_without_a_modality_in_a_ct_workflow_get_one_warning_with_counts(tmp_path, caplog):
    cfg = _nifti_config(tmp_path)  # segment_3d.yaml: modalities [CT], intensity ct, CT window and spacing
    with caplog.at_level(logging.WARNING, logger="medtl.workflow"):
        prepare_data(cfg, tmp_path / "out", progress=False)
    warned = [r.getMessage() for r in caplog.records if "data.intensity is ct" in r.getMessage()]
    assert len(warned) == 1
    assert ("12 of 12 studies have no DICOM modality" in warned[0] and "data.ct_window [-200.0, 300.0]" in warned[0]
            and "--set data.intensity=mr --set data.spacing=[]" in warned[0])

    caplog.clear()
    mr = load_config(WORKFLOWS / "segment_3d.yaml", [f"data.root={cfg.data.root}", f"data.labels={cfg.data.labels}",
                                                     "data.modalities=[]", "data.intensity=mr", "data.spacing=[]"])
    with caplog.at_level(logging.WARNING, logger="medtl.workflow"):
        prepare_data(mr, tmp_path / "out_mr", progress=False)
    assert "data.intensity is ct" not in caplog.text


@pytest.mark.parametrize(
    ("labels", "positive", "classes"),
    [
        (("normal", "abnormal"), "", ["normal", "abnormal"]),  # alphabetical order would make "normal" positive
        (("No Finding", "effusion"), "", ["No Finding", "effusion"]),
        (("normal", "abnormal"), "normal", ["abnormal", "normal"]),  # audit.positive_class decides for two too
        (("0", "1"), "", ["0", "1"]),
    ],
)
def test_the_positive_class_of_two_gets_index_1(tmp_path, labels, positive, classes):
    write_png_exports(tmp_path / "exports", labels=labels)
    cfg = _png_config(tmp_path, *([f"audit.positive_class={positive}"] if positive else []))
    prepared = prepare_data(cfg, tmp_path / "out", progress=False)
    assert prepared.classes == classes and positive_class(cfg, prepared) == classes[1]
    items = manifest_items(prepared.manifest, "test", "classification", prepared.classes)
    targets = {str(prepared.manifest.set_index("id").at[item["id"], "label"]): item["label"] for item in items}
    assert targets == {classes[0]: 0, classes[1]: 1}


@pytest.mark.parametrize(("labels", "positive", "message"), [
    (("cat", "dog"), "", r"'audit\.positive_class' must name the positive class of the two classes \['cat', 'dog'\], "
                         r"not be empty: neither sounds negative"),
    (("normal", "abnormal"), "pneumonia", r"'audit\.positive_class' must be one of the manifest's classes"),
])
def test_an_undecidable_positive_class_is_refused_before_training(tmp_path, labels, positive, message):
    write_png_exports(tmp_path / "exports", labels=labels)
    cfg = _png_config(tmp_path, *([f"audit.positive_class={positive}"] if positive else []))
    with pytest.raises(ConfigError, match=message):
        prepare_data(cfg, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("splits", "extra", "cause"),
    [
        ({"val": "train"}, ["data.fractions=[0.85, 0, 0.15]"],
         "the labels CSV's split column gives no row the split val (train 48, val 0, test 12 rows), and "
         "data.fractions gives val a share of 0, so no val patients were set aside from the given train rows; "
         "give some rows the split val, or set data.fractions with a val share"),
        ({"train": "test", "val": "test"}, [],
         "the labels CSV's split column gives no row the split train (train 0, val 0, test 60 rows); give some rows "
         "the split train, or empty the split column"),
    ],
)
def test_an_empty_split_of_a_given_split_column_names_that_cause(tmp_path, splits, extra, cause):
    labels = write_png_exports(tmp_path / "exports")
    table = pd.read_csv(labels)
    table.assign(split=table["split"].replace(splits)).to_csv(labels, index=False)
    with pytest.raises(InputError) as caught:
        prepare_data(_png_config(tmp_path, *extra), tmp_path / "out", progress=False)
    assert cause in str(caught.value)
    assert "data.modalities" not in str(caught.value) and "model.spatial_dims" not in str(caught.value)


def test_an_empty_split_whose_rows_were_left_out_names_the_key_that_keeps_them(tmp_path):
    labels = write_png_exports(tmp_path / "exports")
    table = pd.read_csv(labels)
    table.assign(label=table["label"].where(table["split"] != "val", "")).to_csv(labels, index=False)
    with pytest.raises(InputError) as caught:
        prepare_data(_png_config(tmp_path), tmp_path / "out", progress=False)
    assert "all 12 'val' rows were left out of this run (12 (no label)); give those rows a label" in str(caught.value)
    assert "data.fractions" not in str(caught.value)


def test_publish_manifest_writes_each_file_through_the_one_atomic_writer(tmp_path, monkeypatch):
    import medtl.workflow.prepare

    cfg = _png_config(tmp_path)
    prepared = prepare_data(cfg, tmp_path / "out", progress=False)
    written = []
    real = medtl.workflow.prepare.replace_atomically

    def spy(target, data, *, mode_of=None):
        written.append(Path(target).name)
        real(target, data, mode_of=mode_of)

    monkeypatch.setattr(medtl.workflow.prepare, "replace_atomically", spy)
    publish_manifest(prepared, cfg)
    assert written == ["m.csv", "m.json"]
