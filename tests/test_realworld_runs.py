"""Runs that went wrong on real hospital machines, replayed: each test fails on the code that misbehaved.

- A small real test set had every subgroup suppressed, yet its audit said "passed": such an audit
  is inconclusive, everywhere (audit.json, console, MLflow, registry) and cannot be promoted.
- A finished run was thrown away at its last step because its data folder, named "root", equalled
  the OS user name: a common word is no finding; a real one stops the run before anything is
  recorded, and one found after training keeps the results and says how to record them again:
  `--resume` (no training) when the manifest stays the same, a new run when the labels CSV changes.
- A run interrupted with Ctrl-C showed as FAILED in MLflow: it is KILLED. Re-runs into a used
  output folder, and `--resume` without a checkpoint, now say what will happen.
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
import pandas as pd
import pytest

from medtl.data.synthetic import write_demo_data
from medtl.errors import InputError
from medtl.tracking import registry, store
from medtl.workflow.config import load_config
from medtl.workflow.prepare import prepare_data
from medtl.workflow.record import PHILeakError
from medtl.workflow.run import run_workflow
from tests.exports import write_png_exports

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "classify_2d.yaml"
EPOCHS = 2


def _medtl(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return _medtl_side_by_side([args], cwd, **env)[0]


def _medtl_side_by_side(commands: list[list[str]], cwd: Path, **env: str) -> list[subprocess.CompletedProcess]:
    """`medtl` commands run at the same time (most of each is the interpreter importing), in order."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **env}
    running = [subprocess.Popen([sys.executable, "-m", "medtl.cli", *args], cwd=cwd, env=full_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    done = []
    for args, process in zip(commands, running, strict=True):
        out, err = process.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


# -- 3. no traceback with a path reaches the console ----------------------------------------


def test_an_unexpected_error_in_a_patient_named_folder_prints_one_path_free_line(tmp_path):
    folder = tmp_path / "DOE_JANE"
    (folder / "workflow.yaml").mkdir(parents=True)  # reading it raises IsADirectoryError, quoting the path
    workflow = str(folder / "workflow.yaml")
    done, *debugged = _medtl_side_by_side(
        [["-q", "run", workflow], ["--debug", "-q", "run", workflow], ["-q", "run", workflow, "--debug"]], tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    for part in ("DOE_JANE", str(tmp_path), tmp_path.name):
        assert part not in done.stderr and part not in done.stdout, part
    assert done.stderr.strip().splitlines() == [
        "medtl: error: unexpected IsADirectoryError while loading the workflow config; run again with --debug "
        "for the full traceback (it may show file paths)"]

    for debug in debugged:  # --debug before or after the command
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
            "data.fractions=[0.6, 0.2, 0.2]", "data.image_size=[32, 32]", f"train.epochs={EPOCHS}", "train.min_steps=0",
            "train.batch_size=16", "train.num_threads=1", "evaluation.n_boot=100", "audit.reference=none",
            f"name={name}", f"tracking.registered_model={name}", "tracking.experiment=realworld"]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the embedded MLflow store is ./mlruns
    return tmp_path


def test_an_identifying_field_stops_the_run_before_anything_is_recorded_naming_the_field_not_the_value(
        workdir, monkeypatch):
    monkeypatch.setenv("LOGNAME", "root")
    # A folder named like a patient whose name is made of generic words: the name looks technical,
    # so config_dict keeps it, and only the patient's name (a needle of the build) tells.
    data = workdir / "Gray_Val"
    write_png_exports(data)
    cfg = load_config(WORKFLOW, _sets(data, workdir, "guard_early"))
    with pytest.raises(PHILeakError) as caught:
        run_workflow(cfg, workdir / "out", progress=False, extra_forbidden={"GRAY^VAL": "patient name"})
    message = str(caught.value)
    assert "run param 'data.root': forbidden string" in message
    assert "Nothing was recorded in MLflow and nothing was trained" in message
    assert "rename the file or folder that data.root points to" in message
    assert "gray" not in message.casefold()
    assert not (workdir / "out" / "checkpoints").exists(), "the scan must come before training"

    # A patient's name as the experiment: found before the experiment is created, with the key to change.
    data = workdir / "exports"
    write_png_exports(data)
    cfg = load_config(WORKFLOW, [*_sets(data, workdir, "guard_early"), "tracking.experiment=OKAFOR_CHIDI"])
    with pytest.raises(PHILeakError) as caught:
        run_workflow(cfg, workdir / "out2", progress=False, extra_forbidden={"OKAFOR_CHIDI": "patient name"})
    message = str(caught.value)
    assert "experiment 'name': forbidden string" in message and "set tracking.experiment" in message
    assert "OKAFOR" not in message and not (workdir / "out2" / "checkpoints").exists()
    # Nothing reached the store: no experiment, no run, no params to delete afterwards.
    store.tracking_uri()
    names = [e.name for e in store.client().search_experiments()]
    assert "OKAFOR_CHIDI" not in names and "realworld" not in names


@pytest.mark.parametrize(
    ("finding", "resume"),
    [
        ("run artifact 'predictions.csv': forbidden string #3", False),  # a subgroup value of the labels CSV
        ("run param 'data.root': forbidden string #1", True),
        ("experiment 'name': forbidden string #2", True),
        ("file 'report.html': home directory", True),
    ],
)
def test_the_advice_after_a_late_finding_offers_resume_only_when_the_manifest_stays_the_same(tmp_path, finding,
                                                                                              resume):
    from medtl.workflow.record import _raise_findings

    with pytest.raises(PHILeakError) as caught:
        _raise_findings([finding], "r1", name="m", version="", output_dir=tmp_path / "out")
    message = str(caught.value)
    if resume:
        assert "then re-record the run without training again: `medtl run <workflow> --resume --output" in message
    else:
        assert "remove identifying text from the labels CSV" in message
        assert "then run again (training starts over: a changed labels CSV changes the manifest" in message
        assert "--resume --output" not in message


def test_the_run_says_when_resume_has_no_checkpoint_and_when_it_replaces_a_finished_run(workdir, caplog):
    labels = write_png_exports(workdir / "exports")
    table = pd.read_csv(labels)
    table.assign(split="test").to_csv(labels, index=False)  # the run stops in prepare_data, after the notes
    cfg = load_config(WORKFLOW, _sets(workdir / "exports", workdir, "notes"))
    out = workdir / "out"
    with caplog.at_level(logging.WARNING, logger="medtl.workflow.run"), pytest.raises(InputError):
        run_workflow(cfg, out, resume=True, progress=False)
    assert "--resume: no checkpoint in out/checkpoints: training starts from the first epoch" in caplog.text

    caplog.clear()
    for name in ("metrics.json", "report.html"):
        (out / name).write_text("{}")
    with caplog.at_level(logging.WARNING, logger="medtl.workflow.run"), pytest.raises(InputError):
        run_workflow(cfg, out, progress=False)
    assert ("output folder out already holds a finished run's outputs (metrics.json, report.html): this run "
            "replaces them") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtl.workflow.run"), pytest.raises(InputError):
        run_workflow(cfg, out, resume=True, progress=False)  # re-recording a finished run: no warning about it
    assert "replaces them" not in caplog.text


def test_an_interrupted_run_ends_its_mlflow_run_as_killed(workdir, monkeypatch):
    import medtl.workflow.run

    write_png_exports(workdir / "exports")
    cfg = load_config(WORKFLOW, _sets(workdir / "exports", workdir, "interrupted"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while training

    monkeypatch.setattr(medtl.workflow.run, "train_for_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_workflow(cfg, workdir / "out", progress=False)
    store.tracking_uri()
    experiment = store.client().get_experiment_by_name("realworld")
    assert [r.info.status for r in store.client().search_runs([experiment.experiment_id])] == ["KILLED"]


def test_the_console_handler_replaces_the_handlers_a_root_logger_already_has():
    from medtl.cli import ConsoleFormatter, _setup_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stray = logging.StreamHandler(io.StringIO())  # e.g. a notebook's or an embedding program's handler
    root.addHandler(stray)
    try:
        _setup_logging(debug=False)
        assert stray not in root.handlers
        assert [type(h.formatter) for h in root.handlers] == [ConsoleFormatter]
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


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
    # Its fix is in the labels CSV, which changes the manifest: a resume would be refused.
    assert "then run again (training starts over" in message and "report this as a bug" not in message
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
    assert "audit INCONCLUSIVE: no subgroup gap could be decided, so nothing was checked; registered" in done.stdout
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

