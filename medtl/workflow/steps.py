"""Which step a run is in, and Ctrl-C: the control state every step module shares.

The CLI names the step an unexpected error came from ("... while training"); a Ctrl-C that a
library swallowed is kept and raised again at the next step or epoch end, and the MLflow run of an
interrupted run ends KILLED.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
from collections.abc import Iterator

# The step a run is in, for the CLI's one-line report of an unexpected error ("... while training").
# A context variable, not a `with` block: a failing step must stay named after the exception left it.
_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("medtl_step", default=None)


def set_step(name: str | None) -> None:
    """Name the step now running (e.g. "training"); None when no run step is running.

    A run step begins only if no Ctrl-C is pending (see `interrupts_kept`).
    """
    if name is not None:
        stop_if_interrupted()
    _STEP.set(name)


# Set by the SIGINT handler of a running workflow: Python raises KeyboardInterrupt wherever the
# main thread happens to be, and where that is a library's garbage-collection callback (SQLAlchemy,
# under MLflow) the exception is printed and ignored, so the run would go on to the end. The flag
# keeps the request: the next epoch end or step raises it again.
_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Within a run, Ctrl-C raises KeyboardInterrupt and is also kept until the run stops.

    A Ctrl-C that lands inside an MLflow (database) call is only kept: the call finishes and the next
    `stop_if_interrupted` (each epoch end and step start) raises it. A second Ctrl-C raises at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):  # noqa: ARG001 - the signal module's handler signature
        if _INTERRUPTED.is_set() or not _in_a_database_call(frame):
            _INTERRUPTED.set()
            raise KeyboardInterrupt
        _INTERRUPTED.set()  # raised by the caller's next `stop_if_interrupted`

    previous = signal.signal(signal.SIGINT, interrupted)
    _INTERRUPTED.clear()
    try:
        yield
    finally:
        # None: the previous handler was not set from Python; Python's own is the closest match.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        _INTERRUPTED.clear()


# Modules in whose calls a Ctrl-C waits: a KeyboardInterrupt raised inside an MLflow write can leave
# SQLAlchemy's SQLite connection checked out mid-transaction, holding the database's write lock, and
# the run then cannot be ended KILLED ("database is locked" after MLflow's 20 s busy timeout).
_DEFERRING_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "alembic")


def _in_a_database_call(frame) -> bool:
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] in _DEFERRING_MODULES:
            return True
        frame = frame.f_back
    return False


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt when a Ctrl-C of this run was swallowed where it landed."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def current_step() -> str | None:
    """The step named last by `set_step` (the one an exception came from, if one did)."""
    return _STEP.get()


@contextlib.contextmanager
def killed_on_interrupt() -> Iterator[None]:
    """End the active MLflow run as KILLED, not FAILED, when the user interrupts it (Ctrl-C)."""
    try:
        yield
    except KeyboardInterrupt:
        import mlflow  # here, not at import: the CLI reads the step without loading MLflow
        from mlflow.entities import RunStatus

        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
