"""Benchmark: what averaging finished runs' scores would give (a k-seed ensemble), without training again.

Each group is a comma-separated list of run folders (`medtl run` outputs with `predictions.csv`)
trained the same way with different seeds. For each group the test AUROC of every member is
printed, then that of the mean of the members' test scores (the ensemble's score of a study is
the mean of its members' probabilities), and the mean ± sd of the ensembles over groups. The
test rows must be the same studies in every member (the published split); a group whose
members scored different studies is refused.

Usage:
    .venv/bin/python benchmarks/ensemble.py RUN,RUN,RUN [RUN,RUN,RUN ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def test_scores(run: Path) -> pd.DataFrame:
    """The run's test rows (pseudonymous id -> y_true, y_score)."""
    table = pd.read_csv(run / "predictions.csv")
    return table[table["split"] == "test"].set_index("id")[["y_true", "y_score"]]


def group_auroc(runs: list[Path]) -> tuple[list[float], float]:
    """(each member's test AUROC, the ensemble's test AUROC)."""
    members = [test_scores(run) for run in runs]
    ids = members[0].index
    if any(set(m.index) != set(ids) for m in members):
        raise SystemExit(f"the runs {', '.join(r.name for r in runs)} scored different test studies; "
                         "group runs of one split")
    truth = members[0].loc[ids, "y_true"]
    singles = [float(roc_auc_score(truth, m.loc[ids, "y_score"])) for m in members]
    mean = np.mean([m.loc[ids, "y_score"].to_numpy() for m in members], axis=0)
    return singles, float(roc_auc_score(truth, mean))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="+", help="comma-separated run folders of one ensemble")
    args = parser.parse_args(argv)
    print("| members | member test AUROC | mean ± sd of members | ensemble test AUROC |")
    print("|---|---|---|---|")
    ensembles = []
    for group in args.groups:
        runs = [Path(p) for p in group.split(",")]
        singles, together = group_auroc(runs)
        ensembles.append(together)
        spread = statistics.stdev(singles) if len(singles) > 1 else 0.0
        print(f"| {', '.join(r.name for r in runs)} | {' / '.join(f'{v:.3f}' for v in singles)} | "
              f"{statistics.mean(singles):.3f} ± {spread:.3f} | {together:.3f} |")
    if len(ensembles) > 1:
        print(f"\nensembles: {statistics.mean(ensembles):.3f} ± {statistics.stdev(ensembles):.3f} "
              f"over {len(ensembles)} groups")


if __name__ == "__main__":
    main()
