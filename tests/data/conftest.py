"""Fixtures of the data tests: a real Orthanc PACS with its DICOMweb plugin.

`orthanc` installs `orthanc` and `orthanc-dicomweb` with apt-get when they are missing (skipping,
with the reason, only when that is impossible), starts Orthanc on free ports of 127.0.0.1 with
authentication on, and uploads synthetic demo studies to it; `credentials` puts its user and
password in the environment as `medtl pull` and `medtl predict --store-to` read them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import requests

from medtl.data.pacs import PASSWORD_ENV, TOKEN_ENV, USER_ENV
from medtl.data.synthetic import DemoSummary, write_demo_data
from tests.processes import apt_get_install

ORTHANC_USER = "medtl-tester"
#: Distinctive, so a search of messages and logs for it cannot hit anything else.
ORTHANC_PASSWORD = "pw-" + secrets.token_hex(12)
PACKAGES = ("orthanc", "orthanc-dicomweb")


@dataclass(frozen=True)
class Pacs:
    url: str
    host: str
    demo: DemoSummary
    sop_files: dict[str, Path]  # SOPInstanceUID -> original demo file, for what Orthanc accepted


# ---------------------------------------------------------------------------------------------
# Orthanc


def _orthanc_paths() -> tuple[str | None, str | None]:
    """(the Orthanc binary, the DICOMweb plugin .so) when installed."""
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                              if os.access(p, os.X_OK)), None)
    listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False)
    plugins = [line for line in listed.stdout.splitlines() if re.search(r"\.so(\.\d+)*$", line)]
    plugin = next((p for p in plugins if p.endswith(".so")), plugins[0] if plugins else None)
    return binary, plugin


def _install_orthanc() -> tuple[str, str]:
    binary, plugin = _orthanc_paths() if shutil.which("dpkg") else (None, None)
    if binary and plugin:
        return binary, plugin
    if not shutil.which("apt-get"):
        pytest.skip("Orthanc is not installed and this machine has no apt-get to install orthanc orthanc-dicomweb")
    if os.geteuid() != 0:
        pytest.skip("Orthanc is not installed and installing orthanc orthanc-dicomweb with apt-get needs root")
    failed = apt_get_install(PACKAGES, installed=lambda: all(_orthanc_paths()), timeout=900,
                             recommends=False)
    if failed:
        pytest.skip(f"could not install {' '.join(PACKAGES)}: {failed[-300:]}")
    binary, plugin = _orthanc_paths()
    if not (binary and plugin):
        pytest.skip("orthanc and orthanc-dicomweb were installed but the Orthanc binary or the plugin is missing")
    return binary, plugin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(binary: str, plugin: str, folder: Path) -> tuple[subprocess.Popen, str, Path]:
    http_port, dicom_port = free_port(), free_port()
    config = folder / "orthanc.json"
    config.write_text(pd.Series({
        "Name": "medtl-test", "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
        "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }).to_json())
    log = folder / "orthanc.log"
    with log.open("w") as out:
        process = subprocess.Popen([binary, str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode}: {log.read_text()[-1500:]}")
        try:
            if requests.get(f"{base}/system", auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=2).ok:
                return process, base, log
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"Orthanc did not answer /system within 30 s: {log.read_text()[-1500:]}")


@contextmanager
def _running(folder: Path) -> Iterator[str]:
    """A started Orthanc (its base URL), stopped afterwards."""
    binary, plugin = _install_orthanc()
    process, base, _ = _start(binary, plugin, folder)
    try:
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Iterator[Pacs]:
    """A running Orthanc (DICOMweb at `url`) holding the demo studies of 10 patients; tests only read it."""
    with _running(tmp_path_factory.mktemp("orthanc")) as base:
        demo = write_demo_data(tmp_path_factory.mktemp("pacs-demo") / "demo", patients=10, seed=0, progress=False)
        sop_files: dict[str, Path] = {}
        with requests.Session() as session:
            session.auth = (ORTHANC_USER, ORTHANC_PASSWORD)
            for path in sorted(demo.root.rglob("*.dcm")):
                answer = session.post(f"{base}/instances", data=path.read_bytes(), timeout=30)
                if answer.ok:
                    sop_files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
                else:  # only the demo's truncated file is refused
                    assert path.name == "partial_transfer.dcm", f"Orthanc refused {path.name}: {answer.status_code}"
        yield Pacs(url=f"{base}/dicom-web", host="127.0.0.1", demo=demo, sop_files=sop_files)


@pytest.fixture
def empty_pacs(tmp_path) -> Iterator[str]:
    """The DICOMweb URL of a fresh, empty Orthanc for a test that stores: what it holds is the test's alone."""
    (tmp_path / "orthanc").mkdir()
    with _running(tmp_path / "orthanc") as base:
        yield f"{base}/dicom-web"


@pytest.fixture
def credentials(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(USER_ENV, ORTHANC_USER)
    monkeypatch.setenv(PASSWORD_ENV, ORTHANC_PASSWORD)


