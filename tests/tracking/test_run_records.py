"""Config, weight record, load report, manifest inputs, metrics and environment as stored by MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest

from medtl import tracking
from medtl.errors import ConfigError, InputError
from tests.tracking.helpers import SHA


def test_config_is_flattened_and_absolute_paths_are_never_logged(store, tmp_path):
    data_root = tmp_path / "DOE_JOHN_scans"
    config = {
        "data": {
            "root": str(data_root),
            "labels": "labels.csv",
            "modalities": ["CR", "DX"],
            "key": data_root,
        },
        "train": {"lr": 0.001, "epochs": 3},
        "model": {"weights_file": "~/weights/resnet_18.pth"},
    }
    with tracking.start_run("medtl-test") as run:
        logged = tracking.log_config(config)
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert params == logged
    assert params["train.lr"] == "0.001"
    assert params["data.labels"] == "labels.csv"
    assert json.loads(params["data.modalities"]) == ["CR", "DX"]
    for key in ("data.root", "data.key", "model.weights_file"):
        assert params[key] == tracking.REDACTED_PATH
    assert not any(str(tmp_path) in v or "DOE_JOHN" in v for v in params.values())


def test_config_key_that_is_an_absolute_path_is_refused(store):
    with tracking.start_run("medtl-test"):
        with pytest.raises(ConfigError, match="plain names, not absolute paths"):
            tracking.log_config({"files": {"/data/DOE_JOHN/1.dcm": 1}})


def test_a_logged_parameter_cannot_change_value(store):
    with tracking.start_run("medtl-test"):
        tracking.log_config({"train": {"lr": 0.1}})
        tracking.log_config({"train": {"lr": 0.1}})  # same value: fine
        with pytest.raises(ConfigError, match="'train.lr' must keep the value"):
            tracking.log_config({"train": {"lr": 0.2}})


def test_weight_record_becomes_params_and_load_report_a_json_artifact(store, tmp_path):
    record = {"origin": "imagenet:efficientnet_lite0", "sha256": "ab" * 32, "licence": "Apache-2.0"}
    report = {
        "matched": ["conv.weight", "conv.bias"],
        "missing": ["head.weight"],
        "unexpected": [],
        "first_conv": "summed RGB to 1 channel",
        "source_file": str(tmp_path / "weights.pth"),
    }
    with tracking.start_run("medtl-test") as run:
        tracking.log_weights(record, report)
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert params["weights.origin"] == "imagenet:efficientnet_lite0"
    assert params["weights.sha256"] == "ab" * 32
    assert params["weights.licence"] == "Apache-2.0"
    assert (params["weights.load.n_matched"], params["weights.load.n_missing"]) == ("2", "1")
    assert params["weights.load.source_file"] == tracking.REDACTED_PATH
    stored = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/weights/load_report.json")
    assert stored["missing"] == ["head.weight"]
    assert stored["source_file"] == tracking.REDACTED_PATH


def test_weight_record_without_licence_is_refused(store):
    with tracking.start_run("medtl-test"):
        with pytest.raises(ConfigError, match="not lack licence"):
            tracking.log_weights({"origin": "imagenet", "sha256": None})


def test_manifest_is_one_dataset_input_per_split_with_full_sha256_and_no_rows(store, manifest):
    with tracking.start_run("medtl-test") as run:
        splits = tracking.log_manifest(manifest, SHA.upper())
    assert splits == ["train", "val", "test"]
    inputs = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"train", "val", "test"}
    for split, dataset_input in by_context.items():
        tags = {t.key: t.value for t in dataset_input.tags}
        assert tags["sha256"] == SHA
        assert tags["rows"] == "2"
        dataset = dataset_input.dataset
        assert dataset.name == f"manifest-{split}"
        assert json.loads(dataset.profile)["num_rows"] == 2
        columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
        assert columns == list(manifest.columns)
        stored = " ".join([dataset.source, dataset.schema, dataset.profile, dataset.digest])
        assert "p000" not in stored and "alias:00000000" not in stored, "rows must not be stored"
        assert json.loads(dataset.source) == {"tags": tracking.NEUTRAL_TAGS}


def test_manifest_with_an_empty_split_cell_or_short_digest_is_refused(store, manifest):
    broken = manifest.astype({"split": object})
    broken.loc[0, "split"] = None
    with tracking.start_run("medtl-test"):
        with pytest.raises(InputError, match="not leave 1 empty"):
            tracking.log_manifest(broken, SHA)
        with pytest.raises(InputError, match="64 hexadecimal characters"):
            tracking.log_manifest(manifest, "abc123")


def test_epoch_metrics_use_the_epoch_as_step_and_final_metrics_are_kept(store):
    with tracking.start_run("medtl-test") as run:
        for epoch in range(3):
            tracking.log_epoch_metrics(
                {"train.loss": 1.0 / (epoch + 1), "val.auroc": 0.5 + epoch / 10}, epoch
            )
        tracking.log_final_metrics({"test.auroc": 0.91, "test.dice": None})
        with pytest.raises(InputError, match="metric 'bad' must be a number"):
            tracking.log_epoch_metrics({"bad": "high"}, 3)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "val.auroc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [round(m.value, 3) for m in history] == [0.5, 0.6, 0.7]
    final = client.get_run(run.info.run_id).data.metrics
    assert final["test.auroc"] == pytest.approx(0.91)
    assert "test.dice" not in final, "None means not measured"


def test_environment_tags_name_medtl_torch_monai_and_mlflow_versions(store):
    import importlib.metadata

    import torch

    with tracking.start_run("medtl-test") as run:
        tags = tracking.log_environment()
    stored = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert stored["medtl.version"] == tags["medtl.version"]
    assert stored["env.torch"] == torch.__version__.split("+")[0]
    assert stored["env.monai"] == importlib.metadata.version("monai")
    assert stored["env.mlflow"] == mlflow.__version__
    if "medtl.git_commit" in stored:
        assert len(stored["medtl.git_commit"]) == 40
        assert stored["mlflow.source.git.commit"] == stored["medtl.git_commit"]
