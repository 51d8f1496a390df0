"""The transfer-benefit study: nested label subsets, the JSON/headline summary, and a short real study."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from medtl.config import load_config
from medtl.errors import ConfigError
from medtl.studies import (
    check_label_fractions,
    nested_label_subsets,
    render_section,
    report_mapping,
    run_transfer_benefit,
    study_arms,
    summarise,
)

STABLE_POINT_KEYS = {"mean", "sd", "runs", "train_seconds"}
HEADLINE_KEYS = {"matches_scratch_full_at", "scratch_full", "pretrained_at_that_fraction", "label_savings",
                 "time_to_target_seconds", "text"}


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


def test_summarise_headline_names_smallest_pretrained_fraction_matching_scratch_at_full():
    runs = {
        "pretrained": {"0.1": [_run(0.80, 0.8, [(0.8, 5.0)])], "0.25": [_run(0.91, 0.9, [(0.9, 6.0)])],
                       "1.0": [_run(0.95, 0.95, [(0.7, 10.0), (0.95, 20.0)]), _run(0.93, 0.9, [(0.9, 12.0)], 1)]},
        "scratch": {"0.1": [_run(0.60, 0.6, [(0.6, 5.0)])], "0.25": [_run(0.70, 0.7, [(0.7, 6.0)])],
                    "1.0": [_run(0.90, 0.88, [(0.5, 10.0), (0.88, 30.0)]), _run(0.88, 0.86, [(0.86, 25.0)], 1)]},
    }
    result = summarise("auroc", runs)
    assert set(result) == {"metric", "arms", "headline"}
    assert set(result["arms"]["pretrained"]["1.0"]) == STABLE_POINT_KEYS
    assert result["arms"]["pretrained"]["1.0"]["mean"] == pytest.approx(0.94)
    assert result["arms"]["pretrained"]["1.0"]["sd"] == pytest.approx(np.std([0.95, 0.93], ddof=1))
    assert result["arms"]["scratch"]["0.1"]["sd"] == 0.0  # one seed
    head = result["headline"]
    assert HEADLINE_KEYS <= set(head)
    assert head["matches_scratch_full_at"] == 0.25 and head["label_savings"] == pytest.approx(0.75)
    assert head["scratch_full"] == pytest.approx(0.89) and head["pretrained_at_that_fraction"] == 0.91
    assert head["text"].startswith("pretrained at 25 % of labels matches scratch at 100 %")
    # target = scratch's mean best validation at 100 % = 0.87; first epoch reaching it per seed: 20 s, 12 s
    assert head["target"]["value"] == pytest.approx(0.87)
    assert head["time_to_target_seconds"]["pretrained"] == pytest.approx(16.0)
    assert head["time_to_target_seconds"]["scratch"] is None  # seed 1 never reached 0.87
    assert head["time_to_target_reached"] == {"pretrained": 2, "scratch": 1}
    assert report_mapping(result)["scratch"]["1.0"] == {"mean": pytest.approx(0.89),
                                                        "sd": pytest.approx(np.std([0.9, 0.88], ddof=1))}
    json.dumps(result, allow_nan=False)


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


@pytest.mark.slow
def test_transfer_benefit_study_on_demo_data_writes_json_plot_and_nested_mlflow_runs(tmp_path, monkeypatch):
    from medtl.data.demo import write_demo_data
    from medtl.demo import DEMO_WORKFLOW
    from medtl.tracking import store

    monkeypatch.chdir(tmp_path)  # the default MLflow store is ./mlruns of the working directory
    demo = write_demo_data(tmp_path / "demo", patients=60, seed=0, progress=False)
    # 48 px, not 32: at 32 px the encoder's last stage is 1x1, and BatchNorm cannot train on a last
    # batch of one image (train_config_for keeps incomplete batches), which some subset sizes give.
    cfg = load_config(None, [
        f"data.root={demo.root}", f"data.labels={demo.labels_csv}", "data.image_size=[48,48]",
        "data.augment=false", "train.epochs=1", "train.batch_size=16", "evaluation.n_boot=100",
        "audit.attributes=[sex]", "audit.intersections=false", "audit.min_group_size=2",
        "tracking.experiment=tb-test",
    ], base=DEMO_WORKFLOW)
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
            assert set(point) == STABLE_POINT_KEYS
            assert all(math.isfinite(point[k]) for k in ("mean", "sd", "train_seconds"))
            (run,) = point["runs"]
            assert run["seed"] == cfg.seed and math.isfinite(run["value"]) and len(run["ci"]) == 2
            assert run["epochs_run"] == len(run["history"]) == 1
    assert HEADLINE_KEYS <= set(written["headline"]) and written["headline"]["text"]
    bias = written["headline"]["bias"]
    # The paired comparison ran; with 60 demo patients every test-split subgroup may be suppressed
    # (n <= 10), so its list of compared gaps can be empty.
    assert bias["paired"] is True and isinstance(bias["comparisons"], list)

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
    assert (out / "transfer_benefit_time.png").stat().st_size > 1000

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
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"transfer_benefit.json", "transfer_benefit.png"} <= artifacts
    assert str(demo.root) not in json.dumps(written)  # no data path in the study's output
    assert not (out / "runs").exists()  # checkpoints lived in temporary folders
