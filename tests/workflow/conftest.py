"""Shared fixtures of the workflow tests: one tiny demo run per session (test_run, test_after_training)."""

from __future__ import annotations

import contextlib
import io

import pytest

from medtl.data.synthetic import write_demo_data
from medtl.tracking import store
from medtl.workflow.demo import run_demo

TINY = ["data.image_size=[32, 32]", "train.epochs=1", "train.min_steps=0", "train.batch_size=16", "evaluation.n_boot=100"]

DEMO_STORE: dict[str, str] = {}  # the tracking URI the demo run recorded in


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A tiny demo run, once per session; tests read its store by URI, never by the current folder.

    Yields (work folder, RunOutputs, identifying strings of the demo studies, project-config folder):
    the key that made the pseudonyms lives in that config folder, so later commands on the same
    studies (predict, evaluate) must use it too.
    """
    work = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # the embedded MLflow store is ./mlruns of the working directory
        mp.setenv("MEDTL_CONFIG_DIR", str(work / "config"))
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # no store of an earlier module
            mp.setenv(name, "")
            mp.delenv(name)
        with contextlib.redirect_stdout(printed):
            outputs = run_demo(work / "out", patients=48, seed=0, progress=False, overrides=TINY)
        DEMO_STORE["uri"] = store.tracking_uri()
        twin = write_demo_data(work / "twin", patients=48, seed=0, progress=False)
        (work / "printed.txt").write_text(printed.getvalue())
    yield work, outputs, twin.phi_strings | {f"date:{d}" for d in twin.phi_dates}
