"""`medtl study transfer-benefit`: does pretraining pay off, and how much labelling does it save?

The workflow's model is trained with its pretrained weights and from scratch (same architecture,
same epochs and optimiser) on nested, patient-level, label-stratified fractions of the training
patients, with several seeds; optionally also as a linear probe on the pretrained encoder. Every
run is evaluated on the same validation/test patients (test metric with a patient bootstrap CI,
per-subgroup bias audit). The runs are MLflow child runs of one parent run, which gets
`transfer_benefit.json` (see `medtl.studies.summaries`) and the figures.

The study compares plain fine-tuning only: a workflow with multi-task training, domain adaptation
or continual fine-tuning configured is refused up front (`check_plain_finetuning`), since every arm
trains through `medtl.workflow.train_model`, which applies none of them.

Order: config checks -> manifest (once) -> nested label subsets per seed -> for each seed, fraction
and arm: train, predict, evaluate, audit (a child run) -> paired pretrained-vs-scratch gap comparison
at every fraction (first seed) -> JSON, figures, HTML -> PHI scan of the parent and every child run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from tqdm.auto import tqdm

from medtl.errors import ConfigError
from medtl.evaluation.bootstrap import check_bootstrap_settings
from medtl.studies.label_fractions import check_label_fractions, fraction_key, nested_label_subsets
from medtl.studies.summaries import bias_summary, summarise, write_figures, write_html
from medtl.tracking import phi_guard, run_records, store
from medtl.tracking.values import MAX_TAG_LENGTH, safe_text
from medtl.workflow.config import WorkflowConfig
from medtl.workflow.evaluate import check_audit_setup, evaluate, predictions_table, run_audit
from medtl.workflow.prepare import PreparedData, input_size_from_data, prepare_data, publish_manifest
from medtl.workflow.record import AUDIT_STATUS_TAG, PHILeakError, config_dict
from medtl.workflow.train import train_model

ARMS = ("pretrained", "scratch", "linear_probe")
DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
STUDY = "transfer-benefit"
RESULT_FILE = "transfer_benefit.json"


@dataclass(frozen=True)
class Arm:
    """How one arm initialises and trains the workflow's model."""

    name: str
    weights: str
    strategy: str


def study_arms(cfg: WorkflowConfig, arms: Sequence[str], *, linear_probe: bool = False) -> list[Arm]:
    """The arms to train: pretrained (the workflow's weights and strategy), scratch, linear probe.

    Scratch trains every layer ("finetune"): freezing or down-weighting random layers, as a
    workflow's linear_probe / lp_ft / gradual_unfreeze strategy would, only handicaps it.

    Raises:
        ConfigError: unknown or repeated arm names, or a pretrained arm without pretrained weights.
    """
    names = list(arms) + (["linear_probe"] if linear_probe and "linear_probe" not in arms else [])
    unknown = [a for a in names if a not in ARMS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"arms must be distinct names among {list(ARMS)}, not {list(arms)!r}; "
                          "e.g. --arms pretrained,scratch")
    if cfg.model.weights == "none" and any(a != "scratch" for a in names):
        raise ConfigError("config key 'model.weights' must name pretrained weights for the transfer-benefit "
                          "study, not 'none'; set e.g. model.weights=imagenet")
    table = {
        "pretrained": Arm("pretrained", cfg.model.weights, cfg.train.strategy),
        "scratch": Arm("scratch", "none", "finetune"),
        "linear_probe": Arm("linear_probe", cfg.model.weights, "linear_probe"),
    }
    return [table[a] for a in names]


def check_plain_finetuning(cfg: WorkflowConfig) -> None:
    """Refuse a workflow whose transfer method the study would silently drop.

    Every arm trains through `medtl.workflow.train_model` (plain supervised fine-tuning or training
    from scratch): a multi-task head, AdaBN/DANN or a registered starting model would be ignored,
    and DANN's unlabelled target rows would even land in every label subset.

    Raises:
        ConfigError: naming each such key and how to unset it.
    """
    problems = []
    if cfg.multitask.enabled:
        problems.append("config key 'multitask.enabled' must be false for the transfer-benefit study, not true; "
                        "unset it (--set multitask.enabled=false)")
    if cfg.adaptation.method != "none":
        problems.append(f"config key 'adaptation.method' must be none for the transfer-benefit study, not "
                        f"{cfg.adaptation.method!r}; unset it (--set adaptation.method=none)")
    if cfg.continual.from_model:
        problems.append(f"config key 'continual.from_model' must be empty for the transfer-benefit study, not "
                        f"{cfg.continual.from_model!r}; unset it with its old manifest "
                        "(--set continual.from_model= --set continual.old_manifest=)")
    if problems:
        raise ConfigError("; ".join(problems) + " (the study compares plain fine-tuning of pretrained weights "
                          "with training from scratch)")


def _check_seeds(seeds: int) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a whole number >= 1, not {seeds!r}; e.g. --seeds 3")
    return seeds


def _primary_metric(cfg: WorkflowConfig, test: Mapping[str, Any]) -> str:
    if cfg.task == "segmentation":
        return "dice"
    return "auroc" if "auroc" in test else "auroc_macro"


def run_transfer_benefit(
    cfg: WorkflowConfig,
    output_dir: Path,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = 3,
    arms: Sequence[str] = ("pretrained", "scratch"),
    linear_probe: bool = False,
    target: float | None = None,
    n_boot: int | None = None,
    keep_checkpoints: bool = False,
    progress: bool = True,
    extra_forbidden: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run the transfer-benefit study and write `output_dir/transfer_benefit.json`.

    Args:
        cfg: The validated workflow config (its model, training budget and evaluation settings).
        output_dir: Gets transfer_benefit.json, transfer_benefit.png (data efficiency),
            transfer_benefit_time.png, transfer_benefit.html and the manifest (unless data.manifest /
            data.manifest_out say otherwise).
        fractions: Fractions of the training patients, each in (0, 1]; the largest is the reference
            ("scratch at 100 %") of the headline.
        seeds: Runs per arm and fraction, with seeds cfg.seed, cfg.seed + 1, ...; each seed also
            draws its own nested subsets.
        arms: Among "pretrained", "scratch", "linear_probe".
        linear_probe: Add the "linear_probe" arm.
        target: Validation value for time-to-target; None = the lowest over seeds of scratch's best
            validation value at the largest fraction, which every scratch seed reached (an arm's
            time to target is its mean over seeds only when all of its seeds reached the target).
        n_boot: Bootstrap replicates for CIs and audits (None keeps cfg.evaluation.n_boot).
        keep_checkpoints: Keep each run's checkpoints under output_dir/runs/ (several MB per run);
            by default they live in a temporary folder removed after the run.
        progress: Show a progress bar over runs.
        extra_forbidden: More identifying strings the PHI scan of the runs must not find.

    Returns:
        The transfer_benefit.json document.

    Raises:
        ConfigError: invalid fractions, seeds or arms, or a workflow with multitask.enabled,
            adaptation.method or continual.from_model set (`check_plain_finetuning`); raised before
            the manifest is built.
        InputError / LeakageError: from the manifest step.
        PHILeakError: when the scan finds an identifying value or a data path in a run.

    Example:
        >>> result = run_transfer_benefit(cfg, Path("tb"), fractions=(0.1, 1.0), seeds=3)  # doctest: +SKIP
        >>> result["headline"]["text"]  # doctest: +SKIP
        'pretrained at 10 % of labels matches scratch at 100 % (test AUROC 0.912 vs 0.905, ...)'
    """
    cfg, values, seed_list, chosen = _checked_settings(cfg, fractions, seeds, arms, linear_probe, n_boot)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, output_dir, progress=progress)
    cfg = input_size_from_data(cfg, data)  # one patch for every arm, from the whole training split
    check_audit_setup(cfg, data)  # every child run audits: fail now, not after the first training
    stratify = cfg.task == "classification"
    subsets = {s: nested_label_subsets(data.manifest, values, seed=s, stratify=stratify,
                                       target_column="label" if stratify else "mask") for s in seed_list}
    store.tracking_uri()
    tags = {"medtl.workflow": cfg.name, "medtl.study": STUDY}
    with store.start_run(cfg.tracking.experiment, run_name=f"{cfg.name}-{STUDY}", tags=tags) as parent:
        run_records.log_config(config_dict(cfg))
        run_records.log_config({"study": {"name": STUDY, "fractions": list(values), "seeds": seed_list,
                                          "arms": [a.name for a in chosen]}})
        run_records.log_environment()
        run_records.log_manifest(data.manifest, data.manifest_sha256)
        metric, records, kept_tables, child_ids = _child_runs(cfg, data, chosen, values, seed_list, subsets,
                                                              output_dir, parent, keep_checkpoints, progress)
        by_fraction = _paired_bias(cfg, data, kept_tables, values, seed_list[0])
        result = summarise(metric, records, target=target, bias=by_fraction.get(fraction_key(values[-1])),
                           bias_by_fraction=by_fraction)
        _write_outputs(result, output_dir)
        _log_parent(result, output_dir)
    _scan([parent.info.run_id, *child_ids], data, extra_forbidden)
    publish_manifest(data, cfg)  # only after the study succeeded: a failure leaves data.manifest_out as it was
    return result


def _checked_settings(cfg: WorkflowConfig, fractions: Sequence[float], seeds: int, arms: Sequence[str],
                      linear_probe: bool, n_boot: int | None):
    """Every study setting checked before the manifest and hours of training, not after."""
    check_plain_finetuning(cfg)
    values = check_label_fractions(fractions)
    seed_list = [cfg.seed + i for i in range(_check_seeds(seeds))]
    chosen = study_arms(cfg, arms, linear_probe=linear_probe)
    if n_boot is not None:
        cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, n_boot=n_boot))
    check_bootstrap_settings(cfg.evaluation.n_boot, 0.95)
    return cfg, values, seed_list, chosen


def _child_runs(cfg: WorkflowConfig, data: PreparedData, chosen: list[Arm], values: Sequence[float],
                seed_list: list[int], subsets: Mapping, output_dir: Path, parent, keep_checkpoints: bool,
                progress: bool):
    """One child run per (seed, fraction, arm); the records by arm and fraction, and the tables the
    paired gap comparison needs (the first seed's test predictions of pretrained and scratch: one
    test split per fraction, so small beside the training data)."""
    records: dict[str, dict[str, list[dict]]] = {a.name: {fraction_key(f): [] for f in values} for a in chosen}
    kept_tables: dict[tuple[str, str], pd.DataFrame] = {}
    child_ids: list[str] = []
    metric = "auroc" if cfg.task == "classification" else "dice"
    jobs = list(itertools.product(seed_list, values, chosen))
    bar = tqdm(total=len(jobs), desc=STUDY, disable=not progress)
    for seed, fraction, arm in jobs:
        bar.set_description(f"{STUDY} {arm.name} {fraction:g} seed {seed}")
        with contextlib.ExitStack() as stack:
            run_dir = _run_folder(stack, output_dir, arm, fraction, seed, keep=keep_checkpoints)
            record, table = _child_run(dataclasses.replace(cfg, seed=seed), data, arm, fraction,
                                       subsets[seed][fraction], run_dir, parent, bar)
        metric = record.pop("metric")
        child_ids.append(record["run_id"])
        records[arm.name][fraction_key(fraction)].append(record)
        if seed == seed_list[0] and arm.name in ("pretrained", "scratch"):
            kept_tables[(arm.name, fraction_key(fraction))] = table
        bar.update(1)
    bar.close()
    return metric, records, kept_tables, child_ids


def _paired_bias(cfg: WorkflowConfig, data: PreparedData, tables: Mapping[tuple[str, str], pd.DataFrame],
                 fractions: Sequence[float], seed: int) -> dict[str, dict[str, Any]]:
    """Fraction key -> `bias_summary` of the paired pretrained-vs-scratch audit of the first seed.

    Paired (both arms' predictions on the same resampled patients), so a widened gap has a CI. One
    seed only, because each paired audit is another bootstrap over the test patients, and the first
    seed is the one every study has.
    """
    out = {}
    for fraction in fractions:
        key = fraction_key(fraction)
        if ("pretrained", key) in tables and ("scratch", key) in tables:
            paired = run_audit(cfg, data, tables[("pretrained", key)], progress=False,
                               reference=tables[("scratch", key)])
            out[key] = bias_summary(paired.to_dict().get("amplification", []), fraction=fraction, seed=seed)
    return out


def _run_folder(stack: contextlib.ExitStack, output_dir: Path, arm: Arm, fraction: float, seed: int, *,
                keep: bool) -> Path:
    """Where a run's checkpoints go: kept under output_dir/runs/, or a temporary folder.

    Checkpoints (several MB a run, dozens of runs) only matter while the run trains.
    """
    if keep:
        return output_dir / "runs" / arm.name / fraction_key(fraction) / f"seed{seed}"
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medtl-tb-")))


def _child_run(cfg: WorkflowConfig, data: PreparedData, arm: Arm, fraction: float, ids: frozenset[str],
               run_dir: Path, parent: Run, bar: tqdm) -> tuple[dict, pd.DataFrame]:
    """Train, evaluate and audit one (arm, fraction, seed) inside an MLflow child run."""
    # store.start_run refuses to open a run inside another (by design, for workflow runs), so the child
    # is created here the same way: MlflowClient.create_run with the neutral tags (no OS user, script
    # path or git remote) plus the parent link, then made active as a nested run.
    key = fraction_key(fraction)
    train_rows = data.manifest[data.manifest["id"].isin(ids)]
    tags = {**store.NEUTRAL_TAGS, MLFLOW_PARENT_RUN_ID: parent.info.run_id, "medtl.workflow": cfg.name,
            "medtl.study": STUDY, "medtl.arm": arm.name, "medtl.fraction": key, "medtl.seed": str(cfg.seed)}
    created = store.client().create_run(
        parent.info.experiment_id, run_name=safe_text(f"{cfg.name}-{arm.name}-{key}-seed{cfg.seed}"),
        tags={k: safe_text(v, max_length=MAX_TAG_LENGTH) for k, v in tags.items()},
    )
    with mlflow.start_run(run_id=created.info.run_id, nested=True, log_system_metrics=False):
        run_records.log_config({"study": {
            "arm": arm.name, "fraction": fraction, "seed": cfg.seed, "weights": arm.weights,
            "strategy": arm.strategy, "n_train_patients": int(train_rows["patient"].nunique()),
            "n_train_images": len(train_rows)}})

        def on_epoch_end(epoch: int, record: dict) -> None:
            run_records.log_epoch_metrics({k: v for k, v in record.items() if k != "epoch"}, epoch)
            bar.set_postfix(epoch=epoch + 1, refresh=True)

        trained, sets = train_model(cfg, data, output_dir=run_dir, weights=arm.weights, strategy=arm.strategy,
                                    train_ids=set(ids), progress=False, on_epoch_end=on_epoch_end)
        fit = trained.fit
        load_report = trained.bundle.load_report
        run_records.log_weights(trained.bundle.weights.as_dict(), load_report.as_dict() if load_report else None)
        predictions = predictions_table(cfg, data, trained, sets, progress=False)
        evaluation = evaluate(cfg, data, predictions)
        table = evaluation.pop("cases") if cfg.task == "segmentation" else predictions
        audit = run_audit(cfg, data, table, progress=False).to_dict()
        run_records.log_json(audit, "audit.json")
        # As `medtl run`: the metric audit.passed cannot tell a failed audit from one that decided nothing.
        mlflow.set_tag(AUDIT_STATUS_TAG, audit["status"])
        metric = _primary_metric(cfg, evaluation["test"])
        estimate = evaluation["test"].get(metric) or {}
        flat = {f"test.{metric}": estimate.get("value"), "train_seconds": fit.total_train_seconds,
                "time_to_best_seconds": fit.time_to_best_seconds, "train.passes_per_epoch": float(fit.passes_per_epoch),
                "audit.passed": float(audit["passed"]),
                "audit.evaluated_attributes": float(len(audit.get("evaluated_attributes", [])))}
        if estimate.get("ci"):
            flat[f"test.{metric}.ci_lo"], flat[f"test.{metric}.ci_hi"] = map(float, estimate["ci"])
        run_records.log_final_metrics({k: v for k, v in flat.items() if _number(v) is not None})
    seconds, history = 0.0, []
    for record in fit.history:
        seconds += float(record["epoch_seconds"])
        history.append({"epoch": int(record["epoch"]), "value": _number(record.get(fit.monitor)),
                        "seconds": seconds})
    return {
        "seed": cfg.seed, "value": _number(estimate.get("value")),
        "ci": [float(v) for v in estimate["ci"]] if estimate.get("ci") else None,
        "train_seconds": float(fit.total_train_seconds), "time_to_best_seconds": float(fit.time_to_best_seconds),
        "epochs_run": int(fit.epochs_run), "best_epoch": int(fit.best_epoch), "best_val": _number(fit.best_metric),
        "passes_per_epoch": int(fit.passes_per_epoch),
        "n_train_patients": int(train_rows["patient"].nunique()), "n_train_images": len(train_rows),
        "strategy": trained.strategy, "weights_source": trained.bundle.weights.source, "run_id": created.info.run_id,
        "history": history, "audit_passed": bool(audit["passed"]), "audit_status": audit["status"],
        "gaps": [{k: g.get(k) for k in ("attribute", "metric", "value", "ci", "flagged", "status")}
                 for g in audit.get("gaps", []) if g.get("kind") == "difference"],
        "metric": metric,
    }, table


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def _write_outputs(result: dict[str, Any], output_dir: Path) -> None:
    (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, allow_nan=False))
    write_figures(result, output_dir)
    write_html(result, output_dir / "transfer_benefit.html")


def _log_parent(result: Mapping[str, Any], output_dir: Path) -> None:
    metric = result["metric"]
    flat: dict[str, float | None] = {}
    for arm, points in result["arms"].items():
        for key, point in points.items():
            flat[f"{arm}.f{key}.{metric}_mean"] = point["mean"]
            flat[f"{arm}.f{key}.{metric}_sd"] = point["sd"]
            flat[f"{arm}.f{key}.train_seconds"] = point["train_seconds"]
    head = result["headline"]
    flat["headline.matches_scratch_full_at"] = head["matches_scratch_full_at"]
    flat["headline.label_savings"] = head["label_savings"]
    run_records.log_final_metrics(flat)
    mlflow.set_tag("medtl.headline", safe_text(head["text"], max_length=MAX_TAG_LENGTH))
    for name in (RESULT_FILE, "transfer_benefit.png", "transfer_benefit_time.png", "transfer_benefit.html"):
        run_records.log_artifact(output_dir / name)


def _scan(run_ids: Sequence[str], data: PreparedData, extra: Mapping[str, str] | None) -> None:
    forbidden = set(data.forbidden) | set(extra or {})
    findings = [f for run_id in run_ids for f in phi_guard.scan_run(run_id, forbidden, [data.root.resolve()])]
    if findings:
        raise PHILeakError(
            f"the MLflow runs of the {STUDY} study hold {len(findings)} identifying value(s) or data path(s): "
            + "; ".join(findings[:5]) + "; the findings name the fields: rename the data folder or change the "
            "config key they point at, delete these runs in MLflow, and run the study again (a finding in a field "
            "medtl wrote itself is a bug: please report it)"
        )
