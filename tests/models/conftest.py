"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run model tests on one intra-op thread.

    The test machine's two cores are shared: with two torch threads a busy neighbour makes each
    convolution wait for a descheduled thread (a 0.1 s DenseNet step took 8 s), one thread does not.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
