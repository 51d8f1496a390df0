"""Gap CIs: the worst-vs-best pair is held fixed, so groups without a gap are not flagged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtl.evaluation.audit import BiasAudit
from medtl.evaluation.gaps import pair_difference


def test_pair_difference_keeps_the_point_estimate_ends_in_every_replicate():
    point = np.array([0.9, 0.6, 0.8])  # AUROC: worst is group 1, best group 0
    replicates = np.array([[0.9, 0.6, 0.5], [0.7, 0.8, 0.95]])
    # max - min per replicate would be 0.4 and 0.25; the fixed pair gives best - worst of groups 0 and 1.
    np.testing.assert_allclose(pair_difference("auroc", point, replicates), [0.3, -0.1])
    fnr = np.array([0.1, 0.4, 0.2])  # lower is better: worst is group 1, best group 0
    np.testing.assert_allclose(pair_difference("fnr", fnr, np.array([[0.1, 0.5, 0.0]])), [0.4])
    assert np.isnan(pair_difference("auroc", np.array([0.9, np.nan]), replicates[:, :2])).all()


def _simulated(rng: np.random.Generator, *, n: int = 160, gap_group: str | None = None) -> pd.DataFrame:
    """Scores with AUROC about 0.93 in every group, except `gap_group` (AUROC about 0.6) when given."""
    y = rng.integers(0, 2, n)
    age = rng.choice([f"band{i}" for i in range(9)], n)
    site = rng.choice(["s0", "s1", "s2", "s3"], n)
    signal = np.where(site == gap_group, 0.35, 2.1)
    score = rng.normal(0, 1, n) + signal * y
    return pd.DataFrame({"id": [f"P{i}" for i in range(n)], "split": np.where(rng.random(n) < 0.35, "val", "test"),
                         "y_true": y, "y_score": 1 / (1 + np.exp(-score)), "age_band": age, "site": site})


def _flagged(df: pd.DataFrame, seed: int) -> set[str]:
    audit = BiasAudit(["age_band", "site"], intersections=False, n_boot=300, seed=seed, progress=False)
    result = audit.run(df, df["id"].to_numpy()).result_.to_dict()
    return {g["attribute"] for g in result["gaps"] if g["flagged"]}


@pytest.mark.slow
def test_no_gap_is_rarely_flagged_even_with_many_small_groups():
    """Null data: recomputing max - min per replicate flagged age bands in ~90 % of such sets."""
    rng = np.random.default_rng(7)
    flagged = [_flagged(_simulated(rng), seed) for seed in range(20)]
    assert sum("age_band" in f for f in flagged) <= 2, flagged
    assert sum("site" in f for f in flagged) <= 1, flagged


def test_a_planted_site_gap_is_flagged_and_age_bands_are_not():
    rng = np.random.default_rng(3)
    flagged = [_flagged(_simulated(rng, n=400, gap_group="s2"), seed) for seed in range(3)]
    assert all("site" in f for f in flagged), flagged
    assert not any("age_band" in f for f in flagged), flagged


def test_equalized_odds_names_the_groups_of_its_larger_rate_gap():
    from medtl.evaluation.gaps import draft_gaps

    names = ["A", "B", "C"]
    point = {"tpr": np.array([0.90, 0.85, 0.88]), "fpr": np.array([0.10, 0.12, 0.30])}  # FPR gap 0.20 > TPR 0.05
    replicates = {m: np.tile(v, (50, 1)) for m, v in point.items()}
    overall = {"tpr": 0.88, "fpr": 0.17}
    eo = next(d for d in draft_gaps("site", names, point, replicates, overall,
                                    {m: np.full(50, v) for m, v in overall.items()}, ["equalized_odds"]))
    assert eo.value == pytest.approx(0.20) and (eo.worst_group, eo.best_group) == ("C", "A")
    point["tpr"] = np.array([0.95, 0.60, 0.88])  # now the TPR gap (0.35) is the larger
    replicates = {m: np.tile(v, (50, 1)) for m, v in point.items()}
    eo = next(d for d in draft_gaps("site", names, point, replicates, overall,
                                    {m: np.full(50, v) for m, v in overall.items()}, ["equalized_odds"]))
    assert eo.value == pytest.approx(0.35) and (eo.worst_group, eo.best_group) == ("B", "A")
