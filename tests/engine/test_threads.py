"""The engine picks its CPU thread count by measurement and lets the user pin it."""

import math

import pytest
import torch

from medtl.engine import runtime
from medtl.engine.config import TrainConfig
from medtl.engine.runtime import pick_cpu_threads
from medtl.errors import ConfigError


@pytest.mark.parametrize(
    ("seconds", "chosen"),
    [
        ({1: 1.0, 2: 0.5, 4: 0.45}, 2),  # 4 threads only 10 % faster than 2: not worth it
        ({1: 1.0, 2: 0.5, 4: 0.3}, 4),  # 4 threads clearly faster (by more than 20 %)
        ({1: 1.0, 2: 0.9, 4: 0.7}, 4),  # compared with the best so far, not with the previous count
        ({1: 1.0, 2: 5.0, 4: 9.0}, 1),  # contended cores: more threads are slower
    ],
)
def test_thread_probe_picks_the_count_clearly_faster_than_fewer_threads_and_applies_it(monkeypatch, seconds, chosen):
    probed = []

    def fake_probe(threads, reps, give_up_after):
        probed.append((threads, give_up_after))
        return seconds[threads]

    monkeypatch.setattr(runtime, "_probe_seconds", fake_probe)
    before = torch.get_num_threads()
    try:
        assert pick_cpu_threads(4, reps=2) == chosen
        assert torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(before)
    assert [threads for threads, _ in probed] == [1, 2, 4]  # one thread first: it bounds the others' time
    assert probed[1][1] == 4 * seconds[1]


def test_thread_probe_measures_nothing_with_one_core(monkeypatch):
    monkeypatch.setattr(runtime, "_probe_seconds", lambda *args, **kwargs: pytest.fail("probed one core"))
    before = torch.get_num_threads()
    try:
        assert pick_cpu_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_probe_times_the_workload_on_the_thread_count_it_is_given():
    before = torch.get_num_threads()
    try:
        seconds = runtime._probe_seconds(1, reps=2, give_up_after=math.inf)
        assert torch.get_num_threads() == 1 and 0 < seconds < 60
    finally:
        torch.set_num_threads(before)


def test_num_threads_must_be_positive():
    with pytest.raises(ConfigError):
        TrainConfig(num_threads=0)
