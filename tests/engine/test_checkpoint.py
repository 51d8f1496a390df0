"""Checkpoints: contents, atomic writes, RNG round trip, manifest check, resuming a finished run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from medtl.engine import TrainConfig, fit, load_checkpoint
from medtl.engine.checkpoint import atomic_save, capture_rng, restore_rng
from medtl.errors import InputError
from tests.engine.run_toy import ToyImages, accuracy, toy_classifier

SHA = "ab" * 32
CFG = TrainConfig(
    epochs=2,
    batch_size=8,
    lr=0.05,
    num_workers=0,
    progress=False,
    amp="off",
    deterministic=True,
    monitor="accuracy",
    mode="max",
)


def _fit(folder, **kwargs):
    torch.manual_seed(0)
    model = toy_classifier(dropout=0.2)
    args = {
        "loss_fn": nn.CrossEntropyLoss(),
        "cfg": CFG,
        "val_metric_fn": accuracy,
        "checkpoint_dir": folder,
        "manifest_sha256": SHA,
        **kwargs,
    }
    return model, fit(model, ToyImages(32, seed=1), ToyImages(8, seed=2), **args)


def test_checkpoint_holds_everything_needed_to_resume(tmp_path):
    model, result = _fit(tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt", manifest_sha256=SHA)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config", "state"):
        assert key in ckpt, key
    assert ckpt["manifest_sha256"] == SHA and ckpt["world_size"] == 1
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    state = ckpt["state"]
    assert state["next_epoch"] == 2 and state["best_epoch"] == result.best_epoch
    assert state["best_metric"] == result.best_metric and len(state["history"]) == 2
    # Stepped once per batch: after 2 x 4 updates the cosine has reached its end (0), and each group
    # keeps the scale the schedule multiplies.
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.0] * len(groups)
    assert [g["lr_scale"] for g in groups] == [CFG.lr] * len(groups)
    assert ckpt["scheduler"]["t_initial"] == 2 * 4 - 4  # warm-up: 1 epoch of 4 updates
    assert ckpt["optimizer"]["state"]  # AdamW moments saved
    assert ckpt["config"]["seed"] == CFG.seed
    assert not list(tmp_path.glob(".*tmp*"))


def test_resuming_a_finished_run_trains_nothing_and_returns_the_same_result(tmp_path):
    first_model, first = _fit(tmp_path)
    calls = []
    model, again = _fit(tmp_path, resume=True, on_epoch_end=lambda e, r: calls.append(e))
    assert calls == []
    assert again.history == first.history and again.best_epoch == first.best_epoch
    for key, value in first_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_resume_refuses_checkpoint_of_another_manifest(tmp_path):
    _fit(tmp_path)
    with pytest.raises(InputError, match=r"must come from the current manifest .*resume=False"):
        _fit(tmp_path, resume=True, manifest_sha256="cd" * 32)


def test_resume_refuses_a_truncated_checkpoint(tmp_path):
    _fit(tmp_path)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="readable medtl checkpoint"):
        _fit(tmp_path, resume=True)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    _, result = _fit(tmp_path / "new", resume=True)
    assert result.epochs_run == 2


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    atomic_save({"rng": capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "x.pt"
    atomic_save({"a": 1}, target)
    atomic_save({"a": 2}, target)
    assert torch.load(target, weights_only=True) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
