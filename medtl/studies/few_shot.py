"""The few-shot study: frozen-encoder classifiers fitted on k labelled patients per class.

Prototype classifier and linear probe on the frozen pretrained encoder's embeddings, k training
patients per class, several random draws per k, scored on the test split; one MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medtl.data.dataset import make_dataset, manifest_items
from medtl.errors import ConfigError
from medtl.models.factory import ModelBundle
from medtl.models.fewshot import embed, few_shot_eval, flatten_results
from medtl.tracking import run_records, store
from medtl.workflow.config import WorkflowConfig, validate
from medtl.workflow.evaluate import patient_ids, strict_json
from medtl.workflow.prepare import PreparedData, input_size_from_data, prepare_data, publish_manifest
from medtl.workflow.record import config_dict, scan_before_logging, scan_or_raise
from medtl.workflow.steps import killed_on_interrupt
from medtl.workflow.train import build_model, preprocessing_for


def run_few_shot(
    cfg: WorkflowConfig,
    output_dir: Path,
    *,
    ks: Sequence[int] | None = None,
    draws: int | None = None,
    progress: bool = True,
    extra_forbidden: dict[str, str] | None = None,
) -> dict:
    """The few-shot study of a classification workflow, recorded as one MLflow run.

    Frozen pretrained encoder (no fine-tuning): prototype classifier and linear probe fitted on k
    training patients per class, scored on the test split, `draws` random draws per k.

    Args:
        cfg: the validated workflow config (its `fewshot` section gives the defaults).
        output_dir: gets few_shot.json (and the manifest when it is built).
        ks: support sizes, overriding `fewshot.ks`.
        draws: draws per k, overriding `fewshot.draws`.
        progress: progress bars.
        extra_forbidden: more identifying strings the PHI scan of the run must not find.

    Returns:
        The content of few_shot.json: settings, sizes, "skipped_ks", "run_id" and
        "results" = {method: {k: {"auroc_mean", "auroc_sd", "accuracy_mean", "accuracy_sd",
        "auroc", "accuracy" (per draw), "n_support"}}} (NaN written as null).

    Raises:
        ConfigError: for a segmentation workflow or invalid ks/draws.
        PHILeakError: when the scan of the MLflow run finds an identifying value or a data path.

    Example:
        >>> result = run_few_shot(load_config(Path("workflows/classify_2d.yaml")), Path("outputs/few_shot"),
        ...                       ks=[1, 5, 10], draws=5)
    """
    fewshot = dataclasses.replace(cfg.fewshot, ks=tuple(ks) if ks is not None else cfg.fewshot.ks,
                                  draws=draws if draws is not None else cfg.fewshot.draws)
    cfg = validate(dataclasses.replace(cfg, fewshot=fewshot))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, output_dir, progress=progress)
    cfg = input_size_from_data(cfg, data)  # data.image_size [] (3D): from the training volumes
    store.tracking_uri()
    tags = {"medtl.workflow": cfg.name, "medtl.study": "few-shot"}
    forbidden = {**data.forbidden, **(extra_forbidden or {})}
    params = config_dict(cfg)
    scan_before_logging(cfg, params, tags, forbidden, [data.root.resolve()], run_name=f"{cfg.name}-few-shot",
                         model_name=None)
    with store.start_run(cfg.tracking.experiment, run_name=f"{cfg.name}-few-shot", tags=tags) as run, \
            killed_on_interrupt():
        run_records.log_config(params)
        run_records.log_environment()
        run_records.log_manifest(data.manifest, data.manifest_sha256)
        result, bundle = few_shot_study(cfg, data, progress=progress)
        report = bundle.load_report
        run_records.log_weights(bundle.weights.as_dict(), report.as_dict() if report is not None else None)
        result["run_id"] = run.info.run_id
        numbers = flatten_results({m: {int(k): e for k, e in by_k.items()} for m, by_k in result["results"].items()})
        run_records.log_final_metrics({k: v for k, v in numbers.items() if np.isfinite(v)})
        path = output_dir / "few_shot.json"
        path.write_text(json.dumps(strict_json(result), indent=2, sort_keys=True))
        run_records.log_artifact(path)
    scan_or_raise(result["run_id"], forbidden, [data.root.resolve()], name="", version="")
    publish_manifest(data, cfg)  # only after the study succeeded
    return strict_json(result)


# --------------------------------------------------------------------------------------- few-shot
def few_shot_study(cfg: WorkflowConfig, data: PreparedData, *, progress: bool = True) -> tuple[dict, ModelBundle]:
    """Few-shot evaluation of the pretrained encoder (no fine-tuning), as configured in `fewshot`.

    The training split is the pool the k studies per class are drawn from (k distinct patients per
    class, one study each); the test split is scored. Images get the evaluation preprocessing.

    Returns:
        (result mapping for few_shot.json: settings, sizes, skipped ks and per-method, per-k
        results with string keys; the encoder bundle).

    Raises:
        ConfigError: for a segmentation or multi-label workflow.
    """
    if cfg.task != "classification" or cfg.model.multi_label:
        raise ConfigError("config key 'task' must be classification with model.multi_label false for the few-shot "
                          "study, not segmentation or multi-label; use a classification workflow")
    f = cfg.fewshot
    bundle = build_model(cfg)
    prep = preprocessing_for(cfg, bundle)
    features, labels, patients = {}, {}, {}
    for split in ("train", "test"):
        items = manifest_items(data.manifest, split, cfg.task, data.classes)
        dataset = make_dataset(items, prep, data.root, key_file=data.key_file, train=False, cache="none",
                               progress=progress)
        features[split] = embed(bundle.model, dataset, batch_size=cfg.train.batch_size, progress=progress)
        labels[split] = np.asarray([item["label"] for item in items])
        patients[split] = patient_ids(data, pd.Series([item["id"] for item in items]))
    results = few_shot_eval(
        features["train"], labels["train"], patients["train"], features["test"], labels["test"],
        ks=f.ks, draws=f.draws, seed=cfg.seed, methods=f.methods, normalize_embeddings=f.normalize, C=f.probe_c,
        progress=progress,
    )
    done = set(results[f.methods[0]])
    summary = {
        "ks": list(f.ks), "draws": f.draws, "methods": list(f.methods), "classes": list(data.classes),
        "encoder": cfg.model.encoder, "weights_origin": bundle.weights.origin,
        "n_pool": int(len(labels["train"])), "n_pool_patients": int(len(set(patients["train"]))),
        "n_test": int(len(labels["test"])), "skipped_ks": [k for k in f.ks if k not in done],
        "results": {method: {str(k): entry for k, entry in by_k.items()} for method, by_k in results.items()},
    }
    return summary, bundle


def few_shot_summary(result: Mapping) -> list[str]:
    """Console lines for a few-shot result: one per method and k, AUROC mean ± SD over the draws.

    Example:
        >>> for line in few_shot_summary(run_few_shot(cfg, out)): print(line)
    """
    lines = []
    for method, by_k in result["results"].items():
        for k, entry in by_k.items():
            mean, sd = entry.get("auroc_mean"), entry.get("auroc_sd")
            shown = "n/a" if mean is None or not np.isfinite(mean) else f"{mean:.3f} ± {sd or 0.0:.3f}"
            lines.append(f"{method:>12} k={k:<3} AUROC {shown} over {len(entry['auroc'])} draws")
    if result.get("skipped_ks"):
        lines.append(f"skipped k (a class has fewer training patients): {result['skipped_ks']}")
    return lines
