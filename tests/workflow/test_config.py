"""Workflow configuration: the stable keys, --set overrides and errors that name the bad key."""

from pathlib import Path

import pytest

from medtl.errors import ConfigError
from medtl.workflow.config import LIST_KEYS, load_config

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


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
    from medtl.workflow.train import train_config_for

    base: list[str] = []
    pinned = load_config(WORKFLOWS / "classify_2d.yaml", [*base, "train.num_threads=1"])
    assert train_config_for(pinned, progress=False, monitor="auroc").num_threads == 1
    auto = load_config(WORKFLOWS / "classify_2d.yaml", base)
    assert auto.train.num_threads == 0 and train_config_for(auto, progress=False, monitor="auroc").num_threads is None
    with pytest.raises(ConfigError, match="train.num_threads"):
        load_config(WORKFLOWS / "classify_2d.yaml", [*base, "train.num_threads=-2"])


@pytest.mark.parametrize(("key", "empty"), [("data.spacing", ()), ("data.modalities", ()), ("data.subgroups", ()),
                                            ("audit.tolerances", {})])
def test_null_means_empty_where_an_empty_list_means_something(key, empty):
    cfg = load_config(WORKFLOWS / "classify_3d.yaml", [f"{key}=null"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == empty


@pytest.mark.parametrize("key", [k for k, spec in LIST_KEYS.items() if not spec.empty])
def test_null_is_refused_where_empty_means_nothing_with_the_key_own_example(key):
    with pytest.raises(ConfigError) as err:
        load_config(WORKFLOWS / "classify_2d.yaml", [f"{key}=null"])
    assert str(err.value) == f"config key '{key}' must be a list, not null; e.g. {LIST_KEYS[key].example}"


def test_a_wrong_type_for_a_list_key_says_what_empty_means():
    with pytest.raises(ConfigError, match=r"'data\.spacing' must be a list, not int; e\.g\. \[1\.5, 1\.5, 2\.5\] "
                                          r"\(\[\] or null: keep the source spacing\)"):
        load_config(WORKFLOWS / "classify_3d.yaml", ["data.spacing=2"])


def test_every_list_key_has_an_example_and_the_readme_says_what_empty_and_null_mean():
    import dataclasses
    from typing import get_origin, get_type_hints

    from medtl.workflow.config import WorkflowConfig

    sections = {name: cls for name, cls in get_type_hints(WorkflowConfig).items() if dataclasses.is_dataclass(cls)}
    keys = {f"{section}.{name}" for section, cls in sections.items()
            for name, hint in get_type_hints(cls).items() if get_origin(hint) in (tuple, dict)}
    assert keys == set(LIST_KEYS)
    readme = (WORKFLOWS / "README.md").read_text()
    for key, spec in LIST_KEYS.items():
        if spec.empty:
            row = next(line for line in readme.splitlines() if line.startswith(f"| `{key}`"))
            assert "`null`" in row and ("`[]`" in row or "`{}`" in row), row


@pytest.mark.parametrize(
    ("workflow", "setting", "message"),
    [
        ("classify_2d", "train.lr=0", r"'train\.lr' must be a positive number, not 0; e\.g\. 0\.001"),
        ("classify_2d", "train.lr=-1e-3", r"'train\.lr' must be a positive number"),
        ("classify_2d", "train.batch_size=0", r"'train\.batch_size' must be at least 1, not 0"),
        ("classify_2d", "data.image_size=[0, 96]", r"'data\.image_size' must hold positive sizes, not \[0, 96\]"),
        ("classify_2d", "data.spacing=[1, 1]", r"'data\.spacing' must be empty for model\.spatial_dims=2"),
        ("classify_3d", "data.spacing=[1.5, 0, 2.5]", r"'data\.spacing' must be 3 positive voxel sizes in mm"),
        ("classify_3d", "data.spacing=[1.5, 1.5]", r"'data\.spacing' must be 3 positive voxel sizes in mm"),
        ("classify_3d", "data.ct_window=[300, -200]", r"'data\.ct_window' must be two numbers \[low, high\]"),
        ("classify_2d", "model.dropout=1", r"'model\.dropout' must be in \[0, 1\), not 1"),
        ("classify_2d", "model.num_classes=1", r"'model\.num_classes' must be at least 2, not 1"),
        ("classify_2d", "train.layer_decay=1.5", r"'train\.layer_decay' must be in \[0, 1\]"),
        ("classify_2d", "evaluation.threshold_target=1", r"'evaluation\.threshold_target' must be in \(0, 1\)"),
        ("classify_2d", "audit.alpha=0", r"'audit\.alpha' must be in \(0, 1\), not 0"),
        ("classify_2d", "audit.tolerances={auroc: -0.1}", r"'audit\.tolerances\.auroc' must be at least 0"),
        ("classify_2d", "train.warmup_epochs=-1", r"'train\.warmup_epochs' must be at least 0"),
    ],
)
def test_numeric_ranges_are_refused_when_the_config_loads(workflow, setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(WORKFLOWS / f"{workflow}.yaml", [setting])


def test_choice_values_ignore_case():
    cfg = load_config(WORKFLOWS / "segment_3d.yaml", ["data.intensity=MR", "train.strategy=FineTune", "task=Segmentation"])
    assert (cfg.data.intensity, cfg.train.strategy, cfg.task) == ("mr", "finetune", "segmentation")
    with pytest.raises(ConfigError, match=r"'data\.intensity' must be one of auto, ct, mr, xray, not 'MRI'"):
        load_config(WORKFLOWS / "segment_3d.yaml", ["data.intensity=MRI"])


@pytest.mark.parametrize("word", ["none", "keep", "None"])
def test_a_word_where_a_list_of_numbers_belongs_gets_the_list_example(word):
    with pytest.raises(ConfigError) as err:
        load_config(WORKFLOWS / "classify_3d.yaml", [f"data.spacing={word}"])
    assert str(err.value) == (f"config key 'data.spacing' must be a list, not {word!r}; e.g. [1.5, 1.5, 2.5] "
                              f"([] or null: keep the source spacing)")
