"""Model registry: versions with audit tags, the `candidate` and `champion` aliases.

Aliases replace MLflow's deprecated stages. Every new version gets `candidate` and
`audit_status=pending`; only `promote` moves `champion`, and only to a version whose bias audit
passed (`set_audit_status(..., "passed", ...)`): not one whose audit failed, or was inconclusive
(it decided no subgroup gap, e.g. every group of a small test set was suppressed, or every
attribute was unknown). The statuses are `medtl.vocabulary.AUDIT_STATUSES` plus "pending".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from medtl.errors import ConfigError, InputError
from medtl.tracking.store import client
from medtl.tracking.values import MAX_TAG_LENGTH, safe_key, safe_text
from medtl.vocabulary import AUDIT_STATUSES

_log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
AUDIT_STATUS = "audit_status"
PENDING = "pending"
#: Version tag values: "pending" until the audit ran, then the audit's verdict (audit.json "status").
VERSION_AUDIT_STATUSES = (PENDING, *AUDIT_STATUSES)
REQUIRED_VERSION_TAGS = ("task", "encoder", "weights_origin", "strategy", "manifest_sha256")


def register_model(
    model_uri: str,
    name: str,
    tags: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> str:
    """Register a logged model as a new version, tag it and point `candidate` at it.

    Version tags: the given `tags` (at least task, encoder, weights_origin, strategy,
    manifest_sha256), `metric.<name>` for each key metric, and `audit_status=pending`.

    Args:
        model_uri: From `log_torch_model`, e.g. `models:/m-...`.
        name: Registered model name, e.g. the workflow's `tracking.registered_model`.
        tags: Version tags; values that look like absolute paths are replaced.
        metrics: Key metrics to copy onto the version, e.g. `{"test.auroc": 0.95}`.

    Returns:
        The new version number as a string.

    Raises:
        ConfigError: when a required tag is missing, `audit_status` is given, or the name is not
            a plain name.
    """
    _check_name(name)
    missing = [key for key in REQUIRED_VERSION_TAGS if key not in tags]
    if missing:
        raise ConfigError(
            f"registry tags must include {', '.join(REQUIRED_VERSION_TAGS)}, not lack {', '.join(missing)}; "
            "pass them from the run's config and weight record"
        )
    if AUDIT_STATUS in tags:
        raise ConfigError(
            f"registry tags must not set {AUDIT_STATUS!r}, not {AUDIT_STATUS}=...; "
            "it starts as 'pending' and only set_audit_status changes it"
        )
    version_tags = {safe_key(k): safe_text(v, max_length=MAX_TAG_LENGTH) for k, v in tags.items()}
    for key, value in (metrics or {}).items():
        version_tags[safe_key(f"metric.{key}")] = _metric_text(key, value)
    version_tags[AUDIT_STATUS] = PENDING
    version = mlflow.register_model(model_uri, name, tags=version_tags)
    client().set_registered_model_alias(name, CANDIDATE, version.version)
    return str(version.version)


def set_audit_status(
    name: str, version: str | int, status: str, summary: Mapping[str, Any] | None = None
) -> None:
    """Record the bias audit's verdict on a version (tags `audit_status` and `audit.<key>`).

    A version whose audit is not "passed" loses the `champion` alias if it held it.

    Args:
        name: Registered model name.
        version: Version number.
        status: "pending", "passed", "failed" or "inconclusive".
        summary: Short facts to keep with the verdict, e.g. `{"max_gap.sex.fnr": 0.04, "flags": 0}`.

    Raises:
        InputError: when the status is unknown or the version does not exist.
    """
    if status not in VERSION_AUDIT_STATUSES:
        raise InputError(
            f"audit status must be one of {', '.join(VERSION_AUDIT_STATUSES)}, not {safe_text(status)!r}; "
            "pass the audit's verdict"
        )
    current = get_model_version(name, version)
    mlflow_client = client()
    for key, value in (summary or {}).items():
        mlflow_client.set_model_version_tag(
            name, current.version, safe_key(f"audit.{key}"), safe_text(value, max_length=MAX_TAG_LENGTH)
        )
    mlflow_client.set_model_version_tag(name, current.version, AUDIT_STATUS, status)
    if status != "passed" and CHAMPION in (current.aliases or []):
        mlflow_client.delete_registered_model_alias(name, CHAMPION)
        _log.warning(
            "model %s version %s lost the %r alias: its audit status is now %r",
            name,
            current.version,
            CHAMPION,
            status,
        )


def promote(name: str, version: str | int) -> None:
    """Point the `champion` alias at a version whose bias audit passed.

    Args:
        name: Registered model name.
        version: Version number.

    Raises:
        InputError: when the version does not exist or its `audit_status` is not "passed"
            (missing, pending, failed or inconclusive); the message says what to do.

    Example:
        >>> set_audit_status("classify_2d", "3", "passed", {"flags": 0})
        >>> promote("classify_2d", "3")  # models:/classify_2d@champion
    """
    current = get_model_version(name, version)
    status = current.tags.get(AUDIT_STATUS)
    if status != "passed":
        shown = "missing" if status is None else repr(safe_text(status))
        raise InputError(
            f"model {name!r} version {current.version} audit_status must be 'passed' to promote, "
            f"not {shown}; {_PROMOTE_ADVICE.get(status or '', _PROMOTE_ADVICE['missing'])}"
        )
    client().set_registered_model_alias(name, CHAMPION, current.version)


_PROMOTE_ADVICE = {
    "failed": "its bias audit flagged subgroup gaps beyond tolerance (see the run's report.html and audit.json), "
              "so this version cannot be promoted; fix the model or data, run `medtl run` again, and promote "
              "the new version once its audit passed",
    "inconclusive": "its bias audit decided no subgroup gap (none was shown within tolerance or beyond it), so it "
                    "checked nothing and this version cannot be promoted; audit.json unevaluated_attributes says "
                    "why for each attribute and what would make it evaluable: provide attributes that are "
                    "unknown for every patient (sex, age, site or scanner columns in the labels CSV, or DICOM "
                    "headers that carry them), or more test patients per group (or a lower "
                    "audit.min_group_size if that is acceptable); then run `medtl run` again and promote the "
                    "new version once its audit passed",
    PENDING: "its bias audit has not finished; wait for the run to end, or run it again if it stopped",
    "missing": "no bias audit was recorded for it, so it cannot be promoted; register models through `medtl run`, "
               "which audits them, and promote a version whose audit passed",
}


def champion_audit(name: str) -> tuple[str, dict[str, Any]] | None:
    """The `champion` version of a registered model and its run's parsed `audit.json`.

    Used as the reference of a bias-amplification comparison: the new model's gaps against those
    of the model it would replace.

    Args:
        name: Registered model name.

    Returns:
        (version, audit document), or None when the model has no champion (or is not registered
        yet), or the champion's run holds no audit.json (a warning says so).

    Raises:
        ConfigError: when the name is not a plain name.
    """
    import json
    import tempfile

    _check_name(name)
    try:
        version = client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    run_id = version.tags.get("run_id") or version.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="audit.json", dst_path=tmp)
            with open(local, encoding="utf-8") as handle:
                document = json.load(handle)
        except (MlflowException, OSError, ValueError) as err:
            _log.warning("model %s version %s (champion) has no readable audit.json in its run (%s); "
                         "bias amplification is not computed", name, version.version, type(err).__name__)
            return None
    gaps = document.get("gaps") if isinstance(document, dict) else None
    if not isinstance(gaps, list) or not all(isinstance(g, dict) and {"attribute", "metric"} <= set(g) for g in gaps):
        _log.warning("model %s version %s (champion) has an audit.json without a medtl 'gaps' list; "
                     "bias amplification is not computed", name, version.version)
        return None
    return str(version.version), document


def resolve_model_uri(uri: str, *, what: str = "model URI") -> tuple[str, ModelVersion | None]:
    """The model a `models:/` URI names, as MLflow resolves it.

    MLflow parses the URI and resolves `models:/<name>@<alias>`, `models:/<name>/<version>`,
    `models:/<name>/latest` and a logged model's `models:/<model id>`
    (`ModelsArtifactRepository`); the reference names the version it resolved to, so loading it
    later gives these weights even when the alias has moved on meanwhile.

    Args:
        uri: A models:/ URI, e.g. `models:/classify_2d@champion`.
        what: What the URI is, for the error message, e.g. "config key 'continual.from_model'".

    Returns:
        `("<name>/<version>", that version with its tags)` for a registered version, or
        `("<model id>", None)` for a logged model.

    Raises:
        InputError: naming the URI and MLflow's reason (not a models:/ URI, unknown model, alias
            or version).

    Example:
        >>> resolve_model_uri("models:/classify_2d@champion")  # doctest: +SKIP
        ('classify_2d/3', <ModelVersion: name='classify_2d', version='3', ...>)
    """
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    client()  # MLflow resolves through the registry of medtl's tracking store
    try:
        resolved = ModelsArtifactRepository(uri)
    except MlflowException as err:
        reason = err.message.split(". ")[0].strip().rstrip(".")[:200]  # MLflow's first sentence names the problem
        raise InputError(
            f"{what} must name a registered version or a logged model, not {uri!r} ({reason}); use "
            "models:/<name>@<alias>, models:/<name>/<version> or models:/<model id> and check the name, alias "
            "or version in the MLflow UI"
        ) from err
    if resolved.is_logged_model_uri:
        return uri.removeprefix("models:/"), None
    version = get_model_version(resolved.model_name, resolved.model_version)
    return f"{version.name}/{version.version}", version


def get_model_version(name: str, version: str | int) -> ModelVersion:
    """The registry entry of one version (with its tags and aliases).

    Raises:
        ConfigError: when the name is not a plain name.
        InputError: when the version does not exist.
    """
    _check_name(name)
    try:
        return client().get_model_version(name, str(version))
    except MlflowException as err:
        raise InputError(
            f"model {name!r} version {safe_text(version)!r} must exist in the registry, not be "
            f"unknown; check the name and version in the MLflow UI ({err.error_code})"
        ) from err


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or safe_text(name) != name:
        raise ConfigError(
            "tracking.registered_model must be a plain name such as 'classify_2d', not empty or a path; "
            "set it in the workflow"
        )


def _metric_text(key: str, value: float) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"registry metric {safe_key(str(key))!r} must be a number, not {type(value).__name__}; "
            "pass final metrics only"
        ) from err
    return "nan" if math.isnan(number) else f"{number:.6g}"
