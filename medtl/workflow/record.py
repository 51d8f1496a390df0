"""Step 4 of a run: what goes to MLflow and the registry, and the PHI checks around it.

Params come from `config_dict` (file and folder names only when generic); names, params and tags
are checked before anything is logged, the run is read back and scanned before training and after
it (`PHILeakError` names the field and how to fix it, never the value).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtl import __version__
from medtl.data.needles import looks_identifying
from medtl.errors import MedtlError
from medtl.tracking import phi_guard, registry, run_records
from medtl.tracking.values import flatten, safe_key, safe_text
from medtl.vocabulary import MEDTL_WORDS
from medtl.workflow.config import WorkflowConfig, to_dict
from medtl.workflow.methods import RegisteredWeights
from medtl.workflow.prepare import PreparedData
from medtl.workflow.steps import stop_if_interrupted
from medtl.workflow.train import TrainedModel

# What `config_dict` logs instead of a file or folder name that may identify someone.
WITHHELD_NAME = "(name withheld: not generic)"


def config_dict(cfg: WorkflowConfig) -> dict:
    """The config for logging: file and folder keys reduced to a generic name, or withheld.

    An absolute path never leaves; a name leaves only when every part of it is generic
    (`looks_identifying` is False: the allow-list of manifest paths, plus medtl's own words such
    as `manifest.csv` or `medtl.key`), else `WITHHELD_NAME` stands in: a PNG export folder
    `/data/garcia_maria_cxr` is logged as `(name withheld: not generic)`.
    """
    raw = to_dict(cfg)
    for section, keys in (("data", ("root", "labels", "manifest", "manifest_out", "key_file")),
                          ("continual", ("old_manifest", "old_root"))):
        for key in keys:
            if raw[section].get(key):
                raw[section][key] = name_to_log(raw[section][key])
    # A registry URI is no path, but "models:/" reads like one to the path redaction.
    raw["continual"]["from_model"] = raw["continual"]["from_model"].removeprefix("models:/")
    return raw


def name_to_log(path: str | Path) -> str:
    """The name of a file or folder as it may be logged: the name when generic, else `WITHHELD_NAME`.

    Example:
        >>> name_to_log("/data/garcia_maria_cxr"), name_to_log("/data/cxr/labels.csv")
        ('(name withheld: not generic)', 'labels.csv')
    """
    name = Path(path).name
    return WITHHELD_NAME if not name or looks_identifying(name, MEDTL_WORDS) else name


#: Run tag holding the audit's verdict ("passed", "failed" or "inconclusive"); the metric
#: `audit.passed` alone cannot tell a failed audit from one that measured nothing.
AUDIT_STATUS_TAG = "medtl.audit_status"


class PHILeakError(MedtlError):
    """Something identifying reached the MLflow run; the run is marked and the version withheld."""


def flat_metrics(evaluation: dict) -> dict[str, float]:
    flat = {}
    for split in ("val", "test"):
        flat.update(flat_estimates(split, evaluation.get(split, {})))
    return flat


def flat_estimates(prefix: str, estimates: dict) -> dict[str, float]:
    flat = {}
    for name, est in estimates.items():
        if isinstance(est, dict) and est.get("value") is not None and np.isfinite(est["value"]):
            flat[f"{prefix}.{name}"] = float(est["value"])
            if est.get("ci"):
                flat[f"{prefix}.{name}.ci_lo"], flat[f"{prefix}.{name}.ci_hi"] = map(float, est["ci"])
    return flat


def log_epoch(epoch: int, record: dict, logged: set[int]) -> None:
    run_records.log_epoch_metrics({k: v for k, v in record.items() if k != "epoch"}, epoch)
    logged.add(int(epoch))
    stop_if_interrupted()  # after the epoch's checkpoint: a resume continues with the next epoch


def log_earlier_epochs(history: Sequence[dict], logged: set[int]) -> None:
    """Epochs a resumed run did not train again (they are in its checkpoint): log them to this run too.

    Without this a run re-recorded with --resume after its last epoch would have no training curve.
    """
    for record in history:
        epoch = int(record.get("epoch", -1))
        if epoch >= 0 and epoch not in logged:
            log_epoch(epoch, record, logged)


def version_tags(cfg: WorkflowConfig, data: PreparedData, trained: TrainedModel, run_id: str,
                  registered: RegisteredWeights | None) -> dict[str, str]:
    bundle = trained.bundle
    tags = {
        "task": cfg.task, "encoder": cfg.model.encoder, "weights_origin": bundle.weights.origin,
        "weights_source": bundle.weights.source, "strategy": trained.strategy,
        "manifest_sha256": data.manifest_sha256, "run_id": run_id,
    }
    if cfg.adaptation.method != "none":
        tags["adaptation"] = f"{cfg.adaptation.method} to {cfg.adaptation.domain_column}={cfg.adaptation.target}"
    if cfg.multitask.enabled:
        # The logged model returns S segmentation maps then the K class logits repeated over space.
        tags["multitask"] = f"outputs {bundle.model.num_seg_classes} segmentation + {bundle.model.num_classes} class"
    if registered is not None:
        tags["continual_from"] = registered.reference
    return tags


def key_metrics(metrics: dict) -> dict[str, float]:
    return {f"{split}.{k}": v for split in ("test", "target_test", "old_test") for k, v in metrics.get(split, {}).items()
            if k in ("auroc", "auprc", "accuracy", "dice") and v is not None}


def code_version(environment: dict[str, str]) -> str:
    """"medtl 0.1.0, git 1a2b3c4" (with "+ local changes" when the checkout is dirty), or the version."""
    commit = environment.get("medtl.git_commit")
    if not commit:
        return f"medtl {__version__}"
    dirty = " + local changes" if environment.get("medtl.git_dirty") == "true" else ""
    return f"medtl {__version__}, git {commit[:12]}{dirty}"


def scan_before_logging(cfg: WorkflowConfig, params: dict, tags: dict[str, str], forbidden: dict[str, str],
                         roots: list[Path], *, run_name: str, model_name: str | None) -> None:
    """Check the experiment, run and model names, the tags and the params before MLflow stores any.

    The params are checked as `run_records.log_config` will log them (flattened, paths removed).

    Raises:
        PHILeakError: naming each field (never its value) and how to fix it; nothing was recorded.
    """
    groups: list[tuple[str, dict]] = [
        ("experiment", {"name": cfg.tracking.experiment}),
        ("run", {"name": run_name}),
        ("run tag", tags),
        ("run param", {safe_key(k): safe_text(v) for k, v in flatten(params).items()}),
    ]
    if model_name is not None:
        groups.append(("registered model", {"name": model_name}))
    findings = [finding for where, fields in groups
                for finding in phi_guard.scan_fields(fields, forbidden.keys(), roots, where=where)]
    if findings:
        raise PHILeakError(
            f"the names, tags and params of the MLflow run must hold no identifying value or data path, not "
            f"{len(findings)} finding(s): "
            + "; ".join(findings[:5]) + ". Nothing was recorded in MLflow and nothing was trained. "
            + _fixes(findings) + "; then run again"
        )


def scan_before_training(run_id: str, forbidden: dict[str, str], roots: list[Path]) -> None:
    """Scan what the run holds before training (names, params, tags, dataset input); stop on a finding."""
    findings = phi_guard.scan_run(run_id, forbidden.keys(), roots)
    if findings:
        raise PHILeakError(
            f"the MLflow run {run_id} must hold no identifying value or data path, not {len(findings)} finding(s): "
            + "; ".join(findings[:5]) + ". Nothing was trained. " + _fixes(findings)
            + f"; then run again. Delete run {run_id}, which holds the value: `mlflow runs delete --run-id "
            f"{run_id}` (then `mlflow gc` removes it for good)"
        )


def scan_files_or_raise(paths: list[Path], forbidden: dict[str, str], roots: list[Path], *, run_id: str,
                         name: str, version: str, output_dir: Path | None = None) -> None:
    findings = phi_guard.scan_files(paths, forbidden.keys(), roots)
    _raise_findings(findings, run_id, name=name, version=version, output_dir=output_dir)


def scan_or_raise(run_id: str, forbidden: dict[str, str], roots: list[Path], *, name: str, version: str,
                   output_dir: Path | None = None) -> None:
    _raise_findings(phi_guard.scan_run(run_id, forbidden.keys(), roots), run_id, name=name, version=version,
                    output_dir=output_dir)


def _raise_findings(findings: list[str], run_id: str, *, name: str, version: str,
                    output_dir: Path | None = None) -> None:
    """Stop a run whose MLflow record or report holds a finding, saying how to fix and record it again.

    `--resume` re-records a run without training only while its manifest is unchanged (checkpoints
    are tied to the manifest's SHA-256): it is offered when the fix is a name (a config key, a file
    or folder name, the user or a path), never when the fix is in the labels CSV.
    """
    if not findings:
        return
    if version:
        registry.set_audit_status(name, version, "failed", {"phi_findings": len(findings)})
    message = (f"the MLflow run {run_id} or its report must hold no identifying value or data path, not "
               f"{len(findings)} finding(s): " + "; ".join(findings[:5])
               + (f"; version {version} of {name} was marked failed" if version else "") + ". ")
    if output_dir is None:  # a study's run: nothing to resume
        raise PHILeakError(message + _fixes(findings) + "; then run again")
    if any(_fix(finding)[1] for finding in findings):
        again = ("; then run again (training starts over: a changed labels CSV changes the manifest, whose "
                 "checkpoints --resume would refuse): `medtl run <workflow> --output <the same output folder>`")
    else:
        again = ("; then re-record the run without training again: `medtl run <workflow> --resume --output <the "
                 "same output folder>`")
    raise PHILeakError(
        message + f"The results on disk are kept (metrics.json, predictions.csv, audit.json and checkpoints/ in "
        f"output folder '{output_dir.name}'); no report was kept. " + _fixes(findings) + again
        + f". Delete run {run_id}, which holds the value: `mlflow runs delete --run-id {run_id}`"
    )


# How to fix a finding, by where it is. Params are the flattened workflow config (config keys);
# data.* params hold only the name of the file or folder the key points to.
_FILE_KEYS = ("data.root", "data.labels", "data.manifest", "data.manifest_out", "data.key_file",
              "continual.old_manifest", "continual.old_root")


def _is_path_finding(finding: str) -> bool:
    kind = finding.rsplit(": ", 1)[-1]
    return kind in ("home directory", "OS user name") or kind.startswith("forbidden path")


def _fixes(findings: Sequence[str]) -> str:
    """One "how to fix" per kind of finding, naming the config key or field, never the value."""
    fixes = list(dict.fromkeys(_fix(finding)[0] for finding in findings))
    return "To fix: " + "; ".join(fixes)


def _fix(finding: str) -> tuple[str, bool]:
    """How to fix one finding, and whether that fix changes the labels CSV (hence the manifest)."""
    # Findings read "<where> '<key>': <kind>" or "<where> #<n> (...): <kind>" (phi_guard).
    head = finding.split(": ", 1)[0]
    where = re.split(r" '| #| \(", head, maxsplit=1)[0]
    key = head.split("'")[1] if head.count("'") >= 2 else ""
    if where == "run param" and key in _FILE_KEYS:
        return f"rename the file or folder that {key} points to (its name is recorded as param {key!r})", False
    if where == "run param" and key:
        return f"change config key {key!r}", False
    if where == "experiment":
        return "set tracking.experiment to a neutral name", False
    if where in ("run", "run tag") and key in ("name", "medtl.workflow"):
        return "set the workflow's name to a neutral one", False
    if where.startswith("run dataset input"):
        return "rename the manifest file (data.manifest / data.manifest_out)", False
    if where.startswith(("registered model", "model version")):
        return "set tracking.registered_model to a neutral name", False
    if ("artifact" in where or where == "file") and _is_path_finding(finding):
        return "a local path reached a file medtl wrote: report a medtl bug", False
    if "artifact" in where or where == "file":
        return ("remove identifying text from the labels CSV (class names, extra subgroup values); if there is "
                "none, report a medtl bug"), True
    return "remove the identifying value from that field; if medtl wrote it, report a medtl bug", False
