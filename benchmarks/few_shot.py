"""Benchmark: few-shot classification on PneumoniaMNIST with the frozen ImageNet encoder.

Runs `medtl.studies.few_shot.run_few_shot` (the `medtl` few-shot study: no fine-tuning; the bundled ImageNet
EfficientNet-Lite0 embeds the training pool and the test split once, then a prototype classifier
and a linear probe are fitted on k training patients per class, over several random draws) on the
PNG export of ../shared/data/pneumoniamnist (published split kept, each image its own patient;
laid out in folders of 50 images, see `transfer_benefit.sharded_pneumonia`).
Reports test AUROC and accuracy, mean ± SD over draws, per k and method.

Usage:
    .venv/bin/python benchmarks/few_shot.py [--work DIR] [--quick] [--ks 1 5 10 20] [--draws 5] [--image-size 64]

Writes <work>/runs/few_shot[-quick]/few_shot.json (the study's own output) and
<work>/few_shot_benchmark.json (settings, machine, timings, results). MLflow goes to a SQLite store
in the work folder, never the repository's mlruns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)
from transfer_benefit import sharded_pneumonia  # noqa: E402

WORKFLOW = _data.REPO / "workflows" / "classify_2d.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--quick", action="store_true", help="tiny version for smoke checks (40 images a split)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20], help="patients per class")
    parser.add_argument("--draws", type=int, default=5, help="random support sets per k")
    parser.add_argument("--image-size", type=int, default=64, help="input size in pixels (square)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = _data.setup(args.work, progress=args.progress)
    # The export re-laid into small folders: medtl's loader costs O(N^2) on a flat folder
    # (see transfer_benefit.sharded_pneumonia).
    root, labels = sharded_pneumonia(work, limit=40 if args.quick else None)
    ks = [k for k in args.ks if not args.quick or k <= 10]
    draws = 2 if args.quick else args.draws
    before = _data.machine()
    print("machine:", before)

    from medtl.studies.few_shot import run_few_shot
    from medtl.workflow.config import load_config

    size = 32 if args.quick else args.image_size
    cfg = load_config(WORKFLOW, [
        f"data.root={root}",
        f"data.labels={labels}",
        f"data.manifest_out={work / 'manifests' / ('few_shot-quick.csv' if args.quick else 'few_shot.csv')}",
        "data.modalities=[]",  # PNG exports carry no DICOM modality
        f"data.image_size=[{size}, {size}]",
        "model.weights=imagenet",
        "tracking.experiment=medtl-benchmarks",
    ])
    output = work / "runs" / ("few_shot-quick" if args.quick else "few_shot")
    start = time.perf_counter()
    study = run_few_shot(cfg, output, ks=ks, draws=draws, progress=args.progress)
    wall = time.perf_counter() - start

    rows = []
    for method, by_k in study["results"].items():
        for k, r in sorted(by_k.items(), key=lambda item: int(item[0])):
            rows.append([method, int(k), f"{r['auroc_mean']:.3f} ± {r['auroc_sd']:.3f}",
                         f"{r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}", r["n_support"], len(r["auroc"])])
    _data.print_table(
        f"PneumoniaMNIST test, few-shot on the frozen ImageNet EfficientNet-Lite0 ({size} px)",
        ["method", "k (patients/class)", "test AUROC mean ± SD", "accuracy mean ± SD", "support studies", "draws"],
        rows,
    )
    if study.get("skipped_ks"):
        print("skipped ks:", study["skipped_ks"])
    result = {
        "benchmark": "few_shot",
        "dataset": "pneumoniamnist (PNG export, published split)",
        "encoder": "efficientnet_lite0 imagenet (frozen)",
        "image_size": size,
        "ks": ks,
        "draws": draws,
        "quick": args.quick,
        "wall_seconds": wall,
        "machine_before": before,
        "machine_after": _data.machine(),
        "run_id": study.get("run_id"),
        "results": study["results"],
    }
    path = work / ("few_shot_benchmark-quick.json" if args.quick else "few_shot_benchmark.json")
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwall {wall:.0f} s; results: {path}")
    print("machine after:", result["machine_after"])
    return result


if __name__ == "__main__":
    main()
