"""Benchmark: test-time augmentation (evaluation.tta) on finished runs, without training again.

For each run folder given (a `medtl run` output with `package/`, `manifest.csv` and
`predictions.csv`), the test studies are scored again through the registered model's own scoring
path (`medtl.workflow.apply.score_studies`, what `medtl predict` and the served model use) once per
test-time augmentation mode, and the test AUROC of each mode is printed, then the mean ± sd over runs.

Usage:
    .venv/bin/python benchmarks/tta.py --work WORK --root DATA_ROOT RUN_DIR [RUN_DIR ...]

WORK is the training benchmark's work folder (its project key under WORK/config resolves the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402  (the benchmarks folder is not a package)

from medtl.data.verify import resolve_study  # noqa: E402
from medtl.vocabulary import TTA_MODES  # noqa: E402
from medtl.workflow.apply import score_studies  # noqa: E402
from medtl.workflow.package import read_package  # noqa: E402


def test_auroc(run: Path, root: Path, mode: str) -> float:
    """Test AUROC of the run's registered model with test-time augmentation `mode`."""
    package, network = read_package(run / "package")
    package = dataclasses.replace(package, tta=mode)
    table = pd.read_csv(run / "predictions.csv").query("split == 'test'")
    manifest = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False).set_index("id")
    studies = [(i, resolve_study({**manifest.loc[i].to_dict(), "id": i}, root).files, manifest.at[i, "modality"])
               for i in table["id"]]
    scores = [float(s.probs[1]) for s in score_studies(package, network, studies, progress=False)]
    return float(roc_auc_score(table["y_true"], scores))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="the work folder of the benchmark that trained the runs")
    parser.add_argument("--root", required=True, help="the data root the runs were trained on")
    parser.add_argument("runs", nargs="+", help="run output folders")
    args = parser.parse_args(argv)
    _data.setup(args.work)
    print("machine:", _data.machine())
    results = {mode: [] for mode in TTA_MODES}
    for run in map(Path, args.runs):
        row = {mode: test_auroc(run, Path(args.root), mode) for mode in TTA_MODES}
        for mode, value in row.items():
            results[mode].append(value)
        print(run.name, " ".join(f"{mode}={value:.4f}" for mode, value in row.items()), flush=True)
    for mode, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{mode}: test AUROC {statistics.mean(values):.4f} ± {sd:.4f} over {len(values)} runs")


if __name__ == "__main__":
    main()
