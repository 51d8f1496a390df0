"""Helpers for tests that start real processes: a free local port, a torchrun launch, apt-get installs."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[str], *, cwd: Path, timeout: float, nproc: int = 2) -> tuple[int, str]:
    """Run `python -m torch.distributed.run` with `nproc` CPU (gloo) ranks; returns (exit code, output).

    One thread per rank, the repository on PYTHONPATH, no inherited rendezvous variables; the
    launcher runs in its own session so that a hung run is killed together with its workers.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


#: One lock file for every test process: `make test` runs tests in parallel workers (pytest-xdist),
#: and two `apt-get` runs at once fail on dpkg's own lock instead of waiting for it.
APT_LOCK = Path(tempfile.gettempdir()) / "medtl-tests-apt.lock"


def apt_get_install(packages: Sequence[str], *, installed: Callable[[], bool], timeout: float,
                    recommends: bool = True) -> str | None:
    """`apt-get update` then `apt-get install -y PACKAGES`, one test process at a time.

    `installed` is checked again once the lock is held (another worker may have just installed
    them). Returns None when the packages are there, else what failed (for the skip or fail message).
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout
    with APT_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return None
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *([] if recommends else ["--no-install-recommends"]), *packages]):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                                      timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s"
            if done.returncode != 0:
                return f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
    return None
