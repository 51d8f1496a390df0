"""Keys, pseudonyms, coarsened subgroups, path aliases and the PHI scanner."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path

import pytest

from medtl.data.needles import PathNamer, identifying_needles, looks_identifying, scan_for_phi
from medtl.data.privacy import (
    age_band,
    key_created_message,
    load_aliases,
    load_key,
    normalise_sex,
    path_alias,
    resolve_alias,
    save_aliases,
    scanner_code,
    site_code,
)
from medtl.errors import ConfigError, InputError


def _secret(byte: int) -> bytes:
    return hashlib.sha256(bytes([byte])).digest()


def _key_file(tmp_path: Path, name: str, byte: int) -> Path:
    path = tmp_path / name
    path.write_text(_secret(byte).hex() + "\n")
    path.chmod(0o600)
    return path


def test_pseudonyms_change_with_the_key_and_are_stable_with_the_same_key(tmp_path):
    key_a, key_b = load_key(_key_file(tmp_path, "a.key", 1)), load_key(_key_file(tmp_path, "b.key", 2))
    again = load_key(tmp_path / "a.key")
    assert key_a.pseudonym("patient", "12345678") == again.pseudonym("patient", "12345678")
    assert key_a.pseudonym("patient", "12345678") != key_b.pseudonym("patient", "12345678")
    assert re.fullmatch(r"P-[0-9a-f]{16}", key_a.pseudonym("patient", "12345678"))
    assert key_a.key_id != key_b.key_id


def test_pseudonyms_are_keyed_hmac_with_a_domain_per_kind_not_a_plain_hash(tmp_path):
    key = load_key(_key_file(tmp_path, "a.key", 7))
    value = "NGH1234567"
    expected = hmac.new(_secret(7), f"medtl/patient\x00{value}".encode(), hashlib.sha256).hexdigest()[:16]
    assert key.pseudonym("patient", value) == "P-" + expected
    assert hashlib.sha256(value.encode()).hexdigest()[:16] not in key.pseudonym("patient", value)
    assert key.pseudonym("patient", value)[2:] != key.pseudonym("study", value)[3:]
    with pytest.raises(ValueError, match="pseudonym kind"):
        key.pseudonym("hospital", value)


def test_default_key_is_created_once_in_the_config_dir_with_mode_0600():
    key = load_key()
    expected = Path(os.environ["MEDTL_CONFIG_DIR"]) / "keys" / "medtl.key"
    assert key.created and key.path == expected
    assert stat.S_IMODE(expected.stat().st_mode) == 0o600
    assert str(expected) in key_created_message(key)
    again = load_key()
    assert not again.created and again.key_id == key.key_id and key_created_message(again) is None


def test_key_id_never_reveals_the_key():
    key = load_key()
    secret_hex = key.path.read_text().strip()
    assert key.key_id not in secret_hex and secret_hex not in repr(key)
    assert len(key.key_id) == 16


def test_key_file_comes_from_the_environment_when_not_given(tmp_path, monkeypatch):
    path = _key_file(tmp_path, "env.key", 3)
    monkeypatch.setenv("MEDTL_KEY_FILE", str(path))
    assert load_key().path == path
    assert load_key(_key_file(tmp_path, "arg.key", 4)).path == tmp_path / "arg.key"


def test_a_named_key_file_that_is_missing_or_short_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="existing key file"):
        load_key(tmp_path / "typo.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32 random bytes, not 10 bytes"):
        load_key(short)


@pytest.mark.parametrize(
    ("patient_age", "band"),
    [("045Y", "40-49"), ("006M", "0-17"), ("010D", "0-17"), ("002W", "0-17"), ("017Y", "0-17"), ("018Y", "18-29"),
     ("089Y", "80-89"), ("090Y", "90+"), ("104Y", "90+"), ("", "unknown"), ("abc", "unknown")],
)
def test_age_band_from_dicom_patient_age(patient_age, band):
    assert age_band(patient_age=patient_age) == band


def test_age_band_from_birth_and_study_dates_counts_completed_years_and_top_codes():
    assert age_band(birth_date="19800615", study_date="20100614") == "18-29"
    assert age_band(birth_date="19800615", study_date="20100615") == "30-39"
    assert age_band(birth_date="19200101", study_date="20150101") == "90+"
    assert age_band(birth_date="20200101", study_date="20100101") == "unknown"


def test_age_band_prefers_the_numeric_age_column():
    assert age_band(age="93", patient_age="045Y") == "90+"
    assert age_band(age=89.9) == "80-89"
    assert age_band(age="", patient_age="045Y") == "40-49"


def test_sex_is_normalised_to_m_f_o_u():
    assert [normalise_sex(v) for v in ("M", "female", "o", "", None, "?")] == ["M", "F", "O", "U", "U", "U"]


def test_site_and_scanner_codes_are_keyed_and_ignore_case_and_spacing(tmp_path):
    key, other = load_key(_key_file(tmp_path, "a.key", 1)), load_key(_key_file(tmp_path, "b.key", 2))
    code = site_code(key, "St. Brigid Community Hospital")
    assert re.fullmatch(r"SITE-[0-9a-f]{6}", code)
    assert site_code(key, "  st. brigid   COMMUNITY hospital ") == code
    assert site_code(other, "St. Brigid Community Hospital") != code
    assert site_code(key, "") == "unknown" and site_code(key, code) == code
    scanner = scanner_code(key, "GE Healthcare", "Revolution EVO")
    assert re.fullmatch(r"SCN-[0-9a-f]{6}", scanner) and scanner != scanner_code(key, "GE Healthcare", "Other")
    assert scanner_code(key, "", "") == "unknown"


@pytest.mark.parametrize(
    ("relative", "aliased"),
    [
        ("DOE_JANE/ct/1.dcm", True),  # the patient's name
        ("patients/jane/x.png", True),  # one name component, other case
        ("export/0012345/a.dcm", True),  # the digits of the ID
        ("x/2024-01-15/a.dcm", True),  # the study date in another form
        ("SMITH_JOHN/x.png", True),  # shaped like LAST_FIRST, whoever it is
        ("scans/Smith^John.png", True),  # DICOM person-name style
        ("scans/20210304_chest.png", True),  # a date-like digit run
        ("x/2021-03-04/a.png", True),
        ("data/case_01/image.nii.gz", False),
        ("masks/study_0001_seg.nii.gz", False),
    ],
)
def test_paths_with_identifying_parts_become_aliases(tmp_path, relative, aliased):
    key = load_key(_key_file(tmp_path, "a.key", 1))
    needles = identifying_needles(["DOE^JANE", "MRN0012345", "20240115"])
    out = PathNamer(key, needles)(relative)
    assert out.startswith("alias:") is aliased
    assert out == (path_alias(key, relative) if aliased else relative)


def test_looks_identifying_leaves_ordinary_names_alone():
    assert not any(looks_identifying(c) for c in ("image_01.png", "series_1", "lung_mask.nii.gz", "CT", "1-001.dcm"))


def test_alias_map_is_local_beside_the_key_merged_across_builds_and_resolvable(tmp_path):
    key = load_key(_key_file(tmp_path, "a.key", 1))
    first, second = path_alias(key, "DOE_JANE/a.dcm"), path_alias(key, "ROE_JOHN/b.dcm")
    save_aliases(key, {first: "DOE_JANE/a.dcm"})
    path = save_aliases(key, {second: "ROE_JOHN/b.dcm"})
    assert path == tmp_path / "aliases" / f"{key.key_id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_aliases(key) == {first: "DOE_JANE/a.dcm", second: "ROE_JOHN/b.dcm"}
    assert json.loads(path.read_text())["key_id"] == key.key_id
    assert resolve_alias(key, second) == "ROE_JOHN/b.dcm"
    assert resolve_alias(key, "plain/path.png") == "plain/path.png"


def test_an_alias_missing_from_the_map_is_found_among_candidate_paths_or_refused(tmp_path):
    key = load_key(_key_file(tmp_path, "a.key", 1))
    alias = path_alias(key, "DOE_JANE/a.dcm")
    assert resolve_alias(key, alias, ["other/x.png", "DOE_JANE/a.dcm"]) == "DOE_JANE/a.dcm"
    with pytest.raises(InputError, match="must resolve"):
        resolve_alias(key, alias, ["other/x.png"])


def test_phi_scan_names_output_and_kind_never_the_value(tmp_path):
    out = tmp_path / "manifest.csv"
    out.write_text("id,path\nR-1,scans/zofia/x.png\n")
    forbidden = {"KOWALSKI^ZOFIA": "DICOM header value", "NGH1234567": "labels-CSV patient_id value"}
    findings = scan_for_phi([out], forbidden)
    assert findings == ["manifest.csv: contains a DICOM header value (person-name component)"]
    assert not any("zofia" in f.lower() or "1234567" in f for f in findings)
    texts = {"log message 1": "row 7 of patient ngh1234567 failed"}
    assert scan_for_phi(texts, forbidden) == [
        "log message 1: contains a labels-CSV patient_id value (digits of an identifier)",
        "log message 1: contains a labels-CSV patient_id value (identifying text value)",
    ]


def test_phi_scan_finds_dicom_dates_in_other_forms_and_ids_in_any_case():
    assert scan_for_phi(["study of 2024-01-15"], {"20240115"}) == ["text 1: contains a date"]
    assert scan_for_phi(["STUDY 20240115"], {"20240115"}) == ["text 1: contains a date"]
    assert scan_for_phi(["Jane Doe"], {"DOE^JANE"})


def test_phi_scan_ignores_words_that_merely_contain_a_value_and_chance_hits_in_hashes():
    digest = "ab" * 10 + "ned" + "0" * 41  # not hex, so not a hash: a real hit
    assert scan_for_phi(["status: quarantined"], {"Ned"}) == []
    assert scan_for_phi(["sha256 " + "a1" * 10 + "1234567" + "b2" * 20], {"MRN1234567"}) == []
    assert scan_for_phi(["x-ned-y " + digest], {"Ned"})
    assert scan_for_phi(["shape 1024x1024"], {"1024"}) == []  # digits-only values under 5 digits
