"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository; the test skips cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests that need real data skip without it)")
    return SHARED_DATA


@pytest.fixture
def fixed_key(tmp_path, monkeypatch) -> Path:
    """A project key of fixed bytes in $MEDTL_KEY_FILE: the patient-level split of demo data is fixed too."""
    key = tmp_path / "project.key"
    key.write_bytes(np.random.default_rng(0).bytes(32))
    key.chmod(0o600)
    monkeypatch.setenv("MEDTL_KEY_FILE", str(key))
    return key


@pytest.fixture(autouse=True)
def _isolated_medtl_config(tmp_path_factory, monkeypatch):
    """Keep keys, alias maps and MLflow stores of a test out of the user's real folders."""
    cfg = tmp_path_factory.mktemp("medtl-config")
    monkeypatch.setenv("MEDTL_CONFIG_DIR", str(cfg))
    monkeypatch.delenv("MEDTL_KEY_FILE", raising=False)
    # MLflow's set_tracking_uri/set_registry_uri write these into os.environ themselves; setting
    # them first makes monkeypatch restore (remove) them after the test, so no store leaks on.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield


def pytest_collection_modifyitems(config, items):
    """Test files holding a `slow` test run first, each file's tests kept together and in order.

    `make test` hands whole test files to parallel workers (pytest-xdist, loadfile); a slow file
    queued last would leave one worker running it alone at the end. Files stay whole so that
    their module fixtures are set up once.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order within each group
