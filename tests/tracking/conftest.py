"""Fixtures for the tracking tests: a real SQLite MLflow store, a tiny network, a small manifest."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from medtl import tracking
from tests.tracking.helpers import TinyNet


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def manifest() -> pd.DataFrame:
    """Manifest-shaped rows with pseudonyms only (as medtl/data/manifest.py writes them)."""
    n = 6
    return pd.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(n)],
            "patient": [f"p{i // 2:03d}" for i in range(n)],
            "path": [f"alias:{i:08x}" for i in range(n)],
            "label": [0, 1, 0, 1, 0, 1],
            "sex": ["F", "M", "F", "M", "F", "M"],
            "split": ["train", "train", "val", "val", "test", "test"],
        }
    )


@pytest.fixture(scope="session")
def shared_store_uri(tmp_path_factory) -> str:
    """One SQLite store for the tracking tests: creating MLflow's tables costs 2-10 s each time.

    Tests that share it use their own registered-model names, so they do not see each other.
    """
    folder = tmp_path_factory.mktemp("store")
    return f"sqlite:///{(folder / 'mlflow.db').as_posix()}"


@pytest.fixture
def store(shared_store_uri) -> str:
    """Point medtl.tracking (and MLflow) at the shared store for this test."""
    return tracking.tracking_uri(shared_store_uri)
