"""Which training samples each process sees, epoch by epoch, and class-imbalance handling.

Every order is a pure function of (seed, epoch), so a resumed run replays the epoch it lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from medtl.errors import ConfigError, InputError


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Class labels of every sample: (N,) class indices or (N, C) multi-hot rows.

    A dataset exposing a `labels` sequence is read from it; otherwise every sample is loaded
    once (expose `labels` to avoid loading images just to count classes).

    Args:
        dataset: a map-style dataset yielding {"image", "label"} dicts.

    Returns:
        A long tensor of class indices or a float tensor of multi-hot rows.

    Raises:
        ConfigError: when labels are masks (segmentation) or mix shapes.
    """
    raw = getattr(dataset, "labels", None)
    if raw is None:
        raw = [dataset[i]["label"] for i in range(len(dataset))]  # type: ignore[arg-type]
    rows = [torch.as_tensor(np.asarray(label)) for label in raw]
    if not rows:
        raise InputError("training dataset must hold at least one sample, not 0; check the train split")
    dims = {row.ndim for row in rows}
    if dims == {0}:
        return torch.stack(rows).long()
    if dims == {1} and len({row.shape for row in rows}) == 1:
        return torch.stack(rows).float()
    raise ConfigError(
        "train.balance needs class labels (a class index or a multi-hot vector per sample), "
        f"not labels of {sorted(dims)} dimensions (segmentation masks?); set balance: none"
    )


def class_counts(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Samples per class (positives per class for multi-hot labels).

    Args:
        labels: (N,) class indices or (N, C) multi-hot rows, as from `dataset_labels`.
        num_classes: number of classes for index labels; None = largest index + 1.

    Returns:
        A (C,) float tensor of counts.
    """
    if labels.ndim == 2:
        return (labels > 0.5).sum(0).double()
    n = num_classes if num_classes is not None else int(labels.max()) + 1
    return torch.bincount(labels, minlength=n).double()


def class_weights(labels_or_dataset: torch.Tensor | Dataset, num_classes: int | None = None) -> torch.Tensor:
    """Loss weights that balance the classes, for the caller's loss function.

    Index labels get scikit-learn's "balanced" weights N / (C * n_c), to pass as
    `CrossEntropyLoss(weight=...)`; multi-hot labels get negatives/positives per class, to pass
    as `BCEWithLogitsLoss(pos_weight=...)`.

    Args:
        labels_or_dataset: labels as from `dataset_labels`, or the training dataset.
        num_classes: number of classes for index labels; None = largest index + 1.

    Returns:
        A (C,) float32 tensor.

    Raises:
        InputError: when a class has no training sample (or, multi-hot, no negative).

    Example:
        >>> loss = torch.nn.CrossEntropyLoss(weight=class_weights(train_ds, 2))
    """
    labels = (
        labels_or_dataset
        if isinstance(labels_or_dataset, torch.Tensor)
        else dataset_labels(labels_or_dataset)
    )
    counts = class_counts(labels, num_classes)
    if labels.ndim == 2:
        negatives = labels.shape[0] - counts
        empty = [i for i in range(len(counts)) if counts[i] == 0 or negatives[i] == 0]
        if empty:
            raise InputError(
                f"every class must have positive and negative training samples, not none for classes {empty}; "
                "drop those classes or use balance: none"
            )
        return (negatives / counts).float()
    empty = [i for i in range(len(counts)) if counts[i] == 0]
    if empty:
        raise InputError(
            f"every class must have training samples, not none for classes {empty}; "
            "check num_classes and the train split, or use balance: none"
        )
    from sklearn.utils.class_weight import compute_class_weight  # slow import, only needed here

    classes = np.arange(len(counts))
    return torch.as_tensor(
        compute_class_weight("balanced", classes=classes, y=labels.numpy()), dtype=torch.float32
    )


def sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample drawing weights that make every class equally likely.

    A multi-hot row takes the weight of its rarest positive class; rows without any positive
    ("no finding") form a group of their own.

    Args:
        labels: (N,) class indices or (N, C) multi-hot rows.

    Returns:
        A (N,) float64 tensor.
    """
    if labels.ndim == 1:
        return 1.0 / class_counts(labels)[labels]
    positive = labels > 0.5
    inverse = 1.0 / class_counts(labels).clamp(min=1)
    weights = torch.where(positive, inverse, torch.zeros_like(inverse)).amax(1)
    none = ~positive.any(1)
    if none.any():
        weights[none] = 1.0 / none.sum().double()
    return weights


class BalancedSampler(Sampler[int]):
    """Class-balanced draws with replacement, split across processes, reseeded per epoch.

    torch's `WeightedRandomSampler` draws the indices (with a generator seeded by seed + epoch);
    this class adds what it lacks: the per-epoch seed and the split across ranks (rank r takes
    every world_size-th draw, as `DistributedSampler` does).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        *,
        num_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.weights = weights.double()
        self.per_rank = math.ceil((num_samples or len(weights)) / world_size)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draws `__iter__` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = list(
            WeightedRandomSampler(self.weights, self.per_rank * self.world_size, generator=generator)
        )
        return iter(draws[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def train_sampler(
    dataset: Dataset, balance: str, *, seed: int, rank: int = 0, world_size: int = 1, passes: int = 1
) -> Any:
    """The training sampler: shuffled (`DistributedSampler`, also for one process) or balanced.

    Both have `set_epoch(epoch)`; call it before every epoch.

    Args:
        dataset: the training dataset.
        balance: "none" / "loss" (shuffle) or "sampler" (class-balanced draws).
        seed: shuffle seed (the same on every rank).
        rank: this process's rank.
        world_size: number of processes.
        passes: times an epoch goes over the training set (each sample `passes` times when
            shuffled, in one shuffled order; `passes` times as many draws when balanced).

    Returns:
        A sampler with `set_epoch`.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if balance == "sampler":
        return BalancedSampler(
            sample_weights(dataset_labels(dataset)), num_samples=n * passes, rank=rank, world_size=world_size,
            seed=seed,
        )
    if passes == 1:
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    # DistributedSampler only needs the length: shuffle n x passes slots and fold them back onto the
    # n samples, so every sample is seen `passes` times an epoch (torch has no repeat option).
    return _Folded(DistributedSampler(range(n * passes), num_replicas=world_size, rank=rank, shuffle=True,  # type: ignore[arg-type]
                                      seed=seed), n)


class _Folded(Sampler[int]):
    """A sampler over n x k slots whose indices are taken modulo n."""

    def __init__(self, inner: DistributedSampler, n: int) -> None:
        self.inner, self.n = inner, n

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (i % self.n for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def passes_per_epoch(samples_per_rank: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """How many times each epoch must go over the training set for `epochs` epochs to make at
    least `min_steps` optimizer steps (1 when they already do, or when `min_steps` is 0).

    Args:
        samples_per_rank: training samples one process sees in one pass.
        batch_size: samples per optimizer step and process.
        epochs: the run's epochs.
        min_steps: the run's smallest number of optimizer steps.
    """
    steps = max(1, samples_per_rank // batch_size) * epochs
    return max(1, math.ceil(min_steps / steps))


def shard_indices(n: int, rank: int, world_size: int) -> Sequence[int]:
    """Indices of an n-sample evaluation set for one rank: interleaved, no padding, no repeats."""
    return range(rank, n, world_size)
