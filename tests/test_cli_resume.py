"""`medtl run --resume` after a SIGKILL ends with the same model as a run that was never stopped.

The engine-level test (tests/engine/test_resume_kill.py) kills mid-epoch; this one goes through
the CLI a user types: manifest, checkpoints in OUTPUT/checkpoints, MLflow, evaluation. Both runs
pin one CPU thread (`train.num_threads=1`) so their float reductions happen in the same order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from medtl.data.synthetic import write_demo_data
from medtl.tracking import store

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


def _command(data: Path, work: Path, output: Path, *extra: str) -> list[str]:
    sets = [
        f"data.root={data}", f"data.labels={data / 'labels.csv'}", f"data.manifest_out={work / 'manifest.csv'}",
        "data.image_size=[32, 32]", f"train.epochs={EPOCHS}", "train.min_steps=0", "train.batch_size=16",
        f"train.early_stopping_patience={EPOCHS}", "train.num_threads=1", "evaluation.n_boot=100",
    ]
    args = [sys.executable, "-m", "medtl.cli", "-q", "run", str(REPO / "workflows" / "classify_2d.yaml"),
            "--output", str(output), *extra]
    for s in sets:
        args += ["--set", s]
    return args


def _run(args: list[str], work: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with open(log, "a") as handle:
        return subprocess.Popen(args, cwd=work, env=env, stdout=handle, stderr=handle)


@pytest.mark.slow
def test_cli_run_killed_after_an_epoch_then_resumed_matches_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_demo_data(data, patients=80, seed=1, progress=False)
    log = tmp_path / "log.txt"
    # The uninterrupted reference runs beside the others (each run takes one thread), in a working
    # folder of its own: its own MLflow store and published manifest, the same project key.
    (tmp_path / "ref").mkdir()
    reference_log = tmp_path / "reference_log.txt"
    reference = _run(_command(data, tmp_path / "ref", tmp_path / "reference"), tmp_path / "ref", reference_log)

    output = tmp_path / "resumed"
    last = output / "checkpoints" / "last.pt"
    killed = _run(_command(data, tmp_path, output), tmp_path, log)
    try:
        deadline = time.monotonic() + 300
        while not last.exists():
            assert killed.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.02)
    finally:
        if killed.poll() is None:
            os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    done = torch.load(last, weights_only=True)["state"]["next_epoch"]
    assert 1 <= done < EPOCHS, f"the kill came after {done} of {EPOCHS} epochs; nothing left to resume"
    assert not (output / "predictions.csv").exists()

    resumed = _run(_command(data, tmp_path, output, "--resume"), tmp_path, log)
    assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert reference.wait(timeout=600) == 0, reference_log.read_text()[-3000:]
    # A fresh start would give the same predictions (same seed, one thread): check it really resumed.
    assert f"resumed from last.pt: {done} epoch(s) already done" in log.read_text()
    got = pd.read_csv(output / "predictions.csv")
    want = pd.read_csv(tmp_path / "reference" / "predictions.csv")
    assert list(got["id"]) == list(want["id"])
    assert (got["y_score"].to_numpy() == want["y_score"].to_numpy()).all(), "resumed predictions differ"


def test_an_interrupted_run_tells_how_to_continue_it(tmp_path, monkeypatch, capsys):
    import medtl.workflow.run
    from medtl.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medtl.workflow.run, "run_workflow", interrupted)
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        status = main(["-q", "run", str(REPO / "workflows" / "classify_2d.yaml"),
                       "--set", f"data.root={tmp_path}", "--set", f"data.labels={tmp_path / 'labels.csv'}"])
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
    assert status == 130
    assert capsys.readouterr().err.strip() == (
        "medtl: interrupted while running the workflow; the checkpoints of finished epochs are kept: run the same "
        "command with --resume to continue")


@pytest.mark.slow
def test_ctrl_c_during_training_ends_the_mlflow_run_as_killed_and_says_how_to_resume(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_demo_data(data, patients=80, seed=1, progress=False)
    log = tmp_path / "log.txt"
    output = tmp_path / "out"
    run = _run(_command(data, tmp_path, output), tmp_path, log)
    try:
        deadline = time.monotonic() + 300
        while not (output / "checkpoints" / "last.pt").exists():
            assert run.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert run.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
            run.wait(timeout=60)
    assert "medtl: interrupted while training; the checkpoints of finished epochs are kept: run the same command " \
           "with --resume to continue" in log.read_text()
    monkeypatch.chdir(tmp_path)
    store.tracking_uri()
    experiment = store.client().get_experiment_by_name("medtl")
    assert [r.info.status for r in store.client().search_runs([experiment.experiment_id])] == ["KILLED"]
