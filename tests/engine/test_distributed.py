"""Two gloo processes under torchrun (per-rank batch 4) train exactly like one process (batch 8)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine import run_toy

SCRIPT = Path(__file__).with_name("run_toy.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    # The plan freezes the conv layer in epoch 0 and unfreezes it in epoch 1, so this also checks
    # that gradients of layers unfrozen mid-run are synchronised across ranks.
    common = ["--n-train", "32", "--epochs", "3", "--plan", "--dropout", "0"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(SCRIPT),
        "--out",
        str(tmp_path / "ddp"),
        "--ckpt",
        str(tmp_path / "ckpt"),
        "--batch-size",
        "4",
        *common,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # Own session, so a hung run can be killed with all its workers.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]

    run_toy.main(["--out", str(tmp_path / "single"), "--batch-size", "8", *common])

    ddp = json.loads((tmp_path / "ddp.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert len(ddp["history"]) == len(single["history"]) == 3
    for got, want in zip(ddp["history"], single["history"], strict=True):
        for key in ("train_loss", "val_loss", "accuracy", "lr_encoder", "lr_head"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    got_w = torch.load(tmp_path / "ddp.pt", weights_only=True)
    want_w = torch.load(tmp_path / "single.pt", weights_only=True)
    for key in want_w:
        torch.testing.assert_close(got_w[key], want_w[key], atol=1e-5, rtol=1e-5)
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # each rank's random streams kept
