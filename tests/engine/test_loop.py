"""The training loop on toy problems: it learns, stops early, keeps the best weights, reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from medtl.engine import TrainConfig, fit
from medtl.errors import ConfigError, InputError
from tests.engine.run_toy import ToyImages, ToyPlan, accuracy, toy_classifier

FAST = {"num_workers": 0, "progress": False, "amp": "off", "deterministic": True}


class ToySquares(Dataset):
    """A bright square on noise; the mask marks the square (labels shaped 1 x spatial, as MONAI)."""

    def __init__(self, n: int, size: int, spatial_dims: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        shape = (size,) * spatial_dims
        self.images, self.masks = [], []
        for _ in range(n):
            mask = torch.zeros(shape)
            corner = torch.randint(0, size - size // 2, (spatial_dims,), generator=gen).tolist()
            mask[tuple(slice(c, c + size // 2) for c in corner)] = 1
            self.images.append((mask + 0.3 * torch.randn(shape, generator=gen))[None])
            self.masks.append(mask[None])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.masks[i]}


def toy_segmenter(spatial_dims: int) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 8, 3, padding=1), nn.ReLU(), conv(8, 2, 1))


def dice_metric(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    from monai.metrics import compute_dice

    pred = outputs.argmax(1, keepdim=True)
    onehot = torch.cat([pred == 0, pred == 1], 1).float()
    truth = torch.cat([targets == 0, targets == 1], 1).float()
    return {"dice": compute_dice(onehot, truth, include_background=False).nanmean().item()}


def test_fit_learns_separable_classification_and_reports_history():
    torch.manual_seed(0)
    model = toy_classifier()
    seen = []
    cfg = TrainConfig(
        epochs=4, batch_size=8, lr=0.05, warmup_epochs=0.5, monitor="accuracy", mode="max", **FAST
    )
    result = fit(
        model,
        ToyImages(64, seed=1),
        ToyImages(32, seed=2),
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        val_metric_fn=accuracy,
        on_epoch_end=lambda epoch, rec: seen.append((epoch, rec)),
    )
    assert result.best_metric >= 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert [epoch for epoch, _ in seen] == [0, 1, 2, 3] == [r["epoch"] for r in result.history]
    for key in ("train_loss", "val_loss", "accuracy", "lr", "epoch_seconds", "samples_per_s"):
        assert key in result.history[0]
    assert result.history[0]["samples_per_s"] > 0
    assert 0 < result.time_to_best_seconds <= result.total_train_seconds
    assert result.epochs_run == 4 and not result.stopped_early and result.best_checkpoint is None


@pytest.mark.slow
def test_fit_learns_toy_segmentation_2d_with_monai_loss():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = toy_segmenter(2)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=0.02, warmup_epochs=0.5, monitor="dice", mode="max", **FAST)
    result = fit(
        model,
        ToySquares(32, 16, 2, seed=1),
        ToySquares(8, 16, 2, seed=2),
        loss_fn=DiceCELoss(to_onehot_y=True, softmax=True),
        cfg=cfg,
        val_metric_fn=dice_metric,
    )
    assert result.best_metric > 0.85, result.history


def test_fit_validates_3d_volumes_by_sliding_window_and_learns():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = toy_segmenter(3)
    cfg = TrainConfig(
        epochs=4,
        batch_size=4,
        lr=0.02,
        warmup_epochs=0.5,
        monitor="dice",
        mode="max",
        val_roi_size=[8, 8, 8],
        sw_batch_size=2,
        **FAST,
    )
    # Training patches are 8^3, validation volumes 12^3: only sliding windows fit them to the model's patch.
    result = fit(
        model,
        ToySquares(16, 8, 3, seed=1),
        ToySquares(3, 12, 3, seed=2),
        loss_fn=DiceCELoss(to_onehot_y=True, softmax=True),
        cfg=cfg,
        val_metric_fn=dice_metric,
    )
    assert result.best_metric > 0.7, result.history


@pytest.mark.parametrize("use_folder", [False, True])
def test_early_stopping_stops_after_patience_and_restores_best_weights(tmp_path, use_folder):
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95, 0.99])
    snapshots = {}

    def scripted_metric(outputs, targets):
        return {"score": next(scores)}

    def snapshot(epoch, record):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    model = toy_classifier()
    cfg = TrainConfig(
        epochs=6, batch_size=8, lr=0.05, monitor="score", mode="max", early_stopping_patience=2, **FAST
    )
    result = fit(
        model,
        ToyImages(32, seed=1),
        ToyImages(8, seed=2),
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        val_metric_fn=scripted_metric,
        on_epoch_end=snapshot,
        checkpoint_dir=tmp_path / "ckpt" if use_folder else None,
    )
    assert result.stopped_early and result.epochs_run == 4
    assert (result.best_epoch, result.best_metric) == (1, 0.9)
    assert not torch.equal(snapshots[1]["0.weight"], snapshots[3]["0.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key
    if use_folder:
        assert result.best_checkpoint is not None and result.best_checkpoint.name == "best-epoch001.pt"
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best-epoch001.pt", "last.pt"]


def test_min_mode_treats_lower_val_loss_as_better():
    torch.manual_seed(0)
    model = toy_classifier()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, early_stopping_patience=None, **FAST)
    result = fit(model, ToyImages(32, seed=1), ToyImages(16, seed=2), loss_fn=nn.CrossEntropyLoss(), cfg=cfg)
    losses = [r["val_loss"] for r in result.history]
    assert result.monitor == "val_loss" and result.best_metric == min(losses)
    assert result.best_epoch == losses.index(min(losses))


def test_plan_groups_and_epoch_hook_drive_freezing_and_learning_rates():
    torch.manual_seed(0)
    model = toy_classifier()
    conv_before = model[0].weight.detach().clone()
    frozen_after_epoch0 = []
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0, scheduler="constant", **FAST)
    fit(
        model,
        ToyImages(32, seed=1),
        ToyImages(8, seed=2),
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        plan=ToyPlan(model),
        on_epoch_end=lambda e, rec: frozen_after_epoch0.append(
            (torch.equal(model[0].weight, conv_before), rec["lr_encoder"], rec["lr_head"])
        ),
    )
    assert frozen_after_epoch0[0] == (True, 0.02, 0.05)  # linear probe: conv untouched in epoch 0
    assert frozen_after_epoch0[1][0] is False  # fine-tuned from epoch 1


class RecordingImages(ToyImages):
    """ToyImages that remember the label of every sample the training loader fetches."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fetched: list[int] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched.append(int(self.labels[i]))
        return super().__getitem__(i)


def test_balanced_sampler_and_bf16_autocast_run_end_to_end():
    torch.manual_seed(0)
    model = toy_classifier()
    dtypes = []
    model[5].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    train = RecordingImages(40, seed=1, classes=(0, 0, 0, 1))  # 10 of 40 in class 1
    cfg = TrainConfig(
        epochs=2,
        batch_size=8,
        lr=0.05,
        balance="sampler",
        monitor="accuracy",
        mode="max",
        **{**FAST, "amp": "bf16"},
    )
    result = fit(model, train, ToyImages(16, seed=2), cfg=cfg, loss_fn=nn.CrossEntropyLoss(), val_metric_fn=accuracy)
    assert result.epochs_run == 2 and torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    # Drawn with replacement, class-balanced: about half the draws are class 1 (exactly 1/4 unbalanced).
    assert len(train.fetched) == 2 * 40
    assert 0.4 <= sum(train.fetched) / len(train.fetched) <= 0.6
    # Autocast ran the layers in bf16 (training and validation), the weights stayed fp32.
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert model[5].weight.dtype == torch.float32


def test_nan_monitor_is_no_information_never_best_and_never_a_reason_to_stop():
    nan = float("nan")
    scores = iter([nan, 0.5, nan, nan, nan, 0.4, nan, 0.3])

    def scripted_metric(outputs, targets):
        return {"score": next(scores)}

    torch.manual_seed(0)
    cfg = TrainConfig(
        epochs=9, batch_size=8, lr=0.05, monitor="score", mode="max", early_stopping_patience=2, **FAST
    )
    result = fit(
        toy_classifier(),
        ToyImages(16, seed=1),
        ToyImages(8, seed=2),
        loss_fn=nn.CrossEntropyLoss(),
        cfg=cfg,
        val_metric_fn=scripted_metric,
    )
    # Three NaN epochs in a row after the best one do not stop a run with patience 2; the two worse
    # finite epochs (0.4, 0.3) do, after the epoch of the second one (of 9).
    assert (result.best_epoch, result.best_metric) == (1, 0.5)
    assert result.stopped_early and result.epochs_run == 8


def test_a_monitor_that_is_always_nan_keeps_the_last_weights_and_runs_every_epoch():
    torch.manual_seed(0)
    model = toy_classifier()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, monitor="score", mode="max", early_stopping_patience=1, **FAST)
    with pytest.warns(UserWarning, match="score was never finite"):
        result = fit(model, ToyImages(16, seed=1), ToyImages(8, seed=2), loss_fn=nn.CrossEntropyLoss(), cfg=cfg,
                     val_metric_fn=lambda outputs, targets: {"score": float("nan")})
    assert result.epochs_run == 3 and not result.stopped_early and result.best_epoch == -1


def test_unknown_monitor_and_empty_datasets_are_refused():
    cfg = TrainConfig(epochs=1, batch_size=8, monitor="auroc", **FAST)
    with pytest.raises(ConfigError, match="train.monitor must be one of"):
        fit(
            toy_classifier(),
            ToyImages(16, seed=1),
            ToyImages(8, seed=2),
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
            val_metric_fn=accuracy,
        )
    with pytest.raises(InputError, match="val dataset must hold"):
        fit(
            toy_classifier(),
            ToyImages(16, seed=1),
            ToyImages(0, seed=2),
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
        )
    with pytest.raises(ConfigError, match="checkpoint_dir must be set"):
        fit(
            toy_classifier(),
            ToyImages(16, seed=1),
            ToyImages(8, seed=2),
            loss_fn=nn.CrossEntropyLoss(),
            cfg=cfg,
            resume=True,
        )


@pytest.mark.parametrize("workers", [0, 1])
def test_monai_random_transforms_are_reseeded_per_epoch_for_resumable_augmentation(workers):
    import numpy as np
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import RandGaussianNoised

    from medtl.engine.loop import _loader, _Runtime
    from medtl.engine.runtime import DistInfo

    rows = [{"image": np.zeros((1, 4, 4), np.float32), "label": i % 2} for i in range(8)]
    ds = MonaiDataset(rows, transform=RandGaussianNoised(keys="image", prob=1.0))
    cfg = TrainConfig(num_workers=workers, progress=False)
    rt = _Runtime(DistInfo(), torch.device("cpu"), None, None)

    def epoch_images(seed):
        loader = _loader(ds, cfg, rt, batch_size=4, sampler=list(range(8)), drop_last=False, seed=seed)
        return torch.cat([torch.as_tensor(batch["image"]) for batch in loader])

    first = epoch_images(123)
    for i in range(3):  # advance the transform's own random state, as earlier epochs would
        ds[i]
    assert torch.equal(epoch_images(123), first)
    assert not torch.equal(epoch_images(124), first)


def test_min_steps_passes_over_a_small_training_set_several_times_an_epoch():
    torch.manual_seed(0)
    model = toy_classifier()
    updates: list[int] = []
    model.register_forward_pre_hook(lambda module, args: updates.append(len(args[0])) if module.training else None)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, min_steps=20, monitor="accuracy", mode="max", **FAST)
    result = fit(model, ToyImages(16, seed=1), ToyImages(8, seed=2), loss_fn=nn.CrossEntropyLoss(), cfg=cfg,
                 val_metric_fn=accuracy)
    # 16 samples = 2 steps a pass; 2 epochs need 5 passes each for 20 steps.
    assert result.passes_per_epoch == 5 and result.epochs_run == 2
    assert updates == [8] * 20
    plain = fit(toy_classifier(), ToyImages(16, seed=1), ToyImages(8, seed=2), loss_fn=nn.CrossEntropyLoss(),
                cfg=TrainConfig(epochs=2, batch_size=8, monitor="accuracy", mode="max", **FAST),
                val_metric_fn=accuracy)
    assert plain.passes_per_epoch == 1


def test_several_passes_never_end_an_epoch_with_a_batch_of_one_sample():
    # 3 samples, batches of 2, 3 passes: 9 draws an epoch. A last batch of one sample would fail in
    # BatchNorm layers, and drop_last=False (the caller's choice for one pass) must not let it through.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])) if module.training else None)
    cfg = TrainConfig(epochs=1, batch_size=2, min_steps=3, drop_last=False, monitor="val_loss", **FAST)
    result = fit(model, ToyImages(3, seed=1), ToyImages(4, seed=2), loss_fn=nn.CrossEntropyLoss(), cfg=cfg)
    assert result.passes_per_epoch == 3 and sizes == [2, 2, 2, 2]
