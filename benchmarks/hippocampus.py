"""Benchmark: the shipped `segment_3d` workflow on the hippocampus MRI volumes, end to end.

Runs `workflows/segment_3d.yaml` exactly as shipped plus only the settings that describe this data
(`data.modalities=[]`: NIfTI has no DICOM modality; `data.intensity=mr`; `data.spacing=[1,1,1]`)
through `load_config` + `run_workflow` (manifest -> train -> evaluate -> audit -> MLflow -> report),
on ../shared/data/hippocampus (191 cases, medtl's own patient-level split). Reports the test mean
Dice over the two foreground classes with its 95 % bootstrap CI and wall time, per seed.

Usage:
    .venv/bin/python benchmarks/hippocampus.py [--work DIR] [--seeds 0 1 2] [--set key=value ...]

MLflow goes to a SQLite store in the work folder, never the repository's mlruns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

WORKFLOW = _data.REPO / "workflows" / "segment_3d.yaml"
DESCRIBES_THE_DATA = ["data.modalities=[]", "data.intensity=mr", "data.spacing=[1, 1, 1]"]
ANCHORS = [("nnU-Net 3d_fullres (Medical Segmentation Decathlon Task04, 5-fold CV)", "0.89-0.90"),
           ("medtl benchmarks/transfer_benefit.py, 32^3, 20 epochs (docs/benchmarks.md section 3)", "0.874")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more workflow overrides (after the data's own), e.g. train.epochs=20")
    parser.add_argument("--name", default="", help="suffix of the run folders (to keep several variants)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def run_seed(work: Path, root: Path, labels: Path, seed: int, args: argparse.Namespace) -> dict:
    from medtl.workflow.config import load_config
    from medtl.workflow.run import run_workflow

    output = work / "runs" / f"hippocampus-s{seed}{'-' + args.name if args.name else ''}"
    overrides = [f"data.root={root}", f"data.labels={labels}",
                 f"data.manifest_out={work / 'manifests' / 'hippocampus.csv'}", *DESCRIBES_THE_DATA,
                 f"seed={seed}", "tracking.experiment=medtl-benchmarks",
                 "tracking.registered_model=benchmark_hippocampus", *args.overrides]
    cfg = load_config(WORKFLOW, overrides)
    print(f"\n== seed {seed}: {cfg.model.encoder}, size {cfg.data.image_size}, {cfg.train.epochs} epochs -> {output}",
          flush=True)
    start = time.perf_counter()
    outputs = run_workflow(cfg, output, progress=args.progress)
    metrics = outputs.metrics
    result = {"seed": seed, "dice": metrics["test"].get("dice"), "dice_ci": metrics["test_ci"].get("dice"),
              "val_dice": metrics["val"].get("dice"), "wall_seconds": time.perf_counter() - start,
              "train_seconds": metrics["timings"]["train_seconds"], "epochs_run": metrics["epochs_run"],
              "best_epoch": metrics["best_epoch"], "overrides": overrides[3:]}
    (output / "benchmark.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = _data.setup(args.work, progress=args.progress)
    root, labels = _data.hippocampus_labels(work)
    print("machine:", _data.machine())
    results = [run_seed(work, root, labels, seed, args) for seed in args.seeds]
    rows = [[r["seed"], f"{r['dice']:.3f}", "-".join(f"{v:.3f}" for v in r["dice_ci"] or []),
             f"{r['val_dice']:.3f}", f"{r['best_epoch']}/{r['epochs_run']}", f"{r['wall_seconds'] / 60:.1f}"]
            for r in results]
    _data.print_table("hippocampus test mean Dice (medtl segment_3d)",
                      ["seed", "test Dice", "95% CI", "val Dice", "best/epochs", "wall min"], rows)
    dice = [r["dice"] for r in results]
    if len(dice) > 1:
        print(f"mean +- sd over {len(dice)} seeds: {statistics.mean(dice):.3f} +- {statistics.stdev(dice):.3f}")
    _data.print_table("Anchors (mean Dice)", ["method", "Dice"], [list(a) for a in ANCHORS])


if __name__ == "__main__":
    main()
