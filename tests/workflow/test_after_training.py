"""After training: external validation, inference on new studies, the pyfunc model and `mlflow models serve`.

Real files (demo DICOM studies), a real SQLite MLflow store, a real model server on 127.0.0.1.
One classifier is trained on three of the demo's four sites; the fourth is the external site.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from medtl.cli import main
from medtl.data.discover import load_study
from medtl.data.synthetic import write_demo_data
from medtl.data.verify import resolve_study
from medtl.errors import ConfigError, InputError
from medtl.tracking import registry, store
from medtl.workflow.config import load_config
from medtl.workflow.external import run_external_validation
from medtl.workflow.package import PACKAGE_FILE, read_package, remembered_manifest
from medtl.workflow.predict import run_predict
from medtl.workflow.run import run_workflow
from tests.data import dicom_factory as factory

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
TINY = ["data.image_size=[32, 32]", "train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=100",
        "audit.reference=none", "data.manifest_out="]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """classify_2d trained on sites A-C of a demo data set; site D's labels kept apart (plus two training rows)."""
    work = tmp_path_factory.mktemp("after")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MEDTL_CONFIG_DIR", str(work / "config"))
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.setenv(name, "")
            mp.delenv(name)
        root = work / "data"
        write_demo_data(root, patients=80, seed=2, progress=False)
        labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
        site = labels["patient_id"].str[:3]
        held_out = site.value_counts().index[0]  # the largest site: enough external studies
        labels[site != held_out].to_csv(work / "train.csv", index=False)
        external = pd.concat([labels[site == held_out], labels[site != held_out].head(2)])
        external.to_csv(work / "external.csv", index=False)
        cfg = load_config(WORKFLOWS / "classify_2d.yaml",
                          [f"data.root={root}", f"data.labels={work / 'train.csv'}", "tracking.registered_model=cxr",
                           "evaluation.tta=flip", *TINY])
        outputs = run_workflow(cfg, work / "run", progress=False)
        uri = store.tracking_uri()
        yield {"work": work, "root": root, "outputs": outputs, "uri": uri, "config": work / "config"}


@pytest.fixture
def env(trained, monkeypatch):
    """The trained run's store, key and working folder for one test."""
    monkeypatch.chdir(trained["work"])
    monkeypatch.setenv("MEDTL_CONFIG_DIR", str(trained["config"]))
    store.tracking_uri(trained["uri"])
    return trained


def _model(env) -> str:
    return f"models:/{env['outputs'].model_name}/{env['outputs'].model_version}"


@pytest.mark.slow
def test_predict_gives_the_training_runs_probabilities_and_the_class_at_the_frozen_threshold(env, tmp_path):
    out = run_predict(_model(env), env["root"], tmp_path / "pred", progress=False)
    predicted = pd.read_csv(out.predictions_csv)
    run = pd.read_csv(env["outputs"].output_dir / "predictions.csv")
    both = run.merge(predicted, on="id", suffixes=("_run", "_new"))
    assert len(both) == len(run) > 10  # every val/test study of the run was predicted again, by the same pseudonym
    np.testing.assert_allclose(both["y_score_new"], both["y_score_run"], atol=1e-5, rtol=0)
    threshold = json.loads((env["outputs"].output_dir / "metrics.json").read_text())["threshold"]
    assert (predicted["y_pred"] == (predicted["y_score"] >= threshold).astype(int)).all()
    # Both averaged the image with its mirror image (the run's evaluation.tta, frozen in the package).
    package = json.loads((env["outputs"].output_dir / "package" / PACKAGE_FILE).read_text())
    assert package["tta"] == "flip"
    # The demo's CT/MR series are left out (by modality, or by dimensionality), and counted.
    shapes = pd.read_csv(out.output_dir / "manifest.csv", dtype=str)["shape"]
    assert sum(out.skipped.values()) == int((shapes.str.count("x") == 2).sum()) > 0
    # A study is flagged for its scanner exactly when training's rows never held that scanner: every
    # study of the held-out site, and any val/test study whose scanner the training split lacked.
    # (Score, size and intensity checks depend on the one-epoch model and are tested on their own.)
    rows = pd.read_csv(out.output_dir / "manifest.csv", dtype=str).set_index("id").loc[predicted["id"]]
    train = pd.read_csv(env["outputs"].output_dir / "manifest.csv", dtype=str).query("split == 'train'")
    unseen = ~rows["scanner"].isin(set(train["scanner"])).to_numpy()
    notes = predicted["distribution_notes"].fillna("")
    assert (notes.str.contains("scanner not seen in training").to_numpy() == unseen).all()
    assert (predicted["within_training_distribution"] == (notes == "")).all()
    held_out = ~rows["site"].isin(set(train["site"])).to_numpy()
    assert unseen[held_out].all() and held_out.sum() > 5 and not notes.str.contains("modality").any()
    assert list(predicted.columns) == ["id", "y_score", "y_pred", "within_training_distribution", "distribution_notes"]


@pytest.mark.slow
def test_predict_flags_a_study_far_outside_the_training_distribution(env, tmp_path):
    study = resolve_study(pd.read_csv(env["outputs"].output_dir / "manifest.csv", dtype=str,
                                      keep_default_na=False).query("modality == 'DX'").iloc[0].to_dict(), env["root"])
    odd = tmp_path / "odd"
    odd.mkdir()
    ds = pydicom.dcmread(study.files[0])
    pixels = np.kron(ds.pixel_array, np.ones((4, 4), ds.pixel_array.dtype))  # 4x the rows and columns
    ds.set_pixel_data(pixels, ds.PhotometricInterpretation, int(ds.BitsStored))
    ds.save_as(odd / "big.dcm")
    out = run_predict(_model(env), odd, tmp_path / "pred", progress=False)
    row = pd.read_csv(out.predictions_csv).iloc[0]
    assert not row["within_training_distribution"] and "image size outside the training range" in row["distribution_notes"]


@pytest.mark.slow
def test_predict_takes_a_flat_folder_of_a_series_beside_exports_by_the_training_rule(env, tmp_path):
    """A CT series and a PNG export in one folder: the series is one study named by its first file
    (not the whole folder); the PNG, which has no DICOM modality, is taken by a [CR, DX] model of its
    dimensionality, as training took such exports; the 3D series is left out and counted."""
    flat = tmp_path / "flat"
    factory.write_series(flat, np.arange(3 * 20 * 24, dtype=np.int16).reshape(3, 20, 24),
                         names=["a.dcm", "b.dcm", "c.dcm"])
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)).save(flat / "x.png")
    out = run_predict(_model(env), flat, tmp_path / "pred", progress=False)
    assert out.predicted == 1 and out.skipped == {"other modality": 1}  # CT is not CR/DX
    assert len(pd.read_csv(out.predictions_csv)) == 1


@pytest.mark.slow
def test_external_validation_by_run_id_tags_the_version_and_refuses_frozen_keys(env, tmp_path):
    run_id = env["outputs"].run_id
    with pytest.raises(ConfigError, match="may change evaluation"):
        run_external_validation(run_id, env["root"], env["work"] / "external.csv", tmp_path / "x",
                                overrides=["data.modalities=[]"], progress=False)
    out = run_external_validation(run_id, env["root"], env["work"] / "external.csv", tmp_path / "ext",
                                  overrides=["evaluation.n_boot=100"], progress=False)
    version = registry.get_model_version(env["outputs"].model_name, env["outputs"].model_version)
    assert out.run_id in version.tags["external_validations"].split(",")


@pytest.mark.slow
def test_external_validation_uses_the_frozen_threshold_and_leaves_out_training_patients(env, tmp_path):
    out = run_external_validation(_model(env), env["root"], env["work"] / "external.csv", tmp_path / "ext",
                                  overrides=["evaluation.n_boot=200"], progress=False)
    package = json.loads((env["outputs"].output_dir / "package" / PACKAGE_FILE).read_text())
    metrics = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert metrics["threshold"] == package["threshold"] == json.loads(
        (env["outputs"].output_dir / "metrics.json").read_text())["threshold"]
    table = pd.read_csv(tmp_path / "ext" / "predictions.csv")
    assert list(table.columns) == ["id", "split", "y_true", "y_score", "y_pred", "sex", "age_band", "site", "scanner"]
    # Sensitivity at the frozen threshold, recomputed: a threshold re-derived on the external data gives another.
    positives = table[table["y_true"] == 1]
    assert metrics["test"]["tpr"] == pytest.approx(float((positives["y_score"] >= package["threshold"]).mean()))
    assert (table["y_pred"] == (table["y_score"] >= package["threshold"]).astype(int)).all()
    assert out.left_out["patient in the training manifest"] == 2  # the two training rows in external.csv
    train_patients = set(pd.read_csv(env["outputs"].output_dir / "manifest.csv", dtype=str)["patient"])
    external = pd.read_csv(tmp_path / "ext" / "manifest.csv", dtype=str).set_index("id")
    assert not set(external.loc[table["id"], "patient"]) & train_patients
    assert set(table["site"]).isdisjoint(set(pd.read_csv(env["outputs"].output_dir / "manifest.csv", dtype=str)
                                               .query("split == 'train'")["site"]))  # the held-out site only
    report = (tmp_path / "ext" / "report.html").read_text()
    assert "External validation</th><td>yes" in report and 'id="shift"' in report and "Internal test" in report
    version = registry.get_model_version(env["outputs"].model_name, env["outputs"].model_version)
    assert out.run_id in version.tags["external_validations"].split(",")
    run = store.client().get_run(out.run_id)
    assert run.data.metrics["external_test.auroc"] == pytest.approx(metrics["test"]["auroc"])
    assert {a.path for a in store.client().list_artifacts(out.run_id)} >= {"metrics.json", "report.html", "audit.json"}


@pytest.mark.slow
def test_external_validation_refuses_another_training_manifest_and_a_foreign_key(env, tmp_path):
    manifest = remembered_manifest(json.loads(
        (env["outputs"].output_dir / "package" / PACKAGE_FILE).read_text())["run_id"])
    assert manifest is not None and manifest.is_file()
    edited = tmp_path / "manifest.csv"
    edited.write_text(manifest.read_text().replace(",train", ",test", 1))
    with pytest.raises(InputError, match="must be the manifest the model was trained on"):
        run_external_validation(_model(env), env["root"], env["work"] / "external.csv", tmp_path / "x",
                                train_manifest=edited, progress=False)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    with pytest.raises(InputError, match="project key must be the model's"):
        run_predict(_model(env), env["root"], tmp_path / "y", key_file=other, progress=False)


@pytest.mark.slow
def test_the_cli_evaluates_and_predicts_with_the_documented_arguments(env, tmp_path, capsys):
    assert main(["-q", "predict", _model(env), "--root", str(env["root"]), "--output", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "predictions.csv").is_file()
    assert main(["-q", "evaluate", _model(env), "--root", str(env["root"]), "--labels", str(env["work"] / "external.csv"),
                 "--output", str(tmp_path / "e"), "--set", "evaluation.n_boot=100"]) == 0
    printed = capsys.readouterr().out
    assert "frozen at training" in printed and str(env["root"]) not in printed.replace(str(tmp_path), "")


# --- the registered model runs by itself -----------------------------------------------------------------------


def _paths(env, n: int) -> tuple[list[str], pd.DataFrame]:
    run = pd.read_csv(env["outputs"].output_dir / "predictions.csv").head(n)
    manifest = pd.read_csv(env["outputs"].output_dir / "manifest.csv", dtype=str, keep_default_na=False).set_index("id")
    paths = [str(resolve_study({**manifest.loc[i].to_dict(), "id": i}, env["root"]).files[0]) for i in run["id"]]
    return paths, run


@pytest.mark.slow
def test_the_pyfunc_model_takes_raw_files_and_arrays_and_gives_the_runs_scores(env):
    paths, run = _paths(env, 4)
    model = mlflow.pyfunc.load_model(_model(env))
    by_path = model.predict(pd.DataFrame({"path": paths}))
    np.testing.assert_allclose(by_path["y_score"], run["y_score"], atol=1e-5, rtol=0)
    # The same training-distribution check as medtl predict, less the scanner (its pseudonym needs the key).
    predicted = pd.read_csv(run_predict(_model(env), env["root"], env["work"] / "pred-pyfunc", progress=False)
                            .predictions_csv, keep_default_na=False).set_index("id").loc[run["id"]]
    expected = [[r for r in notes.split("; ") if r and r != "scanner not seen in training"]
                for notes in predicted["distribution_notes"]]
    assert [n.split("; ") if n else [] for n in by_path["distribution_notes"]] == expected
    assert by_path["within_training_distribution"].tolist() == [not e for e in expected]
    arrays = [load_study(resolve_study(*_row(env, i))).array for i in run["id"]]
    by_array = model.predict(pd.DataFrame({"image": arrays, "modality": ["DX"] * len(arrays)}))
    np.testing.assert_allclose(by_array["y_score"], run["y_score"], atol=1e-5, rtol=0)


def _row(env, row_id: str):
    manifest = pd.read_csv(env["outputs"].output_dir / "manifest.csv", dtype=str, keep_default_na=False).set_index("id")
    return {**manifest.loc[row_id].to_dict(), "id": row_id}, env["root"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_scores_of_medtl_predict(env):
    paths, run = _paths(env, 2)
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
    environ = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": env["uri"]}
    server = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", _model(env), "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=environ,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    np.testing.assert_allclose([a["y_score"] for a in answer], run["y_score"], atol=1e-5, rtol=0)
    # The class at the frozen threshold; a validation score can equal the threshold itself (it is
    # chosen among them), where a float32 round trip may fall either side: those rows are not compared.
    threshold = json.loads((env["outputs"].output_dir / "metrics.json").read_text())["threshold"]
    clear = (run["y_score"] - threshold).abs().to_numpy() > 1e-5
    assert [a["y_pred"] for a, c in zip(answer, clear, strict=True) if c] == run["y_pred"][clear].tolist()


def _wait_for(url: str, server: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve stopped with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail("mlflow models serve did not answer /ping within two minutes")


# --- segmentation: masks on the input grid, DICOM SEG over the source series ----------------------------------


@pytest.mark.slow
def test_segmentation_predict_writes_masks_on_the_input_grid_and_dicom_seg_over_the_source(tmp_path, monkeypatch,
                                                                                              fixed_key):
    monkeypatch.chdir(tmp_path)  # fixed_key: the patient-level split (hence CTs in every split) is fixed too
    root = tmp_path / "data"
    write_demo_data(root, patients=60, seed=3, progress=False)
    cfg = load_config(WORKFLOWS / "segment_3d.yaml", [f"data.root={root}", f"data.labels={root / 'labels.csv'}",
                                                      "data.image_size=[16, 16, 8]", "train.epochs=1", "train.min_steps=0",
                                                      "evaluation.n_boot=100", "audit.reference=none",
                                                      "data.manifest_out=", "tracking.registered_model=seg",
                                                      # Trained with flips, so predict averages the mirror views too.
                                                      "data.flip_axes=[0, 1, 2]", "evaluation.tta=mirror",
                                                      # The decoder options: the package rebuilds them.
                                                      "model.input_skip=8", "model.deep_supervision=2"])
    trained = run_workflow(cfg, tmp_path / "run", progress=False)
    package, network = read_package(tmp_path / "run" / "package")
    assert (package.tta, package.flips()) == ("mirror", (0, 1, 2))  # what predict, evaluate and serving average over
    assert (package.input_skip, package.deep_supervision, len(network.aux_heads)) == (8, 2, 2)
    # The demo folder also holds the NIfTI masks themselves: a CSV of the image paths picks the CTs.
    labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    labels.loc[labels["mask"] != "", ["path"]].to_csv(tmp_path / "cts.csv", index=False)
    out = run_predict(f"models:/seg/{trained.model_version}", root, tmp_path / "pred", labels=tmp_path / "cts.csv",
                      progress=False)
    assert out.masks == out.dicom_segs == out.predicted == int((labels["mask"] != "").sum())
    manifest = pd.read_csv(tmp_path / "pred" / "manifest.csv", dtype=str, keep_default_na=False).set_index("id")
    for path in sorted((tmp_path / "pred" / "masks").glob("*.nii.gz"))[:3]:
        row_id = path.name.removesuffix(".nii.gz")
        study = resolve_study({**manifest.loc[row_id].to_dict(), "id": row_id}, root)
        source, mask = load_study(study), nib.load(path)
        labels = np.asarray(mask.dataobj)
        assert labels.shape == source.array.shape and np.allclose(mask.affine, source.affine)
        seg = hd.seg.segread(tmp_path / "pred" / "dicom_seg" / f"{row_id}.dcm")
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in study.files]  # in slice order
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[h.SOPInstanceUID for h in headers], segment_numbers=[1, 2],
            combine_segments=True, skip_overlap_checks=True)
        np.testing.assert_array_equal(frames, labels.transpose(2, 1, 0))
    # The SEG objects carry identifiers by design: they stay in their own folder, named by pseudonym only.
    assert {p.stem for p in (tmp_path / "pred" / "dicom_seg").iterdir()} <= set(manifest.index)
    shutil.rmtree(tmp_path / "pred" / "dicom_seg")
    with pytest.raises(InputError, match="must be given a classification model"):
        run_external_validation(f"models:/seg/{trained.model_version}", root, root / "labels.csv", tmp_path / "x",
                                progress=False)


@pytest.mark.slow
def test_scoring_holds_one_chunk_of_preprocessed_studies_and_gives_the_same_scores(env, monkeypatch):
    from medtl.workflow import apply

    package, network = read_package(env["outputs"].output_dir / "package")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 4096, (40, 48)).astype(np.float32) for _ in range(apply.CHUNK * 2 + 5)]
    pulled, held = [0], []

    def items():
        for i, array in enumerate(arrays):
            pulled[0] += 1
            yield apply.loaded_array(f"s{i}", array, "DX", package)

    real_predict = apply.predict

    def predict(*args, **kwargs):
        held.append(pulled[0] - sum(held_scored))  # studies read but not yet scored when a chunk is scored
        out = real_predict(*args, **kwargs)
        held_scored.append(len(out))
        return out

    held_scored: list[int] = []
    monkeypatch.setattr(apply, "predict", predict)
    chunked = apply.score_loaded(package, network, items(), total=len(arrays), progress=False)
    assert max(held) == apply.CHUNK and len(held) == 3  # 64 + 64 + 5: never more than one chunk in memory
    monkeypatch.setattr(apply, "CHUNK", len(arrays))
    whole = apply.score_loaded(package, network, items(), total=len(arrays), progress=False)
    np.testing.assert_array_equal(np.stack([s.probs for s in chunked]), np.stack([s.probs for s in whole]))
