"""What a medtl run records: config, weight record, load report, manifest, metrics, environment.

Every function logs into the active run (see `medtl.tracking.start_run`) and sends only strings
that went through `medtl.tracking.values.safe_text`, so an absolute path never reaches MLflow.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.code_dataset_source import CodeDatasetSource

from medtl import __version__ as medtl_version
from medtl.errors import ConfigError, InputError
from medtl.tracking.store import NEUTRAL_TAGS, active_run, client
from medtl.tracking.values import MAX_TAG_LENGTH, flatten, redact_tree, safe_key, safe_text

WEIGHT_RECORD_KEYS = ("origin", "sha256", "licence")
SPLIT_ORDER = ("train", "val", "test")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def log_config(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Log a (nested) workflow config as flat dotted parameters.

    Values that look like absolute paths are logged as `<absolute path removed>`; lists are logged
    as JSON. MLflow parameters are immutable, so logging a key twice with another value fails.

    Args:
        config: The loaded workflow mapping (or a dataclass).
        prefix: Optional prefix for every key.

    Returns:
        The parameters exactly as logged.

    Raises:
        ConfigError: when a key looks like a path or collides with an already logged parameter.
        InputError: when no run is active.

    Example:
        >>> log_config({"train": {"lr": 1e-3}, "data": {"root": "/srv/scans"}})
        {'train.lr': '0.001', 'data.root': '<absolute path removed>'}
    """
    return _log_params({safe_key(k): safe_text(v) for k, v in flatten(config, prefix).items()})


def log_weights(record: Mapping[str, Any], load_report: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Log the pretrained-weight record and, if given, the checkpoint load report.

    The record becomes `weights.<field>` parameters. The load report is stored in full as the JSON
    artifact `weights/load_report.json`; its summary becomes `weights.load.<key>` parameters (the
    length of every list, e.g. `weights.load.n_missing`, and every scalar).

    Args:
        record: At least `origin`, `sha256` and `licence` (None allowed, e.g. for random init).
        load_report: Matched/missing/unexpected keys and similar, or None.

    Returns:
        The parameters exactly as logged.

    Raises:
        ConfigError: when a required record field is missing.
        InputError: when no run is active.
    """
    missing = [key for key in WEIGHT_RECORD_KEYS if key not in record]
    if missing:
        raise ConfigError(
            f"the weight record must have {', '.join(WEIGHT_RECORD_KEYS)}, not lack {', '.join(missing)}; "
            "pass the weight source's metadata (None for a field that does not apply)"
        )
    params = {safe_key(k): safe_text(v) for k, v in flatten(record, "weights").items()}
    if load_report is not None:
        for key, value in load_report.items():
            if isinstance(value, list | tuple | set | Mapping):
                params[safe_key(f"weights.load.n_{key}")] = str(len(value))
            elif value is None or isinstance(value, bool | int | float | str):
                params[safe_key(f"weights.load.{key}")] = safe_text(value)
    logged = _log_params(params)
    if load_report is not None:
        mlflow.log_dict(redact_tree(load_report), "weights/load_report.json")
    return logged


def log_manifest(
    manifest: pd.DataFrame,
    manifest_sha256: str,
    *,
    split_column: str = "split",
    name: str = "manifest",
) -> list[str]:
    """Log the manifest as one MLflow dataset input per split.

    Only the schema (column names and types), a row count and MLflow's short digest are stored,
    never the rows. The full manifest SHA-256 goes in the input's `sha256` tag because MLflow's
    digest is only a few hex characters. The dataset source is a neutral code source: left to
    itself, `mlflow.data.from_pandas` records the OS user and the script path.

    Args:
        manifest: The manifest table (columns as in medtl/data/manifest.py).
        manifest_sha256: SHA-256 (64 hex characters) of the manifest file.
        split_column: Column holding train/val/test.
        name: Dataset name prefix; each input is named `<name>-<split>`.

    Returns:
        The split names logged, in train/val/test order then others.

    Raises:
        InputError: when the split column is missing or has empty cells, the table is empty, the
            digest is not a SHA-256, or no run is active.
    """
    active_run()
    digest = str(manifest_sha256).strip().lower()
    if not _SHA256.fullmatch(digest):
        raise InputError(
            "manifest_sha256 must be 64 hexadecimal characters, not a value of length "
            f"{len(digest)}; pass the SHA-256 of the manifest file"
        )
    if split_column not in manifest.columns:
        raise InputError(
            f"the manifest must have a {split_column!r} column, not only {len(manifest.columns)} others; "
            "build it with medtl's manifest step or name the split column"
        )
    if manifest.empty:
        raise InputError("the manifest must have rows, not be empty; rebuild it from the studies")
    empty = int(manifest[split_column].isna().sum())
    if empty:
        raise InputError(
            f"column {split_column!r} must name a split for every row, not leave {empty} empty; "
            "re-run the split step"
        )
    splits = sorted(
        {str(s) for s in manifest[split_column]},
        key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s),
    )
    source = CodeDatasetSource(tags=dict(NEUTRAL_TAGS))
    for split in splits:
        rows = manifest[manifest[split_column].astype(str) == split]
        with warnings.catch_warnings():
            # Schema inference warns that integer columns cannot hold missing values (a hint for
            # model inputs, irrelevant for a record of the manifest).
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(rows, source=source, name=safe_text(f"{name}-{split}"))
            mlflow.log_input(dataset, context=split, tags={"sha256": digest, "rows": str(len(rows))})
    return splits


def log_epoch_metrics(metrics: Mapping[str, float], epoch: int) -> None:
    """Log one epoch's metrics with `step=epoch`.

    Args:
        metrics: Name -> value, e.g. `{"train.loss": 0.41, "val.auroc": 0.93}`; None values
            (not measured this epoch) are skipped.
        epoch: The epoch index (0-based or 1-based, as the engine counts).

    Raises:
        InputError: when a value is not a number or no run is active.
    """
    active_run()
    mlflow.log_metrics(_numbers(metrics), step=int(epoch))


def log_final_metrics(metrics: Mapping[str, float]) -> None:
    """Log end-of-training metrics (test set, selected threshold, ...) without a step.

    Args:
        metrics: Name -> value, e.g. `{"test.auroc": 0.95}`; None values are skipped.

    Raises:
        InputError: when a value is not a number or no run is active.
    """
    active_run()
    mlflow.log_metrics(_numbers(metrics))


def log_environment() -> dict[str, str]:
    """Record package versions and the medtl git commit as run tags.

    Tags: `medtl.version`, `medtl.git_commit` and `medtl.git_dirty` (when medtl runs from a git
    checkout; also mirrored to `mlflow.source.git.commit`), `env.python`, `env.torch`,
    `env.torch_cuda`, `env.monai`, `env.mlflow`, and `env.<package>` for timm, torchvision, pydicom
    and nibabel when installed. Tags, not parameters, so a resumed run can update them.

    Returns:
        The tags set.

    Raises:
        InputError: when no run is active.
    """
    active_run()
    tags = {"medtl.version": medtl_version, "env.python": platform.python_version()}
    for package in ("torch", "monai", "mlflow", "timm", "torchvision", "pydicom", "nibabel"):
        try:
            tags[f"env.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    import torch

    tags["env.torch_cuda"] = str(torch.version.cuda or "none")
    commit, dirty = _git_state(Path(__file__).resolve().parents[2])
    if commit:
        tags.update({"medtl.git_commit": commit, "medtl.git_dirty": str(dirty).lower()})
        tags["mlflow.source.git.commit"] = commit
    tags = {k: safe_text(v, max_length=MAX_TAG_LENGTH) for k, v in tags.items()}
    mlflow.set_tags(tags)
    return tags


def log_artifact(local_path: Path, artifact_dir: str | None = None) -> str:
    """Copy a file (report, predictions table, figure) into the active run's artifacts.

    Args:
        local_path: The file to store; only its name is kept.
        artifact_dir: Sub-folder inside the run's artifacts, e.g. "report".

    Returns:
        The artifact's path inside the run, e.g. "report/report.html".

    Raises:
        InputError: when the file does not exist, the folder looks like a path, or no run is active.
    """
    active_run()
    path = Path(local_path)
    if not path.is_file():
        raise InputError(
            f"the artifact must be an existing file, not a missing one named {path.name!r}; "
            "write it before logging"
        )
    if artifact_dir is not None and safe_text(artifact_dir) != artifact_dir:
        raise InputError(
            "artifact_dir must be a relative folder name, not an absolute path; use e.g. 'report'"
        )
    mlflow.log_artifact(str(path), artifact_path=artifact_dir)
    return f"{artifact_dir}/{path.name}" if artifact_dir else path.name


def log_json(payload: Mapping[str, Any], artifact_file: str) -> str:
    """Store a mapping as a JSON artifact, with path-like strings replaced.

    Args:
        payload: JSON-like data (audit summary, thresholds, ...).
        artifact_file: Path inside the run, e.g. "audit/summary.json".

    Returns:
        `artifact_file`.

    Raises:
        InputError: when `artifact_file` looks like an absolute path or no run is active.
    """
    active_run()
    if safe_text(artifact_file) != artifact_file:
        raise InputError(
            "artifact_file must be a relative name, not an absolute path; use e.g. 'audit/summary.json'"
        )
    mlflow.log_dict(redact_tree(payload), artifact_file)
    return artifact_file


def _log_params(params: dict[str, str]) -> dict[str, str]:
    run_id = active_run().info.run_id
    logged = client().get_run(run_id).data.params
    clashes = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if clashes:
        raise ConfigError(
            f"parameter {clashes[0]!r} must keep the value it was first logged with, not change; "
            "MLflow parameters are immutable, so rename the key or start a new run"
        )
    new = {k: v for k, v in params.items() if k not in logged}
    # log_batch caps a call at 100 parameters (mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH).
    items = list(new.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))
    return params


def _numbers(metrics: Mapping[str, float]) -> dict[str, float]:
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None:  # not measured this time (e.g. no validation epoch): nothing to record
            continue
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise InputError(
                f"metric {safe_key(str(key))!r} must be a number, not {type(value).__name__}; "
                "log scalars only"
            ) from err
        values[safe_key(str(key))] = number
    return values


def _git_state(folder: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the checkout medtl runs from, or (None, False) outside one.

    Only when `folder` is the top of the checkout: an installed medtl inside some other repository
    (a venv in a project folder) must not report that repository's commit.
    """
    git = shutil.which("git")
    if git is None:
        return None, False
    try:
        top = _run_git(git, folder, "rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != folder:
            return None, False
        commit = _run_git(git, folder, "rev-parse", "HEAD")
        status = _run_git(git, folder, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, bool(status)


def _run_git(git: str, folder: Path, *args: str) -> str | None:
    result = subprocess.run([git, *args], cwd=folder, capture_output=True, text=True, timeout=10, check=False)
    return result.stdout.strip() if result.returncode == 0 else None
