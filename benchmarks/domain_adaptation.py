"""Benchmark: domain adaptation to one site of the demo data (source-only vs AdaBN vs DANN).

Writes the synthetic demo studies (`medtl.data.synthetic.write_demo_data`) into the work folder, builds
their manifest once, and trains the demo workflow (`medtl.workflow.demo.DEMO_WORKFLOW`: ImageNet
EfficientNet-Lite0, 64 px) three ways, each with `medtl.workflow.run.run_workflow`:

- **source-only**: the target site's train and val rows are removed from the manifest (its test
  rows stay), `adaptation.method=none`: the model never sees the target site before testing.
- **AdaBN**: `adaptation.method=adabn` (trains on the source sites, then re-estimates BatchNorm
  statistics on the target site's *unlabelled* training images).
- **DANN**: `adaptation.method=dann` (the target site's training images join training unlabelled
  behind a gradient-reversal domain classifier).

The target is the demo's planted-gap site by default (its radiographs show the finding fainter;
docs/demo_data.md), named by its manifest code only. All three are scored on the same test
patients; the table gives test AUROC on the target site and on the source sites, computed from
each run's predictions.csv with scikit-learn.

Usage:
    .venv/bin/python benchmarks/domain_adaptation.py [--work DIR] [--quick] [--patients 300] [--epochs 4]
        [--target SITE-code] [--methods source_only adabn dann] [--set key=value ...]

Writes <work>/domain_adaptation.json; each run's folder is <work>/runs/da-<method>. MLflow goes to a
SQLite store in the work folder, never the repository's mlruns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

METHODS = ("source_only", "adabn", "dann")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help=f"work folder outside the repo (default {_data.DEFAULT_WORK})")
    parser.add_argument("--quick", action="store_true", help="tiny version for smoke checks (60 patients, 1 epoch)")
    parser.add_argument("--patients", type=int, default=300, help="synthetic demo patients")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--target", default="", help="target site code (default: the demo's planted-gap site)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more workflow overrides (after the benchmark's own)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def _auroc(table, mask) -> float | None:
    from sklearn.metrics import roc_auc_score

    rows = table[mask]
    if rows["y_true"].nunique() < 2:
        return None
    return float(roc_auc_score(rows["y_true"], rows["y_score"]))


def domain_scores(predictions: Path, target: str) -> dict:
    """Test AUROC on the target site, the source sites and overall, from a run's predictions.csv."""
    import pandas as pd

    table = pd.read_csv(predictions, dtype={"site": str}, keep_default_na=False)
    test = table["split"] == "test"
    on_target = table["site"].str.strip() == target
    return {
        "target_test_auroc": _auroc(table, test & on_target),
        "source_test_auroc": _auroc(table, test & ~on_target),
        "test_auroc": _auroc(table, test),
        "n_target_test": int((test & on_target).sum()),
        "n_source_test": int((test & ~on_target).sum()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = _data.setup(args.work, progress=args.progress)

    import pandas as pd

    from medtl.data.privacy import load_key, site_code
    from medtl.data.synthetic import write_demo_data
    from medtl.workflow.config import load_config
    from medtl.workflow.demo import DEMO_WORKFLOW
    from medtl.workflow.prepare import prepare_data
    from medtl.workflow.run import run_workflow

    patients = 60 if args.quick else args.patients
    epochs = 1 if args.quick else args.epochs
    data_dir = work / ("da_demo_data_quick" if args.quick else "da_demo_data")
    if data_dir.exists():
        shutil.rmtree(data_dir)  # our own synthetic folder from an earlier run: write it afresh
    demo = write_demo_data(data_dir, patients=patients, seed=0, progress=args.progress)
    forbidden = {s: "demo PHI" for s in demo.phi_strings}
    manifest_path = work / "manifests" / ("da_demo-quick.csv" if args.quick else "da_demo.csv")
    base = [
        f"data.root={data_dir}",
        f"data.labels={demo.labels_csv}",
        f"data.image_size=[{args.image_size}, {args.image_size}]",
        f"train.epochs={epochs}",
        "train.early_stopping_patience=10",  # the same number of epochs for every method
        f"evaluation.n_boot={100 if args.quick else 300}",
        "tracking.experiment=medtl-benchmarks-da",
        "tracking.register=false",
        *(["audit.min_group_size=2"] if args.quick else []),
    ]
    cfg = load_config(None, [*base, f"data.manifest_out={manifest_path}"], base=DEMO_WORKFLOW)
    data = prepare_data(cfg, work / "runs", progress=args.progress)  # builds the manifest once
    target = args.target or site_code(load_key(cfg.data.key_file or None), demo.gap_institution)
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    counts = (manifest[manifest["modality"].isin(["CR", "DX"])].groupby(["site", "split"]).size()
              .unstack(fill_value=0))
    print(f"target site: {target}{' (planted gap)' if not args.target else ''}\nradiographs per site and split:\n"
          f"{counts.to_string()}")
    # Source-only: the target site's train/val rows leave the manifest (its test rows stay), so the
    # model never sees the target site before testing.
    source_only = manifest[~((manifest["site"].str.strip() == target) & manifest["split"].isin(["train", "val"]))]
    source_manifest = manifest_path.with_name(manifest_path.stem + "-source_only.csv")
    source_only.to_csv(source_manifest, index=False)
    sidecar = manifest_path.with_suffix(".json")
    if sidecar.is_file():
        shutil.copyfile(sidecar, source_manifest.with_suffix(".json"))
    before = _data.machine()
    print("machine:", before)
    del data

    results = {}
    for method in args.methods:
        if method == "source_only":
            extra = [f"data.manifest={source_manifest}", "adaptation.method=none"]
        else:
            extra = [f"data.manifest={manifest_path}", f"adaptation.method={method}", "adaptation.domain_column=site",
                     f"adaptation.target={target}"]
        run_cfg = load_config(None, [*base, *extra, *args.overrides], base=DEMO_WORKFLOW)
        output = work / "runs" / f"da-{method}{'-quick' if args.quick else ''}"
        print(f"\n== {method}: {args.image_size} px, {epochs} epochs -> {output}", flush=True)
        start = time.perf_counter()
        outputs = run_workflow(run_cfg, output, progress=args.progress, extra_forbidden=forbidden)
        wall = time.perf_counter() - start
        scores = domain_scores(output / "predictions.csv", target)
        metrics = outputs.metrics
        results[method] = {
            **scores,
            "workflow_target_test": metrics.get("target_test"),  # medtl's own (AdaBN/DANN runs only)
            "epochs_run": metrics.get("epochs_run"),
            "best_epoch": metrics.get("best_epoch"),
            "method_facts": {k: v for k, v in metrics.items() if k in ("adaptation", "method")},
            "wall_seconds": wall,
            "run_id": outputs.run_id,
        }
        print(f"{method}: target test AUROC {scores['target_test_auroc']}, source {scores['source_test_auroc']}, "
              f"wall {wall:.0f} s", flush=True)

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    ref = results.get("source_only", {}).get("target_test_auroc")
    rows = []
    for method, r in results.items():
        delta = (r["target_test_auroc"] - ref) if ref is not None and r["target_test_auroc"] is not None else None
        rows.append([method, fmt(r["target_test_auroc"]), "—" if method == "source_only" else fmt(delta),
                     fmt(r["source_test_auroc"]), fmt(r["test_auroc"]), r["n_target_test"], r["n_source_test"],
                     r["epochs_run"], f"{r['wall_seconds']:.0f}"])
    _data.print_table(
        f"Demo data, target site {target}: test AUROC (EfficientNet-Lite0 ImageNet, {args.image_size} px, "
        f"{epochs} epochs)",
        ["method", "target-site AUROC", "Δ vs source-only", "source-sites AUROC", "all-test AUROC",
         "target test studies", "source test studies", "epochs run", "wall s"],
        rows,
    )
    result = {
        "benchmark": "domain_adaptation",
        "dataset": f"medtl demo data, {patients} patients, seed 0",
        "target_site": target,
        "target_is_planted_gap_site": not args.target,
        "site_split_counts": {str(k): {str(s): int(n) for s, n in v.items()} for k, v in counts.to_dict("index").items()},
        "image_size": args.image_size,
        "epochs": epochs,
        "quick": args.quick,
        "machine_before": before,
        "machine_after": _data.machine(),
        "results": results,
    }
    path = work / f"domain_adaptation{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nresults: {path}")
    print("machine after:", result["machine_after"])
    return result


if __name__ == "__main__":
    main()
