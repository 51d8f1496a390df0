"""Plain helpers shared by the tracking tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch
from torch import nn

SHA = "0f" * 32


class TinyNet(nn.Module):
    """A small conv net defined here, so its source file would show up in export stack traces."""

    def __init__(self, in_channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.norm(self.conv(x)))
        return self.head(features.mean(dim=(2, 3)))


def registry_tags() -> dict[str, str]:
    return {
        "task": "classification",
        "encoder": "tiny",
        "weights_origin": "imagenet",
        "strategy": "finetune",
        "manifest_sha256": SHA,
    }
