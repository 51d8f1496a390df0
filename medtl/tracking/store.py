"""Where runs go (an embedded SQLite store or the user's server) and how a run is opened.

The embedded default keeps everything under `./mlruns/` of the working directory: the SQLite
database `./mlruns/mlflow.db` and artifacts under `./mlruns/artifacts/<experiment>`. No server is
needed. `MLFLOW_TRACKING_URI` (for example an `mlflow server` backed by PostgreSQL and an object
store) is used unchanged when set.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.entities import LifecycleStage, Run
from mlflow.exceptions import MlflowException

from medtl.errors import ConfigError, InputError
from medtl.tracking.values import MAX_TAG_LENGTH, safe_key, safe_text

EMBEDDED_DIR = "mlruns"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "artifacts"

# MLflow's context providers fill these from the OS user, `sys.argv[0]` and the git checkout
# (mlflow/tracking/context/default_context.py, git_context.py): a user name and a local path.
# medtl writes fixed values instead and never lets the providers run (see `start_run`).
NEUTRAL_TAGS: dict[str, str] = {
    "mlflow.user": "medtl",
    "mlflow.source.name": "medtl",
    "mlflow.source.type": "LOCAL",
}

_current_uri: str | None = None
_current_registry: str | None = None
_echoes: set[str] = set()  # every URI medtl handed to MLflow in this process


def tracking_uri(explicit: str | None = None) -> str:
    """Resolve the tracking URI, make it MLflow's current one, and return it.

    Order: `explicit`, then `MLFLOW_TRACKING_URI`, then the embedded store under `./mlruns/`.
    The model registry uses the same URI unless the user set `MLFLOW_REGISTRY_URI`. MLflow exports
    the chosen URI as `MLFLOW_TRACKING_URI`, so later calls without `explicit` (and subprocesses)
    keep using it.

    Args:
        explicit: A tracking URI from the workflow configuration, or None.

    Returns:
        The URI now in use, e.g. `sqlite:////work/project/mlruns/mlflow.db` or `http://host:5000`.

    Example:
        >>> uri = tracking_uri()  # ./mlruns/mlflow.db when MLFLOW_TRACKING_URI is unset
    """
    global _current_uri, _current_registry
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        folder = Path.cwd() / EMBEDDED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / EMBEDDED_ARTIFACTS).mkdir(exist_ok=True)
        uri = f"sqlite:///{(folder / EMBEDDED_DB).as_posix()}"
    # MLflow exports both URIs to the environment (for subprocesses such as torchrun workers), so
    # an MLFLOW_REGISTRY_URI equal to any URI medtl set earlier in this process is our own echo,
    # not the user's choice: following it would register models in a store chosen before.
    registry = os.environ.get("MLFLOW_REGISTRY_URI")
    if not registry or registry in _echoes:
        registry = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    _current_uri, _current_registry = uri, registry
    _echoes.add(uri)  # a user's MLFLOW_REGISTRY_URI is not an echo: it stays followed
    return uri


def client() -> mlflow.MlflowClient:
    """An `MlflowClient` on the resolved URI (resolving the default first if nothing was chosen)."""
    if _current_uri is None:
        tracking_uri()
    return mlflow.MlflowClient()


def local_artifact_root(uri: str) -> Path | None:
    """The artifact folder medtl uses beside a SQLite database, or None for other stores.

    With a SQLite store MLflow would otherwise put artifacts under `./mlruns` of whatever folder the
    process runs in, so medtl pins them next to the database: `<db folder>/artifacts`.

    Args:
        uri: A tracking URI.

    Returns:
        The folder for `sqlite:///...` file databases; None for servers, PostgreSQL, in-memory DBs.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return Path(db).absolute().parent / EMBEDDED_ARTIFACTS


def get_or_create_experiment(name: str) -> str:
    """Return the id of the named experiment, creating it (with a pinned artifact folder) if needed.

    Args:
        name: Experiment name, e.g. the workflow's `tracking.experiment`.

    Returns:
        The experiment id.

    Raises:
        ConfigError: when the name is empty or looks like a path.
        InputError: when the experiment exists but is deleted.
    """
    if not name or not name.strip() or safe_text(name) != name:
        raise ConfigError(
            "tracking.experiment must be a plain name such as 'medtl', not empty or a path; "
            "set tracking.experiment in the workflow"
        )
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        root = local_artifact_root(mlflow.get_tracking_uri())
        location = None
        if root is not None:
            location = str(root / (re.sub(r"[^\w.-]", "_", name) or "experiment"))
        try:
            return mlflow_client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another process may have created it between the lookup and the insert.
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == LifecycleStage.DELETED:
        raise InputError(
            f"experiment {name!r} must be active, not deleted; restore it with "
            "`mlflow experiments restore` or choose another tracking.experiment"
        )
    return experiment.experiment_id


@contextlib.contextmanager
def start_run(
    experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[Run]:
    """Open an MLflow run with neutral system tags and make it the active run.

    The run is created through `MlflowClient.create_run`, which, unlike `mlflow.start_run`, does
    not consult MLflow's context providers: no OS user, script path, git branch or remote URL is
    recorded. The run ends FINISHED, or FAILED when the block raises.

    Args:
        experiment: Experiment name (created on first use).
        run_name: Display name; MLflow picks a random one when None.
        tags: Extra run tags; values that look like absolute paths are replaced.

    Yields:
        The active `mlflow.entities.Run`.

    Raises:
        ConfigError: when the experiment name is empty or looks like a path.
        InputError: when another run is already active or the experiment is deleted.

    Example:
        >>> with start_run("medtl", "classify_2d") as run:
        ...     log_config({"train": {"lr": 1e-3}})
    """
    if mlflow.active_run() is not None:
        raise InputError(
            "start_run must be called with no MLflow run active, not inside another run; "
            "finish the current `with start_run(...)` block first"
        )
    experiment_id = get_or_create_experiment(experiment)
    all_tags = {safe_key(k): safe_text(v, max_length=MAX_TAG_LENGTH) for k, v in (tags or {}).items()}
    all_tags.update(NEUTRAL_TAGS)
    name = safe_text(run_name) if run_name else None
    created = client().create_run(experiment_id, tags=all_tags, run_name=name)
    with mlflow.start_run(run_id=created.info.run_id, log_system_metrics=False) as run:
        yield run


def active_run() -> Run:
    """The active run, or a clear error when logging is attempted outside `start_run`.

    Raises:
        InputError: when no run is active.
    """
    run = mlflow.active_run()
    if run is None:
        raise InputError(
            "an MLflow run must be active, not none; call this inside "
            "`with medtl.tracking.start_run(experiment, run_name):`"
        )
    return run
