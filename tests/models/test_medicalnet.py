"""MedicalNet checkpoints in their real on-disk format, every depth, and the failures that matter.

`_Reference` re-states the architecture of MedicalNet's `models/resnet.py` (github.com/Tencent/
MedicalNet) independently of medtl's code: names, shapes and strides come from there, so the
checkpoints written here have the names and shapes of the released `resnet_{depth}.pth` files
(`{"state_dict": ...}`, `module.` prefixes from DataParallel, a `conv_seg` head).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtl.errors import WeightsError
from medtl.models import create_model

LAYOUT = {  # depth -> (bottleneck?, blocks per layer, shortcut type) as in MedicalNet's README
    10: (False, (1, 1, 1, 1), "B"), 18: (False, (2, 2, 2, 2), "A"), 34: (False, (3, 4, 6, 3), "A"),
    50: (True, (3, 4, 6, 3), "B"), 101: (True, (3, 4, 23, 3), "B"), 152: (True, (3, 8, 36, 3), "B"),
    200: (True, (3, 24, 36, 3), "B"),
}


class _Block(nn.Module):
    def __init__(self, cin, planes, stride, dilation, bottleneck, shortcut):
        super().__init__()
        width = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm3d(planes)
            self.conv2 = nn.Conv3d(planes, planes, 3, stride, dilation, dilation, bias=False)
            self.bn2 = nn.BatchNorm3d(planes)
            self.conv3 = nn.Conv3d(planes, width, 1, bias=False)
            self.bn3 = nn.BatchNorm3d(width)
        else:
            self.conv1 = nn.Conv3d(cin, planes, 3, stride, dilation, dilation, bias=False)
            self.bn1 = nn.BatchNorm3d(planes)
            self.conv2 = nn.Conv3d(planes, planes, 3, 1, dilation, dilation, bias=False)
            self.bn2 = nn.BatchNorm3d(planes)
        self.shortcut, self.stride, self.width, self.bottleneck = None, stride, width, bottleneck
        if stride != 1 or cin != width:
            if shortcut == "B":
                self.downsample = nn.Sequential(nn.Conv3d(cin, width, 1, stride, bias=False), nn.BatchNorm3d(width))
            else:
                self.shortcut = "A"

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(out)))
        if hasattr(self, "downsample"):
            residual = self.downsample(x)
        elif self.shortcut == "A":  # MedicalNet: avg_pool3d(kernel 1, stride) + zero channels
            residual = F.avg_pool3d(x, kernel_size=1, stride=self.stride)
            pad = residual.new_zeros(residual.shape[0], self.width - residual.shape[1], *residual.shape[2:])
            residual = torch.cat([residual, pad], 1)
        else:
            residual = x
        return F.relu(out + residual)


class _Reference(nn.Module):
    def __init__(self, depth, *, shortcut=None, classes=2):
        super().__init__()
        bottleneck, blocks, default_shortcut = LAYOUT[depth]
        shortcut = shortcut or default_shortcut
        self.conv1 = nn.Conv3d(1, 64, 7, stride=(2, 2, 2), padding=(3, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        cin = 64
        settings = zip((64, 128, 256, 512), blocks, (1, 2, 1, 1), (1, 1, 2, 4), strict=True)
        for i, (planes, n, stride, dilation) in enumerate(settings):
            layer = []
            for j in range(n):
                layer.append(_Block(cin, planes, stride if j == 0 else 1, dilation, bottleneck, shortcut))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.conv_seg = nn.Sequential(nn.ConvTranspose3d(cin, 32, 2, stride=2), nn.BatchNorm3d(32), nn.ReLU(),
                                      nn.Conv3d(32, 32, 3, padding=1, bias=False), nn.BatchNorm3d(32), nn.ReLU(),
                                      nn.Conv3d(32, classes, 1, bias=False))

    def backbone(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _medicalnet_state(depth, *, shortcut=None) -> collections.OrderedDict:
    """Random weights with the names and shapes of MedicalNet's resnet_{depth} (built on the meta device)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _Reference(depth, shortcut=shortcut).state_dict().items()}
    generator = torch.Generator().manual_seed(depth)
    state = collections.OrderedDict()
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state


def _save(state, path) -> None:
    """MedicalNet's file layout: a pickled dict, tensors under "state_dict", DataParallel names."""
    torch.save({"state_dict": collections.OrderedDict((f"module.{k}", v) for k, v in state.items())}, path)


@pytest.mark.parametrize("depth", [
    10, 18, 34, 50,
    pytest.param(101, marks=pytest.mark.slow), pytest.param(152, marks=pytest.mark.slow),
    pytest.param(200, marks=pytest.mark.slow),
])
def test_medicalnet_checkpoint_of_every_depth_loads_with_every_backbone_key_matched(depth, tmp_path, monkeypatch):
    state = _medicalnet_state(depth)
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    name = f"resnet_{depth}_23dataset.pth" if depth <= 50 else f"resnet_{depth}.pth"
    _save(state, tmp_path / name)
    bundle = create_model("classification", f"medicalnet_resnet{depth}", spatial_dims=3, in_channels=1,
                          num_classes=2, weights="medicalnet")
    report = bundle.load_report
    backbone = {k for k in state if not k.startswith("conv_seg") and not k.endswith("num_batches_tracked")}
    assert set(report.matched) == backbone
    assert report.matched_fraction == 1.0 and not report.unexpected and not report.adapted
    assert set(report.dropped) == {k for k in state if k.startswith("conv_seg") and not k.endswith("tracked")}
    assert set(report.newly_initialised) == {"head.fc.weight", "head.fc.bias"}
    assert report.checkpoint == name and bundle.weights.sha256 == report.sha256
    assert bundle.weights.normalization == "zscore_nonzero" and bundle.weights.axes == "DHW"
    loaded = bundle.model.encoder.net.state_dict()
    assert torch.equal(loaded["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    del state, loaded, bundle


@pytest.mark.parametrize("depth", [10, 18, 50])
def test_loaded_medicalnet_backbone_computes_what_medicalnet_computes(depth, tmp_path):
    reference = _Reference(depth).eval()
    reference.load_state_dict(_medicalnet_state(depth))
    _save(reference.state_dict(), tmp_path / "ckpt.pth")
    model = create_model("segmentation", f"medicalnet_resnet{depth}", spatial_dims=3, in_channels=1,
                         num_classes=2, weights=tmp_path / "ckpt.pth").model.eval()
    volume_dhw = torch.randn(1, 1, 12, 20, 16, generator=torch.Generator().manual_seed(3))
    medtl_input = volume_dhw.permute(0, 1, 4, 3, 2)  # medtl arrays are (cols, rows, slices)
    with torch.no_grad():
        expected = reference.backbone(volume_dhw)
        got = model.encoder.forward_features(medtl_input)
        logits = model(medtl_input)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.shape[2:] == (2, 3, 2)  # output stride 8: dilated layer3/layer4 keep the resolution
    assert logits.shape == (1, 2, 16, 20, 12)


def test_medicalnet_checkpoint_with_grey_stem_adapts_to_two_channels(tmp_path):
    _save(_medicalnet_state(10), tmp_path / "resnet_10.pth")
    bundle = create_model("segmentation", "medicalnet_resnet10", spatial_dims=3, in_channels=2, num_classes=3,
                          weights=tmp_path / "resnet_10.pth")
    assert dict(bundle.load_report.adapted) == {"conv1.weight": "input channels 1->2 (repeat, scaled)"}
    stem = bundle.model.encoder.net.conv1.weight
    assert stem.shape == (64, 2, 7, 7, 7)
    assert bundle.model(torch.zeros(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_resnet18_checkpoint_with_shortcut_b_is_refused_naming_the_shortcut(tmp_path):
    _save(_medicalnet_state(18, shortcut="B"), tmp_path / "resnet_18.pth")
    with pytest.raises(WeightsError, match=r"shortcut type A .*not type B"):
        create_model("classification", "medicalnet_resnet18", spatial_dims=3, weights=tmp_path / "resnet_18.pth")


def test_resnet50_checkpoint_with_shortcut_a_is_refused_naming_the_shortcut(tmp_path):
    _save(_medicalnet_state(50, shortcut="A"), tmp_path / "resnet_50.pth")
    with pytest.raises(WeightsError, match=r"shortcut type B .*not type A"):
        create_model("classification", "medicalnet_resnet50", spatial_dims=3, weights=tmp_path / "resnet_50.pth")


def test_checkpoint_with_other_channel_widths_is_refused_naming_the_tensor(tmp_path):
    state = _medicalnet_state(10)
    state["layer1.0.conv1.weight"] = torch.randn(32, 64, 3, 3, 3)
    _save(state, tmp_path / "resnet_10.pth")
    with pytest.raises(WeightsError, match=r"'layer1\.0\.conv1\.weight' must be \(64, 64, 3, 3, 3\), not \(32, 64"):
        create_model("classification", "medicalnet_resnet10", spatial_dims=3, weights=tmp_path / "resnet_10.pth")


def test_checkpoint_with_a_three_channel_stem_is_refused_naming_the_channel_count(tmp_path):
    state = _medicalnet_state(10)
    state["conv1.weight"] = torch.randn(64, 3, 7, 7, 7)
    _save(state, tmp_path / "resnet_10.pth")
    with pytest.raises(WeightsError, match="must take 1 input channel, not 3"):
        create_model("classification", "medicalnet_resnet10", spatial_dims=3, weights=tmp_path / "resnet_10.pth")


def test_checkpoint_of_another_depth_is_refused_naming_the_right_encoder(tmp_path):
    _save(_medicalnet_state(34), tmp_path / "resnet_34.pth")
    with pytest.raises(WeightsError, match="use encoder 'medicalnet_resnet34'"):
        create_model("classification", "medicalnet_resnet18", spatial_dims=3, weights=tmp_path / "resnet_34.pth")


def test_missing_medicalnet_file_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        create_model("classification", "medicalnet_resnet50", spatial_dims=3)
    message = str(err.value)
    assert "resnet_50_23dataset.pth or resnet_50.pth" in message and str(tmp_path / "weights") in message


def test_medicalnet_encoders_are_3d_only():
    with pytest.raises(ValueError, match=r"spatial_dims .* must be one of \[3\], not 2"):
        create_model("classification", "medicalnet_resnet10", spatial_dims=2, weights="none")
