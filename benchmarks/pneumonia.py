"""Benchmark: the `classify_2d` workflow on PneumoniaMNIST (real chest X-rays), end to end.

Runs the real `medtl run workflows/classify_2d.yaml` path (`load_config` + `run_workflow`: manifest
-> train -> evaluate -> audit -> MLflow -> report) on the PNG export of
../shared/data/pneumoniamnist (published train/val/test split kept), with the default encoder
(bundled ImageNet EfficientNet-Lite0) and, with --scratch, the same budget from random weights.
Reports test AUROC (95 % patient-level bootstrap CI), accuracy, wall time per phase and
throughput next to the published anchors.

Usage:
    .venv/bin/python benchmarks/pneumonia.py [--work DIR] [--quick] [--scratch] [--set key=value ...]

MLflow goes to a SQLite store in the work folder, never the repository's mlruns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

WORKFLOW = _data.REPO / "workflows" / "classify_2d.yaml"

# Settings on top of workflows/classify_2d.yaml (see docs/benchmarks.md for how they were chosen).
# PNG exports have no DICOM modality, so the workflow's [CR, DX] filter is cleared.
SETTINGS = [
    "data.modalities=[]",
    "data.image_size=[96, 96]",
    "train.epochs=8",
    "train.batch_size=32",
    "train.lr=0.001",
    "evaluation.n_boot=1000",
]
QUICK = ["data.image_size=[32, 32]", "train.epochs=1", "train.batch_size=16", "evaluation.n_boot=100",
         "audit.min_group_size=2"]

# Published test AUROC on PneumoniaMNIST (MedMNIST v2 test split; see ../shared/data/README.md and
# /work/shared/FIELD_NOTES.md). The shared .npz is a class-balanced subset of it.
ANCHORS = [
    ("MedMNIST v2 ResNet-18 (28 px), scratch, 100 epochs", 0.944),
    ("MedMNIST v2 ResNet-50 (224 px), scratch, 100 epochs", 0.962),
    ("MedMNIST v2 Google AutoML Vision", 0.991),
    ("MedMNIST+ ResNet-18 (128 px), ImageNet-pretrained, end-to-end", 0.979),
    ("Floor: hand-written timm loop, EfficientNet-Lite0 ImageNet, 64 px, 6 epochs (this machine)", 0.948),
    ("Floor: same loop from scratch", 0.933),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--quick", action="store_true", help="tiny version for smoke checks (40 images a split)")
    parser.add_argument("--scratch", action="store_true", help="also train from scratch (model.weights=none)")
    parser.add_argument("--only-scratch", action="store_true", help="train from scratch only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more workflow overrides (after the benchmark's own), e.g. train.epochs=4")
    parser.add_argument("--name", default="", help="suffix of the run folder (to keep several runs)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def run_arm(work: Path, root: Path, labels: Path, weights: str, args: argparse.Namespace) -> dict:
    """One `run_workflow` call; returns what the summary table needs."""
    from medtl.workflow.config import load_config
    from medtl.workflow.run import run_workflow

    tag = f"{weights}{'-quick' if args.quick else ''}{'-' + args.name if args.name else ''}"
    output = work / "runs" / f"pneumonia-{tag}"
    overrides = [
        f"data.root={root}",
        f"data.labels={labels}",
        f"data.manifest_out={work / 'manifests' / ('pneumonia-quick.csv' if args.quick else 'pneumonia.csv')}",
        *SETTINGS,
        *(QUICK if args.quick else []),
        f"model.weights={weights}",
        "tracking.experiment=medtl-benchmarks",
        f"tracking.registered_model=benchmark_pneumonia_{weights}",
        *args.overrides,
    ]
    cfg = load_config(WORKFLOW, overrides)
    print(f"\n== {weights}: {cfg.data.image_size[0]} px, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr}, strategy {cfg.train.strategy}, n_boot {cfg.evaluation.n_boot} -> {output}", flush=True)
    start = time.perf_counter()
    outputs = run_workflow(cfg, output, progress=args.progress)
    wall = time.perf_counter() - start
    metrics = outputs.metrics
    history = _epoch_history(outputs.run_id)
    timings = metrics["timings"]
    result = {
        "weights": weights,
        "encoder": cfg.model.encoder,
        "image_size": cfg.data.image_size[0],
        "epochs": cfg.train.epochs,
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "auroc": metrics["test"].get("auroc"),
        "auroc_ci": metrics["test_ci"].get("auroc"),
        "accuracy": metrics["test"].get("accuracy"),
        "accuracy_ci": metrics["test_ci"].get("accuracy"),
        "val_auroc": metrics["val"].get("auroc"),
        "wall_seconds": wall,
        "manifest_seconds": timings["manifest_seconds"],
        "train_seconds": timings["train_seconds"],
        "time_to_best_seconds": timings["time_to_best_seconds"],
        "evaluate_seconds": timings["evaluate_seconds"],
        "epoch_seconds": history.get("epoch_seconds", []),
        "samples_per_s": history.get("samples_per_s", []),
        "num_threads": history.get("num_threads", []),
        "val_auroc_per_epoch": history.get("auroc", []),
        "audit_passed": outputs.audit_passed,
        "load_avg_after": os.getloadavg(),
        "overrides": [o for o in overrides if not o.startswith(("data.root", "data.labels", "data.manifest_out"))],
    }
    (output / "benchmark.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def _epoch_history(run_id: str) -> dict[str, list[float]]:
    """Per-epoch metrics the workflow logged to MLflow (ordered by epoch)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    for key in ("epoch_seconds", "samples_per_s", "num_threads", "auroc", "train_loss"):
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if points:
            out[key] = [p.value for p in points]
    return out


def summary(results: list[dict]) -> None:
    def ci(values) -> str:
        return f"{values[0]:.3f}-{values[1]:.3f}" if values else "n/a"

    rows = []
    for r in results:
        other = r["wall_seconds"] - r["manifest_seconds"] - r["train_seconds"] - r["evaluate_seconds"]
        rows.append([
            f"{r['encoder']} {r['weights']}", f"{r['image_size']} px", f"{r['epochs_run']}/{r['epochs']}",
            r["best_epoch"], f"{r['auroc']:.3f}", ci(r["auroc_ci"]), f"{r['accuracy']:.3f}", ci(r["accuracy_ci"]),
            f"{r['wall_seconds'] / 60:.1f}", f"{r['manifest_seconds']:.0f}", f"{r['train_seconds']:.0f}",
            f"{r['evaluate_seconds']:.0f}", f"{other:.0f}",
            f"{sum(r['samples_per_s']) / max(len(r['samples_per_s']), 1):.0f}",
        ])
    _data.print_table(
        "PneumoniaMNIST test (medtl classify_2d)",
        ["model", "input", "epochs run", "best epoch", "test AUROC", "95% CI", "accuracy", "95% CI", "wall min",
         "manifest s", "train s", "evaluate s", "other s", "train samples/s"],
        rows,
    )
    _data.print_table("Published anchors (test AUROC)", ["model", "AUROC"], [[n, f"{v:.3f}"] for n, v in ANCHORS])
    for r in results:
        print(f"{r['weights']}: per-epoch val AUROC {[round(v, 4) for v in r['val_auroc_per_epoch']]}, "
              f"epoch s {[round(v) for v in r['epoch_seconds']]}, threads {[int(v) for v in r['num_threads']]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = _data.setup(args.work, progress=args.progress)
    root, labels = _data.export_pneumonia(work, limit=40 if args.quick else None)
    print("machine:", _data.machine())
    arms = ["none"] if args.only_scratch else (["imagenet", "none"] if args.scratch else ["imagenet"])
    results = [run_arm(work, root, labels, weights, args) for weights in arms]
    summary(results)
    print("machine after:", _data.machine())


if __name__ == "__main__":
    main()
