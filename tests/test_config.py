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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adaptation.method=magic"], r"'adaptation\.method' must be one of none, adabn, dann, not 'magic'"),
        (["adaptation.method=adabn"], r"'adaptation\.target' must be set for adaptation\.method=adabn"),
        (["adaptation.method=dann", "adaptation.target=SITE-1", "train.balance=sampler"],
         r"'train\.balance' must be none or loss with adaptation\.method=dann"),
        (["adaptation.method=adabn", "adaptation.target=SITE-1", "adaptation.batch_size=1"],
         r"'adaptation\.batch_size' must be at least 2"),
        (["adaptation.methd=adabn"], r"unknown config key 'adaptation\.methd'; did you mean adaptation\.method"),
        (["multitask.enabled=true"], r"'multitask\.enabled' needs task segmentation"),
        (["fewshot.ks=[0, 5]"], r"'fewshot\.ks' must be at least 1"),
        (["fewshot.methods=[prototype, knn]"], r"'fewshot\.methods' must be among prototype, linear_probe"),
        (["continual.from_model=classify_2d"], r"'continual\.from_model' must be a registry URI"),
        (["continual.from_model=models:/classify_2d@champion"], r"'continual\.old_manifest' must be set"),
    ],
)
def test_transfer_method_errors_name_the_bad_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(WORKFLOWS / "classify_2d.yaml", overrides)


def test_dann_is_refused_for_segmentation():
    with pytest.raises(ConfigError, match=r"'adaptation\.method' must be adabn or none for segmentation"):
        load_config(WORKFLOWS / "segment_3d.yaml", ["adaptation.method=dann", "adaptation.target=SITE-1"])


def test_transfer_method_keys_parse_from_set():
    cfg = load_config(
        WORKFLOWS / "segment_3d.yaml",
        ["adaptation.method=adabn", "adaptation.target=SITE-1c71bf", "adaptation.domain_column=scanner",
         "multitask.enabled=true", "multitask.cls_weight=0.5", "fewshot.ks=1,5", "fewshot.draws=3",
         "continual.from_model=models:/segment_3d/4", "continual.old_manifest=old.csv"],
    )
    assert (cfg.adaptation.method, cfg.adaptation.target, cfg.adaptation.domain_column) == (
        "adabn", "SITE-1c71bf", "scanner")
    assert (cfg.multitask.enabled, cfg.multitask.cls_weight, cfg.fewshot.ks, cfg.fewshot.draws) == (True, 0.5, (1, 5), 3)
    assert cfg.continual.from_model == "models:/segment_3d/4"


def test_train_num_threads_reaches_the_engine_zero_meaning_measure():
    from medtl.workflow import train_config_for

    base: list[str] = []
    pinned = load_config(WORKFLOWS / "classify_2d.yaml", [*base, "train.num_threads=1"])
    assert train_config_for(pinned, progress=False, monitor="auroc").num_threads == 1
    auto = load_config(WORKFLOWS / "classify_2d.yaml", base)
    assert auto.train.num_threads == 0 and train_config_for(auto, progress=False, monitor="auroc").num_threads is None
    with pytest.raises(ConfigError, match="train.num_threads"):
        load_config(WORKFLOWS / "classify_2d.yaml", [*base, "train.num_threads=-2"])
