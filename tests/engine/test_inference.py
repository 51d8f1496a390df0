"""Sliding-window inference and per-sample predictions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.engine import predict, sliding_window_predict, tta_flips
from medtl.errors import ConfigError, InputError
from tests.engine.run_toy import ToyImages, toy_classifier
from tests.engine.test_loop import ToySquares, toy_segmenter


@pytest.mark.parametrize(("spatial", "roi"), [((20, 24, 28), (16, 16, 16)), ((37, 29), (16, 16))])
def test_sliding_window_output_has_the_input_spatial_shape(spatial, roi):
    conv = nn.Conv2d if len(spatial) == 2 else nn.Conv3d
    model = conv(1, 2, 1).eval()  # pointwise: patch borders cannot change any value
    image = torch.randn(1, 1, *spatial)
    with torch.no_grad():
        out = sliding_window_predict(model, image, roi_size=roi, sw_batch_size=3, overlap=0.5)
        whole = model(image)
    assert out.shape == (1, 2, *spatial)
    assert torch.allclose(out, whole, atol=1e-5)  # every voxel covered and blended back correctly


def test_sliding_window_refuses_unbatched_images():
    with pytest.raises(InputError, match="batch axis"):
        sliding_window_predict(toy_segmenter(3), torch.randn(1, 20, 20, 20), roi_size=(8, 8, 8))


def test_predict_returns_probabilities_labels_and_ids_in_dataset_order():
    torch.manual_seed(0)
    ds = ToyImages(10, seed=4)
    rows = predict(toy_classifier(), ds, batch_size=4, progress=False)
    assert [row["id"] for row in rows] == list(range(10))
    assert [int(row["label"]) for row in rows] == ds.labels.tolist()
    probs = torch.stack([row["output"] for row in rows])
    assert probs.shape == (10, 2) and torch.allclose(probs.sum(1), torch.ones(10))
    raw = predict(toy_classifier(), ds, activation="none", progress=False)
    assert not torch.allclose(torch.stack([r["output"] for r in raw]).sum(1), torch.ones(10))


def test_predict_segments_whole_volumes_by_sliding_window_with_sigmoid():
    model = nn.Conv3d(1, 1, 1)  # pointwise: the stitched windows give exactly the whole volume's logits
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-1.0)  # logits well outside [0, 1], so raw logits cannot pass for probabilities
    data = ToySquares(2, 12, 3, seed=0)
    rows = predict(model, data, activation="sigmoid", roi_size=(8, 8, 8), progress=False)
    assert [row["output"].shape for row in rows] == [(1, 12, 12, 12)] * 2
    with torch.no_grad():
        for row, item in zip(rows, data, strict=True):
            logits = model(item["image"][None])[0]
            assert logits.min() < 0 and logits.max() > 1
            assert torch.allclose(row["output"], torch.sigmoid(logits), atol=1e-6)


def test_flip_tta_averages_the_probabilities_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()  # a left-right asymmetric classifier
    data = ToyImages(6, seed=3)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        expected = (torch.softmax(model(images), 1) + torch.softmax(model(images.flip(-1)), 1)) / 2
        plain = torch.softmax(model(images), 1)
    flipped = torch.stack([r["output"] for r in predict(model, data, flips=tta_flips("flip", 2), progress=False)])
    torch.testing.assert_close(flipped, expected)
    assert not torch.allclose(flipped, plain)  # the mirror changed the scores of this model
    alone = torch.stack([r["output"] for r in predict(model, data, flips=tta_flips("none", 2), progress=False)])
    torch.testing.assert_close(alone, plain, rtol=0, atol=0)


@pytest.mark.parametrize("roi", [None, (8, 8)])
def test_flip_tta_mirrors_a_dense_output_back_before_averaging(roi):
    torch.manual_seed(0)
    model = nn.Conv2d(1, 2, (1, 3), padding=(0, 1)).eval()  # a kernel that looks left-right asymmetrically
    data = ToySquares(3, 16, 2, seed=4)
    images = torch.stack([data[i]["image"] for i in range(len(data))])

    def run(x):  # windows see their own borders, so the reference runs through the same windows
        return model(x) if roi is None else sliding_window_predict(model, x, roi_size=roi, sw_batch_size=1, overlap=0.0)

    with torch.no_grad():
        mirrored = torch.softmax(run(images.flip(-1)), 1).flip(-1)
        expected = (torch.softmax(run(images), 1) + mirrored) / 2
    rows = predict(model, data, flips=(1,), roi_size=roi, sw_batch_size=1, overlap=0.0, progress=False)
    torch.testing.assert_close(torch.stack([r["output"] for r in rows]), expected, rtol=1e-5, atol=1e-6)


def test_an_unknown_tta_mode_is_refused_with_the_config_key():
    with pytest.raises(ConfigError, match="evaluation.tta"):
        tta_flips("rotate", 2)


def test_mirror_tta_mirrors_the_axes_training_flipped_and_needs_them():
    assert tta_flips("mirror", 3, (0, 1, 2)) == (0, 1, 2)
    assert tta_flips("mirror", 3, [2]) == (2,)
    with pytest.raises(ConfigError, match="data.flip_axes"):
        tta_flips("mirror", 3)
