"""`medtl.data.pacs` and `medtl pull` against a real Orthanc with its DICOMweb plugin.

The `orthanc` fixture (tests/data/conftest.py) is a real Orthanc on 127.0.0.1 with authentication on,
holding synthetic demo studies.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medtl.cli import main
from medtl.data import pacs
from medtl.data.manifest import build_manifest
from medtl.data.pacs import PASSWORD_ENV, TOKEN_ENV, USER_ENV, parse_query, pull, uid_hash
from medtl.errors import InputError
from tests.data.conftest import ORTHANC_PASSWORD, ORTHANC_USER, free_port

HASHED_FILE = re.compile(r"^[0-9a-f]{16}/[0-9a-f]{16}\.dcm$")
#: Columns that must agree between a manifest of the pulled files and one of the originals.
SAME_COLUMNS = ("patient", "study", "series", "kind", "modality", "n_files", "shape", "spacing", "orientation",
                "sha256", "label", "sex", "age_band", "site", "scanner")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _key(folder: Path) -> Path:
    key = folder / "project.key"
    key.write_text(secrets.token_hex(32))
    return key


# ---------------------------------------------------------------------------------------------
# Pulling


@pytest.mark.slow
def test_pulled_cr_dx_studies_give_the_manifest_of_the_originals(orthanc, credentials, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "pulled"
    result = pull(orthanc.url, parse_query("Modality=CR,DX"), out, progress=False)

    labels = pd.read_csv(orthanc.demo.labels_csv, dtype=str, keep_default_na=False)
    radiographs = labels[labels["path"].str.endswith(".dcm")]
    assert (result.studies, result.series, result.fetched, result.skipped, result.failed) == (
        len(radiographs), len(radiographs), len(radiographs), 0, {})
    pulled = _files(out)
    assert all(HASHED_FILE.match(rel) for rel in pulled), "names must be UID hashes only"
    origin: dict[str, Path] = {}  # pulled relative path -> the demo file it came from
    for rel, data in pulled.items():
        ds = pydicom.dcmread(out / rel, stop_before_pixels=True)
        assert rel == f"{uid_hash(ds.StudyInstanceUID)}/{uid_hash(ds.SOPInstanceUID)}.dcm"
        assert ds.Modality in ("CR", "DX")  # the report (SR) of a CR/DX study is left out
        origin[rel] = orthanc.sop_files[str(ds.SOPInstanceUID)]
        assert data == origin[rel].read_bytes(), "the PACS's DICOM must be written as is"
    # No UID, name or other identifying value of the demo reached a log record (hashes only).
    assert not [s for s in orthanc.demo.phi_strings if s in caplog.text]

    # The same studies, labelled the same, from both folders, pseudonymised with one key.
    by_origin = {orthanc.demo.root / p: row for p, row in zip(labels["path"], labels.to_dict("records"),
                                                               strict=True)}
    pulled_labels = pd.DataFrame([{"path": rel, "label": by_origin[src]["label"]} for rel, src in origin.items()])
    original_labels = pd.DataFrame([by_origin[src] for src in origin.values()])
    pulled_labels.to_csv(tmp_path / "pulled_labels.csv", index=False)
    original_labels.to_csv(tmp_path / "original_labels.csv", index=False)
    key = _key(tmp_path)
    built = {}
    for name, root in (("pulled", out), ("original", orthanc.demo.root)):
        made = build_manifest(root, tmp_path / f"{name}_labels.csv", tmp_path / f"{name}.csv", key_file=key,
                              progress=False, workers=1)
        built[name] = pd.read_csv(made.manifest_csv, dtype=str, keep_default_na=False)
    assert len(built["pulled"]) == len(built["original"]) == len(radiographs)
    columns = list(SAME_COLUMNS)
    mine = built["pulled"][columns].sort_values("series").reset_index(drop=True)
    theirs = built["original"][columns].sort_values("series").reset_index(drop=True)
    assert mine["sha256"].str.fullmatch("[0-9a-f]{64}").all() and mine["patient"].str.len().gt(0).all()
    pd.testing.assert_frame_equal(mine, theirs)


@pytest.mark.slow
def test_an_interrupted_pull_continues_and_ends_like_a_one_shot_pull(orthanc, credentials, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    write = pacs._write_atomic
    written: list[Path] = []

    def write_then_stop(path, dataset):
        write(path, dataset)
        written.append(path)
        if len(written) == 4:
            raise Stop

    out = tmp_path / "resumed"
    monkeypatch.setattr(pacs, "_write_atomic", write_then_stop)
    with pytest.raises(Stop):
        pull(orthanc.url, {}, out, progress=False)
    monkeypatch.setattr(pacs, "_write_atomic", write)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(written)
    stale = written[0].parent / "0000000000000000.dcm.part"  # as left by a pull killed mid-write
    stale.write_bytes(b"half a file")

    resumed = pull(orthanc.url, {}, out, progress=False)
    total = len(orthanc.sop_files)
    assert (resumed.skipped, resumed.fetched, resumed.failed) == (4, total - 4, {})
    assert not stale.exists()
    once = pull(orthanc.url, {}, tmp_path / "once", progress=False)
    assert (once.fetched, once.skipped) == (total, 0)
    assert _files(out) == _files(tmp_path / "once")
    again = pull(orthanc.url, {}, out, progress=False)
    assert (again.fetched, again.skipped, again.studies) == (0, total, once.studies)


@pytest.mark.slow
def test_the_cli_prints_counts_only(orthanc, credentials, tmp_path, capsys):
    status = main(["-q", "pull", "--dicomweb", orthanc.url, "--query", "Modality=CR&StudyDate=20180101-",
                   "--out", str(tmp_path / "cr")])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    n = len(list((tmp_path / "cr").rglob("*.dcm")))
    assert 0 < n < len(orthanc.sop_files)
    assert f"{n} instances fetched, 0 already present, 0 failed" in printed.out
    assert not [s for s in orthanc.demo.phi_strings if s in printed.out + printed.err]


# ---------------------------------------------------------------------------------------------
# Credentials


@pytest.mark.slow
def test_a_refused_password_is_named_without_the_password(orthanc, tmp_path, monkeypatch, caplog, capsys):
    wrong = "wrong-" + secrets.token_hex(12)
    monkeypatch.setenv(USER_ENV, ORTHANC_USER)
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InputError) as err:
        pull(orthanc.url, {"Modality": "CR"}, tmp_path / "refused", progress=False)
    message = str(err.value)
    assert message.startswith(f"the PACS refused the credentials for {orthanc.host} (HTTP 401); set {USER_ENV}")
    assert f"netrc entry for {orthanc.host}" in message
    printed = capsys.readouterr()
    for secret in (wrong, ORTHANC_USER, ORTHANC_PASSWORD):
        assert secret not in message + caplog.text + printed.out + printed.err
    assert not list((tmp_path / "refused").rglob("*.dcm"))

    status = main(["-q", "pull", "--dicomweb", orthanc.url, "--query", "Modality=CR", "--out", str(tmp_path / "x")])
    printed = capsys.readouterr()
    assert status == 2
    assert "medtl: error: the PACS refused the credentials for 127.0.0.1 (HTTP 401)" in printed.err
    assert wrong not in printed.out + printed.err and ORTHANC_USER not in printed.out + printed.err


@pytest.mark.slow
def test_credentials_come_from_a_netrc_entry_for_the_host(orthanc, tmp_path, monkeypatch):
    for name in (USER_ENV, PASSWORD_ENV, TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine {orthanc.host} login {ORTHANC_USER} password {ORTHANC_PASSWORD}\n")
    netrc_file.chmod(0o600)
    result = pull(orthanc.url, {"Modality": "CR"}, tmp_path / "cr", progress=False, auth_file=netrc_file)
    assert result.fetched > 0 and not result.failed

    netrc_file.write_text(f"machine pacs.example.org login {ORTHANC_USER} password {ORTHANC_PASSWORD}\n")
    with pytest.raises(InputError, match=r"asked for credentials \(HTTP 401\) and none were found"):
        pull(orthanc.url, {"Modality": "CR"}, tmp_path / "cr", progress=False, auth_file=netrc_file)
    monkeypatch.setenv(TOKEN_ENV, "not-a-token-" + secrets.token_hex(8))  # Orthanc takes no bearer tokens
    with pytest.raises(InputError, match=r"refused the credentials for 127\.0\.0\.1 \(HTTP 401\)") as err:
        pull(orthanc.url, {"Modality": "CR"}, tmp_path / "cr", progress=False)
    assert "not-a-token" not in str(err.value)


def test_unusable_urls_and_unreachable_servers_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(USER_ENV, ORTHANC_USER)
    monkeypatch.setenv(PASSWORD_ENV, ORTHANC_PASSWORD)
    with pytest.raises(InputError, match="must not carry a user name or password") as err:
        pull(f"http://u:{ORTHANC_PASSWORD}@127.0.0.1:8042/dicom-web", {"Modality": "CR"}, tmp_path)
    assert ORTHANC_PASSWORD not in str(err.value)
    with pytest.raises(InputError, match="must be http"):
        pull("ftp://pacs.example.org/dicom-web", {"Modality": "CR"}, tmp_path)
    port = free_port()
    with pytest.raises(InputError, match=rf"could not reach the PACS at 127\.0\.0\.1:{port} .*check the URL"):
        pull(f"http://127.0.0.1:{port}/dicom-web", {"Modality": "CR"}, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# The query


def test_the_query_parser_reads_pairs_and_percent_encoding():
    assert parse_query("Modality=CR,DX&StudyDate=20240101-20241231&StudyDescription=XR%20CHEST") == {
        "Modality": "CR,DX", "StudyDate": "20240101-20241231", "StudyDescription": "XR CHEST"}
    assert parse_query("StudyDate=-20241231") == {"StudyDate": "-20241231"}


@pytest.mark.parametrize(("text", "expected"), [
    ("", "not empty"),
    ("Modality CR", "part 1 must be KEY=VALUE, not text without '='"),
    ("Modality=CR&&StudyDate=20240101", "part 2 must be KEY=VALUE"),
    ("Modalty=CR", "did you mean 'Modality'"),
    ("Modality=CR&Modality=DX", "must appear once"),
    ("Modality=", "must have a value"),
    ("StudyDate=2024", "must be a date (8 digits"),
    ("StudyDate=20240101to20241231", "must be a date (8 digits"),
    ("limit=10", "must not be given"),
])
def test_the_query_parser_refuses_malformed_queries(text, expected):
    with pytest.raises(InputError, match=re.escape(expected)):
        parse_query(text)


def test_query_messages_do_not_quote_values():
    with pytest.raises(InputError) as err:
        parse_query("PatientID=NGH4334960&PatientBirthDate=1957")
    assert "PatientBirthDate" in str(err.value) and "NGH4334960" not in str(err.value)
    assert "1957" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Storing (medtl predict --store-to)


@pytest.mark.slow
def test_stored_seg_objects_come_back_from_the_pacs_and_storing_twice_is_harmless(orthanc, empty_pacs, credentials,
                                                                                  tmp_path):
    import numpy as np

    from tests.data import dicom_factory as factory

    series = sorted({p.parent for p in orthanc.sop_files.values()
                     if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"})[0]
    files = sorted(series.glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    shape = pydicom.dcmread(files[0]).pixel_array.shape
    segments = np.zeros((len(files), *shape, 1), np.uint8)
    segments[1:-1, 10:20, 12:30] = 1
    seg = factory.write_seg(tmp_path / "out" / "seg.dcm", files, segments, ["organ"])
    for _ in range(2):
        result = pacs.store(empty_pacs, [seg], progress=False)
        assert (result.stored, result.failed) == (1, {})
    pulled = pull(empty_pacs, {"Modality": "SEG"}, tmp_path / "pulled", progress=False)
    back = [pydicom.dcmread(p) for p in (tmp_path / "pulled").rglob("*.dcm")]
    sent = pydicom.dcmread(seg)
    assert pulled.fetched == 1 and [b.SOPInstanceUID for b in back] == [sent.SOPInstanceUID]
    assert back[0].PixelData == sent.PixelData


def test_storing_with_a_refused_password_names_the_host_not_the_password(orthanc, tmp_path, monkeypatch):
    wrong = "wrong-" + secrets.token_hex(12)
    monkeypatch.setenv(USER_ENV, ORTHANC_USER)
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    some = next(iter(orthanc.sop_files.values()))
    with pytest.raises(InputError, match=r"^the PACS refused the credentials for 127\.0\.0\.1 \(HTTP 401\)") as err:
        pacs.store(orthanc.url, [some], progress=False)
    assert wrong not in str(err.value)
    with pytest.raises(InputError, match="must not carry a user name or password"):
        pacs.check_store_url(f"http://{ORTHANC_USER}:{wrong}@127.0.0.1:8042/dicom-web")
