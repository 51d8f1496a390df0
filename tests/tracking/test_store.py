"""Tracking URI resolution, the embedded ./mlruns store end to end, and neutral run tags."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import mlflow
import pytest

from medtl import tracking
from medtl.errors import InputError
from tests.tracking.helpers import SHA, registry_tags


def test_default_uri_is_sqlite_under_mlruns_of_the_working_directory_for_tracking_and_registry(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    tracking.tracking_uri("sqlite:///first.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # MLflow exported the explicit choice; forget it
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').as_posix()}"
    assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_registry_uri() == uri
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


def test_mlflow_tracking_uri_from_environment_is_used_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wanted = f"sqlite:///{(tmp_path / 'elsewhere.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", wanted)
    assert tracking.tracking_uri() == wanted
    assert mlflow.get_tracking_uri() == wanted
    assert tracking.tracking_uri("sqlite:///explicit.db") == "sqlite:///explicit.db"
    assert not (tmp_path / "mlruns").exists()


def test_a_registry_uri_left_in_the_environment_by_an_earlier_store_is_not_followed(tmp_path, monkeypatch):
    """MLflow exports every URI it is given; an echo of an older store must not catch registrations."""
    monkeypatch.chdir(tmp_path)
    old, new = (f"sqlite:///{(tmp_path / n).as_posix()}" for n in ("old.db", "new.db"))
    tracking.tracking_uri(old)
    tracking.tracking_uri(f"sqlite:///{(tmp_path / 'between.db').as_posix()}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", old)  # the echo of `old`, restored by some other code
    assert tracking.tracking_uri(new) == new
    assert mlflow.get_registry_uri() == new


def test_a_registry_uri_the_user_chose_is_followed_on_every_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chosen = f"sqlite:///{(tmp_path / 'registry.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", chosen)
    for name in ("a.db", "b.db"):
        tracking.tracking_uri(f"sqlite:///{(tmp_path / name).as_posix()}")
        assert mlflow.get_registry_uri() == chosen


def test_embedded_store_records_a_full_run_under_mlruns_and_registry_gates_champion(
    tmp_path, monkeypatch, tiny_model, manifest
):
    monkeypatch.chdir(tmp_path)
    tracking.tracking_uri()
    with tracking.start_run("medtl-test", "embedded") as run:
        tracking.log_config({"train": {"lr": 0.01, "epochs": 2}, "model": {"encoder": "tiny"}})
        tracking.log_manifest(manifest, SHA)
        for epoch in range(2):
            tracking.log_epoch_metrics({"train.loss": 1.0 / (epoch + 1)}, epoch)
        tracking.log_final_metrics({"test.auroc": 0.75})
        model_uri = tracking.log_torch_model(tiny_model, (1, 8, 8))
    version = tracking.register_model(model_uri, "tiny-classifier", registry_tags(), {"test.auroc": 0.75})

    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    artifacts = tmp_path / "mlruns" / "artifacts"
    assert any(p.name == "MLmodel" for p in artifacts.rglob("*")), (
        "model files must lie under ./mlruns/artifacts"
    )

    # Read back through a fresh client on the same store.
    reader = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').as_posix()}")
    stored = reader.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.lr"] == "0.01"
    assert stored.data.metrics["test.auroc"] == 0.75
    assert {
        t.value for i in stored.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"
    } == {
        "train",
        "val",
        "test",
    }
    assert mlflow.pytorch.load_model(model_uri) is not None

    entry = reader.get_model_version("tiny-classifier", version)
    assert "candidate" in entry.aliases
    assert {k: entry.tags[k] for k in registry_tags()} == registry_tags()
    assert entry.tags["audit_status"] == "pending"
    assert entry.tags["metric.test.auroc"] == "0.75"

    with pytest.raises(InputError, match="audit_status must be 'passed'.*not 'pending'"):
        tracking.promote("tiny-classifier", version)
    tracking.set_audit_status("tiny-classifier", version, "passed", {"flags": 0})
    tracking.promote("tiny-classifier", version)
    champion = reader.get_model_version_by_alias("tiny-classifier", "champion")
    assert str(champion.version) == version
    assert champion.tags["audit.flags"] == "0"


def test_run_system_tags_are_neutral_not_os_user_script_or_git_remote(store):
    with tracking.start_run("medtl-test", "neutral", tags={"site_note": "/srv/pacs/export"}) as run:
        pass
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["mlflow.user"] == "medtl" != getpass.getuser()
    assert tags["mlflow.source.name"] == "medtl"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert not {"mlflow.source.git.branch", "mlflow.source.git.repoURL"} & set(tags)
    script = sys.argv[0]
    assert script and not any(script in value for value in tags.values())
    assert tags["site_note"] == tracking.REDACTED_PATH


def test_logging_outside_a_run_and_nested_runs_are_refused_with_a_clear_message(store):
    with pytest.raises(InputError, match="run must be active"):
        tracking.log_config({"a": 1})
    with tracking.start_run("medtl-test"):
        with pytest.raises(InputError, match="no MLflow run active"):
            with tracking.start_run("medtl-test"):
                pass


def test_sqlite_uri_from_environment_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    db = tmp_path / "team" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db.as_posix()}")
    tracking.tracking_uri()
    with tracking.start_run("medtl-test") as run:
        tracking.log_json({"a": 1}, "check/a.json")
    assert Path(mlflow.get_run(run.info.run_id).info.artifact_uri).is_relative_to(db.parent / "artifacts")
    assert not (tmp_path / "mlruns").exists()
