"""Workflow configuration: the stable keys, --set overrides and errors that name the bad key."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from medtl.errors import ConfigError
from medtl.vocabulary import FEW_SHOT_METHODS, STRATEGIES, TASKS, THRESHOLD_RULES
from medtl.workflow.config import config_keys, load_config, to_dict

LIST_KEYS = {key: doc for key, doc in config_keys().items() if doc.kind != "value"}

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.mark.parametrize("name", ["classify_2d", "segment_3d", "classify_3d"])
def test_shipped_workflows_validate(name):
    cfg = load_config(WORKFLOWS / f"{name}.yaml")
    assert cfg.name == name
    # segment_3d chooses its patch from the data ([]); the others give the input size.
    assert len(cfg.data.image_size) == (0 if name == "segment_3d" else cfg.model.spatial_dims)


def test_an_image_size_from_the_data_is_for_3d_models_only():
    with pytest.raises(ConfigError, match=r"data.image_size' must have 2 values .* \(\[\] chooses it from the data "
                                          r"for 3D models only\)"):
        load_config(WORKFLOWS / "classify_2d.yaml", ["data.image_size=[]"])
    assert load_config(WORKFLOWS / "segment_3d.yaml", ["data.image_size=null"]).data.image_size == ()
    assert load_config(WORKFLOWS / "classify_3d.yaml", ["data.image_size=[]"]).data.image_size == ()


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
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean 'train\.epochs'"):
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
        (["adaptation.methd=adabn"], r"unknown config key 'adaptation\.methd'; did you mean 'adaptation\.method'"),
        (["multitask.enabled=true"], r"'multitask\.enabled' needs task segmentation"),
        (["adaptation.method=dann", "adaptation.target=SITE-1", "train.label_smoothing=0.1"],
         r"'train\.label_smoothing' must be 0 with adaptation\.method=dann, not 0\.1"),
        (["multitask.enabled=true", "task=segmentation", "train.label_smoothing=0.1"],
         r"'train\.label_smoothing' must be 0 with multitask\.enabled"),
        (["multitask.enabled=true", "task=segmentation", "model.deep_supervision=2"],
         r"'model\.deep_supervision' must be 0 with multitask\.enabled, not 2"),
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


@pytest.mark.parametrize("workflow", ["classify_2d", "classify_3d", "segment_3d"])
def test_shipped_workflows_give_small_training_sets_500_steps_unless_turned_off(workflow):
    from medtl.workflow.train import train_config_for

    shipped = load_config(WORKFLOWS / f"{workflow}.yaml", [])
    assert train_config_for(shipped, progress=False, monitor="auroc").min_steps == 500
    off = load_config(WORKFLOWS / f"{workflow}.yaml", ["train.min_steps=0"])
    assert train_config_for(off, progress=False, monitor="auroc").min_steps == 0


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
    from typing import get_origin, get_type_hints

    from medtl.workflow.config import WorkflowConfig

    sections = {name: cls for name, cls in get_type_hints(WorkflowConfig).items() if dataclasses.is_dataclass(cls)}
    keys = {f"{section}.{name}" for section, cls in sections.items()
            for name, hint in get_type_hints(cls).items() if get_origin(hint) in (tuple, dict)}
    assert keys == set(LIST_KEYS)
    assert all(spec.example for spec in LIST_KEYS.values())
    readme = (WORKFLOWS / "README.md").read_text()
    for key, spec in LIST_KEYS.items():
        if spec.empty:
            row = next(line for line in readme.splitlines() if line.startswith(f"| `{key}`"))
            assert "`null`" in row and ("`[]`" in row or "`{}`" in row), row
    null_refused = readme.split("## List keys")[1].split("\n\n")[1]
    assert {key for key, spec in LIST_KEYS.items() if not spec.empty} == set(
        re.findall(r"`([a-z_]+\.[a-z_]+)`", null_refused.split("Elsewhere")[1].split(")")[0]))


def _readme_keys() -> dict[str, tuple[str, str]]:
    """{key: (its documented default, its row)} from the Keys table of workflows/README.md."""
    table = (WORKFLOWS / "README.md").read_text().split("## Keys")[1].split("\n## ")[0]
    documented = {}
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.split(r",\s*(?![^\[]*\])", cells[1]) if len(names) > 1 else [cells[1]]
        defaults = defaults * len(names) if len(defaults) == 1 else defaults  # "—" for both keys
        assert len(defaults) == len(names), row
        documented.update({name: (default, row) for name, default in zip(names, defaults, strict=True)})
    return documented


def _as_yaml(text: str):
    text = re.sub(r"\s*\(.*\)$", "", text.replace("`", "")).strip()  # "0 (off)" documents 0
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value  # YAML 1.1 reads 1e-3 as text
    except ValueError:
        return value


def test_the_readme_documents_every_key_with_the_schema_default_and_choices():
    keys, documented = config_keys(), _readme_keys()
    assert set(documented) == set(keys)
    for key, (default, row) in documented.items():
        doc = keys[key]
        schema = list(doc.default) if isinstance(doc.default, tuple) else doc.default
        # Words ("keep", "all", "—") may describe an empty default; `name` defaults to the file name.
        if key != "name" and doc.default not in ("", (), {}):
            assert _as_yaml(default) == schema, f"README says {key} defaults to {default}, the schema {schema}"
        assert all(f"`{choice}`" in row for choice in doc.choices), row


def test_choices_come_from_the_one_vocabulary():
    keys = config_keys()
    assert keys["task"].choices == TASKS
    assert keys["train.strategy"].choices == STRATEGIES
    assert keys["evaluation.threshold_rule"].choices == THRESHOLD_RULES
    assert keys["fewshot.methods"].choices == FEW_SHOT_METHODS


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
        ("classify_2d", "train.label_smoothing=1", r"'train\.label_smoothing' must be in \[0, 1\), not 1"),
        ("segment_3d", "model.deep_supervision=-1", r"'model\.deep_supervision' must be at least 0, not -1"),
        ("classify_2d", "model.num_classes=1", r"'model\.num_classes' must be at least 2, not 1"),
        ("classify_2d", "train.layer_decay=1.5", r"'train\.layer_decay' must be in \[0, 1\]"),
        ("classify_2d", "evaluation.threshold_target=1", r"'evaluation\.threshold_target' must be in \(0, 1\)"),
        ("classify_2d", "audit.alpha=0", r"'audit\.alpha' must be in \(0, 1\), not 0"),
        ("classify_2d", "audit.tolerances={auroc: -0.1}", r"'audit\.tolerances\.auroc' must be at least 0"),
        ("classify_2d", "train.warmup_epochs=-1", r"'train\.warmup_epochs' must be at least 0"),
        ("classify_2d", "data.flip_axes=[2]", r"'data\.flip_axes' must list distinct spatial axes from 0 to 1 for "
                                              r"model\.spatial_dims=2, not \[2\]"),
        ("segment_3d", "data.flip_axes=[0, 0]", r"'data\.flip_axes' must list distinct spatial axes from 0 to 2"),
        ("segment_3d", "data.flip_axes=[-1]", r"'data\.flip_axes' must list distinct spatial axes"),
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


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.epochs=true", "config key 'train.epochs' must be a whole number, not true; e.g. 8"),
        ("train.lr=.nan", "config key 'train.lr' must be a positive number, not nan; e.g. 0.001"),
        ("model.dropout=.inf", "config key 'model.dropout' must be in [0, 1), not inf; e.g. 0.2"),
        ("train.lr=fast", "config key 'train.lr' must be a number, not 'fast'; e.g. 0.001"),
        ("data.augment=1", "config key 'data.augment' must be true or false, not 1"),
        ("data.image_size=[96, x]", "config key 'data.image_size' must be a whole number, not 'x'; "
                                    "e.g. [96, 96] (2D) or [32, 32, 16] (3D)"),
        ("fewshot.ks=[]", "config key 'fewshot.ks' must list at least one value, not []; e.g. [1, 5, 10, 20]"),
        ("data.fractions=[0.5, 0.5]", "config key 'data.fractions' must be three numbers summing to 1, not "
                                      "[0.5, 0.5]; e.g. [0.7, 0.15, 0.15]"),
        ("evaluation.n_boot=50", "config key 'evaluation.n_boot' must be at least 100, not 50; e.g. 2000"),
        ("audit.positive_class=yes", "config key 'audit.positive_class' must be text, not true; quote it (YAML "
                                     "reads unquoted yes, no, on and off as true/false)"),
        ("model=resnet", "config section 'model' must be a mapping, not str"),
        ("trian.epochs=3", "unknown config key 'trian'; did you mean 'train' or 'tracking'?"),
        ("data.intensity=MRI", "config key 'data.intensity' must be one of auto, ct, mr, xray, not 'MRI'; "
                               "did you mean 'mr'?"),
    ],
)
def test_each_wrong_value_is_one_line_naming_the_key_never_a_pydantic_dump(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config(WORKFLOWS / "classify_2d.yaml", [setting])
    assert str(err.value) == message


def test_several_bad_keys_name_the_first_and_list_the_others():
    with pytest.raises(ConfigError) as err:
        load_config(WORKFLOWS / "classify_2d.yaml", ["train.lr=0", "train.batch_size=0", "audit.alpha=2"])
    assert str(err.value) == ("config key 'train.batch_size' must be at least 1, not 0; e.g. 32 "
                              "(also check 'train.lr', 'audit.alpha')")


def test_text_keys_read_numbers_as_names_and_null_as_empty():
    cfg = load_config(WORKFLOWS / "classify_2d.yaml", ["audit.positive_class=1", "data.key_file=null"])
    assert (cfg.audit.positive_class, cfg.data.key_file) == ("1", "")


def test_an_empty_section_in_yaml_is_all_defaults(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("data:\n  root: r\n  labels: l.csv\naudit:\n")
    cfg = load_config(path)
    assert cfg.audit == load_config(WORKFLOWS / "classify_2d.yaml").audit
    assert cfg.name == "w"


def test_dataclasses_replace_keeps_working_and_validates_like_loading():
    cfg = load_config(WORKFLOWS / "classify_2d.yaml")
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest="built.csv"))
    assert (moved.data.manifest, moved.data.root, cfg.data.manifest) == ("built.csv", cfg.data.root, "")
    with pytest.raises(ConfigError, match=r"^config key 'fewshot\.ks' must be at least 1, not 0; e\.g\. \[1, 5"):
        dataclasses.replace(cfg.fewshot, ks=(0, 5))
    with pytest.raises(ConfigError, match=r"^unknown config key 'train\.epoch'; did you mean 'train\.epochs'"):
        dataclasses.replace(cfg.train, epoch=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_to_dict_is_a_plain_nested_mapping_that_loads_back():
    cfg = load_config(WORKFLOWS / "segment_3d.yaml", ["audit.tolerances={auroc: 0.05}", "data.image_size=[32, 32, 16]"])
    plain = to_dict(cfg)
    assert plain["train"]["lr"] == 0.001 and plain["audit"]["tolerances"] == {"auroc": 0.05}
    assert plain["data"]["image_size"] == (32, 32, 16)
    assert load_config(None, base=plain) == cfg


def test_list_choices_ignore_case_and_comma_lists_parse():
    cfg = load_config(WORKFLOWS / "classify_2d.yaml", ["fewshot.methods=Prototype", "data.modalities=CR,DX"])
    assert (cfg.fewshot.methods, cfg.data.modalities) == (("prototype",), ("CR", "DX"))


@pytest.mark.parametrize("workflow", ["segment_3d", "classify_3d"])
def test_flip_test_time_augmentation_is_refused_beyond_2d_classification(workflow):
    with pytest.raises(ConfigError, match=r"'evaluation.tta' must be none for 3D .*, not flip: training shows no "
                                          r"mirrored images"):
        load_config(WORKFLOWS / f"{workflow}.yaml", ["evaluation.tta=flip"])
    assert load_config(WORKFLOWS / "classify_2d.yaml", ["evaluation.tta=flip"]).evaluation.tta == "flip"


@pytest.mark.parametrize("workflow", ["segment_3d", "classify_3d", "classify_2d"])
def test_mirror_test_time_augmentation_needs_a_model_trained_with_flips(workflow):
    with pytest.raises(ConfigError, match=r"'evaluation.tta' can be mirror only for a model trained with flips"):
        load_config(WORKFLOWS / f"{workflow}.yaml", ["evaluation.tta=mirror"])
    axes = "[0, 1]" if workflow == "classify_2d" else "[0, 1, 2]"
    with pytest.raises(ConfigError, match=r"can be mirror only for a model trained with flips"):
        load_config(WORKFLOWS / f"{workflow}.yaml", ["evaluation.tta=mirror", f"data.flip_axes={axes}", "data.augment=false"])
    cfg = load_config(WORKFLOWS / f"{workflow}.yaml", ["evaluation.tta=mirror", f"data.flip_axes={axes}"])
    assert (cfg.evaluation.tta, cfg.data.flip_axes) == ("mirror", tuple(json.loads(axes)))


def test_the_package_mirrors_the_axes_its_run_trained_with_flips():
    from medtl.workflow.package import ModelPackage, reusable_config

    cfg = load_config(WORKFLOWS / "segment_3d.yaml", ["evaluation.tta=mirror", "data.flip_axes=[0, 2]"])
    fields = {"task": cfg.task, "encoder": cfg.model.encoder, "spatial_dims": 3, "in_channels": 1, "num_classes": 3,
              "classes": [], "positive_class": None, "threshold": None, "preprocessing": {}, "modalities": [],
              "key_id": "", "manifest_sha256": ""}
    package = ModelPackage(**fields, tta=cfg.evaluation.tta, workflow_config=reusable_config(cfg))
    assert package.flips() == (0, 2)  # what `medtl predict`, external evaluation and serving average over
    # A package written before data.flip_axes existed keeps its own mode.
    assert ModelPackage(**fields, tta="none", workflow_config={"data": {}}).flips() == ()


def test_the_package_rebuilds_the_decoders_input_skip(tmp_path):
    import torch

    from medtl.models import create_model
    from medtl.workflow.package import PACKAGE_FILE, ModelPackage, packable, read_package, write_package

    cfg = load_config(WORKFLOWS / "segment_3d.yaml", ["model.input_skip=8"])
    fields = {"task": cfg.task, "encoder": cfg.model.encoder, "spatial_dims": 3, "in_channels": 1, "num_classes": 3,
              "classes": [], "positive_class": None, "threshold": None, "preprocessing": {}, "modalities": [],
              "key_id": "", "manifest_sha256": ""}
    trained = create_model(cfg.task, cfg.model.encoder, spatial_dims=3, num_classes=3, weights="none",
                           input_skip=cfg.model.input_skip).model.eval()
    package = ModelPackage(**fields, input_skip=cfg.model.input_skip)
    assert packable(package, trained)
    assert not packable(ModelPackage(**fields), trained)  # without the key, another network
    _, network = read_package(write_package(package, trained, tmp_path / "package"))
    image = torch.randn(1, 1, 16, 24, 16)
    with torch.no_grad():
        assert torch.equal(network(image), trained(image))
    # A package written before model.input_skip existed has no skip.
    document = json.loads((tmp_path / "package" / PACKAGE_FILE).read_text())
    del document["input_skip"]
    assert ModelPackage(**document).input_skip == 0


def test_label_smoothing_reaches_the_loss():
    import torch

    from medtl.workflow.train import loss_and_metric

    logits, target = torch.tensor([[4.0, -4.0]]), torch.tensor([0])
    plain, _, _ = loss_and_metric(load_config(WORKFLOWS / "classify_2d.yaml"), None)
    smoothed, _, _ = loss_and_metric(load_config(WORKFLOWS / "classify_2d.yaml", ["train.label_smoothing=0.2"]), None)
    # A confident right answer costs more with smoothed targets (0.9, 0.1) than with (1, 0).
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.2)
    assert float(smoothed(logits, target)) == pytest.approx(float(expected))
    assert float(smoothed(logits, target)) > float(plain(logits, target)) + 0.5
