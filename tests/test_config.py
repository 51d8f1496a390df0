"""Workflow configuration: the stable keys, --set overrides and errors that name the bad key."""

from pathlib import Path

import pytest

from medtl.config import load_config
from medtl.errors import ConfigError

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@pytest.mark.parametrize("name", ["classify_2d", "segment_3d", "classify_3d"])
def test_shipped_workflows_validate(name):
    cfg = load_config(WORKFLOWS / f"{name}.yaml")
    assert cfg.name == name
    assert len(cfg.data.image_size) == cfg.model.spatial_dims


def test_set_overrides_take_the_stable_dotted_keys():
    cfg = load_config(
        WORKFLOWS / "classify_2d.yaml",
        [
            "data.root=/data/cxr",
            "data.labels=/data/cxr/labels.csv",
            "data.manifest=m.csv",
            "model.encoder=resnet18",
            "model.weights=none",
            "train.strategy=linear_probe",
            "train.epochs=3",
            "seed=7",
        ],
    )
    assert (cfg.data.root, cfg.data.labels, cfg.data.manifest) == ("/data/cxr", "/data/cxr/labels.csv", "m.csv")
    assert (cfg.model.encoder, cfg.model.weights) == ("resnet18", "none")
    assert (cfg.train.strategy, cfg.train.epochs, cfg.seed) == ("linear_probe", 3, 7)


def test_unknown_key_is_named_with_a_close_match():
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean train\.epochs"):
        load_config(WORKFLOWS / "classify_2d.yaml", ["train.epoch=3"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be a whole number"):
        load_config(WORKFLOWS / "classify_2d.yaml", ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"'train\.strategy' must be one of"):
        load_config(WORKFLOWS / "classify_2d.yaml", ["train.strategy=magic"])


def test_missing_data_source_is_refused():
    with pytest.raises(ConfigError, match="data.manifest, or both data.root and data.labels"):
        load_config(None, [], base={"name": "x"})


def test_image_size_must_match_spatial_dims():
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(WORKFLOWS / "classify_2d.yaml", ["model.spatial_dims=3"])
