"""Engine test fixtures: undo the process-wide switches `fit` flips."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """`fit` sets deterministic algorithms and thread counts for the whole process: put them back
    so tests elsewhere in the session run as they would alone."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)
