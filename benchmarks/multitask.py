"""Benchmark: multi-task (segmentation + class head on one encoder) vs segmentation only, demo CT series.

Writes the synthetic demo studies (`medtl.data.synthetic.write_demo_data`, seed 0) into the work folder
once, builds their manifest once (reused by every run, so every arm and seed sees the same patient
split), and trains `workflows/segment_3d.yaml` (EfficientNet-Lite0 with ImageNet weights inflated
to 3D, U-Net decoder) on the CT series with `medtl.workflow.run.run_workflow`, two ways:

- **seg_only**: `multitask.enabled=false`, masks only (organ, lesion); best epoch by validation Dice.
- **multitask**: `multitask.enabled=true`, plus a class head on the deepest feature map trained on
  the series' `label` (1 = the series has a lesion), `multitask.cls_weight` (default 0.5, the low
  end of docs/transfer.md's advice), `seg_weight` 1; best epoch by the mean of validation Dice and
  class AUROC.

Same seeds, epochs (early stopping off) and budget for both arms. The table gives test mean Dice
with its 95 % patient-bootstrap CI, Dice of the organ and of the lesion, the class head's test
AUROC with its CI (multitask only), the best epoch and the training seconds, from each run's
metrics.json; then the mean over seeds per arm. Dice follows medtl (MONAI): a series without a
lesion has no lesion Dice (NaN, ignored), so lesion Dice is over lesion series only and a series'
mean Dice is its organ Dice alone when it has no lesion.

Usage:
    .venv/bin/python benchmarks/multitask.py [--work DIR] [--quick] [--patients 1200] [--seeds 2] [--epochs 10]
        [--cls-weight 0.5] [--arms seg_only multitask] [--name TAG] [--set key=value ...]

Writes <work>/multitask[-TAG].json; each run's folder is <work>/runs/multitask-<arm>-seed<k>[-TAG].
MLflow goes to a SQLite store in the work folder, never the repository's mlruns.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

ARMS = ("seg_only", "multitask")
CLASS_NAMES = {"1": "organ", "2": "lesion"}  # the demo masks' foreground labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny version for smoke checks (240 patients, 1 epoch, 1 seed)")
    parser.add_argument("--patients", type=int, default=1200, help="synthetic demo patients (1 in 8 has a CT series)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per arm (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=10,
                        help="epochs per run (early stopping off); at 5 the lesion is never segmented")
    parser.add_argument("--cls-weight", type=float, default=0.5, help="multitask.cls_weight (seg_weight stays 1)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--name", default="", help="suffix of the run folders and JSON (to keep several runs)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for CIs and audits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more workflow overrides (after the benchmark's own)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def demo_data(work: Path, patients: int, *, progress: bool) -> dict:
    """The demo studies under `work` (written once, then reused) and what the PHI scan must not find.

    The summary of the write (fake identifying strings included: they are synthetic, and the files
    next to them hold them anyway) is kept beside the folder, so a later run can reuse both.
    """
    from medtl.data.synthetic import write_demo_data

    root = work / f"multitask_demo_data_{patients}"
    record = root.with_suffix(".json")
    if (root / "labels.csv").is_file() and record.is_file():
        return json.loads(record.read_text())
    if root.exists():
        shutil.rmtree(root)  # our own synthetic folder from an interrupted write: write it afresh
    summary = write_demo_data(root, patients=patients, seed=0, progress=progress)
    facts = {"root": str(root), "labels_csv": str(summary.labels_csv), "patients": summary.n_patients,
             "ct_series": summary.n_ct_series, "phi_strings": sorted(summary.phi_strings)}
    record.write_text(json.dumps(facts))  # written last: its presence marks a complete folder
    return facts


def split_counts(manifest_path: Path) -> dict[str, dict[str, int]]:
    """CT series per split and class label (label 1 = lesion present)."""
    import pandas as pd

    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    ct = manifest[(manifest["modality"].str.upper() == "CT") & (manifest["mask"].str.strip() != "")]
    table = ct.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {str(split): {str(label): int(n) for label, n in row.items()} for split, row in table.iterrows()}


def run_record(metrics: dict, wall: float) -> dict:
    """What the table needs from one run's metrics.json."""
    test, ci = metrics["test"], metrics["test_ci"]
    record = {
        "test_dice": test.get("dice"),
        "test_dice_ci": ci.get("dice"),
        **{f"test_dice_{name}": test.get(f"dice_{c}") for c, name in CLASS_NAMES.items()},
        **{f"test_dice_{name}_ci": ci.get(f"dice_{c}") for c, name in CLASS_NAMES.items()},
        "test_auroc": test.get("auroc"),
        "test_auroc_ci": ci.get("auroc"),
        "val": metrics.get("val"),
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"),
        "train_seconds": metrics["timings"].get("train_seconds"),
        "wall_seconds": wall,
        "run_id": metrics.get("run_id"),
    }
    return record


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci and None not in ci else "")


def _best(record: dict) -> str:
    """Best epoch counted from 1, of the epochs run ("last" when the monitor was never finite)."""
    best = record["best_epoch"]
    return f"{best + 1 if best is not None and best >= 0 else 'last'}/{record['epochs_run']}"


def print_results(results: dict[str, dict[int, dict]], title: str) -> None:
    rows = []
    for arm, runs in results.items():
        for seed, r in runs.items():
            rows.append([arm, seed, _fmt(r["test_dice"], r["test_dice_ci"]), _fmt(r["test_dice_organ"]),
                         _fmt(r["test_dice_lesion"]), _fmt(r["test_auroc"], r["test_auroc_ci"]),
                         _best(r), f"{r['train_seconds']:.0f}"])
    for arm, runs in results.items():
        mean = {k: _mean([r[k] for r in runs.values()])
                for k in ("test_dice", "test_dice_organ", "test_dice_lesion", "test_auroc", "train_seconds")}
        rows.append([f"**{arm} mean**", f"{len(runs)} seeds", _fmt(mean["test_dice"]), _fmt(mean["test_dice_organ"]),
                     _fmt(mean["test_dice_lesion"]), _fmt(mean["test_auroc"]), "",
                     f"{mean['train_seconds']:.0f}"])
    _data.print_table(title, ["arm", "seed", "test mean Dice (95% CI)", "Dice organ", "Dice lesion",
                              "class-head test AUROC (95% CI)", "best epoch/run", "train s"], rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = _data.setup(args.work, progress=args.progress)

    from medtl.workflow.config import load_config
    from medtl.workflow.prepare import prepare_data
    from medtl.workflow.run import run_workflow

    patients = 240 if args.quick else args.patients
    epochs = 1 if args.quick else args.epochs
    seeds = 1 if args.quick else args.seeds
    n_boot = 100 if args.quick else args.n_boot
    tag = f"{'-quick' if args.quick else ''}{'-' + args.name if args.name else ''}"
    workflow = _data.REPO / "workflows" / "segment_3d.yaml"
    data = demo_data(work, patients, progress=args.progress)
    forbidden = {s: "demo PHI" for s in data["phi_strings"]}
    manifest_path = work / "manifests" / f"multitask_demo_{patients}.csv"
    base = [
        f"data.root={data['root']}",
        f"data.labels={data['labels_csv']}",
        f"train.epochs={epochs}",
        f"train.early_stopping_patience={epochs}",  # the same number of epochs for every run
        f"evaluation.n_boot={n_boot}",
        "tracking.experiment=medtl-benchmarks",
        "tracking.register=false",
        *(["audit.min_group_size=2"] if args.quick else []),
    ]
    if not manifest_path.is_file():  # built once (seed 0), so every arm and seed sees the same split
        cfg = load_config(workflow, [*base, f"data.manifest_out={manifest_path}"])
        prepare_data(cfg, work / "runs", progress=args.progress)
    counts = split_counts(manifest_path)
    print(f"demo data: {data['patients']} patients, {data['ct_series']} CT series; "
          f"CT series per split and label (1 = lesion): {counts}")
    before = _data.machine()
    print("machine:", before)

    results: dict[str, dict[int, dict]] = {}
    start_all = time.perf_counter()
    for seed in range(seeds):
        for arm in args.arms:
            extra = [f"data.manifest={manifest_path}", f"seed={seed}",
                     f"multitask.enabled={'true' if arm == 'multitask' else 'false'}",
                     *([f"multitask.cls_weight={args.cls_weight}", "multitask.seg_weight=1.0"]
                       if arm == "multitask" else [])]
            cfg = load_config(workflow, [*base, *extra, *args.overrides])
            output = work / "runs" / f"multitask-{arm}-seed{seed}{tag}"
            print(f"\n== {arm}, seed {seed}: {epochs} epochs -> {output}", flush=True)
            start = time.perf_counter()
            outputs = run_workflow(cfg, output, progress=args.progress, extra_forbidden=forbidden)
            record = run_record(outputs.metrics, time.perf_counter() - start)
            results.setdefault(arm, {})[seed] = record
            print(f"{arm} seed {seed}: test Dice {_fmt(record['test_dice'], record['test_dice_ci'])}, "
                  f"AUROC {_fmt(record['test_auroc'], record['test_auroc_ci'])}, train {record['train_seconds']:.0f} s, "
                  f"wall {record['wall_seconds']:.0f} s", flush=True)
    wall = time.perf_counter() - start_all

    cfg = load_config(workflow, base)
    size = "x".join(str(s) for s in cfg.data.image_size)
    print_results(results, f"Demo CT series ({data['ct_series']}): multi-task vs segmentation only "
                           f"(EfficientNet-Lite0 ImageNet inflated to 3D, {size} patch, {epochs} epochs, "
                           f"cls_weight {args.cls_weight})")
    result = {
        "benchmark": "multitask",
        "dataset": f"medtl demo data, {data['patients']} patients, seed 0, {data['ct_series']} CT series",
        "ct_series_per_split_and_label": counts,
        "workflow": "workflows/segment_3d.yaml",
        "manifest": str(manifest_path),
        "overrides": [o for o in [*base, *args.overrides] if not o.startswith(("data.root", "data.labels"))],
        "epochs": epochs,
        "seeds": seeds,
        "cls_weight": args.cls_weight,
        "quick": args.quick,
        "wall_seconds": wall,
        "machine_before": before,
        "machine_after": _data.machine(),
        "results": {arm: {str(seed): r for seed, r in runs.items()} for arm, runs in results.items()},
    }
    path = work / f"multitask{tag}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwall {wall / 60:.1f} min; results: {path}")
    print("machine after:", result["machine_after"])
    return result


if __name__ == "__main__":
    main()
