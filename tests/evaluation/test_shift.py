"""Dataset shift: the privacy of the reference profile, its comparison, per-study flags, the HTML."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtl.errors import InputError
from medtl.evaluation import shift
from medtl.evaluation.shift import (
    REASON_INTENSITY,
    REASON_MODALITY,
    REASON_SCANNER,
    REASON_SCORE,
    REASON_SIZE,
    REASON_SPACING,
    build_profile,
    compare_profiles,
    intensity_stats,
    render_shift_html,
    within_distribution,
)

DEMO_RUN = Path("/tmp/demo0/out/run")
SCANNERS = ("SCN-aaa111", "SCN-bbb222", "SCN-ccc333")
REASONS = {REASON_MODALITY, REASON_SCANNER, REASON_SIZE, REASON_SPACING, REASON_INTENSITY, REASON_SCORE}


def _dataset(n: int = 200, seed: int = 0, *, scanners=SCANNERS, modality: str = "DX", shape: str = "128x128",
             spacing: str = "0.7x0.7", scale: float = 1.0, score_shift: float = 0.0):
    """Manifest-like rows (str columns), intensity stats of real arrays, and beta-distributed scores."""
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame({
        "modality": [modality] * n, "shape": [shape] * n, "spacing": [spacing] * n,
        "sex": rng.choice(["F", "M"], n), "age_band": rng.choice(["18-29", "30-39", "40-49", "50-59"], n),
        "site": rng.choice(["SITE-1a2b3c", "SITE-4d5e6f"], n), "scanner": rng.choice(list(scanners), n),
        "split": ["train"] * n,
    }).astype(str)
    intensities = [intensity_stats(rng.gamma(2.0, 200.0, size=(32, 32)) * scale) for _ in range(n)]
    scores = np.clip(rng.beta(2.0, 5.0, n) + score_shift, 0.0, 1.0)
    return rows, intensities, scores


@pytest.fixture(scope="module")
def training():
    rows, intensities, scores = _dataset()
    return rows, intensities, scores, build_profile(rows, intensities, scores)


def test_intensity_stats_summarise_only_the_finite_values():
    image = np.arange(1000, dtype=np.float32).reshape(10, 100)
    image[0, :3] = [np.nan, np.inf, -np.inf]
    finite = np.arange(3, 1000, dtype=np.float64)
    stats = intensity_stats(image)
    p01, p50, p99 = np.percentile(finite, [1, 50, 99])
    expected = {"mean": finite.mean(), "std": finite.std(), "p01": p01, "p50": p50, "p99": p99}
    assert stats == pytest.approx(expected)
    assert all(type(v) is float for v in stats.values())


def test_intensity_stats_refuse_an_image_without_finite_values():
    with pytest.raises(InputError, match="finite"):
        intensity_stats(np.full((4, 4), np.nan))


def test_the_profile_keeps_shares_and_quantiles_but_no_row(training):
    rows, intensities, scores, profile = training
    assert profile["n_studies"] == 200 and profile["schema_version"] == shift.SCHEMA_VERSION
    counts = rows["scanner"].value_counts()
    assert profile["categorical"]["scanner"] == pytest.approx({k: counts[k] / 200 for k in SCANNERS})
    assert profile["categorical"]["modality"] == {"DX": 1.0}
    p50 = [i["p50"] for i in intensities]
    dist = profile["numeric"]["intensity.p50"]
    assert dist["n"] == 200 and dist["mean"] == pytest.approx(np.mean(p50))
    assert dist["quantiles"]["p50"] == pytest.approx(np.median(p50))
    # p01 of 200 values would sit between the 2nd and 3rd smallest; clamped to the 5th smallest.
    assert dist["quantiles"]["p01"] == pytest.approx(np.sort(p50)[4])
    assert dist["quantiles"]["p99"] == pytest.approx(np.sort(p50)[-5])
    assert profile["numeric"]["size.axis2"] is None and profile["numeric"]["spacing.axis2"] is None
    assert profile["scores"]["quantiles"]["p50"] == pytest.approx(np.median(scores))


def test_the_profile_round_trips_through_json(training):
    profile = training[3]
    assert json.loads(json.dumps(profile, allow_nan=False)) == profile
    comparison = compare_profiles(profile, profile)
    assert json.loads(json.dumps(comparison, allow_nan=False)) == comparison


def test_a_scanner_seen_in_three_studies_is_merged_into_other():
    rows, intensities, scores = _dataset(n=100, scanners=("SCN-aaa111", "SCN-bbb222"))
    rows.loc[:2, "scanner"] = "SCN-rare01"
    profile = build_profile(rows, intensities, scores)
    shares = profile["categorical"]["scanner"]
    # No share or count of the rare scanner anywhere; only the list of pseudonyms training saw names it.
    assert "SCN-rare01" not in json.dumps({k: v for k, v in profile.items() if k != "seen"})
    assert "SCN-rare01" in profile["seen"]["scanner"]
    # "other" of 3 studies would itself be a small cell: the smaller kept scanner joins it.
    kept = rows["scanner"].value_counts().drop("SCN-rare01")
    larger, smaller = kept.idxmax(), kept.idxmin()
    assert shares == pytest.approx({larger: kept[larger] / 100, "other": (kept[smaller] + 3) / 100})


def test_complementary_suppression_hides_a_small_known_age_band():
    rows, intensities, scores = _dataset(n=62)
    rows["age_band"] = ["40-49"] * 40 + ["50-59"] * 20 + ["90+"] * 2
    shares = build_profile(rows, intensities, scores)["categorical"]["age_band"]
    assert shares == pytest.approx({"40-49": 40 / 62, "other": 22 / 62})


def test_no_published_aggregate_describes_fewer_than_min_count_studies():
    rows, intensities, scores = _dataset(n=120, seed=3)
    rows.loc[:2, "shape"] = "48x48x12"  # three 3D studies: too few for an axis2 distribution
    rows.loc[:2, "spacing"] = "0.8x0.8x2.5"
    rows.loc[3:4, "sex"] = ""
    scores[:2] = 0.99  # two studies alone in the top bins
    profile = build_profile(rows, intensities, scores)
    n = profile["n_studies"]
    for shares in profile["categorical"].values():
        assert all(round(share * n) >= 5 for share in shares.values()), shares
    assert "(missing)" not in profile["categorical"]["sex"]
    assert profile["numeric"]["size.axis2"] is None and profile["numeric"]["spacing.axis2"] is None
    assert all(d is None or d["n"] >= 5 for d in profile["numeric"].values())
    histogram = profile["scores"]["histogram"]
    counts = [round(share * n) for share in histogram["shares"]]
    assert sum(counts) == n and all(c == 0 or c >= 5 for c in counts), counts
    assert histogram["edges"][0] == 0.0 and histogram["edges"][-1] == 1.0


def test_a_profile_of_fewer_than_min_count_studies_is_refused():
    rows, intensities, scores = _dataset(n=4)
    with pytest.raises(InputError, match="at least 5 studies"):
        build_profile(rows, intensities, scores)


def test_identical_data_shows_no_shift(training):
    rows, intensities, scores, profile = training
    comparison = compare_profiles(profile, build_profile(rows.copy(), list(intensities), scores.copy()))
    values = {name: entry["value"] for name, entry in comparison["attributes"].items()}
    assert all(values[a] == 0.0 for a in shift.CATEGORICAL)
    assert values["scores"] == pytest.approx(0.0, abs=1e-12)
    assert values["intensity.p50"] == 0.0 and values["size.voxels"] == 0.0
    assert comparison["flagged"] == [] and comparison["shifted"] is False


def test_all_studies_from_a_new_scanner_give_tvd_one_and_a_flag(training):
    rows, intensities, scores = _dataset(seed=1, scanners=("SCN-new999",))
    comparison = compare_profiles(training[3], build_profile(rows, intensities, scores))
    scanner = comparison["attributes"]["scanner"]
    assert scanner["value"] == pytest.approx(1.0) and scanner["flagged"] is True
    assert scanner["shares"]["SCN-new999"] == {"reference": 0.0, "external": 1.0}
    assert comparison["attributes"]["site"]["flagged"] is False
    assert comparison["flagged"] == ["scanner"] and comparison["shifted"] is True


def test_scores_shifted_by_0_4_are_flagged_by_psi(training):
    rows, intensities, scores, profile = training
    shifted = np.clip(scores + 0.4, 0.0, 1.0)
    entry = compare_profiles(profile, build_profile(rows, intensities, shifted))["attributes"]["scores"]
    assert entry["value"] > shift.PSI_THRESHOLD and entry["flagged"] is True
    assert entry["median_difference"] == pytest.approx(0.4)


def test_psi_matches_the_formula_on_two_point_masses():
    rows, intensities, _ = _dataset(n=100)
    reference = build_profile(rows, intensities, [0.12] * 50 + [0.37] * 50)
    external = build_profile(rows, intensities, [0.12] * 50 + [0.62] * 50)
    eps = shift.PSI_EPSILON
    expected = 2 * (0.5 - eps) * math.log(0.5 / eps)
    assert compare_profiles(reference, external)["attributes"]["scores"]["value"] == pytest.approx(expected)


def test_smd_of_intensities_scaled_by_1_5_matches_the_pooled_formula(training):
    rows, intensities, scores, profile = training
    _, scaled, _ = _dataset(seed=2, scale=1.5)
    entry = compare_profiles(profile, build_profile(rows, scaled, scores))["attributes"]["intensity.mean"]
    ref, ext = np.array([i["mean"] for i in intensities]), np.array([i["mean"] for i in scaled])
    expected = (ext.mean() - ref.mean()) / math.sqrt((ref.var(ddof=1) + ext.var(ddof=1)) / 2)
    assert entry["value"] == pytest.approx(expected) and entry["flagged"] is True
    assert entry["quantiles"]["p50"]["external"] == pytest.approx(np.median(ext))


def test_a_constant_image_size_that_changes_is_flagged_without_an_smd(training):
    rows, intensities, scores = _dataset(seed=1, shape="256x256")
    comparison = compare_profiles(training[3], build_profile(rows, intensities, scores))
    entry = comparison["attributes"]["size.voxels"]
    assert entry["value"] is None and entry["flagged"] is True


def test_a_value_one_side_shows_is_compared_with_the_other_sides_other_bucket():
    rows, intensities, scores = _dataset(n=100, scanners=("SCN-aaa111",))
    rows.loc[:5, "scanner"] = [f"SCN-r{i}" for i in range(6)]  # six rare scanners: "other" = 6 %
    reference = build_profile(rows, intensities, scores)
    external_rows = rows.copy()
    external_rows.loc[:5, "scanner"] = "SCN-rrr000"  # six studies of one scanner: shown on its own
    comparison = compare_profiles(reference, build_profile(external_rows, intensities, scores))
    scanner = comparison["attributes"]["scanner"]
    # The reference cannot tell whether SCN-rrr000 hides in its "other": both sides fold it there.
    assert scanner["value"] == pytest.approx(0.0) and "SCN-rrr000" not in scanner["shares"]
    assert scanner["shares"]["other"] == {"reference": pytest.approx(0.06), "external": pytest.approx(0.06)}


def test_compare_refuses_something_that_is_not_a_profile(training):
    with pytest.raises(InputError, match="schema_version"):
        compare_profiles(training[3], {"n_studies": 3})


def _typical(training):
    rows, intensities, scores, profile = training
    return profile, rows.iloc[0].to_dict(), intensities[0], float(np.median(scores))


def _check(profile, row, intensity, score, **changes):
    return within_distribution(profile, {**row, **changes}, intensity, score)


def test_a_typical_training_study_is_within_distribution(training):
    profile, row, intensity, score = _typical(training)
    assert within_distribution(profile, row, intensity, score) == (True, [])


def test_an_unseen_modality_is_outside_with_its_reason(training):
    profile, row, intensity, score = _typical(training)
    assert _check(profile, row, intensity, score, modality="MR") == (False, [REASON_MODALITY])


def test_an_image_four_times_larger_is_outside_with_its_reason(training):
    profile, row, intensity, score = _typical(training)
    assert _check(profile, row, intensity, score, shape="256x256") == (False, [REASON_SIZE])
    assert _check(profile, row, intensity, score, shape="128x128x40") == (False, [REASON_SIZE])


def test_an_intensity_scale_of_1000_is_outside_with_its_reason(training):
    profile, row, intensity, score = _typical(training)
    scaled = {k: v * 1000 for k, v in intensity.items()}
    assert within_distribution(profile, row, scaled, score) == (False, [REASON_INTENSITY])


def test_spacing_scanner_and_score_outside_each_give_their_reason(training):
    profile, row, intensity, score = _typical(training)
    assert _check(profile, row, intensity, score, spacing="3.5x3.5") == (False, [REASON_SPACING])
    assert _check(profile, row, intensity, score, scanner="SCN-zzz000") == (False, [REASON_SCANNER])
    assert within_distribution(profile, row, intensity, 0.999) == (False, [REASON_SCORE])


def test_unseen_scanners_are_flagged_even_beside_an_other_bucket_and_rare_modalities_stay_exact():
    rows, intensities, scores = _dataset(n=100)
    rows.loc[:5, "scanner"] = ["SCN-r1", "SCN-r2", "SCN-r3", "SCN-r4", "SCN-r5", "SCN-r6"]
    rows.loc[:5, "modality"] = ["CR", "CR", "CT", "CT", "MG", "MG"]
    profile = build_profile(rows, intensities, scores)
    assert "other" in profile["categorical"]["scanner"]  # rare scanners (quasi-identifiers) are merged
    # A modality identifies no one: 2 CR studies stay "CR", so the common modality is never swallowed.
    assert profile["categorical"]["modality"]["CR"] == pytest.approx(0.02) and "other" not in profile["categorical"]["modality"]
    row = rows.iloc[50].to_dict()
    assert within_distribution(profile, row, intensities[50], None) == (True, [])
    assert within_distribution(profile, {**row, "scanner": "SCN-r1"}, None, None) == (True, [])  # rare, but seen
    assert within_distribution(profile, {**row, "scanner": "SCN-new"}, None, None) == (False, [REASON_SCANNER])
    legacy = {k: v for k, v in profile.items() if k != "seen"}  # a profile without the list: "other" may hide it
    assert within_distribution(legacy, {**row, "scanner": "SCN-new"}, None, None) == (True, [])
    assert within_distribution(profile, {**row, "modality": "CR"}, None, None) == (True, [])
    assert within_distribution(profile, {**row, "modality": "MR"}, None, None) == (False, [REASON_MODALITY])
    del row["scanner"]  # a served image has no scanner pseudonym: not checked
    assert within_distribution(profile, row, intensities[50], None) == (True, [])


def test_reasons_are_fixed_strings_never_values(training):
    profile, row, intensity, _ = _typical(training)
    odd = {**row, "modality": "XYZ-42", "scanner": "SCN-secret", "shape": "999x999", "spacing": "9.9x9.9"}
    inside, reasons = within_distribution(profile, odd, {k: v * 1e6 for k, v in intensity.items()}, 0.999)
    assert inside is False and set(reasons) == REASONS and len(reasons) == len(REASONS)


def test_render_escapes_an_attribute_name_and_lists_one_row_per_attribute(training):
    comparison = compare_profiles(training[3], training[3])
    entry = {"kind": "categorical", "measure": "tvd", "value": 0.5, "flagged": True, "note": "<b>x</b>"}
    comparison["attributes"]["<script>alert(1)</script>"] = entry
    comparison["flagged"], comparison["shifted"] = ["<script>alert(1)</script>"], True
    page = render_shift_html(comparison)
    assert page.startswith('<section id="shift">') and page.endswith("</section>")
    assert "<h2>Dataset shift</h2>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page
    assert page.count("<tr") == len(comparison["attributes"]) + 1


@pytest.mark.skipif(not (DEMO_RUN / "manifest.csv").exists(), reason="no demo run at /tmp/demo0/out/run")
def test_the_demo_manifest_profile_hides_rare_values_and_keeps_its_own_rows_inside():
    manifest = pd.read_csv(DEMO_RUN / "manifest.csv", dtype=str, keep_default_na=False)
    train = manifest[manifest["split"] == "train"]
    scores = None
    if (DEMO_RUN / "predictions.csv").exists():
        predictions = pd.read_csv(DEMO_RUN / "predictions.csv")
        scores = predictions.loc[predictions["split"] == "val", "y_score"].to_numpy()
    profile = build_profile(train, [], scores)
    text = json.dumps(profile, allow_nan=False)
    for column in shift.CATEGORICAL:
        counts = train[column].value_counts()
        assert not any(value in text for value in counts[counts < 5].index if value), column
        assert all(round(s * len(train)) >= 5 for s in profile["categorical"][column].values())
    assert not any(key in text for key in ("P-", "R-", "ST-", "study_"))
    assert all(within_distribution(profile, row, None, None)[0] for row in train.to_dict("records"))
    assert within_distribution(profile, {**train.iloc[0].to_dict(), "modality": "MR"}, None, None)[1] == [
        REASON_MODALITY]


def test_scores_like_a_small_validation_set_are_seldom_flagged_and_far_ones_always():
    """Ten validation scores: a quantile range would flag about half of all ordinary studies."""
    rows, intensities, scores = _dataset(n=40)
    profile = build_profile(rows, intensities, scores[:10])
    row = rows.iloc[0].to_dict()
    fresh = np.random.default_rng(7).beta(2.0, 5.0, 2000)
    flagged = [REASON_SCORE in within_distribution(profile, row, intensities[0], float(s))[1] for s in fresh]
    assert np.mean(flagged) < 0.05
    assert within_distribution(profile, row, intensities[0], 0.995)[1] == [REASON_SCORE]
