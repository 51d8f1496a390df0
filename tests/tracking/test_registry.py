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


def test_promote_refuses_an_inconclusive_audit_and_says_what_to_do(model_uri):
    version = tracking.register_model(model_uri, "reg-inconclusive", registry_tags())
    tracking.set_audit_status("reg-inconclusive", version, "inconclusive", {"evaluated_attributes": 0})
    client = mlflow.MlflowClient()
    entry = client.get_model_version("reg-inconclusive", version)
    assert entry.tags["audit_status"] == "inconclusive" and entry.tags["audit.evaluated_attributes"] == "0"
    with pytest.raises(InputError, match=r"not 'inconclusive'; .*decided no subgroup gap.*cannot be promoted") as err:
        tracking.promote("reg-inconclusive", version)
    advice = str(err.value)
    # What would make it evaluable: attributes unknown for every patient, and small groups.
    assert "unevaluated_attributes" in advice and "labels CSV" in advice and "DICOM headers" in advice
    assert "more test patients per group" in advice and "`medtl run` again" in advice
    assert "registry promote" not in advice and "set_audit_status" not in advice
    assert "champion" not in client.get_registered_model("reg-inconclusive").aliases
    # A champion whose audit is re-recorded as inconclusive loses the alias, as for a failed one.
    tracking.set_audit_status("reg-inconclusive", version, "passed")
    tracking.promote("reg-inconclusive", version)
    tracking.set_audit_status("reg-inconclusive", version, "inconclusive")
    assert "champion" not in client.get_registered_model("reg-inconclusive").aliases


def test_registry_statuses_are_the_audit_statuses_plus_pending():
    from medtl.tracking.registry import VERSION_AUDIT_STATUSES
    from medtl.vocabulary import AUDIT_STATUSES

    assert VERSION_AUDIT_STATUSES == ("pending", *AUDIT_STATUSES)


def test_promote_without_a_recorded_audit_never_advises_recording_a_pass_by_hand(model_uri):
    version = tracking.register_model(model_uri, "reg-no-audit", registry_tags())
    mlflow.MlflowClient().delete_model_version_tag("reg-no-audit", version, "audit_status")
    with pytest.raises(InputError, match=r"not missing; no bias audit was recorded for it") as err:
        tracking.promote("reg-no-audit", version)
    assert "set_audit_status" not in str(err.value) and "`medtl run`" in str(err.value)


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


def test_champion_audit_reads_the_champions_audit_json_and_refuses_what_is_not_one(store, tmp_path, caplog):
    from medtl.tracking.registry import champion_audit
    from medtl.tracking.run_records import log_json

    assert champion_audit("reg-never-registered") is None
    versions = {}
    for name, document in (("good", {"passed": True, "gaps": [{"attribute": "sex", "metric": "auroc", "value": 0.02}]}),
                           ("malformed", {"passed": True, "groups": []}), ("missing", None)):
        with tracking.start_run("medtl-test") as run:
            if document is not None:
                log_json(document, "audit.json")
            uri = tracking.log_torch_model(TinyNet(), (1, 8, 8))
        versions[name] = tracking.register_model(uri, "reg-reference", {**registry_tags(), "run_id": run.info.run_id})
    assert champion_audit("reg-reference") is None  # registered, but no champion yet
    for name in ("malformed", "missing"):
        tracking.set_audit_status("reg-reference", versions[name], "passed")
        tracking.promote("reg-reference", versions[name])
        with caplog.at_level("WARNING"):
            assert champion_audit("reg-reference") is None, name
        assert "bias amplification is not computed" in caplog.text
    tracking.set_audit_status("reg-reference", versions["good"], "passed")
    tracking.promote("reg-reference", versions["good"])
    version, document = champion_audit("reg-reference")
    assert version == versions["good"] and document["gaps"][0]["metric"] == "auroc"
