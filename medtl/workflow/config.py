"""Workflow configuration: one schema, loaded from YAML, validated up front.

Stable keys (scripts and hospital tooling call them): `data.root`, `data.labels`,
`data.manifest`, `model.encoder`, `model.weights`, `train.strategy`, `train.epochs`, `seed`.
`--set key=value` takes any key in dotted form; values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from medtl.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the studies are and how they become tensors."""

    root: str = ""
    labels: str = ""
    manifest: str = ""  # an existing manifest CSV to use instead of building one
    manifest_out: str = ""  # where to write the manifest built from root + labels
    key_file: str = ""
    subgroups: tuple[str, ...] = ()
    # Filters studies by their DICOM Modality (e.g. [CR, DX]); empty keeps every modality. Studies
    # without one (PNG/JPEG/TIFF/NIfTI exports) cannot be filtered by it: they are kept when their
    # number of axes equals model.spatial_dims (the run warns how many), else left out.
    modalities: tuple[str, ...] = ()
    fractions: tuple[float, ...] = (0.7, 0.15, 0.15)
    image_size: tuple[int, ...] = (96, 96)  # 2D (H, W) or 3D (D, H, W) network input
    spacing: tuple[float, ...] = ()  # 3D resampling spacing in mm; empty keeps the source spacing
    intensity: str = "auto"  # auto | ct | mr | xray
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    # memory | disk (OUTPUT/cache/: pixel tensors and pseudonymous row ids only) | none
    cache: str = "memory"
    num_workers: int = 0
    augment: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained encoder, which weights, which head."""

    encoder: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | medicalnet | a file path | none
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    multi_label: bool = False
    dropout: float = 0.2


@dataclass(frozen=True)
class TrainConfigSection:
    """Transfer strategy and optimisation."""

    strategy: str = "finetune"  # linear_probe | finetune | gradual_unfreeze | lp_ft
    epochs: int = 8
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    layer_decay: float = 0.0  # 0 disables layer-wise learning-rate decay
    warmup_epochs: int = 1
    early_stopping_patience: int = 5
    bn: str = "adapt"  # adapt | freeze
    amp: str = "auto"
    balance: str = "none"  # none | sampler | loss
    deterministic: bool = True
    compile: bool = False
    # CPU intra-op threads. 0 = measured at every epoch (fastest under changing load, but the
    # summation order, hence the trained weights, can then differ between runs); N pins N threads
    # so the same run on the same machine reproduces bit for bit.
    num_threads: int = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """How test metrics and their confidence intervals are computed."""

    threshold_rule: str = "youden"  # youden | sensitivity | fpr
    threshold_target: float = 0.9
    n_boot: int = 2000


@dataclass(frozen=True)
class AuditConfig:
    """Per-subgroup bias audit settings."""

    attributes: tuple[str, ...] = ("sex", "age_band", "site", "scanner")
    intersections: bool = True
    tolerances: dict[str, float] = field(default_factory=dict)  # empty: medtl.evaluation defaults
    alpha: float = 0.05
    correction: str = "bonferroni"  # bonferroni | none
    fail_on_flagged: bool = True
    min_group_size: int = 10
    min_gap_events: int = 10  # fewer positives/negatives: the group is left out of that metric's gaps
    # Bias amplification: whose gaps the model's are compared with. champion = the registered
    # model's current @champion (its audit.json, unpaired); scratch = the same model trained from
    # scratch on the same manifest and budget (paired CIs; doubles the training time); none.
    reference: str = "champion"
    positive_class: str = ""  # multi-class: the class audited one-vs-rest (required for > 2 classes)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment and registry names."""

    experiment: str = "medtl"
    registered_model: str = ""  # defaults to the workflow name
    register: bool = True


@dataclass(frozen=True)
class AdaptationConfig:
    """Domain adaptation to a target site/scanner whose training studies need no labels (docs/transfer.md)."""

    method: str = "none"  # none | adabn | dann
    domain_column: str = "site"  # manifest column holding the domain (site, scanner, ...)
    target: str = ""  # the target domain's value in that column, e.g. a SITE-... code
    batch_size: int = 32  # adabn: target images per forward pass (larger = steadier variances)
    domain_weight: float = 1.0  # dann: weight of the domain-classification loss
    gamma: float = 10.0  # dann: steepness of the gradient-reversal schedule
    max_lambda: float = 1.0  # dann: final gradient-reversal strength
    hidden: int = 256  # dann: width of the domain classifier


@dataclass(frozen=True)
class MultiTaskConfig:
    """Segmentation plus a classification head on the shared encoder (task: segmentation)."""

    enabled: bool = False
    cls_weight: float = 1.0
    seg_weight: float = 1.0


@dataclass(frozen=True)
class FewShotConfig:
    """The few-shot study: frozen-encoder classifiers fitted on k labelled patients per class."""

    ks: tuple[int, ...] = (1, 5, 10, 20)
    draws: int = 5
    methods: tuple[str, ...] = ("prototype", "linear_probe")
    normalize: bool = True  # L2-normalise the embeddings (both methods)
    probe_c: float = 1.0  # inverse regularisation of the linear probe


@dataclass(frozen=True)
class ContinualConfig:
    """Continual fine-tuning: start from a registered version, report the old test set beside the new."""

    from_model: str = ""  # models:/<name>@<alias> or models:/<name>/<version>
    old_manifest: str = ""  # manifest CSV whose test split is the old test set
    old_root: str = ""  # data root of the old manifest; empty = data.root


@dataclass(frozen=True)
class WorkflowConfig:
    """A whole workflow: data -> model -> training -> evaluation -> audit -> MLflow."""

    name: str = "workflow"
    task: str = "classification"  # classification | segmentation
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfigSection = field(default_factory=TrainConfigSection)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)


_CHOICES = {
    "task": ("classification", "segmentation"),
    "data.intensity": ("auto", "ct", "mr", "xray"),
    "data.cache": ("memory", "disk", "none"),
    "train.strategy": ("linear_probe", "finetune", "gradual_unfreeze", "lp_ft", "discriminative"),
    "train.optimizer": ("adamw", "sgd"),
    "train.bn": ("adapt", "freeze"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.balance": ("none", "sampler", "loss"),
    "evaluation.threshold_rule": ("youden", "sensitivity", "fpr"),
    "audit.correction": ("bonferroni", "none"),
    "audit.reference": ("champion", "scratch", "none"),
    "model.spatial_dims": (2, 3),
    "adaptation.method": ("none", "adabn", "dann"),
}
# Mirrors medtl.models.fewshot.FEW_SHOT_METHODS: loading a config must not import torch.
_FEW_SHOT_METHODS = ("prototype", "linear_probe")


@dataclass(frozen=True)
class ListKey:
    """How a list (or mapping) key is written, for its error messages and the docs.

    Attributes:
        example: a valid value, as typed in YAML or `--set`.
        empty: what an empty value means, when it means something; such keys also read YAML
            `null` as empty. "" = empty has no meaning (and null is refused).
    """

    example: str
    empty: str = ""


# Every list or mapping key of the schema (a test keeps this complete and workflows/README.md in sync).
LIST_KEYS: dict[str, ListKey] = {
    "data.subgroups": ListKey("[ethnicity, insurance]", "no extra subgroup columns"),
    "data.modalities": ListKey("[CR, DX] or [CT]", "keep every modality"),
    "data.fractions": ListKey("[0.7, 0.15, 0.15]"),
    "data.image_size": ListKey("[96, 96] (2D) or [32, 32, 16] (3D)"),
    "data.spacing": ListKey("[1.5, 1.5, 2.5]", "keep the source spacing"),
    "data.ct_window": ListKey("[-1000, 1000]"),
    "audit.attributes": ListKey("[sex, age_band, site, scanner]"),
    "audit.tolerances": ListKey("{auroc: 0.05}", "medtl's default tolerances"),
    "fewshot.ks": ListKey("[1, 5, 10, 20]"),
    "fewshot.methods": ListKey("[prototype, linear_probe]"),
}


def _shape_error(key: str, kind: str, value: Any) -> ConfigError:
    spec = LIST_KEYS.get(key, ListKey("[...]"))
    empty = f" ([] or null: {spec.empty})" if spec.empty else ""
    found = "null" if value is None else repr(value) if isinstance(value, str) else type(value).__name__
    return ConfigError(f"config key '{key}' must be a {kind}, not {found}; e.g. {spec.example}{empty}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    if origin in (dict, tuple) and value is None and LIST_KEYS.get(key, ListKey("")).empty:
        return {} if origin is dict else ()  # null means the same as empty where empty means something
    if origin is dict:
        if not isinstance(value, dict):
            raise _shape_error(key, "mapping", value)
        inner = get_args(annotation)[1]
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        inner = get_args(annotation)[0]
        if isinstance(value, str):
            text = value
            value = [v.strip() for v in value.split(",") if v.strip()]
            if inner in (int, float) and not all(_is_number(v) for v in value):
                # `--set data.spacing=none` (or `off`, `keep`): a word where numbers belong is a
                # list written wrong, not a bad number; say how lists and empty ones are written.
                raise _shape_error(key, "list", text)
        if not isinstance(value, list | tuple):
            raise _shape_error(key, "list", value)
        return tuple(_coerce(v, inner, key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, not {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"config key '{key}' must be a number, not {value!r}")
        try:
            number = annotation(value)
        except ValueError as err:
            raise ConfigError(f"config key '{key}' must be a number, not {value!r}") from err
        if annotation is int and float(value) != number:
            raise ConfigError(f"config key '{key}' must be a whole number, not {value!r}")
        return number
    if annotation is str:
        return "" if value is None else str(value)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, not {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, dotted + ".")
        else:
            kwargs[key] = _coerce(value, annotation, dotted)
        if dotted in _CHOICES:
            kwargs[key] = _choice(dotted, kwargs[key])
    return cls(**kwargs)


def _choice(key: str, value: Any) -> Any:
    """The choice `value` names, case-insensitively (`data.intensity: MR` is `mr`).

    Raises:
        ConfigError: naming the key and its choices when `value` is none of them.
    """
    choices = _CHOICES[key]
    if isinstance(value, str):
        match = next((c for c in choices if isinstance(c, str) and c.casefold() == value.strip().casefold()), None)
        if match is not None:
            return match
    elif value in choices:
        return value
    allowed = ", ".join(str(c) for c in choices)
    raise ConfigError(f"config key '{key}' must be one of {allowed}, not {value!r}")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key=value` overrides in dotted form to a raw config mapping (values parsed as YAML)."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, not {item!r}; e.g. --set train.epochs=3")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text.strip() else ""
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a config section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return result


def load_config(path: Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> WorkflowConfig:
    """Load and validate a workflow YAML (or a base mapping) with dotted `--set` overrides.

    Relative `data.*` paths are resolved against the current working directory, as users type them.

    Raises:
        ConfigError: naming the bad key, when a key is unknown or a value has the wrong type.
    """
    raw: dict = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"workflow file {path} does not exist; see workflows/README.md") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"workflow file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"workflow file {path} must hold a mapping of config keys")
        raw.update(loaded or {})
        raw.setdefault("name", Path(path).stem)
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(WorkflowConfig, raw, "")
    return validate(cfg)


def validate(cfg: WorkflowConfig) -> WorkflowConfig:
    """Cross-key checks that a single key's type cannot express."""
    if not cfg.data.manifest and not (cfg.data.root and cfg.data.labels):
        raise ConfigError("config must set data.manifest, or both data.root and data.labels")
    if cfg.data.manifest and not cfg.data.root:
        raise ConfigError("config key 'data.root' must be set with data.manifest (files are read from it)")
    if len(cfg.data.image_size) != cfg.model.spatial_dims:
        raise ConfigError(
            f"config key 'data.image_size' must have {cfg.model.spatial_dims} values for "
            f"model.spatial_dims={cfg.model.spatial_dims}, not {list(cfg.data.image_size)}"
        )
    if cfg.evaluation.n_boot < 100:
        raise ConfigError(f"config key 'evaluation.n_boot' must be at least 100 (2000 recommended), not {cfg.evaluation.n_boot}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"config key 'train.epochs' must be at least 1, not {cfg.train.epochs}")
    if cfg.train.num_threads < 0:
        raise ConfigError(f"config key 'train.num_threads' must be 0 (measure) or a thread count, not {cfg.train.num_threads}")
    if abs(sum(cfg.data.fractions) - 1.0) > 1e-6 or len(cfg.data.fractions) != 3:
        raise ConfigError(f"config key 'data.fractions' must be three numbers summing to 1, not {list(cfg.data.fractions)}")
    if cfg.model.multi_label:
        raise ConfigError("config key 'model.multi_label' must be false for workflows, not true: the manifest holds one "
                          "label per study; score multi-label predictions with medtl.evaluation.metrics."
                          "multilabel_metrics")
    _validate_data_ranges(cfg)
    _validate_numbers(cfg)
    _validate_adaptation(cfg)
    _validate_multitask(cfg)
    _validate_fewshot(cfg)
    _validate_continual(cfg)
    return cfg


def _at_least(key: str, value: float, low: float, example: str) -> None:
    if not value >= low or math.isinf(value):  # written so that NaN fails too
        raise ConfigError(f"config key '{key}' must be at least {low:g}, not {value:g}; e.g. {example}")


def _between(key: str, value: float, low: float, high: float, example: str, *, low_open: bool = False,
             high_open: bool = False) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # NaN fails both
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"config key '{key}' must be in {interval}, not {value:g}; e.g. {example}")


def _validate_data_ranges(cfg: WorkflowConfig) -> None:
    d = cfg.data
    dims = cfg.model.spatial_dims
    if not all(size >= 1 for size in d.image_size):
        raise ConfigError(f"config key 'data.image_size' must hold positive sizes, not {list(d.image_size)}; "
                          f"e.g. {LIST_KEYS['data.image_size'].example}")
    if d.spacing and dims == 2:
        raise ConfigError(f"config key 'data.spacing' must be empty for model.spatial_dims=2 (2D images are resized "
                          f"to data.image_size, never resampled), not {list(d.spacing)}; remove it or set []")
    if d.spacing and (len(d.spacing) != dims or not all(s > 0 and math.isfinite(s) for s in d.spacing)):
        raise ConfigError(f"config key 'data.spacing' must be {dims} positive voxel sizes in mm, not {list(d.spacing)}; "
                          f"e.g. {LIST_KEYS['data.spacing'].example}, or [] to keep the source spacing")
    if len(d.ct_window) != 2 or not d.ct_window[0] < d.ct_window[1]:
        raise ConfigError(f"config key 'data.ct_window' must be two numbers [low, high] in HU with low < high, not "
                          f"{list(d.ct_window)}; e.g. {LIST_KEYS['data.ct_window'].example}")
    if not all(f >= 0 for f in d.fractions):
        raise ConfigError(f"config key 'data.fractions' must hold shares >= 0, not {list(d.fractions)}; "
                          f"e.g. {LIST_KEYS['data.fractions'].example}")
    _at_least("data.num_workers", d.num_workers, 0, "0 (load in the training process)")


def _validate_numbers(cfg: WorkflowConfig) -> None:
    """Numeric ranges of the model, train, evaluation and audit keys, before any work starts."""
    m, t, e, a = cfg.model, cfg.train, cfg.evaluation, cfg.audit
    _at_least("seed", cfg.seed, 0, "0")
    _at_least("model.in_channels", m.in_channels, 1, "1 (grey levels) or 3")
    _at_least("model.num_classes", m.num_classes, 2, "2 (classes, or segmentation labels incl. background)")
    _between("model.dropout", m.dropout, 0, 1, "0.2", high_open=True)
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise ConfigError(f"config key 'train.lr' must be a positive number, not {t.lr:g}; e.g. 0.001")
    _at_least("train.batch_size", t.batch_size, 1, "32")
    _at_least("train.weight_decay", t.weight_decay, 0, "1e-4")
    _between("train.layer_decay", t.layer_decay, 0, 1, "0.5 (0 turns layer-wise decay off)")
    _at_least("train.warmup_epochs", t.warmup_epochs, 0, "1")
    _at_least("train.early_stopping_patience", t.early_stopping_patience, 1, "4")
    _between("evaluation.threshold_target", e.threshold_target, 0, 1, "0.9", low_open=True, high_open=True)
    _between("audit.alpha", a.alpha, 0, 1, "0.05", low_open=True, high_open=True)
    _at_least("audit.min_group_size", a.min_group_size, 0, "10")
    _at_least("audit.min_gap_events", a.min_gap_events, 0, "10")
    for metric, tolerance in a.tolerances.items():
        _at_least(f"audit.tolerances.{metric}", tolerance, 0, "0.05")


def _validate_adaptation(cfg: WorkflowConfig) -> None:
    a = cfg.adaptation
    if a.method == "none":
        return
    if not a.domain_column.strip():
        raise ConfigError(f"config key 'adaptation.domain_column' must name a manifest column for "
                          f"adaptation.method={a.method}, not be empty; e.g. site or scanner")
    if not a.target.strip():
        raise ConfigError(f"config key 'adaptation.target' must be set for adaptation.method={a.method}, not empty; "
                          f"give the target domain's value of manifest column '{a.domain_column}'")
    _at_least("adaptation.batch_size", a.batch_size, 2, "32")  # BatchNorm statistics need 2+ images a batch
    if a.method == "dann":
        if cfg.task != "classification" or cfg.model.multi_label:
            raise ConfigError("config key 'adaptation.method' must be adabn or none for segmentation or multi-label "
                              "models, not dann; DANN needs one class index per study")
        if cfg.train.balance == "sampler":
            raise ConfigError("config key 'train.balance' must be none or loss with adaptation.method=dann, not "
                              "sampler; the sampler cannot read DANN's [class, domain] labels")
        _at_least("adaptation.domain_weight", a.domain_weight, 0, "1.0")
        _at_least("adaptation.max_lambda", a.max_lambda, 0, "1.0")
        _at_least("adaptation.hidden", a.hidden, 1, "256")
        if a.gamma <= 0:
            raise ConfigError(f"config key 'adaptation.gamma' must be positive, not {a.gamma:g}; e.g. 10")


def _validate_multitask(cfg: WorkflowConfig) -> None:
    m = cfg.multitask
    if not m.enabled:
        return
    if cfg.task != "segmentation":
        raise ConfigError(f"config key 'multitask.enabled' needs task segmentation (studies with a mask and a "
                          f"label), not task {cfg.task}; set task: segmentation")
    _at_least("multitask.cls_weight", m.cls_weight, 0, "1.0")
    _at_least("multitask.seg_weight", m.seg_weight, 0, "1.0")
    if m.cls_weight == 0 and m.seg_weight == 0:
        raise ConfigError("config keys 'multitask.cls_weight' and 'multitask.seg_weight' must not both be 0; "
                          "set one to e.g. 1.0")


def _validate_fewshot(cfg: WorkflowConfig) -> None:
    f = cfg.fewshot
    if not f.ks:
        raise ConfigError("config key 'fewshot.ks' must list at least one k, not be empty; e.g. [1, 5, 10, 20]")
    for k in f.ks:
        _at_least("fewshot.ks", k, 1, "[1, 5, 10, 20]")
    _at_least("fewshot.draws", f.draws, 1, "5")
    unknown = [m for m in f.methods if m not in _FEW_SHOT_METHODS]
    if unknown or not f.methods:
        raise ConfigError(f"config key 'fewshot.methods' must be among {', '.join(_FEW_SHOT_METHODS)}, "
                          f"not {list(f.methods)}")
    if f.probe_c <= 0:
        raise ConfigError(f"config key 'fewshot.probe_c' must be positive, not {f.probe_c:g}; e.g. 1.0")


def _validate_continual(cfg: WorkflowConfig) -> None:
    c = cfg.continual
    if not (c.from_model or c.old_manifest or c.old_root):
        return
    if not c.from_model.startswith("models:/") or len(c.from_model) <= len("models:/"):
        raise ConfigError(f"config key 'continual.from_model' must be a registry URI such as "
                          f"models:/classify_2d@champion or models:/classify_2d/3, not {c.from_model!r}")
    if not c.old_manifest:
        raise ConfigError("config key 'continual.old_manifest' must be set with continual.from_model, not empty; "
                          "give the manifest CSV whose test split is the old test set")


def to_dict(cfg: WorkflowConfig) -> dict:
    """The config as a plain nested mapping (for logging and writing back to YAML)."""
    return dataclasses.asdict(cfg)
