"""The transfer-benefit study: nested label subsets, the JSON/headline summary, and a short real study."""

from __future__ import annotations

import html
import importlib.util
import json
import math
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import yaml

from medtl.errors import ConfigError, InputError
from medtl.evaluation.report_plots import data_efficiency_plot
from medtl.studies import (
    check_label_fractions,
    nested_label_subsets,
    render_section,
    report_mapping,
    run_transfer_benefit,
    study_arms,
    summarise,
)
from medtl.studies.summaries import bias_summary, efficiency_plot
from medtl.vocabulary import AUDIT_STATUSES
from medtl.workflow.config import load_config
from medtl.workflow.record import AUDIT_STATUS_TAG

REPO = Path(__file__).resolve().parents[2]
# The stable interface of transfer_benefit.json: keys may be added, never renamed or removed.
STABLE_POINT_KEYS = {"mean", "sd", "runs", "train_seconds"}
HEADLINE_KEYS = {"matches_scratch_full_at", "scratch_full", "pretrained_at_that_fraction", "label_savings",
                 "time_to_target_seconds", "text", "reference_fraction", "target", "time_to_target_reached",
                 "bias", "flagged_gaps"}


def _manifest(n_patients: int = 40) -> pd.DataFrame:
    """A manifest-shaped table: 1-3 studies per patient, 30 % positive patients, fixed splits."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        split = "train" if p < int(0.7 * n_patients) else ("val" if p % 2 else "test")
        label = "pneumonia" if p % 10 < 3 else "normal"
        for s in range(int(rng.integers(1, 4))):
            rows.append({"id": f"r{p}-{s}", "patient": f"P{p:03d}", "split": split, "label": label})
    return pd.DataFrame(rows)


def _patients(manifest: pd.DataFrame, ids: frozenset[str]) -> set[str]:
    return set(manifest.loc[manifest["id"].isin(ids), "patient"])


def _assert_nested_whole_patients(manifest: pd.DataFrame, subsets: dict[float, frozenset[str]]) -> None:
    train = manifest[manifest["split"] == "train"]
    fractions = sorted(subsets)
    for small, large in zip(fractions, fractions[1:], strict=False):
        assert subsets[small] < subsets[large]
    for ids in subsets.values():
        chosen = train[train["id"].isin(ids)]
        assert len(chosen) == len(ids)  # training rows only
        # patient level: a kept patient keeps every one of its studies
        assert set(train.loc[train["patient"].isin(chosen["patient"]), "id"]) == set(ids)
        assert set(chosen["label"]) == set(train["label"])  # every class present
    assert subsets[1.0] == frozenset(train["id"])


def test_nested_label_subsets_are_nested_whole_patients_with_every_class():
    manifest = _manifest()
    subsets = nested_label_subsets(manifest, (1.0, 0.05, 0.25, 0.5), seed=3)
    assert sorted(subsets) == [0.05, 0.25, 0.5, 1.0]
    _assert_nested_whole_patients(manifest, subsets)
    # 28 training patients (9 positive, 19 normal): ceil per stratum, at least one each
    assert len(_patients(manifest, subsets[0.05])) == 2
    assert len(_patients(manifest, subsets[0.5])) == math.ceil(0.5 * 9) + math.ceil(0.5 * 19)


def test_nested_label_subsets_depend_on_the_seed_only_below_the_full_set():
    manifest = _manifest()
    a = nested_label_subsets(manifest, (0.25, 1.0), seed=0)
    b = nested_label_subsets(manifest, (0.25, 1.0), seed=1)
    assert a == nested_label_subsets(manifest, (0.25, 1.0), seed=0)
    assert a[0.25] != b[0.25] and a[1.0] == b[1.0]


def test_nested_label_subsets_fraction_one_tenth_of_ten_keeps_one_patient():
    manifest = pd.DataFrame({"id": [f"r{i}" for i in range(20)], "patient": [f"P{i}" for i in range(20)],
                             "split": ["train"] * 20, "label": ["a"] * 10 + ["b"] * 10})
    subsets = nested_label_subsets(manifest, (0.1,), seed=0)
    assert len(subsets[0.1]) == 2  # 0.1 * 10 is 1.0000000000000002 in floating point, not 2


def test_nested_label_subsets_keep_unlabelled_training_rows_without_counting_them():
    manifest = _manifest()
    extra = pd.DataFrame({"id": ["u1", "u2"], "patient": ["U1", "U2"], "split": ["train", "train"], "label": ["", ""]})
    subsets = nested_label_subsets(pd.concat([manifest, extra]), (0.05, 1.0), seed=0, target_column="label")
    assert all({"u1", "u2"} <= ids for ids in subsets.values())
    assert subsets[0.05] - {"u1", "u2"} == nested_label_subsets(manifest, (0.05,), seed=0)[0.05]


def test_nested_label_subsets_without_labelled_training_rows_point_at_the_labels_csv():
    manifest = _manifest()
    unlabelled = manifest.assign(label=np.where(manifest["split"] == "train", "", manifest["label"]))
    with pytest.raises(InputError, match="data.labels") as err:
        nested_label_subsets(unlabelled, (0.5,), seed=0, target_column="label")
    assert "data.fractions" not in str(err.value)  # the split is not what is wrong
    with pytest.raises(InputError, match="'train' rows, not none"):
        nested_label_subsets(manifest[manifest["split"] != "train"], (0.5,), seed=0)


@pytest.mark.parametrize("bad", [(), (0.0, 1.0), (1.5,), ("half",), (float("nan"),)])
def test_check_label_fractions_rejects_values_outside_zero_one(bad):
    with pytest.raises(ConfigError, match="fractions must be"):
        check_label_fractions(bad)


def test_study_arms_scratch_finetunes_and_pretrained_needs_weights():
    cfg = load_config(None, ["data.root=r", "data.labels=l.csv", "train.strategy=lp_ft"])
    arms = {a.name: a for a in study_arms(cfg, ("pretrained", "scratch"), linear_probe=True)}
    assert (arms["pretrained"].weights, arms["pretrained"].strategy) == ("imagenet", "lp_ft")
    assert (arms["scratch"].weights, arms["scratch"].strategy) == ("none", "finetune")
    assert (arms["linear_probe"].weights, arms["linear_probe"].strategy) == ("imagenet", "linear_probe")
    with pytest.raises(ConfigError, match="arms must be"):
        study_arms(cfg, ("pretrained", "imagenet"))
    scratch_cfg = load_config(None, ["data.root=r", "data.labels=l.csv", "model.weights=none"])
    with pytest.raises(ConfigError, match="model.weights"):
        study_arms(scratch_cfg, ("pretrained", "scratch"))


def _run(value: float, best_val: float, history: list[tuple[float, float]], seed: int = 0) -> dict:
    return {"seed": seed, "value": value, "best_val": best_val, "train_seconds": history[-1][1],
            "history": [{"epoch": i, "value": v, "seconds": s} for i, (v, s) in enumerate(history)], "gaps": []}


def _assert_headline_follows_the_rule(result: dict) -> None:
    """The headline agrees with the arms' means: the smallest fraction from which pretrained stays >= scratch."""
    head, arms = result["headline"], result["arms"]
    reference = head["reference_fraction"]
    scratch_full = arms["scratch"][str(reference)]["mean"]
    assert head["scratch_full"] == scratch_full
    keys = sorted(arms["pretrained"], key=float)
    holds = [arms["pretrained"][k]["mean"] is not None and arms["pretrained"][k]["mean"] >= scratch_full
             for k in keys]
    expected = next((k for i, k in enumerate(keys) if all(holds[i:])), None)
    if expected is None:
        assert (head["matches_scratch_full_at"], head["pretrained_at_that_fraction"], head["label_savings"]) == (
            None, None, None)
        assert head["text"].startswith("pretrained did not match scratch")
    else:
        assert head["matches_scratch_full_at"] == float(expected)
        assert head["pretrained_at_that_fraction"] == arms["pretrained"][expected]["mean"]
        assert head["label_savings"] == pytest.approx(1 - float(expected) / reference)
        assert head["text"].startswith(f"pretrained at {100 * float(expected):g} % of labels matches")


def test_summarise_headline_names_smallest_pretrained_fraction_matching_scratch_at_full():
    runs = {
        "pretrained": {"0.1": [_run(0.80, 0.8, [(0.8, 5.0)])], "0.25": [_run(0.91, 0.9, [(0.9, 6.0)])],
                       "1.0": [_run(0.95, 0.95, [(0.7, 10.0), (0.95, 20.0)]), _run(0.93, 0.9, [(0.9, 12.0)], 1)]},
        "scratch": {"0.1": [_run(0.60, 0.6, [(0.6, 5.0)])], "0.25": [_run(0.70, 0.7, [(0.7, 6.0)])],
                    "1.0": [_run(0.90, 0.88, [(0.5, 10.0), (0.88, 30.0)]), _run(0.88, 0.86, [(0.86, 25.0)], 1)]},
    }
    result = summarise("auroc", runs)
    assert set(result) == {"metric", "arms", "headline"}
    assert STABLE_POINT_KEYS | {"ci", "n_seeds"} == set(result["arms"]["pretrained"]["1.0"])
    assert result["arms"]["pretrained"]["1.0"]["mean"] == pytest.approx(0.94)
    assert result["arms"]["pretrained"]["1.0"]["sd"] == pytest.approx(np.std([0.95, 0.93], ddof=1))
    assert result["arms"]["scratch"]["0.1"]["sd"] == 0.0  # one seed
    head = result["headline"]
    assert HEADLINE_KEYS <= set(head)
    assert head["matches_scratch_full_at"] == 0.25 and head["label_savings"] == pytest.approx(0.75)
    assert head["scratch_full"] == pytest.approx(0.89) and head["pretrained_at_that_fraction"] == 0.91
    assert head["text"].startswith("pretrained at 25 % of labels matches scratch at 100 %")
    assert "every larger fraction" in head["rule"]
    _assert_headline_follows_the_rule(result)
    assert report_mapping(result)["scratch"]["1.0"] == {"mean": pytest.approx(0.89),
                                                        "sd": pytest.approx(np.std([0.9, 0.88], ddof=1)),
                                                        "ci": result["arms"]["scratch"]["1.0"]["ci"]}
    json.dumps(result, allow_nan=False)


def test_summarise_default_target_is_reached_by_every_scratch_seed_so_scratch_time_is_defined():
    # Scratch's best validation values at 100 % are 0.88 and 0.86: their mean (0.87) is above seed 1's
    # best, so a mean target would leave scratch's time to target undefined; the lowest best is not.
    runs = {
        "pretrained": {"1.0": [_run(0.95, 0.95, [(0.7, 10.0), (0.95, 20.0)]), _run(0.93, 0.9, [(0.9, 12.0)], 1)]},
        "scratch": {"1.0": [_run(0.90, 0.88, [(0.5, 10.0), (0.88, 30.0)]), _run(0.88, 0.86, [(0.86, 25.0)], 1)]},
    }
    head = summarise("auroc", runs)["headline"]
    assert head["target"]["value"] == pytest.approx(0.86)
    assert "lowest over seeds" in head["target"]["source"] and head["target"]["source"].startswith("scratch")
    assert head["time_to_target_reached"] == {"pretrained": 2, "scratch": 2}
    assert head["time_to_target_seconds"]["scratch"] == pytest.approx((30.0 + 25.0) / 2)
    assert head["time_to_target_seconds"]["pretrained"] == pytest.approx((20.0 + 12.0) / 2)


def test_summarise_time_to_target_is_none_unless_every_seed_of_the_arm_reached_it():
    runs = {
        "pretrained": {"1.0": [_run(0.95, 0.95, [(0.95, 20.0)]), _run(0.93, 0.8, [(0.8, 12.0)], 1)]},
        "scratch": {"1.0": [_run(0.90, 0.90, [(0.9, 30.0)]), _run(0.88, 0.9, [(0.9, 25.0)], 1)]},
    }
    head = summarise("auroc", runs, target=0.9)["headline"]
    assert head["time_to_target_reached"] == {"pretrained": 1, "scratch": 2}
    assert head["time_to_target_seconds"] == {"pretrained": None, "scratch": pytest.approx(27.5)}


def test_summarise_headline_ignores_a_fraction_that_larger_fractions_contradict():
    # pretrained 0.95 at 5 % but 0.80 at 10 %: "5 % matches scratch at 100 %" would be contradicted
    pretrained = {"0.05": [_run(0.95, 0.9, [(0.9, 1.0)])], "0.1": [_run(0.80, 0.8, [(0.8, 1.0)])]}
    scratch = {"0.05": [_run(0.60, 0.6, [(0.6, 1.0)])], "0.1": [_run(0.70, 0.7, [(0.7, 1.0)])],
               "1.0": [_run(0.90, 0.9, [(0.9, 1.0)])]}
    holds = summarise("auroc", {"pretrained": {**pretrained, "1.0": [_run(0.92, 0.9, [(0.9, 1.0)])]},
                                "scratch": scratch})
    assert holds["headline"]["matches_scratch_full_at"] == 1.0
    assert holds["headline"]["label_savings"] == 0.0
    assert holds["headline"]["text"].startswith("pretrained at 100 % of labels matches scratch at 100 %")
    _assert_headline_follows_the_rule(holds)
    falls_short = summarise("auroc", {"pretrained": {**pretrained, "1.0": [_run(0.85, 0.9, [(0.9, 1.0)])]},
                                      "scratch": scratch})
    head = falls_short["headline"]
    assert head["matches_scratch_full_at"] is None and head["pretrained_at_that_fraction"] is None
    assert head["text"].startswith("pretrained did not match scratch at 100 %")
    _assert_headline_follows_the_rule(falls_short)


def test_summarise_points_carry_a_t_interval_over_seeds_and_none_for_one_seed():
    runs = {"pretrained": {"0.5": [_run(0.80, 0.8, [(0.8, 1.0)])],
                           "1.0": [_run(v, 0.9, [(0.9, 1.0)], seed) for seed, v in enumerate((0.90, 0.92, 0.97))]},
            "scratch": {"0.5": [_run(0.70, 0.7, [(0.7, 1.0)]), _run(0.74, 0.7, [(0.7, 1.0)], 1)],
                        "1.0": [_run(0.85, 0.8, [(0.8, 1.0)])]}}
    arms = summarise("auroc", runs)["arms"]
    three = np.array([0.90, 0.92, 0.97])
    half = 4.302653 * three.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}, not the normal 1.96
    assert arms["pretrained"]["1.0"]["ci"] == pytest.approx([three.mean() - half, three.mean() + half])
    # two seeds 0.70, 0.74: sd / sqrt(2) = 0.02, t_{0.975, 1} = 12.706
    assert arms["scratch"]["0.5"]["ci"] == pytest.approx([0.72 - 12.7062 * 0.02, 0.72 + 12.7062 * 0.02], rel=1e-4)
    assert arms["pretrained"]["0.5"]["ci"] is None and arms["pretrained"]["0.5"]["n_seeds"] == 1
    assert arms["pretrained"]["1.0"]["n_seeds"] == 3
    page = render_section(summarise("auroc", runs))
    lo, hi = arms["pretrained"]["1.0"]["ci"]
    assert f"95 % CI {lo:.3f}–{hi:.3f}" in page and "one seed: no CI" in page


def test_data_efficiency_plot_draws_the_ci_band_over_seeds_and_labels_it():
    points = {"0.1": {"mean": 0.7, "sd": 0.02}, "1.0": {"mean": 0.9, "sd": 0.01}}
    with_ci = {"scratch": {k: dict(p, ci=[p["mean"] - 0.1, p["mean"] + 0.1]) for k, p in points.items()}}
    without = {"scratch": {k: dict(p, ci=None) for k, p in points.items()}}  # one seed: no band
    plot = data_efficiency_plot(with_ci, metric="AUROC")
    assert "95 % CI over seeds" in plot.alt and "[0.600, 0.800]" in plot.alt
    assert plot.uri != data_efficiency_plot(without, metric="AUROC").uri
    assert "± sd" in data_efficiency_plot({"scratch": points}, metric="AUROC").alt  # the report's shape
    runs = {"pretrained": {"1.0": [_run(0.9, 0.9, [(0.9, 1.0)]), _run(0.94, 0.9, [(0.9, 1.0)], 1)]},
            "scratch": {"1.0": [_run(0.8, 0.8, [(0.8, 1.0)])]}}
    result = summarise("auroc", runs)
    lo, hi = result["arms"]["pretrained"]["1.0"]["ci"]
    assert f"1.00 -> 0.920 [{lo:.3f}, {hi:.3f}]" in efficiency_plot(result).alt
    assert report_mapping(result)["pretrained"]["1.0"]["ci"] == [lo, hi]  # the audit report draws it too


def test_bias_summary_counts_widened_and_narrowed_difference_gaps_and_ignores_ratios():
    amplification = [
        {"attribute": "sex", "metric": "tpr", "kind": "difference", "delta": 0.08, "direction": "widened"},
        {"attribute": "age_band", "metric": "fnr", "kind": "difference", "delta": -0.05, "direction": "narrowed"},
        {"attribute": "site", "metric": "auroc", "kind": "difference", "delta": 0.0, "direction": "unchanged"},
        {"attribute": "site", "metric": "tpr", "kind": "ratio", "delta": -0.2, "direction": "widened"},
    ]
    summary = bias_summary(amplification, fraction=0.25, seed=7)
    assert summary["widened"] == ["sex:tpr"] and summary["narrowed"] == ["age_band:fnr"]
    assert [a["attribute"] for a in summary["comparisons"]] == ["sex", "age_band", "site"]
    assert (summary["fraction"], summary["seed"], summary["paired"]) == (0.25, 7, True)
    assert summary["text"].startswith("at 25 % of labels pretraining widened 1 and narrowed 1 of 3")
    assert summary["text"].endswith("widened: sex:tpr") and "seed 7" in summary["text"]
    assert "no subgroup gap" in bias_summary(amplification[3:], fraction=1.0, seed=0)["text"]


def test_render_section_shows_flagged_gaps_and_the_paired_comparison_per_fraction():
    gap = {"attribute": "sex", "metric": "tpr", "value": 0.2, "ci": [0.1, 0.3], "flagged": True}
    runs = {"pretrained": {"0.5": [dict(_run(0.8, 0.8, [(0.8, 1.0)]), gaps=[gap])],
                           "1.0": [_run(0.9, 0.9, [(0.9, 1.0)])]},
            "scratch": {"0.5": [_run(0.7, 0.7, [(0.7, 1.0)])],
                        "1.0": [dict(_run(0.8, 0.8, [(0.8, 1.0)]), gaps=[dict(gap, attribute="site")])]}}
    widened = [{"attribute": "age_band", "metric": "fnr", "kind": "difference", "direction": "widened"}]
    by_fraction = {"1.0": bias_summary([], fraction=1.0, seed=0), "0.5": bias_summary(widened, fraction=0.5, seed=0)}
    result = summarise("auroc", runs, bias=by_fraction["1.0"], bias_by_fraction=by_fraction)
    head = result["headline"]
    assert list(head["bias_by_fraction"]) == ["0.5", "1.0"] and head["bias"] == head["bias_by_fraction"]["1.0"]
    assert head["flagged_gaps"] == {"pretrained": {"0.5": ["sex:tpr"], "1.0": []},
                                    "scratch": {"0.5": [], "1.0": ["site:tpr"]}}
    page = render_section(result)
    assert "flagged gaps: pretrained" in page and "flagged gaps: scratch" in page
    assert "<td>sex:tpr</td>" in page and "<td>site:tpr</td>" in page and page.count("none flagged") == 2
    assert html.escape(by_fraction["0.5"]["text"]) in page and html.escape(by_fraction["1.0"]["text"]) in page
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("overrides, key", [
    (["task=segmentation", "multitask.enabled=true"], "multitask.enabled"),
    (["adaptation.method=dann", "adaptation.target=SITE-x"], "adaptation.method"),
    (["adaptation.method=adabn", "adaptation.target=SITE-x"], "adaptation.method"),
    (["continual.from_model=models:/m@champion", "continual.old_manifest=old.csv"], "continual.from_model"),
])
def test_run_transfer_benefit_refuses_other_transfer_methods_before_the_manifest(tmp_path, overrides, key):
    # data.root does not exist: a check after the manifest step would fail with InputError instead
    cfg = load_config(None, [f"data.root={tmp_path / 'missing'}", "data.labels=l.csv", *overrides])
    with pytest.raises(ConfigError, match=rf"'{key}' must .*plain fine-tuning"):
        run_transfer_benefit(cfg, tmp_path / "out", fractions=(1.0,), seeds=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_benchmark_accepts_the_linear_probe_arm(monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on sys.path
    spec = importlib.util.spec_from_file_location("benchmark_transfer_benefit",
                                                  REPO / "benchmarks" / "transfer_benefit.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.parse_args(["--arms", "pretrained", "linear_probe"]).arms == ["pretrained", "linear_probe"]
    assert benchmark.parse_args([]).arms == ["pretrained", "scratch"]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--arms", "imagenet"])
    record = dict(_run(0.8, 0.8, [(0.8, 3.0)]), ci=[0.7, 0.9], n_train_images=10, epochs_run=1, best_epoch=0)
    study = summarise("auroc", {"linear_probe": {"1.0": [record]}, "scratch": {"1.0": [record]}})
    rows = benchmark.summary(study, "pneumonia")
    assert [r[0] for r in rows] == ["linear_probe", "scratch"]
    assert "linear_probe vs scratch" in capsys.readouterr().out


def test_summarise_headline_says_so_when_pretrained_never_matches():
    runs = {"pretrained": {"0.5": [_run(0.6, 0.6, [(0.6, 1.0)])], "1.0": [_run(0.7, 0.7, [(0.7, 1.0)])]},
            "scratch": {"0.5": [_run(0.8, 0.8, [(0.8, 1.0)])], "1.0": [_run(0.9, 0.9, [(0.9, 1.0)])]}}
    head = summarise("auroc", runs, target=0.65)["headline"]
    assert head["matches_scratch_full_at"] is None and head["label_savings"] is None
    assert head["text"].startswith("pretrained did not match scratch at 100 %")
    assert head["target"] == {"value": 0.65, "source": "given"}
    assert head["time_to_target_seconds"] == {"pretrained": 1.0, "scratch": 1.0}


def test_render_section_escapes_text_and_inlines_both_figures():
    runs = {"pretrained": {"1.0": [_run(0.9, 0.9, [(0.9, 1.0)])]},
            "scratch": {"1.0": [_run(0.8, 0.8, [(0.8, 1.0)])]}}
    result = summarise("auroc", runs, bias={"text": "sex:<tpr> widened"})
    page = render_section(result)
    assert page.count('src="data:image/png;base64,') == 2
    assert "sex:&lt;tpr&gt; widened" in page and "<tpr>" not in page


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The small demo data set both real-study tests train on (written once: it takes seconds)."""
    from medtl.data.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("tb-demo") / "demo", patients=60, seed=0, progress=False)


def _demo_overrides(demo, experiment: str) -> list[str]:
    # 48 px, not 32: at 32 px the encoder's last stage is 1x1, and BatchNorm cannot train on a last
    # batch of one image (train_config_for keeps incomplete batches), which some subset sizes give.
    return [
        f"data.root={demo.root}", f"data.labels={demo.labels_csv}", "data.image_size=[48,48]",
        "data.augment=false", "train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=100",
        "audit.attributes=[sex]", "audit.intersections=false", "audit.min_group_size=2",
        f"tracking.experiment={experiment}",
    ]


@pytest.mark.slow
def test_transfer_benefit_study_on_demo_data_writes_json_plot_and_nested_mlflow_runs(tmp_path, monkeypatch, demo):
    from medtl.tracking import store
    from medtl.workflow.demo import DEMO_WORKFLOW

    monkeypatch.chdir(tmp_path)  # the default MLflow store is ./mlruns of the working directory
    cfg = load_config(None, _demo_overrides(demo, "tb-test"), base=DEMO_WORKFLOW)
    out = tmp_path / "study"
    result = run_transfer_benefit(cfg, out, fractions=(1.0, 0.5), seeds=1, progress=False,
                                  extra_forbidden={s: "demo PHI" for s in demo.phi_strings})

    written = json.loads((out / "transfer_benefit.json").read_text())
    assert written == result
    assert set(written) == {"metric", "arms", "headline"} and written["metric"] == "auroc"
    assert set(written["arms"]) == {"pretrained", "scratch"}
    for arm, points in written["arms"].items():
        assert list(points) == ["0.5", "1.0"], arm
        for point in points.values():
            assert STABLE_POINT_KEYS <= set(point)
            assert all(math.isfinite(point[k]) for k in ("mean", "sd", "train_seconds"))
            assert point["ci"] is None and point["n_seeds"] == 1  # one seed: no interval
            (run,) = point["runs"]
            assert run["seed"] == cfg.seed and math.isfinite(run["value"]) and len(run["ci"]) == 2
            assert run["epochs_run"] == len(run["history"]) == 1
            assert run["passes_per_epoch"] == 1  # train.min_steps=0: the study records what the recipe chose
    head = written["headline"]
    assert HEADLINE_KEYS <= set(head) and head["text"]
    _assert_headline_follows_the_rule(written)
    # the default target is scratch's best validation at 100 % (one seed), so scratch reached it
    assert head["target"]["value"] == written["arms"]["scratch"]["1.0"]["runs"][0]["best_val"]
    assert head["time_to_target_reached"]["scratch"] == 1 and head["time_to_target_seconds"]["scratch"] is not None
    bias = head["bias"]
    # The paired comparison ran at every fraction; with 60 demo patients every test-split subgroup may
    # be suppressed (n <= 10), so its list of compared gaps can be empty.
    assert bias["paired"] is True and isinstance(bias["comparisons"], list)
    assert list(head["bias_by_fraction"]) == ["0.5", "1.0"] and head["bias_by_fraction"]["1.0"] == bias
    assert head["bias_by_fraction"]["0.5"]["fraction"] == 0.5
    page = (out / "transfer_benefit.html").read_text()
    assert html.escape(head["text"]) in page
    assert all(html.escape(b["text"]) in page for b in head["bias_by_fraction"].values())

    # the subsets the runs trained on: nested, whole patients, both classes
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    manifest = manifest[manifest["modality"].isin(["CR", "DX"]) & (manifest["label"] != "")]
    subsets = nested_label_subsets(manifest, (0.5, 1.0), seed=cfg.seed)
    _assert_nested_whole_patients(manifest, subsets)
    for arm in ("pretrained", "scratch"):
        assert [p["runs"][0]["n_train_images"] for p in written["arms"][arm].values()] == [
            len(subsets[0.5]), len(subsets[1.0])]

    png = mpimg.imread(out / "transfer_benefit.png")
    assert png.ndim == 3 and float(png[..., :3].std()) > 0.01  # something drawn, not a blank canvas
    time_png = mpimg.imread(out / "transfer_benefit_time.png")
    assert time_png.ndim == 3 and float(time_png[..., :3].std()) > 0.01  # something drawn, not a blank canvas

    client = store.client()
    experiment = client.get_experiment_by_name("tb-test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert {c.info.run_id for c in children} == {p["runs"][0]["run_id"] for a in written["arms"].values()
                                                 for p in a.values()}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.user"] == "medtl"
    assert {(c.data.params["study.arm"], c.data.params["study.fraction"]) for c in children} == {
        ("pretrained", "0.5"), ("pretrained", "1.0"), ("scratch", "0.5"), ("scratch", "1.0")}
    assert all("test.auroc" in c.data.metrics for c in children)
    # Each child records the audit's verdict as `medtl run` does, not only the metric audit.passed.
    statuses = {p["runs"][0]["run_id"]: p["runs"][0]["audit_status"] for a in written["arms"].values()
                for p in a.values()}
    for child in children:
        assert child.data.tags[AUDIT_STATUS_TAG] == statuses[child.info.run_id] in AUDIT_STATUSES
        assert child.data.metrics["audit.passed"] == float(statuses[child.info.run_id] == "passed")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"transfer_benefit.json", "transfer_benefit.png"} <= artifacts
    assert str(demo.root) not in json.dumps(written)  # no data path in the study's output
    assert not (out / "runs").exists()  # checkpoints lived in temporary folders


@pytest.mark.slow
def test_cli_study_transfer_benefit_writes_the_stable_json_plot_and_html(tmp_path, monkeypatch, demo, capsys):
    from medtl.cli import main
    from medtl.workflow.demo import DEMO_WORKFLOW

    monkeypatch.chdir(tmp_path)  # the default MLflow store is ./mlruns of the working directory
    workflow = tmp_path / "demo.yaml"
    workflow.write_text(yaml.safe_dump(DEMO_WORKFLOW))
    out = tmp_path / "cli-study"
    sets = [a for s in _demo_overrides(demo, "tb-cli") for a in ("--set", s)]
    code = main(["-q", "study", "transfer-benefit", str(workflow), *sets, "--fractions", "0.5,1.0", "--seeds", "1",
                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "transfer_benefit.json").read_text())
    assert {"metric", "arms", "headline"} <= set(written) and written["metric"] == "auroc"
    assert set(written["arms"]) == {"pretrained", "scratch"}
    for points in written["arms"].values():
        assert list(points) == ["0.5", "1.0"]
        assert all(STABLE_POINT_KEYS <= set(point) for point in points.values())
    assert HEADLINE_KEYS <= set(written["headline"])
    assert written["headline"]["text"] in capsys.readouterr().out
    png = mpimg.imread(out / "transfer_benefit.png")
    assert png.ndim == 3 and float(png[..., :3].std()) > 0.01  # something drawn, not a blank canvas
    page = (out / "transfer_benefit.html").read_text()
    assert page.startswith("<!doctype html>") and html.escape(written["headline"]["text"]) in page
