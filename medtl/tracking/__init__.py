"""MLflow records for medtl: runs, logged models, the registry and the PHI guard.

Imports no other medtl layer (only the leaf modules `medtl.errors` and `medtl.vocabulary`); every
function takes plain values (mappings, DataFrames, torch modules, paths). See docs/tracking.md.
"""

import os

# MLflow 3 sends anonymous usage events to its maintainers unless told not to; a hospital research
# tool stays off the network by default (MLFLOW_DISABLE_TELEMETRY=false opts back in). Set before
# mlflow is imported, because its telemetry client starts at import time.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from medtl.tracking.phi_guard import scan_fields, scan_registered_version, scan_run  # noqa: E402
from medtl.tracking.registry import (  # noqa: E402
    AUDIT_STATUS,
    CANDIDATE,
    CHAMPION,
    REQUIRED_VERSION_TAGS,
    get_model_version,
    promote,
    register_model,
    set_audit_status,
)
from medtl.tracking.run_records import (  # noqa: E402
    log_artifact,
    log_config,
    log_environment,
    log_epoch_metrics,
    log_final_metrics,
    log_json,
    log_manifest,
    log_weights,
)
from medtl.tracking.store import NEUTRAL_TAGS, client, start_run, tracking_uri  # noqa: E402
from medtl.tracking.torch_model import log_torch_model  # noqa: E402
from medtl.tracking.values import REDACTED_PATH  # noqa: E402

__all__ = [
    "AUDIT_STATUS",
    "CANDIDATE",
    "CHAMPION",
    "NEUTRAL_TAGS",
    "REDACTED_PATH",
    "REQUIRED_VERSION_TAGS",
    "client",
    "get_model_version",
    "log_artifact",
    "log_config",
    "log_environment",
    "log_epoch_metrics",
    "log_final_metrics",
    "log_json",
    "log_manifest",
    "log_torch_model",
    "log_weights",
    "promote",
    "register_model",
    "scan_fields",
    "scan_registered_version",
    "scan_run",
    "set_audit_status",
    "start_run",
    "tracking_uri",
]
