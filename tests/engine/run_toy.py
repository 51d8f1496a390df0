"""A tiny, deterministic training run for the engine tests, importable and runnable as a script.

As a script (possibly under torchrun) it trains the toy classifier and writes, on rank 0,
`<out>.json` (history without timings, best epoch/metric) and `<out>.pt` (final weights).
With --kill-after N it writes --marker once N training steps are done and then stalls, so the
test can SIGKILL it mid-epoch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from medtl.engine import TrainConfig, cleanup_distributed, fit, init_distributed, seed_everything

TIMING_KEYS = {"epoch_seconds", "train_seconds", "samples_per_s"}


class ToyImages(Dataset):
    """Separable 2-class images: class 1 is brighter. Fixed by `seed`, `labels` exposed."""

    def __init__(self, n: int, seed: int, size: int = 8, classes: tuple[int, ...] = (0, 1)) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
        shift = (self.labels.float() * 2 - 1).view(n, 1, 1, 1)
        self.images = torch.randn(n, 1, size, size, generator=gen) * 0.7 + shift * 0.6

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "id": i}


def toy_classifier(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4, 2),
    )


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    return {"accuracy": (outputs.argmax(1) == targets).float().mean().item()}


class ToyPlan:
    """Linear probe for epoch 0 (conv frozen), then fine-tune everything at a lower conv lr."""

    def __init__(self, model: nn.Module) -> None:
        self.conv = list(model[0].parameters())
        self.head = list(model[5].parameters())
        self.param_groups = [
            {"params": self.conv, "lr": 0.02, "name": "encoder"},
            {"params": self.head, "lr": 0.05, "name": "head"},
        ]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        for param in self.conv:
            param.requires_grad = epoch >= 1


class KillAfter(nn.Module):
    """Cross-entropy that marks and stalls after `steps` training calls (for the SIGKILL test)."""

    def __init__(self, steps: int, marker: Path) -> None:
        super().__init__()
        self.steps, self.marker, self.calls = steps, marker, 0
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.steps:
                self.marker.write_text("past step")
                time.sleep(120)
        return self.ce(outputs, targets)


def main(argv: list[str] | None = None) -> None:
    """Train the toy classifier as the command line `argv` says (see the module docstring)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sha", default="a" * 64)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--marker", type=Path)
    args = parser.parse_args(argv)

    info = init_distributed()
    seed_everything(0)
    model = toy_classifier(args.dropout)
    loss = KillAfter(args.kill_after, args.marker) if args.kill_after else nn.CrossEntropyLoss()
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=0.05,
        warmup_epochs=0.5,
        amp="off",
        deterministic=True,
        seed=3,
        num_workers=0,
        progress=False,
        monitor="val_loss",
        mode="min",
        early_stopping_patience=None,
    )
    result = fit(
        model,
        ToyImages(args.n_train, seed=1),
        ToyImages(16, seed=2),
        loss_fn=loss,
        cfg=cfg,
        val_metric_fn=accuracy,
        plan=ToyPlan(model) if args.plan else None,
        checkpoint_dir=args.ckpt,
        resume=args.resume,
        manifest_sha256=args.sha,
    )
    if info.is_main:
        history = [{k: v for k, v in rec.items() if k not in TIMING_KEYS} for rec in result.history]
        summary = {"history": history, "best_epoch": result.best_epoch, "best_metric": result.best_metric}
        args.out.with_suffix(".json").write_text(json.dumps(summary))
        torch.save(model.state_dict(), args.out.with_suffix(".pt"))
    cleanup_distributed()


if __name__ == "__main__":
    main()
