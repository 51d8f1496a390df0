"""Validation outputs of whole volumes with different sizes are gathered without crashing."""

import torch

from medtl.engine.loop import _cat_padded


def test_volumes_of_different_sizes_are_zero_padded_to_the_largest():
    a = torch.ones(2, 3, 4, 5)
    b = torch.full((1, 3, 6, 2), 2.0)
    out = _cat_padded([a, b])
    assert out.shape == (3, 3, 6, 5)
    assert torch.equal(out[:2, :, :4, :5], a) and torch.equal(out[2:, :, :6, :2], b)
    assert out[:2, :, 4:].abs().sum() == 0 and out[2:, :, :, 2:].abs().sum() == 0


def test_equal_shapes_and_class_labels_concatenate_unchanged():
    labels = torch.arange(3)
    assert torch.equal(_cat_padded([labels, labels]), torch.cat([labels, labels]))
