"""Runs that went wrong on real hospital machines, replayed: each test fails on the code that misbehaved.

- A small real test set had every subgroup suppressed, yet its audit said "passed": such an audit
  is inconclusive, everywhere (audit.json, console, MLflow, registry) and cannot be promoted.
- A finished run was thrown away at its last step because its data folder, named "root", equalled
  the OS user name: a common word is no finding; a real one stops the run before training, and
  one found after training keeps the results so `--resume` re-records them without training.
- An unexpected error printed a traceback quoting a patient-named folder: the console gets one
  path-free line, and the traceback only with `--debug`.

Real runs on synthetic demo radiographs (tiny images, two epochs) with a real MLflow store.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from medtl.config import load_config
from medtl.data.demo import write_demo_data
from medtl.run import PHILeakError, run_workflow
from medtl.tracking import registry, store
from medtl.workflow import prepare_data

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "classify_2d.yaml"
EPOCHS = 2


def _medtl(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **env}
    return subprocess.run([sys.executable, "-m", "medtl.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=900)


# -- 3. no traceback with a path reaches the console ----------------------------------------


def test_an_unexpected_error_in_a_patient_named_folder_prints_one_path_free_line(tmp_path):
    folder = tmp_path / "DOE_JANE"
    (folder / "workflow.yaml").mkdir(parents=True)  # reading it raises IsADirectoryError, quoting the path
    done = _medtl(["-q", "run", str(folder / "workflow.yaml")], tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    for part in ("DOE_JANE", str(tmp_path), tmp_path.name):
        assert part not in done.stderr and part not in done.stdout, part
    assert done.stderr.strip().splitlines() == [
        "medtl: error: unexpected IsADirectoryError while loading the workflow config; run again with --debug "
        "for the full traceback (it may show file paths)"]

    for args in (["--debug", "-q", "run", str(folder / "workflow.yaml")], ["-q", "run", str(folder / "workflow.yaml"),
                                                                         "--debug"]):
        debug = _medtl(args, tmp_path)
        assert debug.returncode == 2
        assert "Traceback (most recent call last)" in debug.stderr and "DOE_JANE" in debug.stderr
        assert debug.stderr.rstrip().endswith("while loading the workflow config; the traceback above shows where")


def test_library_log_records_print_no_traceback_without_debug():
    from medtl.cli import ConsoleFormatter

    def emit(debug: bool) -> str:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(ConsoleFormatter(debug))
        logger = logging.getLogger("pydicom.pixels.decoders.base")
        logger.addHandler(handler)
        try:
            try:
                open("/data/DOE_JANE/IM-0001.dcm").close()
            except OSError as err:
                logger.exception(err)  # as pydicom logs a decoder failure
        finally:
            logger.removeHandler(handler)
        return stream.getvalue()

    quiet = emit(debug=False)
    assert "Traceback" not in quiet and quiet.count("\n") == 1
    assert quiet.startswith("medtl: ") and "--debug shows it" in quiet
    assert "Traceback (most recent call last)" in emit(debug=True)


@pytest.mark.slow
def test_the_cli_names_the_step_of_an_unexpected_error_inside_a_run(tmp_path):
    # A file where the checkpoint folder goes: saving the first epoch raises an OSError quoting its path.
    data, output = tmp_path / "studies", tmp_path / "DOE_JANE" / "out"
    write_demo_data(data, patients=30, seed=3, progress=False)
    output.mkdir(parents=True)
    (output / "checkpoints").write_text("not a folder")
    done = _medtl(["-q", "run", str(WORKFLOW), "--output", str(output),
                   *[a for s in _sets(data, tmp_path, "step_test") for a in ("--set", s)]], tmp_path,
                  MEDTL_CONFIG_DIR=str(tmp_path / "config"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "DOE_JANE" not in done.stderr and str(tmp_path) not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "medtl: error: unexpected FileExistsError while training; run again with --debug for the full traceback "
        "(it may show file paths)")


# -- 2. the tracking guard: no false alarm, real findings early, results kept ------------------


def _sets(data: Path, work: Path, name: str) -> list[str]:
    return [f"data.root={data}", f"data.labels={data / 'labels.csv'}", f"data.manifest_out={work / 'manifest.csv'}",
            "data.fractions=[0.6, 0.2, 0.2]", "data.image_size=[32, 32]", f"train.epochs={EPOCHS}",
            "train.batch_size=16", "train.num_threads=1", "evaluation.n_boot=100", "audit.reference=none",
            f"name={name}", f"tracking.registered_model={name}", "tracking.experiment=realworld"]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the embedded MLflow store is ./mlruns
    return tmp_path


def test_an_identifying_field_stops_the_run_before_training_naming_the_field_not_the_value(workdir, monkeypatch):
    monkeypatch.setenv("LOGNAME", "jsmith")  # a real user name, and the data folder is named after it
    data = workdir / "jsmith"
    write_demo_data(data, patients=30, seed=2, progress=False)
    cfg = load_config(WORKFLOW, _sets(data, workdir, "guard_early"))
    with pytest.raises(PHILeakError) as caught:
        run_workflow(cfg, workdir / "out", progress=False)
    message = str(caught.value)
    assert "run param 'data.root': OS user name" in message
    assert "Nothing was trained" in message and "rename the file or folder that data.root points to" in message
    assert "jsmith" not in message.casefold()
    assert not (workdir / "out" / "checkpoints").exists(), "the scan must come before training"

    # A patient's name as the experiment: found before training too, with the key to change.
    monkeypatch.setenv("LOGNAME", "root")
    cfg = load_config(WORKFLOW, [*_sets(data, workdir, "guard_early"), "tracking.experiment=OKAFOR_CHIDI"])
    with pytest.raises(PHILeakError) as caught:
        run_workflow(cfg, workdir / "out2", progress=False, extra_forbidden={"OKAFOR_CHIDI": "patient name"})
    message = str(caught.value)
    assert "experiment 'name': forbidden string" in message and "set tracking.experiment" in message
    assert "OKAFOR" not in message and not (workdir / "out2" / "checkpoints").exists()


@pytest.fixture(scope="module")
def rerecorded(tmp_path_factory) -> dict:
    """A run in a data folder named "root" (user root) whose post-training scan finds a planted value,
    then the same run re-recorded through the CLI with --resume once the cause is gone."""
    work = tmp_path_factory.mktemp("realworld")
    data = work / "root"
    name = "realworld_resume"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MEDTL_CONFIG_DIR", str(work / "config"))
        mp.delenv("MEDTL_KEY_FILE", raising=False)
        mp.setenv("LOGNAME", "root")
        for uri in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # MLflow sets them: restore them after
            mp.setenv(uri, "")
            mp.delenv(uri)
        write_demo_data(data, patients=60, seed=4, progress=False)
        cfg = load_config(WORKFLOW, _sets(data, work, name))
        # Stands for an identifier only an artifact holds (a subgroup value that was a header value).
        site = str(prepare_data(cfg, work / "prep", progress=False).manifest["site"].iloc[0])
        with pytest.raises(PHILeakError) as caught:
            run_workflow(cfg, work / "out", progress=False, extra_forbidden={site: "planted identifier"})
        out = work / "out"
        kept = {f: (out / f).exists() for f in ("metrics.json", "predictions.csv", "audit.json",
                                                  "checkpoints/last.pt", "report.html")}
        first_predictions = (out / "predictions.csv").read_bytes()
        last_mtime = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
        store.tracking_uri()
        first_version = registry.get_model_version(name, "1")
        done = subprocess.run([sys.executable, "-m", "medtl.cli", "-q", "run", str(WORKFLOW), "--resume", "--output",
                               str(out), *[a for s in _sets(data, work, name) for a in ("--set", s)]],
                              cwd=work, env={**os.environ, "PYTHONPATH": str(REPO),
                                             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
                              capture_output=True, text=True, timeout=900)
        promote = _medtl(["registry", "promote", name, "2"], work)
    return {"work": work, "out": out, "name": name, "site": site, "error": str(caught.value), "kept": kept,
            "first_version": first_version, "first_predictions": first_predictions, "last_mtime": last_mtime,
            "resumed": done, "promote": promote}


@pytest.mark.slow
def test_a_finding_after_training_keeps_the_results_and_says_how_to_rerecord(rerecorded):
    message = rerecorded["error"]
    assert "run artifact 'predictions.csv': forbidden string" in message
    assert "--resume --output" in message and "report this as a bug" not in message
    assert rerecorded["site"] not in message
    assert rerecorded["kept"] == {"metrics.json": True, "predictions.csv": True, "audit.json": True,
                                  "checkpoints/last.pt": True, "report.html": False}
    assert rerecorded["first_version"].tags["audit_status"] == "failed"


@pytest.mark.slow
def test_resume_after_the_last_epoch_rerecords_without_training_and_no_false_alarm_on_root(rerecorded):
    done, out = rerecorded["resumed"], rerecorded["out"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from last.pt: {EPOCHS} epoch(s) already done" in done.stderr
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == rerecorded["last_mtime"], "an epoch was trained"
    assert (out / "predictions.csv").read_bytes() == rerecorded["first_predictions"]
    assert (out / "report.html").exists()
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(rerecorded["work"])
        store.tracking_uri()
        history = store.client().get_metric_history(run_id, "train_loss")
        run = store.client().get_run(run_id)
    assert sorted(m.step for m in history) == list(range(EPOCHS)), "the re-recorded run keeps its training curve"
    assert run.data.params["data.root"] == "root"  # the folder named like the OS user: no finding


@pytest.mark.slow
def test_a_small_test_set_whose_groups_are_all_suppressed_gives_an_inconclusive_audit(rerecorded):
    done, out, name = rerecorded["resumed"], rerecorded["out"], rerecorded["name"]
    audit = json.loads((out / "audit.json").read_text())
    assert all(g["suppressed"] for g in audit["groups"]), "the fixture's test set must be small"
    assert audit["status"] == "inconclusive" and audit["passed"] is False and audit["evaluated_attributes"] == []
    assert json.loads((out / "metrics.json").read_text())["audit_status"] == "inconclusive"
    assert "audit INCONCLUSIVE: no subgroup gap could be measured, so nothing was checked; registered" in done.stdout
    assert "audit passed" not in done.stdout
    html = (out / "report.html").read_text()
    assert '<span class="badge warn">inconclusive</span>' in html and "Inconclusive, not a pass" in html
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(rerecorded["work"])
        store.tracking_uri()
        run = store.client().get_run(run_id)
        version = registry.get_model_version(name, "2")
    assert run.data.tags["medtl.audit_status"] == "inconclusive" and run.data.metrics["audit.passed"] == 0.0
    assert version.tags["audit_status"] == "inconclusive"
    promote = rerecorded["promote"]
    assert promote.returncode == 2 and "Traceback" not in promote.stderr
    assert "not 'inconclusive'" in promote.stderr and "more test patients per group" in promote.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(rerecorded["work"])
        store.tracking_uri()
        assert "champion" not in mlflow.MlflowClient().get_registered_model(name).aliases

