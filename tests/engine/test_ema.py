"""The moving average of the weights (train.ema_decay): validated, selected, returned and resumed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from medtl.engine import TrainConfig, fit, load_checkpoint
from medtl.errors import ConfigError, InputError
from tests.engine.run_toy import ToyImages, toy_classifier

SHA = "cd" * 32
CFG = TrainConfig(epochs=3, batch_size=8, lr=0.05, num_workers=0, progress=False, amp="off", deterministic=True,
                  monitor="val_loss", mode="min", early_stopping_patience=None, ema_decay=0.9)


class Interrupt(Exception):
    """Stands for a crash after an epoch's checkpoint."""


def _fit(folder, cfg=CFG, **kwargs):
    torch.manual_seed(0)
    model = toy_classifier(dropout=0.2)
    result = fit(model, ToyImages(32, seed=1), ToyImages(8, seed=2), loss_fn=nn.CrossEntropyLoss(), cfg=cfg,
                 checkpoint_dir=folder, manifest_sha256=SHA, **kwargs)
    return model, result


def _val_loss(model: nn.Module) -> float:
    model.eval()
    data = ToyImages(8, seed=2)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = torch.stack([torch.as_tensor(data[i]["label"]) for i in range(len(data))])
    with torch.no_grad():
        return float(nn.CrossEntropyLoss()(model(images), labels))


def test_the_returned_weights_are_the_average_that_was_validated_not_the_raw_ones(tmp_path):
    averaged, result = _fit(tmp_path / "ema")
    raw, raw_result = _fit(tmp_path / "raw", dataclasses.replace(CFG, ema_decay=0.0))
    # The average changes neither the updates nor the training loss, only what is validated and kept.
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in raw_result.history]
    best = result.history[result.best_epoch]["val_loss"]
    assert _val_loss(averaged) == pytest.approx(best, abs=1e-6)
    assert best != raw_result.history[result.best_epoch]["val_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(averaged.state_dict().values(), raw.state_dict().values(),
                                                      strict=True))
    ckpt = load_checkpoint(tmp_path / "ema" / "last.pt", manifest_sha256=SHA)
    assert set(ckpt["ema"]) == set(ckpt["model"]) and "ema" not in load_checkpoint(
        tmp_path / "raw" / "last.pt", manifest_sha256=SHA)


def test_a_run_resumed_after_a_crash_continues_the_average_bit_for_bit(tmp_path):
    whole, _ = _fit(tmp_path / "whole")

    def crash(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(tmp_path / "split", on_epoch_end=crash)
    resumed, result = _fit(tmp_path / "split", resume=True)
    assert result.epochs_run == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resuming_with_an_average_from_a_checkpoint_without_one_is_refused(tmp_path):
    _fit(tmp_path, dataclasses.replace(CFG, ema_decay=0.0, epochs=1))
    with pytest.raises(InputError, match="moving average of the weights"):
        _fit(tmp_path, resume=True)


@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_a_decay_outside_0_to_1_is_refused(decay):
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=decay)
