"""Ctrl-C during a run: kept, raised where it is safe, and the MLflow run ends KILLED.

A real SQLite MLflow store; the Ctrl-C is a real SIGINT sent to this process at a chosen moment.
"""

from __future__ import annotations

import os
import signal

import mlflow
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from medtl import tracking
from medtl.workflow.steps import interrupts_kept, killed_on_interrupt, stop_if_interrupted


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking.tracking_uri(f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}")
    yield
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def ctrl_c_inside_a_database_write():
    """Send SIGINT to this process from inside SQLAlchemy's flush: the moment an MLflow write holds
    SQLite's write lock, where the CI run's Ctrl-C landed."""
    sent = []

    def send(session, flush_context):  # noqa: ARG001 - SQLAlchemy's listener signature
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(Session, "after_flush", send)
    yield sent
    event.remove(Session, "after_flush", send)


def test_a_ctrl_c_inside_an_mlflow_write_lets_the_write_finish_and_the_run_end_killed(
    store, ctrl_c_inside_a_database_write
):
    logged = False
    with interrupts_kept():
        with pytest.raises(KeyboardInterrupt):
            with mlflow.start_run() as run, killed_on_interrupt():
                mlflow.log_metrics({"val.auc": 0.5}, step=3)  # the Ctrl-C lands in here
                logged = True  # reached: the write was not cut off
                stop_if_interrupted()
                pytest.fail("the kept Ctrl-C was not raised at the next check")
    assert ctrl_c_inside_a_database_write, "the SIGINT was never sent: the test did not test anything"
    assert logged, "the Ctrl-C cut the MLflow write off"
    finished = mlflow.MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "KILLED"
    assert finished.data.metrics["val.auc"] == 0.5


def test_a_ctrl_c_outside_a_database_call_raises_at_once(store):
    with interrupts_kept():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000_000):  # the handler runs within a few bytecodes
                pass
            pytest.fail("Ctrl-C did not interrupt plain Python code")


def test_a_second_ctrl_c_inside_a_database_call_raises_at_once(store):
    sent = []

    def send_twice(session, flush_context):  # noqa: ARG001
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # kept
            for _ in range(100_000):
                pass
            os.kill(os.getpid(), signal.SIGINT)  # the user insists: raised here
            for _ in range(10_000_000):
                pass
            sent.append("not interrupted")

    event.listen(Session, "after_flush", send_twice)
    try:
        with interrupts_kept(), pytest.raises(KeyboardInterrupt), mlflow.start_run():
            mlflow.log_metrics({"val.auc": 0.5}, step=1)
    finally:
        event.remove(Session, "after_flush", send_twice)
    assert sent == [True]


def test_the_sigint_handler_is_restored_after_the_run():
    before = signal.getsignal(signal.SIGINT)
    with interrupts_kept():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
