"""Benchmark: a shipped 3D workflow over several seeds, end to end, as a team would run it.

Runs a workflow file exactly as shipped plus only the settings that describe the data, through
`load_config` + `run_workflow` (manifest -> train -> evaluate -> audit -> MLflow -> report), once
per seed, and reports the test metric with its 95 % bootstrap CI, wall time, and mean +- sd:

- `--data hippocampus`: `workflows/segment_3d.yaml` on ../shared/data/hippocampus (191 MRI cases,
  medtl's own patient-level split), with `data.modalities=[]` (NIfTI has no DICOM modality),
  `data.intensity=mr` and `data.spacing=[1,1,1]`; test mean Dice over the two foreground classes.
- `--data hippocampus-volume`: `workflows/classify_3d.yaml` on the same MRI crops, labelled "small"
  when the experts' mask holds fewer voxels than the cohort's median (hippocampal volume, the MRI
  marker of atrophy), else "normal"; with `data.modalities=[]` and `data.intensity=mr`; test AUROC.
- `--data demo-ct`: `workflows/classify_3d.yaml` on medtl's synthetic demo CT series (`--patients`,
  default 600, demo seed 0: lesion present or not), no extra settings; test AUROC.

Usage:
    .venv/bin/python benchmarks/seeds.py --data hippocampus [--work DIR] [--seeds 0 1 2] [--set key=value ...]

MLflow goes to a SQLite store in the work folder, never the repository's mlruns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)


@dataclass(frozen=True)
class Target:
    workflow: str
    metric: str
    settings: tuple[str, ...]  # what describes the data, nothing tuned
    anchors: tuple[tuple[str, str], ...]


TARGETS = {
    "hippocampus": Target("segment_3d", "dice", ("data.modalities=[]", "data.intensity=mr", "data.spacing=[1, 1, 1]"), (
        ("nnU-Net 3d_fullres (Medical Segmentation Decathlon Task04, 5-fold CV)", "0.89-0.90"),
        ("medtl benchmarks/transfer_benefit.py, 32^3, 20 epochs (docs/benchmarks.md section 3)", "0.874"))),
    "hippocampus-volume": Target("classify_3d", "auroc", ("data.modalities=[]", "data.intensity=mr"), (
        ("none published for this label (hippocampus below the cohort's median volume, from the experts' masks)",
         "-"),
        ("MedMNIST v2 3D, ResNet-18+ACS (other data: OrganMNIST3D ... VesselMNIST3D)", "0.73-0.99"))),
    "demo-ct": Target("classify_3d", "auroc", (), (
        ("MedMNIST v2 3D, ResNet-18+ACS (other data: OrganMNIST3D ... VesselMNIST3D)", "0.73-0.99"),)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(TARGETS), required=True)
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more workflow overrides (after the data's own), e.g. train.epochs=20")
    parser.add_argument("--name", default="", help="suffix of the run folders (to keep several variants)")
    parser.add_argument("--patients", type=int, default=600, help="demo-ct: patients of the demo data set")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def data_for(name: str, work: Path, patients: int = 600) -> tuple[Path, Path]:
    """(data root, labels CSV) of a benchmark data set, made in `work` when it is generated."""
    if name == "hippocampus":
        return _data.hippocampus_labels(work)
    if name == "hippocampus-volume":
        return _data.hippocampus_volume_labels(work)
    from medtl.data.synthetic import write_demo_data

    root = work / ("demo_ct" if patients == 600 else f"demo_ct_{patients}")
    if not (root / "labels.csv").is_file():
        write_demo_data(root, patients=patients, seed=0, progress=False)
    return root, root / "labels.csv"


def run_seed(work: Path, root: Path, labels: Path, seed: int, args: argparse.Namespace) -> dict:
    from medtl.workflow.config import load_config
    from medtl.workflow.run import run_workflow

    target = TARGETS[args.data]
    output = work / "runs" / f"{args.data}-s{seed}{'-' + args.name if args.name else ''}"
    overrides = [f"data.root={root}", f"data.labels={labels}",
                 f"data.manifest_out={work / 'manifests' / f'{args.data}.csv'}", *target.settings,
                 f"seed={seed}", "tracking.experiment=medtl-benchmarks",
                 f"tracking.registered_model=benchmark_{args.data.replace('-', '_')}", *args.overrides]
    cfg = load_config(_data.REPO / "workflows" / f"{target.workflow}.yaml", overrides)
    print(f"\n== {args.data} seed {seed}: {cfg.model.encoder}, size {cfg.data.image_size}, {cfg.train.epochs} epochs "
          f"-> {output}", flush=True)
    start = time.perf_counter()
    metrics = run_workflow(cfg, output, progress=args.progress).metrics
    result = {"data": args.data, "workflow": target.workflow, "seed": seed, "metric": target.metric,
              "value": metrics["test"].get(target.metric), "ci": metrics["test_ci"].get(target.metric),
              "val": metrics["val"].get(target.metric), "wall_seconds": time.perf_counter() - start,
              "train_seconds": metrics["timings"]["train_seconds"], "epochs_run": metrics["epochs_run"],
              "best_epoch": metrics["best_epoch"], "overrides": overrides[3:]}
    (output / "benchmark.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = _data.setup(args.work, progress=args.progress)
    root, labels = data_for(args.data, work, args.patients)
    print("machine:", _data.machine())
    results = [run_seed(work, root, labels, seed, args) for seed in args.seeds]
    metric = TARGETS[args.data].metric
    rows = [[r["seed"], f"{r['value']:.3f}", "-".join(f"{v:.3f}" for v in r["ci"] or []), f"{r['val']:.3f}",
             f"{r['best_epoch']}/{r['epochs_run']}", f"{r['wall_seconds'] / 60:.1f}"] for r in results]
    _data.print_table(f"{args.data}: test {metric} ({TARGETS[args.data].workflow})",
                      ["seed", f"test {metric}", "95% CI", f"val {metric}", "best/epochs", "wall min"], rows)
    values = [r["value"] for r in results]
    if len(values) > 1:
        print(f"mean +- sd over {len(values)} seeds: {statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}")
    _data.print_table(f"Anchors ({metric})", ["method", metric], [list(a) for a in TARGETS[args.data].anchors])


if __name__ == "__main__":
    main()
