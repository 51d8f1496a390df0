"""A run killed with SIGKILL mid-epoch and resumed ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.engine import run_toy

SCRIPT = Path(__file__).with_name("run_toy.py")
REPO = Path(__file__).resolve().parents[2]
RUN = ["--epochs", "3", "--dropout", "0.3"]  # dropout: the resumed run must also restore RNG streams


def _start(log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, str(SCRIPT), *RUN, *args], cwd=REPO, env=env, stderr=handle)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    marker, ckpt, log = tmp_path / "marker", tmp_path / "ckpt_killed", tmp_path / "stderr.txt"
    out = ["--out", str(tmp_path / "resumed"), "--ckpt", str(ckpt)]
    # 64 samples / batch 8 = 8 steps an epoch: step 11 is in the middle of epoch 2 (index 1).
    killed = _start(log, *out, "--kill-after", "11", "--marker", str(marker))
    try:
        # The uninterrupted reference runs in this process while the other starts up; one thread,
        # like the subprocess, so float reductions happen in the same order.
        torch.set_num_threads(1)
        run_toy.main([*RUN, "--out", str(tmp_path / "reference"), "--ckpt", str(tmp_path / "ckpt_reference")])
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert killed.poll() is None, f"the run ended before the kill point: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
    finally:
        if killed.poll() is None:
            os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    assert saved["state"]["next_epoch"] == 1  # only epoch 0 was complete when the process died

    resumed_run = _start(log, *out, "--resume")
    try:
        assert resumed_run.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if resumed_run.poll() is None:
            os.kill(resumed_run.pid, signal.SIGKILL)
            resumed_run.wait()

    resumed = json.loads((tmp_path / "resumed.json").read_text())
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert [r["epoch"] for r in resumed["history"]] == [0, 1, 2]
    assert resumed["best_epoch"] == expected["best_epoch"]
    for got, want in zip(resumed["history"], expected["history"], strict=True):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    got_w = torch.load(tmp_path / "resumed.pt", weights_only=True)
    want_w = torch.load(tmp_path / "reference.pt", weights_only=True)
    for key in want_w:
        torch.testing.assert_close(got_w[key], want_w[key], atol=1e-6, rtol=0)
