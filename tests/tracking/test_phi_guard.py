"""The PHI guard finds planted identifiers and paths (so it can fail) and passes a clean medtl run."""

from __future__ import annotations

import getpass
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch

from medtl import tracking
from medtl.errors import InputError
from tests.tracking.helpers import SHA, registry_tags

PATIENT = "DOE^JOHN"
MRN = "MRN0047113"
ORIGINAL_FILE = "IM-0001-0042.dcm"


def _no_value_echoed(findings: list[str], *values: str) -> None:
    text = " ".join(findings).casefold()
    for value in values:
        assert value.casefold() not in text


def test_scan_finds_a_planted_string_in_a_param_and_in_an_artifact_without_echoing_it(store, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text(f"reviewed by radiologist\npatient doe^john, {MRN.lower()}\n")
    with tracking.start_run("medtl-test") as run:
        # Straight to MLflow on purpose: the guard reads back what is stored, whoever wrote it.
        mlflow.log_param("comment", f"case of {PATIENT}")
        mlflow.log_param("clean", "nothing here")
        mlflow.log_artifact(str(notes), artifact_path="review")
    findings = tracking.scan_run(run.info.run_id, [PATIENT, MRN], [])
    assert "run param 'comment': forbidden string #1" in findings
    assert "run artifact 'review/notes.txt': forbidden string #1" in findings
    assert "run artifact 'review/notes.txt': forbidden string #2" in findings
    assert not any("'clean'" in f for f in findings)
    _no_value_echoed(findings, PATIENT, MRN, "doe")


def test_scan_finds_data_paths_home_folder_and_os_user(store, tmp_path, monkeypatch):
    monkeypatch.setenv("LOGNAME", "jsmith")  # getpass.getuser() reads LOGNAME first
    assert getpass.getuser() == "jsmith"
    data_root = tmp_path / "raw"
    report = tmp_path / "report.html"
    report.write_text(f"<p>source: {Path.home() / 'exports'}</p>")
    with tracking.start_run("medtl-test") as run:
        mlflow.set_tag("where", str(data_root / "series1"))
        mlflow.set_tag("operator", "JSmith")
        mlflow.log_artifact(str(report))
    findings = tracking.scan_run(run.info.run_id, [], [data_root])
    assert "run tag 'where': forbidden path #1" in findings
    assert "run artifact 'report.html': home directory" in findings
    assert "run tag 'operator': OS user name" in findings
    _no_value_echoed(findings, "jsmith")


@pytest.mark.parametrize("user", ["root", "admin", "user"])
def test_a_common_word_user_name_is_no_finding_but_real_identifiers_still_are(store, monkeypatch, user):
    # A container runs as root and the data folder is called root: the data.root param (the
    # folder's name) equals the user name, and once failed a finished 13-minute run.
    monkeypatch.setenv("LOGNAME", user)
    with tracking.start_run("medtl-test") as run:
        mlflow.log_param("data.root", user)
        mlflow.set_tag("operator", user.upper())
        mlflow.log_param("comment", f"case of {PATIENT}")
        mlflow.log_param("record", MRN)
        mlflow.log_param("source", "/data/raw/DOE_JANE")
    findings = tracking.scan_run(run.info.run_id, [PATIENT, MRN], [Path("/data/raw")])
    assert not any("OS user name" in f for f in findings), findings
    assert not any("'data.root'" in f or "'operator'" in f for f in findings), findings
    assert "run param 'comment': forbidden string #1" in findings
    assert "run param 'record': forbidden string #2" in findings
    assert "run param 'source': forbidden path #1" in findings


def test_a_name_holding_a_forbidden_string_is_withheld(store, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / f"{ORIGINAL_FILE}.txt").write_text("ok")
    with tracking.start_run("medtl-test") as run:
        mlflow.log_metric(f"loss_{MRN}", 1.0)
        mlflow.log_artifacts(str(folder), artifact_path="x")
    findings = tracking.scan_run(run.info.run_id, [MRN, ORIGINAL_FILE], [])
    assert "run metric (name withheld) name: forbidden string #1" in findings
    assert "run artifact #1 (file name): forbidden string #2" in findings
    _no_value_echoed(findings, MRN, ORIGINAL_FILE)


def test_scan_reads_compressed_zip_members(store, tmp_path):
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("inner/notes.json", '{"who": "' + PATIENT * 20 + '"}')
    assert PATIENT.encode() not in archive.read_bytes(), "the member must really be compressed"
    with tracking.start_run("medtl-test") as run:
        mlflow.log_artifact(str(archive))
    assert tracking.scan_run(run.info.run_id, [PATIENT], []) == [
        "run artifact 'bundle.zip': archive member: forbidden string #1"
    ]


def test_full_medtl_run_and_registered_version_scan_clean(store, tmp_path, tiny_model, manifest):
    data_root = tmp_path / "hospital" / PATIENT
    config = {
        "data": {"root": str(data_root), "labels": str(data_root / "labels.csv"), "modalities": ["CR"]},
        "train": {"lr": 0.001, "epochs": 1},
    }
    report = {"matched": ["conv.weight"], "missing": [], "source": str(data_root / "w.pth")}
    with tracking.start_run("medtl-test", "clean", tags={"workflow": "classify_2d"}) as run:
        tracking.log_config(config)
        tracking.log_weights({"origin": "imagenet", "sha256": "ab" * 32, "licence": "Apache-2.0"}, report)
        tracking.log_manifest(manifest, SHA)
        tracking.log_epoch_metrics({"train.loss": 0.5}, 0)
        tracking.log_final_metrics({"test.auroc": 0.8})
        tracking.log_environment()
        tracking.log_json({"thresholds": {"youden": 0.4}}, "evaluation/thresholds.json")
        model_uri = tracking.log_torch_model(tiny_model, (1, 8, 8))
    version = tracking.register_model(model_uri, "reg-clean", registry_tags(), {"test.auroc": 0.8})
    forbidden = [PATIENT, MRN, ORIGINAL_FILE]
    # The venv and the test folder: torch.export would have stored both in the model's stack traces.
    paths = [data_root, Path(torch.__file__).parents[2], Path(__file__).parent]
    assert tracking.scan_run(run.info.run_id, forbidden, paths) == []
    assert tracking.scan_registered_version("reg-clean", version, forbidden, paths) == []

    mlflow.MlflowClient().set_model_version_tag("reg-clean", version, "note", f"from {data_root}")
    assert tracking.scan_registered_version("reg-clean", version, forbidden, paths) == [
        "model version tag 'note': forbidden string #1",
        "model version tag 'note': forbidden path #1",
    ]


def test_a_single_string_instead_of_a_list_is_refused(store):
    with tracking.start_run("medtl-test") as run:
        pass
    with pytest.raises(InputError, match="forbidden must be a list"):
        tracking.scan_run(run.info.run_id, PATIENT, [])
    with pytest.raises(InputError, match="not the filesystem root"):
        tracking.scan_run(run.info.run_id, [], [Path("/")])


def test_short_name_parts_match_as_whole_words_and_base64_plots_are_not_text(store, tmp_path):
    # "WEI" (from "HUANG^WEI") is in "weights" and, by chance, in base64 image data: neither is a
    # finding; the name itself as a word is. Binary files only match needles of 6+ characters.
    page = tmp_path / "report.html"
    page.write_text('<img src="data:image/png;base64,QUJDd2VpWFla+wei/AAAA"><p>weights: imagenet</p>')
    named = tmp_path / "named.txt"
    named.write_text("reader: huang, wei\n")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00\x01WEI\x02\x00" + b"\x00MRN0047113\x00")
    with tracking.start_run("medtl-test") as run:
        mlflow.log_param("model.weights", "imagenet")
        for path in (page, named, weights):
            mlflow.log_artifact(str(path))
    findings = tracking.scan_run(run.info.run_id, ["WEI", MRN], [])
    assert "run artifact 'named.txt': forbidden string #1" in findings
    assert "run artifact 'weights.bin': forbidden string #2" in findings
    assert not any("report.html" in f or "model.weights" in f for f in findings)
    assert not any("weights.bin': forbidden string #1" in f for f in findings)


def test_scan_files_finds_a_planted_string_and_a_data_path_in_a_local_report(tmp_path):
    data_root = tmp_path / "hospital" / "export"
    report = tmp_path / "report.html"
    report.write_text(f"<p>all clear</p><p>source {data_root}/study_1</p><p>{PATIENT.lower()}</p>")
    clean = tmp_path / "clean.html"
    clean.write_text("<p>test AUROC 0.91 [0.88, 0.94]</p>")
    findings = tracking.phi_guard.scan_files([report, clean], [PATIENT, MRN], [data_root])
    assert any(f.startswith("file 'report.html': forbidden string #1") for f in findings)
    assert any(f.startswith("file 'report.html'") and "path" in f for f in findings)
    assert not any("clean.html" in f for f in findings)
    _no_value_echoed(findings, PATIENT, str(data_root))


# The manifest hands the guard normalised needles ("doe jane", "2019 07 22") and the raw values.
NORMALISED = ["doe jane", "2019 07 22", "22 07 2019", "DOE^JANE", "20190722"]


def test_normalised_needles_find_names_and_dates_written_with_other_separators(store, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("series: Doe, Jane - CT of 22/07/2019\n")
    with tracking.start_run("medtl-test") as run:
        mlflow.log_param("series", "Doe_Jane_CT_2019-07-22")
        mlflow.log_param("date", "22.07.2019")
        mlflow.log_param("clean", "jane_doe_foundation_2019")  # other words, other order: no needle
        mlflow.log_artifact(str(notes))
    findings = tracking.scan_run(run.info.run_id, NORMALISED, [])
    for number in (1, 2, 4):
        assert f"run param 'series': forbidden string #{number}" in findings
    assert "run param 'date': forbidden string #3" in findings
    assert "run artifact 'notes.txt': forbidden string #1" in findings
    assert "run artifact 'notes.txt': forbidden string #3" in findings
    assert not any("'clean'" in f for f in findings), findings
    _no_value_echoed(findings, "doe", "jane", "2019")


def test_normalised_needles_match_whole_words_only_and_long_ones_in_binary_files(tmp_path):
    text = tmp_path / "words.txt"
    text.write_text("weights: imagenet; reader huang_wei; doejane; 2019-07-221\n")
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01Doe_Jane\x02\x00wei_huang\x00")
    findings = tracking.phi_guard.scan_files([text, binary], ["wei", "doe jane", "2019 07 22"], [])
    assert findings == ["file 'words.txt': forbidden string #1", "file 'model.bin': forbidden string #2"]


def test_five_digit_ids_are_found_as_whole_numbers_not_inside_scores_decimals_or_hashes(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"auroc": 0.123456, "brier": 0.12345, "seconds": 12345.5, "n": 1234, '
                       '"run_id": "3fa12345b9c0d1e2aa47", "step": 912345}')
    as_int, as_float = tmp_path / "ids.csv", tmp_path / "ids_float.csv"
    as_int.write_text("row,patient\n1,12345\n")
    as_float.write_text("row,patient\n1,12345.0\n")  # pandas writes an ID column with a gap as floats
    findings = tracking.phi_guard.scan_files([metrics, as_int, as_float], ["12345", "1234"], [])
    assert findings == ["file 'ids.csv': forbidden string #1", "file 'ids_float.csv': forbidden string #1"]


def test_scan_fields_checks_params_and_names_before_they_are_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGNAME", "jsmith")
    data_root = tmp_path / "hospital"
    fields = {"data.root": "Doe_Jane", "data.labels": str(data_root / "labels.csv"), "operator": "JSmith",
              f"note_{MRN}": "x", "train.lr": "0.001", "data.series": "12345"}
    findings = tracking.phi_guard.scan_fields(fields, [*NORMALISED, MRN, "12345"], [data_root], where="run param")
    assert findings == [
        "run param 'data.root': forbidden string #1",
        "run param 'data.root': forbidden string #4",
        "run param 'data.labels': forbidden path #1",
        "run param 'operator': OS user name",
        "run param (name withheld) name: forbidden string #6",
        "run param 'data.series': forbidden string #7",
    ]
    _no_value_echoed(findings, "jane", MRN, "jsmith", "12345", str(data_root))
    assert tracking.phi_guard.scan_fields({"experiment": "chest-xray"}, NORMALISED, [data_root]) == []
    with pytest.raises(InputError, match="fields must be a mapping"):
        tracking.phi_guard.scan_fields(["data.root"], NORMALISED, [])


def test_a_safetensors_file_is_scanned_in_its_header_not_its_weights(tmp_path):
    """Metadata and tensor names can hold text; the weights are numbers whose bytes may spell anything."""
    from safetensors.torch import save_file

    needle = b"KOWALSKI"
    weights = torch.frombuffer(bytearray(needle * 4), dtype=torch.float32).clone()  # bytes spelling the name
    clean, named, padded = tmp_path / "clean.safetensors", tmp_path / "named.safetensors", tmp_path / "padded.safetensors"
    save_file({"w": weights}, str(clean))
    save_file({"w": weights}, str(named), metadata={"owner": "kowalski"})
    padded.write_bytes(clean.read_bytes() + b" kowalski")  # bytes beyond the tensors: not well-formed, all scanned
    findings = tracking.phi_guard.scan_files([clean, named, padded], ["kowalski"], [])
    assert not any("clean.safetensors" in f for f in findings)
    assert any("named.safetensors" in f for f in findings) and any("padded.safetensors" in f for f in findings)


def test_a_torch_export_archive_is_scanned_except_its_weight_storage(tmp_path):
    """The graph of a .pt2 can hold paths and names (stack traces); its weights are numbers."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.frombuffer(bytearray(b"KOWALSKI" * 2), dtype=torch.float32).reshape(2, 2))
    clean, named = tmp_path / "clean.pt2", tmp_path / "named.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 2),)), clean)
    assert b"KOWALSKI" in clean.read_bytes()  # the weight storage spells the name byte for byte
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(named, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b'"', b'" kowalski ', 1)  # a name in the graph's text
            target.writestr(info, data)
    findings = tracking.phi_guard.scan_files([clean, named], ["kowalski"], [])
    assert not any("clean.pt2" in f for f in findings)
    assert any("named.pt2" in f for f in findings)
