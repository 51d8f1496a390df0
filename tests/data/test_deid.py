"""What counts as identifying in a DICOM header (medtl.data.deid), with the attribute it came from."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from medtl.data import deid
from medtl.data.deid import (
    IDENTIFYING_KEYWORDS,
    MIN_VALUE_LENGTH,
    identifying_values,
    values_kept_between_files,
)
from tests.data import dicom_factory as factory


def _dataset_with_phi() -> Dataset:
    ds = factory.base_dataset(
        sop_class=pydicom.uid.CTImageStorage,
        series_uid="1.2.826.0.1.555.2",
        study_uid="1.2.826.0.1.555.1",
        modality="CT",
        instance="1.2.826.0.1.555.3",
    )
    ds.ReferringPhysicianName = "House^Gregory^^Dr."
    ds.StudyDescription = "CT THORAX Mr Smithers follow-up"
    ds.StationName = "CTSCAN04"
    ds.DeviceSerialNumber = "SN-448812"
    ds.StudyTime = "093512"
    ds.PatientWeight = 72.5
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    request = Dataset()
    request.AccessionNumber = "REQ-55512"
    request.RequestedProcedureID = "RP-4411"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    request.ScheduledProtocolCodeSequence = DicomSequence([code])
    ds.RequestAttributesSequence = DicomSequence([request])
    other = Dataset()
    other.PatientID = "MRN-000917"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.add_new(0x00091001, "LO", "site code GREENFIELD")
    ds.add_new(0x00091002, "DS", "12.5")
    ds.add_new(0x00090010, "LO", "ACME PRIVATE DICT")
    return ds


def _ct_dataset() -> Dataset:
    return factory.base_dataset(sop_class=pydicom.uid.CTImageStorage, series_uid="1.2.9.1", study_uid="1.2.9.2",
                                modality="CT", instance="1.2.9.3")


def _values(ds: Dataset) -> set[str]:
    return {value for value, _field in identifying_values(ds)}


def test_identifying_values_collects_names_ids_dates_uids_institution_and_private_strings():
    values = _values(_dataset_with_phi())
    expected = {
        factory.PATIENT_NAME, "House^Gregory^^Dr.",  # person names as stored (needles add the components)
        factory.PATIENT_ID, "MRN-000917",  # IDs, also inside OtherPatientIDsSequence
        factory.BIRTH_DATE, factory.STUDY_DATE,  # dates as stored (needles add the other orders)
        factory.ACCESSION, "REQ-55512", "RP-4411",  # accession, also inside RequestAttributesSequence
        "1.2.826.0.1.555.1", "1.2.826.0.1.555.2", "1.2.826.0.1.555.3",  # instance UIDs
        factory.INSTITUTION, "CTSCAN04", "SN-448812",  # institution, station, device serial number
        "CT THORAX Mr Smithers follow-up",  # free-text description
        "site code GREENFIELD",  # private string
        "058Y",  # age
    }  # fmt: skip
    assert expected <= values


def test_identifying_values_name_the_attribute_each_value_came_from():
    pairs = identifying_values(_dataset_with_phi())
    assert (factory.PATIENT_NAME, "PatientName") in pairs
    assert ("MRN-000917", "PatientID") in pairs  # inside OtherPatientIDsSequence: the element's keyword
    assert ("site code GREENFIELD", "private tag (0009,1001)") in pairs
    assert ("CT THORAX Mr Smithers follow-up", "StudyDescription") in pairs


def test_identifying_values_leaves_out_standard_uids_codes_numbers_times_and_short_values():
    values = _values(_dataset_with_phi())
    assert pydicom.uid.CTImageStorage not in values  # SOP class: the same for everyone
    assert pydicom.uid.ExplicitVRLittleEndian not in values
    assert not {"T-D3000", "SRT", "Chest"} & values  # code plumbing inside identifying sequences
    assert not {"72.5", "12.5", "093512", "ORIGINAL", "ACME PRIVATE DICT"} & values
    assert all(len(v) >= MIN_VALUE_LENGTH for v in values)
    assert "F" not in values and "CT" not in values


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientName", "ANONYMOUS"), ("PatientName", "TEST"), ("PatientName", "PATIENT"),
     ("PatientName", "ANONYMOUS^PATIENT"), ("PatientName", "NAME^PATIENT^NAME"), ("PatientName", "TEST^PATIENT"),
     ("PatientID", "UNKNOWN"), ("PatientID", "TRAIN"), ("StudyDescription", "Test"), ("StudyDescription", "CHEST"),
     ("SeriesDescription", "Axial"), ("InstitutionName", "Hospital")],
)
def test_placeholders_and_single_common_words_are_not_identifying_values(keyword, value):
    # Real de-identified collections (pydicom's own test files among them) hold exactly these.
    ds = Dataset()
    setattr(ds, keyword, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly calls a zero date invalid
        ds.PatientBirthDate = "00000000"
    assert identifying_values(ds) == frozenset()


@pytest.mark.parametrize("value", ["DOE^JANE", "KOWALSKI", "MRN0012345", "Saint Example Hospital", "LI^XI"])
def test_real_names_ids_and_institutions_stay_identifying(value):
    ds = Dataset()
    ds.PatientName = value
    assert _values(ds) == {value}


def test_identifying_values_reads_private_strings_of_files_without_a_dictionary(tmp_path):
    ds = _ct_dataset()
    ds.add_new(0x00291010, "LO", "Operator KOWALSKI")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    reread = pydicom.dcmread(tmp_path / "x.dcm")
    assert reread[0x00291010].VR == "UN"  # implicit VR: the private tag's VR is unknown
    assert "Operator KOWALSKI" in _values(reread)


def test_identifying_values_emit_no_warning_or_log_quoting_an_invalid_value(tmp_path, caplog):
    ds = _ct_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00081155, "UI", "SECRET.01.77")  # invalid UID: pydicom warns quoting the value
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    reread = pydicom.dcmread(tmp_path / "x.dcm")  # values are converted (and checked) on first access
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        values = _values(reread)
    assert "SECRET.01.77" in values
    assert not any("SECRET" in str(w.message) for w in caught)
    assert "SECRET" not in caplog.text


def test_identifying_keywords_cover_the_basic_profile_core_and_are_pydicom_keywords():
    core = {
        "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientIDsSequence",
        "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
        "PerformingPhysicianName", "OperatorsName", "StationName", "StudyDate", "SeriesDate",
        "AcquisitionDateTime", "StudyTime", "StudyDescription", "SeriesDescription", "ImageComments",
        "PatientComments", "DeviceSerialNumber", "PatientAddress", "RequestAttributesSequence",
    }  # fmt: skip
    assert core <= IDENTIFYING_KEYWORDS
    assert all(pydicom.datadict.tag_for_keyword(k) is not None for k in IDENTIFYING_KEYWORDS)
    assert not {"Modality", "Manufacturer", "Rows", "PixelSpacing", "SOPClassUID"} & IDENTIFYING_KEYWORDS


def test_pydicom_decoder_tracebacks_never_reach_the_root_logger(tmp_path, caplog):
    # pydicom.pixels.decoders.base logs decoder failures with a traceback on a child logger of
    # "pydicom"; quiet_pydicom must stop them, not only the parent's own records.
    from medtl.data.deid import quiet_pydicom

    child = logging.getLogger("pydicom.pixels.decoders.base")
    with caplog.at_level(logging.DEBUG), quiet_pydicom():
        try:
            raise RuntimeError("decoder failed on /data/DOE_JANE/x.dcm")
        except RuntimeError:
            child.exception("could not decode")
    assert "DOE_JANE" not in caplog.text and "could not decode" not in caplog.text


def _pydicom_test_files() -> list[str]:
    from pydicom.data.data_manager import DATA_ROOT  # the files pydicom ships (its getters may try downloads)

    return sorted(str(p) for p in (Path(DATA_ROOT) / "test_files").rglob("*.dcm"))


def test_values_judged_from_raw_tags_equal_those_of_a_fully_converted_header():
    # identifying_values converts only the elements its tag and VR say could identify (pydicom
    # converts values lazily); the result must equal that of a header whose every element was converted.
    checked = 0
    for path in _pydicom_test_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lazy = pydicom.dcmread(path, force=True, stop_before_pixels=True)
                eager = pydicom.dcmread(path, force=True, stop_before_pixels=True)
                for _ in eager.iterall():  # converts every element, sequences included
                    pass
                if eager.file_meta is not None:
                    list(eager.file_meta)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken files: not this test's subject
            continue
        assert identifying_values(lazy) == identifying_values(eager), path.rsplit("/", 1)[-1]
        checked += 1
    assert checked > 50  # pydicom bundles about a hundred real files


def _read_quietly(path: str) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom's deliberately broken files
        return None


def test_values_kept_between_files_equal_those_of_a_fresh_walk():
    # The walk keeps the pairs of raw elements it has converted (series slices repeat them); over
    # every file pydicom ships, read after all the others, a file must give what it gives alone.
    paths = [p for p in _pydicom_test_files() if _read_quietly(p) is not None]
    alone = {}
    for path in paths:
        with values_kept_between_files():
            alone[path] = identifying_values(_read_quietly(path))
    with values_kept_between_files():
        for path in paths:
            identifying_values(_read_quietly(path))
        assert deid._MEMO, "the walk must keep what it converted inside the block"
        for path in reversed(paths):
            assert identifying_values(_read_quietly(path)) == alone[path], path.rsplit("/", 1)[-1]
    assert sum(bool(found) for found in alone.values()) > 30
    # Outside the block nothing is kept: a direct call leaves no identifying value behind.
    identifying_values(_read_quietly(paths[0]))
    assert deid._MEMO is None


def test_the_same_name_bytes_under_another_character_set_give_that_set_s_name(tmp_path):
    ds = _dataset_with_phi()
    ds.SpecificCharacterSet = "ISO_IR 100"  # Latin-1
    ds.PatientName = "M\u00fcller^Hannelore"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    latin = tmp_path / "latin.dcm"
    ds.save_as(latin, enforce_file_format=True)
    # The same bytes declared Cyrillic (ISO 8859-5): byte 0xFC is another letter there.
    cyrillic = tmp_path / "cyrillic.dcm"
    cyrillic.write_bytes(latin.read_bytes().replace(b"ISO_IR 100", b"ISO_IR 144"))
    with values_kept_between_files():  # the second file meets the first one's kept bytes
        names = [{v for v, a in identifying_values(pydicom.dcmread(f)) if a == "PatientName"} for f in (latin, cyrillic)]
    assert names == [{"M\u00fcller^Hannelore"}, {"M\u045cller^Hannelore"}]


@pytest.mark.parametrize("implicit", [True, False])
def test_values_read_lazily_from_a_file_equal_those_of_the_dataset_written(tmp_path, implicit):
    ds = _dataset_with_phi()
    # Not an identifying keyword: it identifies only inside an identifying sequence (its context).
    ds.RequestAttributesSequence[0].Manufacturer = "Quimby Westfield Radiology"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = tmp_path / "phi.dcm"
    ds.save_as(path, enforce_file_format=True)
    lazy = pydicom.dcmread(path)
    assert isinstance(lazy.get_item(0x00100010), pydicom.dataelem.RawDataElement)  # nothing converted yet
    found = identifying_values(lazy)
    assert ("Quimby Westfield Radiology", "Manufacturer") in found
    written = {pair for pair in identifying_values(ds) if not pair[1].startswith("MediaStorage")}
    assert {pair for pair in found if not pair[1].startswith("MediaStorage")} == written
