"""Transfer methods beyond plain fine-tuning, chosen by the workflow config.

Domain adaptation (AdaBN, DANN), multi-task segmentation + classification, and continual
fine-tuning from a registered version (with its old test set). `train_for_config` picks the
method; `medtl.workflow.run` records what it did.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from monai.data import Dataset as MonaiDataset
from monai.transforms import ResizeWithPadOrCropd
from torch.utils.data import DataLoader

from medtl.data.dataset import make_dataset, manifest_items
from medtl.engine.inference import collate_fn
from medtl.errors import ConfigError, InputError, LeakageError
from medtl.models.domain import (
    DANNModel,
    DANNPlan,
    DomainLabelDataset,
    adapt_batchnorm,
    dann_loss,
    domain_labels,
)
from medtl.models.factory import ModelBundle
from medtl.models.multitask import (
    MultiTaskDataset,
    MultiTaskModel,
    multitask_loss,
    split_labels,
    split_outputs,
)
from medtl.tracking import registry
from medtl.workflow.config import AdaptationConfig, WorkflowConfig
from medtl.workflow.evaluate import (
    evaluate,
    multitask_classes,
    patient_ids,
    predictions_table,
    scratch_reference_config,
)
from medtl.workflow.prepare import PreparedData, prepare_data, target_domain_rows
from medtl.workflow.train import (
    TrainedModel,
    build_model,
    class_auroc,
    datasets_for,
    fit_model,
    load_initial_state,
    loss_and_metric,
    loss_class_weights,
    preprocessing_for,
    train_model,
    training_augmentation,
    transfer_plan_for,
)

logger = logging.getLogger(__name__)


EpochCallback = Callable[[int, dict], None]


# --------------------------------------------------------------------------------------- training
def train_for_config(
    cfg: WorkflowConfig,
    data: PreparedData,
    *,
    output_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[TrainedModel, dict, dict]:
    """Train the workflow's model the way its config says: plain, AdaBN, DANN and/or multi-task.

    Args:
        cfg: the validated workflow config.
        data: from `prepare_data` (with the target domain's unlabelled training rows, if any).
        output_dir: checkpoints go to output_dir/checkpoints.
        resume: continue from the last checkpoint.
        progress: progress bars.
        on_epoch_end: called with each epoch's record (MLflow logging).
        initial_state: starting weights (continual fine-tuning).

    Returns:
        (trained model, datasets with "val" and "test", facts about the method for metrics.json:
        for AdaBN "bn_layers" and "target_images"; for DANN "target_images").

    Raises:
        ConfigError: when the target domain is not in the manifest.
        InputError: when a domain has no training studies left.
    """
    method = cfg.adaptation.method
    args = {"output_dir": output_dir, "resume": resume, "progress": progress, "on_epoch_end": on_epoch_end,
            "initial_state": initial_state}
    info: dict = {}
    train_data = source_data(cfg, data) if method == "adabn" else data
    if method == "dann":
        trained, sets = train_dann(cfg, data, **args)
        info["target_images"] = int(_target_training_rows(cfg, data).shape[0])
    elif cfg.multitask.enabled:
        trained, sets = train_multitask(cfg, train_data, **args)
    else:
        trained, sets = train_model(cfg, train_data, **args)
    if method == "adabn":
        info.update(apply_adabn(cfg, data, trained, progress=progress))
    return trained, sets, info


def source_data(cfg: WorkflowConfig, data: PreparedData) -> PreparedData:
    """The data without the target domain's train and val rows (its test rows stay).

    Raises:
        InputError: when no source study is left in train or val.
    """
    target = target_domain_rows(cfg, data.manifest)
    manifest = data.manifest[~(target & data.manifest["split"].isin(["train", "val"]).to_numpy())]
    for split in ("train", "val"):
        if not (manifest["split"] == split).any():
            raise InputError(
                f"adaptation must leave source-domain studies in the '{split}' split, not none: every one is in "
                f"target domain {cfg.adaptation.target!r}; choose another adaptation.target or add source studies"
            )
    return dataclasses.replace(data, manifest=manifest.reset_index(drop=True))


def _target_training_rows(cfg: WorkflowConfig, data: PreparedData) -> pd.DataFrame:
    rows = data.manifest[target_domain_rows(cfg, data.manifest) & (data.manifest["split"] == "train").to_numpy()]
    if rows.empty:
        raise InputError(
            f"target domain {cfg.adaptation.target!r} must have studies in the 'train' split to adapt to, not "
            f"none; add unlabelled target studies with split train (its test studies are for evaluation)"
        )
    return rows


def unlabelled_items(rows: pd.DataFrame) -> list[dict]:
    """Dataset items of manifest rows whose label (and mask) must not be used: images only, label -1."""
    return [{"id": row["id"], "row": row, "mask_ref": "", "label": -1} for row in rows.to_dict("records")]


def apply_adabn(cfg: WorkflowConfig, data: PreparedData, trained: TrainedModel, *, progress: bool = True) -> dict:
    """AdaBN on the trained model: BatchNorm statistics from the target domain's training images.

    Images get the evaluation preprocessing; patch-trained (3D segmentation) models see each
    volume centre-cropped or padded to the patch size, the field of view of one sliding window.

    Returns:
        {"bn_layers": layers re-estimated, "target_images": images used}.

    Raises:
        InputError: when the target domain has fewer than 2 training images.
    """
    items = unlabelled_items(_target_training_rows(cfg, data))
    if len(items) < 2:
        raise InputError(f"target domain {cfg.adaptation.target!r} must have at least 2 training studies for AdaBN, "
                         f"not {len(items)}; BatchNorm statistics cannot be estimated from one image")
    dataset = make_dataset(items, trained.prep, data.root, key_file=data.key_file, train=False, cache="none",
                           progress=progress)
    if trained.prep.patch:
        dataset = MonaiDataset(dataset, transform=ResizeWithPadOrCropd(keys="image",
                                                                       spatial_size=trained.prep.image_size))
    size = cfg.adaptation.batch_size
    # A final batch of one image fails in BatchNorm layers whose input is 1 x 1 (train mode needs
    # two values per channel); dropping that one image costs the statistics nothing.
    loader = DataLoader(dataset, batch_size=size, shuffle=False, drop_last=len(items) % size == 1,
                        collate_fn=collate_fn())
    layers = adapt_batchnorm(trained.bundle.model, loader, progress=progress)
    if layers == 0:
        logger.warning("adaptation.method=adabn changed nothing: the model has no BatchNorm layer")
    used = len(items) - (len(items) % size == 1)
    return {"bn_layers": layers, "target_images": used}


def train_dann(
    cfg: WorkflowConfig,
    data: PreparedData,
    *,
    output_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[TrainedModel, dict]:
    """DANN: labelled source and unlabelled target training studies, validation on source studies.

    Returns:
        The trained model (its bundle holds the plain classifier, without the domain head) and
        datasets ("train" = source + target, "val" = source, "test" = both domains).
    """
    a = cfg.adaptation
    torch.manual_seed(cfg.seed)
    bundle = build_model(cfg)
    load_initial_state(bundle.model, initial_state)
    prep = preprocessing_for(cfg, bundle)
    source = source_data(cfg, data)
    items = (manifest_items(source.manifest, "train", cfg.task, data.classes, source.sidecar.get("segment_map"))
             + unlabelled_items(_target_training_rows(cfg, data)))
    domains, _ = domain_labels([item["row"][a.domain_column] for item in items], target=a.target.strip(),
                               column=a.domain_column)
    train_set = make_dataset(items, prep, data.root, key_file=data.key_file, train=True, augment=cfg.data.augment,
                             augmentation=training_augmentation(cfg), cache=cfg.data.cache, cache_dir=data.cache_dir,
                             progress=progress)
    sets = {"train": train_set, **datasets_for(cfg, source, prep, progress=progress, splits=("val", "test"))}
    model = DANNModel(bundle.model, num_domains=2, hidden=a.hidden)
    plan = DANNPlan(transfer_plan_for(cfg, model), epochs=cfg.train.epochs, gamma=a.gamma, max_lambda=a.max_lambda)
    loss = dann_loss(cfg.model.num_classes, a.domain_weight, class_weights=loss_class_weights(cfg, items))
    # The DANN model shares the classifier's encoder and head, so the bundle's classifier ends up
    # with the best epoch's weights when fit loads them into the DANN model.
    trained = fit_model(
        cfg, data, bundle, prep, model=model,
        train_set=DomainLabelDataset(train_set, domains, class_labels=[item["label"] for item in items]),
        val_set=sets["val"], loss_fn=loss, metric_fn=class_auroc, monitor="auroc", plan=plan,
        output_dir=output_dir, resume=resume, progress=progress, on_epoch_end=on_epoch_end,
    )
    return trained, sets


def train_multitask(
    cfg: WorkflowConfig,
    data: PreparedData,
    *,
    output_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[TrainedModel, dict]:
    """Segmentation + classification on one encoder; rows without a label train the masks only.

    The best epoch is the one with the highest mean of validation Dice and class AUROC.

    Raises:
        ConfigError: when the segmentation rows carry fewer than two class labels.
    """
    classes = multitask_classes(data)
    if len(classes) < 2:
        raise ConfigError(f"config key 'multitask.enabled' needs at least 2 classes in the manifest's label column "
                          f"among rows with a mask, not {len(classes)}; add labels or disable multi-task")
    torch.manual_seed(cfg.seed)
    base = build_model(cfg)
    model = MultiTaskModel(base.model, num_classes=len(classes), dropout=cfg.model.dropout)
    bundle: ModelBundle = dataclasses.replace(base, model=model)
    load_initial_state(model, initial_state)
    prep = preprocessing_for(cfg, bundle)
    sets = datasets_for(cfg, data, prep, progress=progress)
    labels = data.manifest.set_index("id")["label"].str.strip()
    index = {name: i for i, name in enumerate(classes)}

    def packed(split: str) -> MultiTaskDataset:
        return MultiTaskDataset(sets[split], [index.get(labels[item["id"]], -1) for item in sets[split].data])

    _, dice, _ = loss_and_metric(cfg, None)
    trained = fit_model(
        cfg, data, bundle, prep, model=model, train_set=packed("train"), val_set=packed("val"),
        loss_fn=multitask_loss(model.num_seg_classes, cls_weight=cfg.multitask.cls_weight,
                               seg_weight=cfg.multitask.seg_weight),
        metric_fn=multitask_metric(model.num_seg_classes, dice), monitor="dice_auroc", plan=transfer_plan_for(cfg, model),
        output_dir=output_dir, resume=resume, progress=progress, on_epoch_end=on_epoch_end,
    )
    return trained, sets


def multitask_metric(num_seg_classes: int, dice: Callable) -> Callable[[torch.Tensor, torch.Tensor], dict]:
    """Validation metric of packed multi-task outputs: "dice", class "auroc" and their mean "dice_auroc".

    The class AUROC is NaN when it is undefined (no validation study with a class label, or one
    class only), never 0.5; "dice_auroc" is then the mean of what is defined, Dice alone, so the
    best epoch still follows the masks.
    """

    def metric(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        segmentation, logits = split_outputs(outputs, num_seg_classes)
        mask, classes = split_labels(targets)
        values = dice(segmentation, mask)
        known = classes >= 0
        values["auroc"] = class_auroc(logits[known], classes[known])["auroc"] if bool(known.any()) else math.nan
        defined = [v for v in (values["dice"], values["auroc"]) if math.isfinite(v)]
        values["dice_auroc"] = sum(defined) / len(defined) if defined else math.nan
        return values

    return metric


# --------------------------------------------------------------------------------------- evaluation
def domain_test_sets(cfg: WorkflowConfig, data: PreparedData, predictions: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The predictions table cut for `target_test` and `source_test` (val rows kept for the threshold).

    A domain without test rows is left out (with a warning).
    """
    in_target = pd.Series(target_domain_rows(cfg, data.manifest), index=data.manifest["id"])
    target = in_target.loc[predictions["id"]].to_numpy()
    val = (predictions["split"] == "val").to_numpy()
    test = (predictions["split"] == "test").to_numpy()
    out = {}
    for name, rows in (("target_test", test & target), ("source_test", test & ~target)):
        if rows.any():
            out[name] = predictions[val | rows]
        else:
            logger.warning("no %s metrics: the test split has no study of that domain", name)
    return out


# --------------------------------------------------------------------------------------- continual
@dataclass(frozen=True)
class RegisteredWeights:
    """The weights of a registered model version, to continue training from.

    Attributes:
        reference: "name/version" of the version (or the logged model id).
        state: its state_dict, on the CPU.
        tags: the version's registry tags (task, encoder, ...); empty for a bare logged model.
    """

    reference: str
    state: dict[str, torch.Tensor]
    tags: dict[str, str]


def load_registered_weights(uri: str) -> RegisteredWeights:
    """Load a registered version (`models:/name@alias`, `models:/name/version` or `models:/m-<id>`).

    MLflow resolves the URI (`medtl.tracking.registry.resolve_model_uri`); the weights are then
    loaded from the exact version it resolved to. medtl logs models in MLflow's `pt2` format
    (`torch.export`); the loaded program keeps the original module's parameter and buffer names, so
    its state_dict loads into a freshly built model of the same config.

    Raises:
        InputError: when the URI names no existing version (the message says why), or the
            version cannot be loaded.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    reference, version = registry.resolve_model_uri(uri, what="config key 'continual.from_model'")
    try:
        module = mlflow.pytorch.load_model(f"models:/{reference}")
    except (MlflowException, OSError) as err:
        raise InputError(
            f"config key 'continual.from_model' must name a version whose model loads, not {uri!r} "
            f"({reference}: {type(err).__name__}); register the model again through `medtl run`"
        ) from err
    state = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
    tags = dict(version.tags) if version is not None else {}
    return RegisteredWeights(reference=reference, state=state, tags=tags)


def check_registered_fits(cfg: WorkflowConfig, registered: RegisteredWeights) -> None:
    """Refuse a version of another task or encoder before anything trains.

    Raises:
        ConfigError: naming the mismatching key.
    """
    for key, tag, wanted in (("task", "task", cfg.task), ("model.encoder", "encoder", cfg.model.encoder)):
        have = registered.tags.get(tag)
        if have is not None and have != wanted:
            raise ConfigError(
                f"config key 'continual.from_model' must be a version with {key}={wanted}, not {key}={have} "
                f"({registered.reference}); set {key} to match or choose another version"
            )


def prepare_old_data(cfg: WorkflowConfig, output_dir: Path, *, progress: bool = True) -> PreparedData:
    """The old manifest (`continual.old_manifest`), filtered like the new one; its test split is the old test set.

    Raises:
        InputError: when the old manifest does not exist or lacks a split.
    """
    c = cfg.continual
    if not Path(c.old_manifest).is_file():
        raise InputError(f"config key 'continual.old_manifest' must be an existing manifest CSV, not "
                         f"{Path(c.old_manifest).name!r}; give the manifest the registered version was tested on")
    old_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, manifest=c.old_manifest, root=c.old_root or cfg.data.root),
        adaptation=AdaptationConfig(),
    )
    # The run's preflight checked continual.old_manifest and continual.old_root with the rest.
    return prepare_data(old_cfg, output_dir, progress=progress, checked=True)


def check_old_test_unseen(data: PreparedData, old: PreparedData) -> None:
    """Refuse new train/val studies that are in the old test set (same pixels, or same patient under one key).

    Raises:
        LeakageError: naming how many studies and patients overlap (never which).
    """
    fitting = data.manifest[data.manifest["split"].isin(["train", "val"])]
    old_test = old.manifest[old.manifest["split"] == "test"]
    studies = len((set(fitting["sha256"]) & set(old_test["sha256"])) - {""})
    patients = 0
    if set(fitting["key_id"]) == set(old_test["key_id"]):  # pseudonyms are comparable under one key only
        patients = len(set(fitting["patient"]) & set(old_test["patient"]))
    if studies or patients:
        raise LeakageError(
            f"{studies} studies and {patients} patient aliases of the old test set are in the new train/val splits; "
            f"the old test set must stay unseen, not be trained on; give those rows split test in the new manifest "
            f"or remove them"
        )


def old_test_predictions(cfg: WorkflowConfig, old: PreparedData, trained: TrainedModel, *,
                         progress: bool = True) -> pd.DataFrame:
    """The trained model's predictions on the old manifest's val and test splits (predictions.csv layout)."""
    sets = datasets_for(cfg, old, trained.prep, progress=progress, splits=("val", "test"))
    return predictions_table(cfg, old, trained, sets, progress=progress)


def extra_evaluations(cfg: WorkflowConfig, data: PreparedData, predictions: pd.DataFrame, trained: TrainedModel,
                       old: PreparedData | None, *, progress: bool) -> tuple[dict[str, dict], pd.DataFrame | None]:
    """Test metrics beside `test`: per adaptation domain, and on the old test set of a continual run.

    The old test set is evaluated like the registered version was (threshold from the old
    manifest's validation split), so its numbers compare with that version's test metrics.
    Each evaluation also gets the test `n_cases` and `n_patients` it was computed on (for the report).
    """
    extra: dict[str, dict] = {}
    if cfg.adaptation.method != "none":
        for name, subset in domain_test_sets(cfg, data, predictions).items():
            extra[name] = {**evaluate(cfg, data, subset), **_test_counts(data, subset)}
    old_table = None
    if old is not None:
        old_predictions = old_test_predictions(cfg, old, trained, progress=progress)
        extra["old_test"] = {**evaluate(cfg, old, old_predictions), **_test_counts(old, old_predictions)}
        old_table = extra["old_test"].get("cases", old_predictions)
    for evaluation in extra.values():
        evaluation.pop("cases", None)
    return extra, old_table


def _test_counts(data: PreparedData, predictions: pd.DataFrame) -> dict[str, int]:
    test = predictions[predictions["split"] == "test"]
    return {"n_cases": int(len(test)), "n_patients": int(len(set(patient_ids(data, test["id"]))))}


def train_scratch_reference(cfg: WorkflowConfig, data: PreparedData, *, output_dir: Path, resume: bool = False,
                            progress: bool = True) -> tuple[TrainedModel, dict] | None:
    """Train the from-scratch twin when `audit.reference` is scratch (else None).

    Every rank calls this right after the workflow's own training, so under torchrun the twin
    trains with DistributedDataParallel too. None as well when the model itself starts from random
    weights (`model.weights: none`): its twin would be the same model again.
    """
    if cfg.audit.reference != "scratch" or cfg.model.weights == "none":
        return None
    logger.info("bias-amplification reference: training the same model from scratch")
    trained, sets, _ = train_for_config(scratch_reference_config(cfg), data, output_dir=output_dir / "reference_scratch",
                                        resume=resume, progress=progress)
    return trained, sets
