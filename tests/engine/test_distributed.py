"""Two gloo processes under torchrun (per-rank batch 4) train exactly like one process (batch 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.engine import run_toy
from tests.processes import REPO, torchrun

SCRIPT = Path(__file__).with_name("run_toy.py")


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    # The plan freezes the conv layer in epoch 0 and unfreezes it in epoch 1, so this also checks
    # that gradients of layers unfrozen mid-run are synchronised across ranks.
    common = ["--n-train", "32", "--epochs", "3", "--plan", "--dropout", "0"]
    cmd = [str(SCRIPT), "--out", str(tmp_path / "ddp"), "--ckpt", str(tmp_path / "ckpt"), "--batch-size", "4", *common]
    returncode, output = torchrun(cmd, cwd=REPO, timeout=180)
    assert returncode == 0, output[-4000:]

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
