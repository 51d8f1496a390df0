"""Class balance: sampler weights, loss weights, and epoch-seeded, rank-split draws."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from medtl.engine import BalancedSampler, class_weights, dataset_labels, sample_weights
from medtl.engine.sampling import passes_per_epoch, train_sampler
from medtl.errors import ConfigError, InputError


class Items(Dataset):
    """Samples without a `labels` attribute, so labels are read item by item."""

    def __init__(self, labels: list) -> None:
        self.items = [{"image": torch.zeros(1, 2, 2), "label": torch.as_tensor(label)} for label in labels]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


IMBALANCED = [0] * 90 + [1] * 10


def test_weighted_sampler_draws_rare_and_common_classes_equally_often():
    labels = torch.tensor(IMBALANCED)
    sampler = BalancedSampler(sample_weights(labels), seed=0)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share_rare = (labels[drawn] == 1).float().mean().item()
    assert len(drawn) == 20 * len(labels)
    assert 0.45 < share_rare < 0.55  # 0.10 without balancing


def test_balanced_sampler_repeats_per_epoch_and_ranks_split_one_draw():
    weights = sample_weights(torch.tensor(IMBALANCED))
    single = BalancedSampler(weights, seed=5)
    single.set_epoch(3)
    again = BalancedSampler(weights, seed=5)
    again.set_epoch(3)
    assert list(single) == list(again)
    single.set_epoch(4)
    assert list(single) != list(again)
    single.set_epoch(3)
    shards = []
    for rank in range(2):
        part = BalancedSampler(weights, seed=5, rank=rank, world_size=2)
        part.set_epoch(3)
        shards.append(list(part))
    assert len(shards[0]) == len(shards[1]) == 50
    interleaved = [i for pair in zip(*shards, strict=True) for i in pair]
    assert interleaved == list(single)


def test_train_sampler_uses_balanced_draws_only_for_balance_sampler():
    ds = Items(IMBALANCED)
    assert isinstance(train_sampler(ds, "sampler", seed=0), BalancedSampler)
    plain = train_sampler(ds, "loss", seed=0)
    plain.set_epoch(0)
    assert sorted(plain) == list(range(len(ds)))  # a permutation: every sample once


def test_class_weights_are_balanced_for_indices_and_pos_weight_for_multi_hot():
    weights = class_weights(Items(IMBALANCED))
    assert weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    multi = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.float32)
    assert class_weights(multi).tolist() == pytest.approx([1.0, 1.0])
    skewed = torch.tensor([[1, 0]] + [[0, 0]] * 3, dtype=torch.float32)
    with pytest.raises(InputError, match=r"classes \[1\]"):
        class_weights(skewed)


def test_class_weights_refuse_a_class_without_samples():
    with pytest.raises(InputError, match=r"classes \[1\]"):
        class_weights(torch.tensor([0, 0, 2, 2]))


def test_multi_hot_sample_weights_favour_rows_with_rare_positives():
    labels = torch.tensor([[1, 0]] * 8 + [[0, 1]] * 2 + [[0, 0]] * 5, dtype=torch.float32)
    weights = sample_weights(labels)
    assert weights[8] > weights[0] and weights[8] > weights[-1]
    assert weights[10:].sum().item() == pytest.approx(1.0)  # "no finding" rows form one group


def test_dataset_labels_refuses_segmentation_masks_for_balancing():
    masks = Items([[[0, 1], [1, 0]]] * 3)
    with pytest.raises(ConfigError, match="balance: none"):
        dataset_labels(masks)


@pytest.mark.parametrize("world_size", [1, 2])
def test_passes_show_every_sample_that_many_times_an_epoch_split_across_ranks(world_size):
    ds = Items(IMBALANCED[:25])
    seen: list[int] = []
    for rank in range(world_size):
        sampler = train_sampler(ds, "none", seed=3, rank=rank, world_size=world_size, passes=4)
        sampler.set_epoch(2)
        seen += list(sampler)
    assert sorted(seen) == sorted(list(range(25)) * 4)  # 100 slots: no rank pads
    again = train_sampler(ds, "none", seed=3, passes=4)
    again.set_epoch(2)
    other = train_sampler(ds, "none", seed=3, passes=4)
    other.set_epoch(3)
    assert list(again) != list(other)  # reshuffled per epoch, the passes interleaved in one order
    balanced = train_sampler(ds, "sampler", seed=3, passes=4)
    assert len(balanced) == 100


@pytest.mark.parametrize(
    ("samples", "batch", "epochs", "min_steps", "passes"),
    [(244, 32, 5, 500, 15),  # 7 steps x 5 epochs = 35: 15 passes make 525 steps
     (2428, 32, 8, 500, 1),  # 75 x 8 = 600 steps already
     (20, 32, 2, 500, 250),  # fewer samples than a batch: one step a pass
     (244, 32, 5, 0, 1)],  # off
)
def test_passes_per_epoch_reach_min_steps_with_the_fewest_passes(samples, batch, epochs, min_steps, passes):
    assert passes_per_epoch(samples, batch, epochs, min_steps) == passes
    steps = max(1, samples // batch) * epochs
    assert steps * passes >= min_steps and (passes == 1 or steps * (passes - 1) < min_steps)
