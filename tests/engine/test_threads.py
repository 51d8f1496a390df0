"""The engine picks its CPU thread count by measurement and lets the user pin it."""

import pytest
import torch

from medtl.engine.config import TrainConfig
from medtl.engine.runtime import pick_cpu_threads
from medtl.errors import ConfigError


def test_thread_probe_returns_a_count_within_the_cores_and_applies_it():
    before = torch.get_num_threads()
    try:
        chosen = pick_cpu_threads(2, reps=2)
        assert 1 <= chosen <= 2
        assert torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)


def test_num_threads_must_be_positive():
    with pytest.raises(ConfigError):
        TrainConfig(num_threads=0)
