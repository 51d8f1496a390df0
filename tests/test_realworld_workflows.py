"""The shipped workflows on the folders hospitals really have, through the CLI a user types.

The most common research export is a folder of de-identified PNG files with a labels CSV: no
DICOM header, so no modality. `workflows/classify_2d.yaml` (unchanged, `modalities: [CR, DX]`)
must train on it. A run that cannot start must say which key is wrong before any work (no
manifest build, no MLflow run), and a run that fails must leave the manifest at
`data.manifest_out` exactly as it was.

Only training-budget keys, the data location and the MLflow store (./mlruns of the working
directory, SQLite) are overridden; never `data.modalities`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medtl.data.manifest import build_manifest
from medtl.tracking import store
from tests.exports import write_png_exports

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "classify_2d.yaml"
BUDGET = ["train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=200"]


def medtl_run(work: Path, data_root: Path, labels: Path, manifest_out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`medtl run workflows/classify_2d.yaml --set ...` in a subprocess, working directory `work`."""
    sets = [f"data.root={data_root}", f"data.labels={labels}", f"data.manifest_out={manifest_out}", *BUDGET, *extra]
    args = [sys.executable, "-m", "medtl.cli", "-q", "run", str(WORKFLOW), "--output", str(work / "out")]
    for setting in sets:
        args += ["--set", setting]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def medtl_in_process(work: Path, data_root: Path, labels: Path, manifest_out: Path, monkeypatch, capsys,
                     *extra: str) -> subprocess.CompletedProcess:
    """The command of `medtl_run` through `medtl.cli.main` in this process, working directory `work`.

    For runs that stop before training: a fresh interpreter would spend most of their time importing.
    """
    import logging

    from medtl.cli import main

    sets = [f"data.root={data_root}", f"data.labels={labels}", f"data.manifest_out={manifest_out}", *BUDGET, *extra]
    args = ["-q", "run", str(WORKFLOW), "--output", str(work / "out")]
    for setting in sets:
        args += ["--set", setting]
    monkeypatch.chdir(work)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the embedded store of `work`, as in a subprocess
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    root, saved = logging.getLogger(), logging.getLogger().handlers[:]
    try:
        status = main(args)
    finally:  # the CLI sets up logging for its process: give the test session its own back
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, printed.out, printed.err)


def mlflow_runs(work: Path, monkeypatch) -> list:
    """Every run of the `medtl` experiment in the embedded SQLite store of `work`."""
    monkeypatch.chdir(work)
    store.tracking_uri()
    experiment = store.client().get_experiment_by_name("medtl")
    return [] if experiment is None else store.client().search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_classify_2d_unchanged_trains_on_png_exports_without_a_dicom_modality(tmp_path, monkeypatch):
    data = tmp_path / "exports"
    labels = write_png_exports(data, labels=("normal", "abnormal"))  # word labels, as public exports have them
    done = medtl_run(tmp_path, data, labels, tmp_path / "manifests" / "classify_2d.csv")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "60 studies have no DICOM modality" in done.stderr  # the run says what it kept and why

    output = tmp_path / "out"
    manifest = pd.read_csv(output / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 60 and set(manifest["kind"]) == {"image2d"} and set(manifest["modality"]) == {"unknown"}
    metrics = json.loads((output / "metrics.json").read_text())
    predictions = pd.read_csv(output / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    assert metrics["test"]["auroc"] == pytest.approx(roc_auc_score(test["y_true"], test["y_score"]), abs=1e-9)
    assert predictions["split"].value_counts().to_dict() == {"val": 12, "test": 12}
    # "abnormal" is the positive class (index 1), though "normal" sorts after it; every output says so.
    label = manifest.set_index("id").loc[predictions["id"], "label"].to_numpy()
    assert ((label == "abnormal") == (predictions["y_true"] == 1)).all()
    assert metrics["positive_class"] == "abnormal"
    assert "positive class: abnormal (sensitivity, FNR and the audit's subgroup gaps refer to it" in done.stdout
    html = (output / "report.html").read_text()
    assert re.search(r"Positive class</th><td>abnormal \(sensitivity", html)

    runs = mlflow_runs(tmp_path, monkeypatch)
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].info.run_id == metrics["run_id"]
    left_out = {k: v for k, v in runs[0].data.params.items() if k.startswith("data.rows_left_out.")}
    assert all(v == "0" for v in left_out.values()), left_out


def _good_manifest(data: Path, labels: Path, target: Path) -> dict[str, bytes]:
    build_manifest(data, labels, target, progress=False)
    return {p.name: p.read_bytes() for p in (target, target.with_suffix(".json"))}


@pytest.mark.parametrize("failure", ["empty data root", "no train rows"])
def test_a_failed_run_leaves_the_published_manifest_byte_identical(tmp_path, monkeypatch, capsys, failure):
    data = tmp_path / "exports"
    labels = write_png_exports(data)
    published = tmp_path / "manifests" / "classify_2d.csv"
    before = _good_manifest(data, labels, published)
    if failure == "empty data root":
        data = tmp_path / "empty"
        data.mkdir()
    else:
        table = pd.read_csv(labels)
        labels = tmp_path / "test_only.csv"
        table.assign(split="test").to_csv(labels, index=False)

    done = medtl_in_process(tmp_path, data, labels, published, monkeypatch, capsys)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in (published, published.with_suffix(".json"))} == before
    assert mlflow_runs(tmp_path, monkeypatch) == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.weights=weights/missing.pth", r"config key 'model.weights' file missing.pth must be an existing"),
        ("model.weights=weights/notes.pth", r"config key 'model.weights' \(notes.pth\): checkpoint notes.pth must be "
                                            r"a torch checkpoint"),
        ("model.encoder=efficientnet_lite", r"config key 'model.encoder' must be a registered encoder name, not "
                                            r"'efficientnet_lite'; did you mean 'efficientnet_lite0'"),
        ("train.lr=0", r"config key 'train.lr' must be a positive number, not 0"),
        ("data.image_size=[0, 96]", r"config key 'data.image_size' must hold positive sizes"),
    ],
)
def test_a_run_that_cannot_start_names_the_key_before_building_anything(tmp_path, monkeypatch, capsys, setting,
                                                                        message):
    data = tmp_path / "exports"
    labels = write_png_exports(data)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "notes.pth").write_text("not a checkpoint\n")
    published = tmp_path / "manifests" / "classify_2d.csv"

    done = medtl_in_process(tmp_path, data, labels, published, monkeypatch, capsys, setting)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr[-2000:]
    assert str(tmp_path) not in done.stderr.replace(str(WORKFLOW), "")  # file names only, never folders
    assert not (tmp_path / "out" / "manifest.csv").exists() and not published.exists()  # nothing was built
    assert mlflow_runs(tmp_path, monkeypatch) == []
