"""Registry versions, the candidate alias and the audit gate in front of champion."""

from __future__ import annotations

import mlflow
import pytest

from medtl import tracking
from medtl.errors import ConfigError, InputError
from tests.tracking.helpers import TinyNet, registry_tags


@pytest.fixture(scope="module")
def logged_model_uri(shared_store_uri) -> str:
    """One logged model for the module: each test registers it under its own name."""
    tracking.tracking_uri(shared_store_uri)
    with tracking.start_run("medtl-test"):
        return tracking.log_torch_model(TinyNet(), (1, 8, 8))


@pytest.fixture
def model_uri(store, logged_model_uri) -> str:
    return logged_model_uri


def test_registration_tags_the_version_pending_and_moves_candidate(model_uri):
    first = tracking.register_model(model_uri, "reg-candidate", registry_tags(), {"test.auroc": 0.875})
    second = tracking.register_model(model_uri, "reg-candidate", registry_tags())
    client = mlflow.MlflowClient()
    entry = client.get_model_version("reg-candidate", first)
    assert {k: entry.tags[k] for k in registry_tags()} == registry_tags()
    assert entry.tags["audit_status"] == "pending"
    assert entry.tags["metric.test.auroc"] == "0.875"
    assert str(client.get_model_version_by_alias("reg-candidate", "candidate").version) == second


def test_promote_needs_a_passed_audit_and_a_failed_audit_drops_champion(model_uri):
    version = tracking.register_model(model_uri, "reg-gate", registry_tags())
    client = mlflow.MlflowClient()
    client.delete_model_version_tag("reg-gate", version, "audit_status")
    with pytest.raises(InputError, match="not missing"):
        tracking.promote("reg-gate", version)
    tracking.set_audit_status("reg-gate", version, "failed", {"flags": 2})
    with pytest.raises(InputError, match="not 'failed'"):
        tracking.promote("reg-gate", version)
    assert "champion" not in client.get_registered_model("reg-gate").aliases

    tracking.set_audit_status("reg-gate", version, "passed", {"flags": 0})
    tracking.promote("reg-gate", version)
    assert str(client.get_model_version_by_alias("reg-gate", "champion").version) == version
    assert mlflow.pytorch.load_model("models:/reg-gate@champion") is not None

    tracking.set_audit_status("reg-gate", version, "failed", {"flags": 1})
    assert "champion" not in client.get_registered_model("reg-gate").aliases


def test_registration_without_documented_tags_or_with_audit_status_is_refused(model_uri):
    tags = registry_tags()
    del tags["manifest_sha256"]
    with pytest.raises(ConfigError, match="not lack manifest_sha256"):
        tracking.register_model(model_uri, "reg-refused", tags)
    with pytest.raises(ConfigError, match="must not set 'audit_status'"):
        tracking.register_model(model_uri, "reg-refused", {**registry_tags(), "audit_status": "passed"})


def test_unknown_version_or_status_is_refused(model_uri):
    version = tracking.register_model(model_uri, "reg-unknown", registry_tags())
    with pytest.raises(InputError, match="must exist in the registry"):
        tracking.promote("reg-unknown", "99")
    with pytest.raises(InputError, match="audit status must be one of"):
        tracking.set_audit_status("reg-unknown", version, "ok")
