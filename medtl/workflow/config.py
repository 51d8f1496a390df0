"""Workflow configuration: one pydantic schema, loaded from YAML, validated up front.

Stable keys (scripts and hospital tooling call them): `data.root`, `data.labels`,
`data.manifest`, `model.encoder`, `model.weights`, `train.strategy`, `train.epochs`, `seed`.
`--set key=value` takes any key in dotted form; values are parsed as YAML scalars.

Each section is a frozen pydantic dataclass: construction validates (types, choices, ranges, unknown
keys), also through `dataclasses.replace`, and `dataclasses.asdict` gives the plain mapping. Every
refusal is a `ConfigError` naming the dotted key; `validate` adds the checks that span keys. Each
key's meaning, example and (list keys) what empty means live on its field: errors, `config_keys()`
and the test that keeps workflows/README.md in sync read them there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform, get_args, get_origin

import pydantic
import pydantic.dataclasses
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, GetCoreSchemaHandler, StrictBool
from pydantic_core import PydanticCustomError, PydanticKnownError, core_schema

from medtl.errors import ConfigError, did_you_mean
from medtl.vocabulary import (
    AMP_MODES,
    BALANCE_MODES,
    FEW_SHOT_METHODS,
    OPTIMIZERS,
    STRATEGIES,
    TASKS,
    THRESHOLD_RULES,
    TTA_MODES,
)

_Cls = TypeVar("_Cls", bound=type)


# --- How values are read ------------------------------------------------------------------------

def _refuse(rule: str, *, example: bool = True) -> PydanticCustomError:
    """A refusal whose text follows "config key 'K' " (the key's example is appended when `example`)."""
    return PydanticCustomError("medtl_rule", "{rule}", {"rule": rule, "example": example})


def _text(value: Any) -> Any:
    if value is None:
        return ""  # an empty text key (`manifest:` in YAML) is unset
    if isinstance(value, bool):
        raise _refuse(f"must be text, not {str(value).lower()}; quote it (YAML reads unquoted yes, no, on "
                      f"and off as true/false)", example=False)
    if isinstance(value, int | float | Path):
        return str(value)  # `positive_class: 1`, `root: 2024`: numbers and paths are names too
    return value


def _no_bool(kind: str) -> BeforeValidator:
    """Refuses true/false where a number belongs (pydantic's lax mode would read true as 1)."""
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticKnownError(kind)
        return value
    return BeforeValidator(check)


Text = Annotated[str, BeforeValidator(_text)]
Whole = Annotated[int, _no_bool("int_type")]
Number = Annotated[float, _no_bool("float_type")]


class _AnyCase:
    """Marks a `Literal` choice whose values ignore case (`data.intensity: MR` is `mr`)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        choices = get_args(source)

        def match(value: Any) -> Any:
            text = value.strip().casefold() if isinstance(value, str) else None
            return next((c for c in choices if str(c).casefold() == text), value)  # "3" is 3 too

        return core_schema.no_info_before_validator_function(match, handler(source))


ANY_CASE = _AnyCase()


@dataclasses.dataclass(frozen=True)
class Listed:
    """Marks a list or mapping key: reads `null`, comma lists (`CR,DX`) and refuses other shapes.

    Attributes:
        empty: what an empty value means, when it means something; such keys also read YAML
            `null` as empty. "" = empty has no meaning of its own and null is refused.
    """

    empty: str = ""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        mapping = get_origin(source) is dict
        item = get_args(source)[0]
        numeric = not mapping and (get_args(item)[0] if get_origin(item) is Annotated else item) in (int, float)

        def read(value: Any) -> Any:
            if value is None and self.empty:
                return {} if mapping else ()
            if mapping and isinstance(value, dict) or not mapping and isinstance(value, list | tuple):
                return value
            if isinstance(value, str) and not mapping:
                items = [v.strip() for v in value.split(",") if v.strip()]
                # `--set data.spacing=none` (or `keep`): a word where numbers belong is a list
                # written wrong, not a bad number; the error says how lists are written.
                try:
                    return [float(v) for v in items] if numeric else items
                except ValueError:
                    pass
            raise PydanticCustomError("medtl_shape", "must be a {kind}", {"kind": "mapping" if mapping else "list"})

        return core_schema.no_info_before_validator_function(read, handler(source))


def _positive_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    if all(s >= 1 for s in sizes):
        return sizes
    raise _refuse(f"must hold positive sizes, not {list(sizes)}")


def _ordered_window(window: tuple[float, ...]) -> tuple[float, ...]:
    if len(window) == 2 and window[0] < window[1]:
        return window
    raise _refuse(f"must be two numbers [low, high] in HU with low < high, not {list(window)}")


def _split_shares(shares: tuple[float, ...]) -> tuple[float, ...]:
    if not all(f >= 0 for f in shares):
        raise _refuse(f"must hold shares >= 0, not {list(shares)}")
    if len(shares) != 3 or abs(sum(shares) - 1.0) > 1e-6:
        raise _refuse(f"must be three numbers summing to 1, not {list(shares)}")
    return shares


_STRICT_KEYS = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass_transform(frozen_default=True, field_specifiers=(Field,))
def _section(cls: _Cls) -> _Cls:
    """A frozen pydantic dataclass whose construction (also `dataclasses.replace`) raises ConfigError."""
    cls = pydantic.dataclasses.dataclass(frozen=True, config=_STRICT_KEYS)(cls)
    validated_init = cls.__init__

    @functools.wraps(validated_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validated_init(self, *args, **kwargs)
        except pydantic.ValidationError as err:
            raise _config_error(err, _SECTION_NAMES.get(cls, "")) from err

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


# --- The schema ---------------------------------------------------------------------------------

@_section
class DataConfig:
    """Where the studies are and how they become tensors."""

    root: Text = Field("", description="studies folder (stable key)")
    labels: Text = Field("", description="labels CSV: path, label and/or mask, optional columns (stable key)")
    manifest: Text = Field("", description="an existing manifest CSV to use instead of building one (stable key)")
    manifest_out: Text = Field("", description="where the built manifest is published after a successful run")
    key_file: Text = Field("", description="project key for pseudonyms; empty: $MEDTL_KEY_FILE or the default")
    subgroups: Annotated[tuple[Text, ...], Listed("no extra subgroup columns")] = Field(
        (), description="extra subgroup columns of the labels CSV to audit", examples=["[ethnicity, insurance]"])
    # Studies without a DICOM Modality (PNG/JPEG/TIFF/NIfTI exports) cannot be filtered by it: they
    # are kept when their number of axes equals model.spatial_dims (the run warns how many).
    modalities: Annotated[tuple[Text, ...], Listed("keep every modality")] = Field(
        (), description="keep only studies of these DICOM modalities", examples=["[CR, DX] or [CT]"])
    fractions: Annotated[tuple[Number, ...], Listed(), AfterValidator(_split_shares)] = Field(
        (0.7, 0.15, 0.15), description="train/val/test share of patients", examples=["[0.7, 0.15, 0.15]"])
    # [] (3D only): from the data, `prepare.input_size_from_data` (segmentation's patch, classification's input).
    image_size: Annotated[tuple[Whole, ...], Listed("from the data (3D: about the median training volume)"),
                          AfterValidator(_positive_sizes)] = Field(
        (96, 96), description="network input (3D segmentation: the training patch)",
        examples=["[96, 96] (2D) or [32, 32, 16] (3D)"])
    spacing: Annotated[tuple[Number, ...], Listed("keep the source spacing")] = Field(
        (), description="3D resampling spacing in mm", examples=["[1.5, 1.5, 2.5]"])
    intensity: Annotated[Literal["auto", "ct", "mr", "xray"], ANY_CASE] = Field(
        "auto", description="CT window, MR percentiles, X-ray range, or auto from the modality")
    ct_window: Annotated[tuple[Number, ...], Listed(), AfterValidator(_ordered_window)] = Field(
        (-1000.0, 1000.0), description="CT window [low, high] in HU", examples=["[-1000, 1000]"])
    # disk: OUTPUT/cache/ holds one safetensors file per item: the preprocessed tensors, the row pseudonym and the
    # class index, no path or header value.
    cache: Annotated[Literal["memory", "disk", "none"], ANY_CASE] = Field(
        "memory", description="where the deterministic preprocessing is cached")
    num_workers: Whole = Field(0, ge=0, description="DataLoader workers", examples=["0 (load in the training process)"])
    augment: StrictBool = Field(True, description="random affine (rotation, scale, shift), noise and contrast for training")
    # Mirroring puts a structure on the other side: right for symmetric anatomy, wrong where a class
    # means a side (left kidney) unless it is mirrored too. Hence none by default.
    flip_axes: Annotated[tuple[Whole, ...], Listed("no flips")] = Field(
        (), description="spatial axes mirrored at random in training, each with probability 0.5 (3D: 0 left-right, "
                        "1 back-front, 2 foot-head)", examples=["[0, 1, 2]"])
    # Masks that are DICOM SEG/RTSTRUCT objects name their segments (ROIs) in free text; the map
    # turns names into classes (compared without regard to case and spacing); unknown names are
    # reported by the manifest build and stay background, never guessed.
    segment_map: Annotated[dict[Text, Annotated[int, Field(ge=0, le=255, strict=True)]],
                           Listed("no map (DICOM SEG/RTSTRUCT masks are refused)")] = Field(
        default_factory=dict, description="DICOM SEG segment / RTSTRUCT ROI name -> class index",
        examples=["{liver: 1, tumour: 2}"])
    masks_from_dicom: StrictBool = Field(
        False, description="a row without a mask gets the SEG/RTSTRUCT under data.root that references its series")


@_section
class ModelConfig:
    """Which pretrained encoder, which weights, which head."""

    encoder: Text = Field("efficientnet_lite0", description="a registered encoder (stable key)")
    weights: Text = Field("imagenet", description="imagenet, medicalnet, a checkpoint path or none (stable key)")
    spatial_dims: Annotated[Literal[2, 3], ANY_CASE] = Field(2, description="2D or 3D images")
    in_channels: Whole = Field(1, ge=1, description="input channels", examples=["1 (grey levels) or 3"])
    num_classes: Whole = Field(2, ge=2, description="classes (segmentation: labels incl. the background)",
                               examples=["2 (classes, or segmentation labels incl. background)"])
    multi_label: StrictBool = Field(False, description="one sigmoid per class (refused by workflows)")
    dropout: Number = Field(0.2, ge=0, lt=1, description="dropout before the classification head", examples=["0.2"])
    input_skip: Whole = Field(0, ge=0, description="segmentation: channels of a conv block on the input, the "
                              "decoder's full-resolution skip; 0: none", examples=["16 (0 turns it off)"])
    deep_supervision: Whole = Field(0, ge=0, description="segmentation: coarser decoder blocks (half resolution, "
                                    "quarter, ...) also trained with a head of their own; 0: none", examples=["2"])


@_section
class TrainConfigSection:
    """Transfer strategy and optimisation; `train_config_for` copies it into the engine's `TrainConfig`."""

    strategy: Annotated[Literal[STRATEGIES], ANY_CASE] = Field(
        "finetune", description="which encoder layers train, and when (stable key)")
    epochs: Whole = Field(8, ge=1, description="maximum epochs (stable key)", examples=["8"])
    batch_size: Whole = Field(32, ge=1, description="samples per optimizer step and process", examples=["32"])
    optimizer: Annotated[Literal[OPTIMIZERS], ANY_CASE] = Field("adamw", description="the optimizer")
    lr: Number = Field(1e-3, gt=0, description="peak learning rate (warm-up, then cosine decay)", examples=["0.001"])
    weight_decay: Number = Field(1e-4, ge=0, description="weight decay", examples=["1e-4"])
    layer_decay: Number = Field(0.0, ge=0, le=1, description="learning-rate decay per encoder stage; 0: off",
                                examples=["0.5 (0 turns layer-wise decay off)"])
    warmup_epochs: Whole = Field(1, ge=0, description="linear warm-up epochs", examples=["1"])
    # Measured at 10 % of PneumoniaMNIST (docs/benchmarks.md): LP-FT 0.957, fine-tuning 0.949, scratch on all labels 0.950.
    small_data_strategy: Annotated[Literal[STRATEGIES], ANY_CASE] = Field(
        "lp_ft", description="strategy of pretrained fine-tuning when the training set is small (train.min_steps "
        "passes over it several times an epoch); finetune: no change")
    # BiT-HyperRule (Kolesnikov et al. 2020) fine-tunes data sets under 20k images for 500 steps: a small
    # training set gets more passes per epoch, not fewer updates (its own recipe, chosen from its size).
    min_steps: Whole = Field(500, ge=0, description="fewest optimizer steps: small training sets are passed "
                             "over several times an epoch; 0: off", examples=["500 (0 turns it off)"])
    label_smoothing: Number = Field(0.0, ge=0, lt=1, description="share of each label spread over all classes "
                                    "in the cross-entropy (segmentation: DiceCE's); 0: off",
                                    examples=["0.1 (0 turns it off)"])
    ema_decay: Number = Field(0.0, ge=0, lt=1, description="moving average of the weights, validated and kept; 0: off",
                              examples=["0.999 (0 turns the average off)"])
    early_stopping_patience: Whole = Field(5, ge=1, description="epochs without improvement", examples=["4"])
    bn: Annotated[Literal["adapt", "freeze"], ANY_CASE] = Field(
        "adapt", description="adapt: BatchNorm statistics follow the new data; freeze: keep the encoder's")
    amp: Annotated[Literal[AMP_MODES], ANY_CASE] = Field(
        "auto", description="mixed precision on CUDA (auto: bf16 or fp16; off on CPU)")
    balance: Annotated[Literal[BALANCE_MODES], ANY_CASE] = Field(
        "none", description="sampler: class-balanced sampling; loss: class weights")
    deterministic: StrictBool = Field(True, description="deterministic algorithms (bit-exact resume)")
    compile: StrictBool = Field(False, description="wrap the model in torch.compile")
    # 0 = measured at every epoch (fastest under changing load, but the summation order, hence the
    # trained weights, can then differ between runs); N pins N threads, so the same run on the
    # same machine reproduces bit for bit.
    num_threads: Whole = Field(0, ge=0, description="CPU threads; 0: measure the fastest count",
                               examples=["0 (measure) or a thread count such as 4"])


@_section
class EvaluationConfig:
    """How test metrics and their confidence intervals are computed."""

    threshold_rule: Annotated[Literal[THRESHOLD_RULES], ANY_CASE] = Field(
        "youden", description="how the operating threshold is chosen on the validation split")
    threshold_target: Number = Field(0.9, gt=0, lt=1, description="target of sensitivity/fpr", examples=["0.9"])
    n_boot: Whole = Field(2000, ge=100, description="bootstrap replicates (patients resampled)", examples=["2000"])
    # Part of the registered model: `medtl predict`, `medtl evaluate` and the served model average alike.
    tta: Annotated[Literal[TTA_MODES], ANY_CASE] = Field(
        "none", description="test-time augmentation: flip averages the image and its left-right mirror; mirror, "
                            "the image and its mirror along each axis of data.flip_axes")


@_section
class AuditConfig:
    """Per-subgroup bias audit settings (the evaluation layer's pass/fail rules are `AuditRules`)."""

    attributes: Annotated[tuple[Text, ...], Listed()] = Field(
        ("sex", "age_band", "site", "scanner"), description="audited subgroup columns",
        examples=["[sex, age_band, site, scanner]"])
    intersections: StrictBool = Field(True, description="also audit every pair of attributes")
    tolerances: Annotated[dict[str, Annotated[Number, Field(ge=0)]], Listed("medtl's default tolerances")] = Field(
        default_factory=dict, description="largest acceptable gap per metric", examples=["{auroc: 0.05}"])
    alpha: Number = Field(0.05, gt=0, lt=1, description="family-wise error rate of the gap tests", examples=["0.05"])
    correction: Annotated[Literal["bonferroni", "none"], ANY_CASE] = Field(
        "bonferroni", description="multiple-testing correction of the gap tests")
    fail_on_flagged: StrictBool = Field(True, description="a flagged gap fails the audit")
    min_group_size: Whole = Field(10, ge=0, description="groups this small are suppressed", examples=["10"])
    min_gap_events: Whole = Field(10, ge=0, description="fewer positives/negatives: out of the metric's gaps",
                                  examples=["10"])
    # champion = the registered model's current @champion (its audit.json, unpaired); scratch = the
    # same model trained from scratch on the same manifest and budget (paired CIs; doubles training).
    reference: Annotated[Literal["champion", "scratch", "none"], ANY_CASE] = Field(
        "champion", description="bias-amplification reference")
    positive_class: Text = Field("", description="the positive class (> 2 classes: audited one-vs-rest, required)")


@_section
class TrackingConfig:
    """MLflow experiment and registry names."""

    experiment: Text = Field("medtl", description="MLflow experiment")
    registered_model: Text = Field("", description="registered model name; empty: the workflow name")
    register: StrictBool = Field(True, description="register the model (alias candidate); false only logs it")


@_section
class AdaptationConfig:
    """Domain adaptation to a target site/scanner whose training studies need no labels (docs/transfer.md)."""

    method: Annotated[Literal["none", "adabn", "dann"], ANY_CASE] = Field("none", description="adaptation method")
    domain_column: Text = Field("site", description="manifest column holding the domain (site, scanner, ...)")
    target: Text = Field("", description="the target domain's value in that column, e.g. a SITE-... code")
    # BatchNorm statistics need 2+ images a batch.
    batch_size: Whole = Field(32, ge=2, description="adabn: target images per forward pass", examples=["32"])
    domain_weight: Number = Field(1.0, ge=0, description="dann: weight of the domain loss", examples=["1.0"])
    gamma: Number = Field(10.0, gt=0, description="dann: steepness of the gradient-reversal schedule", examples=["10"])
    max_lambda: Number = Field(1.0, ge=0, description="dann: final gradient-reversal strength", examples=["1.0"])
    hidden: Whole = Field(256, ge=1, description="dann: width of the domain classifier", examples=["256"])


@_section
class MultiTaskConfig:
    """Segmentation plus a classification head on the shared encoder (task: segmentation)."""

    enabled: StrictBool = Field(False, description="train a class head beside the segmentation")
    cls_weight: Number = Field(1.0, ge=0, description="weight of the classification loss", examples=["1.0"])
    seg_weight: Number = Field(1.0, ge=0, description="weight of the segmentation loss", examples=["1.0"])


@_section
class FewShotConfig:
    """The few-shot study: frozen-encoder classifiers fitted on k labelled patients per class."""

    ks: Annotated[tuple[Annotated[Whole, Field(ge=1)], ...], Listed()] = Field(
        (1, 5, 10, 20), min_length=1, description="labelled patients per class", examples=["[1, 5, 10, 20]"])
    draws: Whole = Field(5, ge=1, description="random draws per k", examples=["5"])
    methods: Annotated[tuple[Annotated[Literal[FEW_SHOT_METHODS], ANY_CASE], ...], Listed()] = Field(
        FEW_SHOT_METHODS, min_length=1, description="classifiers", examples=["[prototype, linear_probe]"])
    normalize: StrictBool = Field(True, description="scale the embeddings to unit length (both methods)")
    probe_c: Number = Field(1.0, gt=0, description="C of the linear probe: larger is a weaker penalty", examples=["1.0"])


@_section
class ContinualConfig:
    """Continual fine-tuning: start from a registered version, report the old test set beside the new."""

    from_model: Text = Field("", description="registry version to start from",
                             examples=["models:/classify_2d@champion or models:/classify_2d/3"])
    old_manifest: Text = Field("", description="manifest CSV whose test split is the old test set")
    old_root: Text = Field("", description="data root of the old manifest; empty: data.root")


@_section
class WorkflowConfig:
    """A whole workflow: data -> model -> training -> evaluation -> audit -> MLflow."""

    name: Text = Field("workflow", description="run name (load_config: the file name)")
    task: Annotated[Literal[TASKS], ANY_CASE] = Field("classification", description="what the model predicts")
    seed: Whole = Field(0, ge=0, description="seeds splits, training and bootstrap", examples=["0"])
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfigSection = Field(default_factory=TrainConfigSection)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)
    multitask: MultiTaskConfig = Field(default_factory=MultiTaskConfig)
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)


_SECTIONS: dict[str, type] = {name: f.annotation for name, f in WorkflowConfig.__pydantic_fields__.items()
                              if dataclasses.is_dataclass(f.annotation)}
_SECTION_NAMES: dict[type, str] = {cls: name for name, cls in _SECTIONS.items()}


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as the schema declares it (for error messages, docs and their sync test).

    `kind` is "value", "list" or "mapping"; `empty` says what [] / {} and null mean for a list or
    mapping key ("" = null is refused); `choices` are a choice key's values (or its items').
    """

    key: str
    default: Any
    meaning: str
    example: str
    kind: str
    empty: str
    choices: tuple
    field: Any = dataclasses.field(repr=False)  # the pydantic FieldInfo: its range constraints


@functools.cache
def config_keys() -> dict[str, KeyDoc]:
    """Every key of the workflow config, in schema order.

    Example:
        >>> config_keys()["data.spacing"].empty
        'keep the source spacing'
    """
    docs = {}
    for name, field in WorkflowConfig.__pydantic_fields__.items():
        section = _SECTIONS.get(name)
        for member, info in section.__pydantic_fields__.items() if section else [("", field)]:
            key = f"{name}.{member}" if member else name
            listed = next((m for m in info.metadata if isinstance(m, Listed)), None)
            kind = "value" if listed is None else "mapping" if get_origin(info.annotation) is dict else "list"
            docs[key] = KeyDoc(key, info.get_default(call_default_factory=True), info.description or "",
                               (info.examples or [""])[0], kind, listed.empty if listed else "",
                               _choices(info.annotation), info)
    return docs


def _choices(annotation: Any) -> tuple:
    """The values of the `Literal` in `annotation` (or in its items), else ()."""
    while get_origin(annotation) in (Annotated, tuple):
        annotation = get_args(annotation)[0]
    return get_args(annotation) if get_origin(annotation) is Literal else ()


# --- Errors: pydantic's, worded as medtl's ------------------------------------------------------

_RULES = {  # pydantic error type -> what the value must be
    "int_from_float": "must be a whole number", "int_parsing": "must be a whole number",
    "int_type": "must be a whole number", "float_parsing": "must be a number", "float_type": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false", "string_type": "must be text",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def _config_error(err: pydantic.ValidationError, section: str) -> ConfigError:
    """The first of pydantic's errors as one ConfigError line, naming the other bad keys."""
    problems = err.errors(include_url=False)
    prefix = (section,) if section else ()
    keys = [".".join(str(p) for p in (*prefix, *problem["loc"]) if isinstance(p, str)) for problem in problems]
    message = _message(problems[0], prefix)
    others = list(dict.fromkeys(k for k in keys if k != keys[0]))
    if others:
        message += f" (also check {', '.join(repr(k) for k in others)})"
    return ConfigError(message)


def _message(problem: dict, prefix: tuple[str, ...]) -> str:
    loc = (*prefix, *problem["loc"])
    names = [str(p) for p in loc if isinstance(p, str)]
    kind, value, ctx = problem["type"], problem["input"], problem.get("ctx") or {}
    key = ".".join(names)
    if not names:
        return f"config is invalid ({kind.replace('_', ' ')})"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        section = names[0] if len(names) > 1 else ""
        options = [f.name for f in dataclasses.fields(_SECTIONS.get(section, WorkflowConfig))]
        return f"unknown config key '{key}'; {did_you_mean(names[-1], options, prefix=section + '.' if section else '')}"
    if kind == "dataclass_type":
        return f"config section '{key}' must be a mapping, not {type(value).__name__}"
    field_key = ".".join(names[:2] if names[0] in _SECTIONS else names[:1])
    doc = config_keys().get(field_key)
    item = isinstance(loc[-1], int) or key != field_key  # one value of a list or mapping key
    example = f"; e.g. {doc.example}" if doc and doc.example else ""
    if kind == "medtl_shape":
        found = "null" if value is None else repr(value) if isinstance(value, str) else type(value).__name__
        empty = f" ([] or null: {doc.empty})" if doc and doc.empty else ""
        return f"config key '{key}' must be a {ctx['kind']}, not {found}{example}{empty}"
    if kind == "medtl_rule":
        return f"config key '{key}' {ctx['rule']}{example if ctx['example'] else ''}"
    if kind == "literal_error" and doc:
        return _choice_message(key, value, doc.choices, item)
    if kind in _BOUNDS:
        rule = _range_rule(ctx if item or doc is None else _bounds_of(doc.field))
    elif kind == "too_short":
        rule = "must list at least one value"
    elif kind in _RULES:
        rule = _RULES[kind]
    else:  # an error no config key produces today: still one line naming the key
        return f"config key '{key}' is invalid ({kind.replace('_', ' ')}), not {_shown(value)}"
    return f"config key '{key}' {rule}, not {_shown(value)}{example}"


def _choice_message(key: str, value: Any, choices: tuple, item: bool) -> str:
    allowed = ", ".join(str(c) for c in choices)
    message = f"config key '{key}' must be {'among' if item else 'one of'} {allowed}, not {_shown(value)}"
    hint = did_you_mean(str(value).casefold(), [str(c) for c in choices])
    return f"{message}; {hint}" if hint.startswith("did you mean") else message


def _bounds_of(field: Any) -> dict[str, float]:
    """A field's range constraints as pydantic's error context names them ({"ge": 0, "lt": 1})."""
    return {name: getattr(c, name) for c in field.metadata for name in ("gt", "ge", "lt", "le")
            if getattr(c, name, None) is not None}


def _range_rule(bounds: dict[str, Any]) -> str:
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if low is not None and high is not None:
        return (f"must be in {'(' if 'gt' in bounds else '['}{low:g}, {high:g}"
                f"{')' if 'lt' in bounds else ']'}")
    if bounds.get("gt") == 0:
        return "must be a positive number"
    if low is not None:
        return f"must be {'greater than' if 'gt' in bounds else 'at least'} {low:g}"
    if high is not None:
        return f"must be {'less than' if 'lt' in bounds else 'at most'} {high:g}"
    return "must be a finite number"


def _shown(value: Any) -> str:
    """A value as it appears in an error message (YAML spelling for null and booleans)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return str(list(value))
    return repr(value)


# --- Loading ------------------------------------------------------------------------------------

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

    Relative `data.*` paths are kept as typed; they are read from the current working directory.

    Args:
        path: the workflow YAML; None = `base` alone.
        overrides: `key=value` items in dotted form, values parsed as YAML.
        base: keys to start from (the YAML's keys replace them).

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the bad key, when a key is unknown, a value has the wrong type or range,
            or keys contradict each other (`validate`).

    Example:
        >>> cfg = load_config(Path("workflows/classify_2d.yaml"), ["train.epochs=3"])
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
    # A section left empty in YAML (`audit:`) is all defaults; keys must be names to be passed on.
    raw = {str(k): ({} if v is None and k in _SECTIONS else v) for k, v in raw.items()}
    return validate(WorkflowConfig(**raw))


# --- Checks that span keys ----------------------------------------------------------------------

def validate(cfg: WorkflowConfig) -> WorkflowConfig:
    """Cross-key checks that a single key's type cannot express (each key is checked on construction).

    Returns:
        `cfg`, unchanged.

    Raises:
        ConfigError: naming the key to change.
    """
    if not cfg.data.manifest and not (cfg.data.root and cfg.data.labels):
        raise ConfigError("config must set data.manifest, or both data.root and data.labels")
    if cfg.data.manifest and not cfg.data.root:
        raise ConfigError("config key 'data.root' must be set with data.manifest (files are read from it)")
    from_data = not cfg.data.image_size and cfg.model.spatial_dims == 3
    if len(cfg.data.image_size) != cfg.model.spatial_dims and not from_data:
        raise ConfigError(
            f"config key 'data.image_size' must have {cfg.model.spatial_dims} values for "
            f"model.spatial_dims={cfg.model.spatial_dims}, not {list(cfg.data.image_size)} ([] chooses it from the "
            f"data for 3D models only)"
        )
    if cfg.model.multi_label:
        raise ConfigError("config key 'model.multi_label' must be false for workflows, not true: the manifest holds one "
                          "label per study; score multi-label predictions with medtl.evaluation.metrics."
                          "multilabel_metrics")
    _validate_spacing(cfg)
    _validate_flips(cfg)
    _validate_tta(cfg)
    _validate_adaptation(cfg)
    _validate_multitask(cfg)
    _validate_continual(cfg)
    return cfg


def _validate_spacing(cfg: WorkflowConfig) -> None:
    spacing, dims = cfg.data.spacing, cfg.model.spatial_dims
    if spacing and dims == 2:
        raise ConfigError(f"config key 'data.spacing' must be empty for model.spatial_dims=2 (2D images are resized "
                          f"to data.image_size, never resampled), not {list(spacing)}; remove it or set []")
    if spacing and (len(spacing) != dims or not all(s > 0 and math.isfinite(s) for s in spacing)):
        raise ConfigError(f"config key 'data.spacing' must be {dims} positive voxel sizes in mm, not {list(spacing)}; "
                          f"e.g. {config_keys()['data.spacing'].example}, or [] to keep the source spacing")


def _validate_flips(cfg: WorkflowConfig) -> None:
    axes, dims = cfg.data.flip_axes, cfg.model.spatial_dims
    if len(set(axes)) != len(axes) or not all(0 <= a < dims for a in axes):
        raise ConfigError(f"config key 'data.flip_axes' must list distinct spatial axes from 0 to {dims - 1} for "
                          f"model.spatial_dims={dims}, not {list(axes)}; e.g. {list(range(dims))}, or [] for no flips")


def _validate_tta(cfg: WorkflowConfig) -> None:
    # Without data.flip_axes training shows no mirrored images. A mirrored radiograph costs a little (-0.004
    # AUROC); a mirrored volume's classes land on the wrong side (-0.22 to -0.36 test Dice on the hippocampus).
    if cfg.evaluation.tta == "mirror":
        if not (cfg.data.flip_axes and cfg.data.augment):
            raise ConfigError("config key 'evaluation.tta' can be mirror only for a model trained with flips: set "
                              "data.flip_axes (e.g. [0, 1, 2]) with data.augment true, or set evaluation.tta to none")
        return
    if cfg.evaluation.tta != "none" and (cfg.task != "classification" or cfg.model.spatial_dims != 2):
        raise ConfigError(f"config key 'evaluation.tta' must be none for {cfg.model.spatial_dims}D {cfg.task}, not "
                          f"{cfg.evaluation.tta}: training shows no mirrored images, and averaged in, a mirrored volume "
                          f"lowered test Dice by 0.22-0.36 (docs/benchmarks.md); flip is for 2D classification, mirror "
                          f"for models trained with data.flip_axes")


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
    if a.method == "dann":
        if cfg.task != "classification" or cfg.model.multi_label:
            raise ConfigError("config key 'adaptation.method' must be adabn or none for segmentation or multi-label "
                              "models, not dann; DANN needs one class index per study")
        if cfg.train.label_smoothing:
            raise ConfigError(f"config key 'train.label_smoothing' must be 0 with adaptation.method=dann, not "
                              f"{cfg.train.label_smoothing}: DANN's loss has none; set train.label_smoothing=0")
        if cfg.train.balance == "sampler":
            raise ConfigError("config key 'train.balance' must be none or loss with adaptation.method=dann, not "
                              "sampler; the sampler cannot read DANN's [class, domain] labels")


def _validate_multitask(cfg: WorkflowConfig) -> None:
    m = cfg.multitask
    if not m.enabled:
        return
    for key, value in (("model.deep_supervision", cfg.model.deep_supervision),
                       ("train.label_smoothing", cfg.train.label_smoothing)):
        if value:
            raise ConfigError(f"config key '{key}' must be 0 with multitask.enabled, not {value}: the multi-task "
                              f"loss has neither; set {key}=0")
    if cfg.task != "segmentation":
        raise ConfigError(f"config key 'multitask.enabled' needs task segmentation (studies with a mask and a "
                          f"label), not task {cfg.task}; set task: segmentation")
    if m.cls_weight == 0 and m.seg_weight == 0:
        raise ConfigError("config keys 'multitask.cls_weight' and 'multitask.seg_weight' must not both be 0; "
                          "set one to e.g. 1.0")


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
