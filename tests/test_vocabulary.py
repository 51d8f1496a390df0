"""The one list of generic words (medtl.vocabulary), and that it covers every word medtl writes."""

from __future__ import annotations

import pytest

from medtl.vocabulary import common_word, generic_component, generic_value
from tests.words import output_vocabulary


def test_every_word_medtl_writes_is_a_common_word():
    # The PHI guard never treats medtl's own words as identifying. A new message with a word no
    # dictionary knows fails here: add the word to MEDTL_WORDS in medtl/vocabulary.py.
    missing = sorted(w for w in output_vocabulary() if not common_word(w))
    assert missing == []


@pytest.mark.parametrize("value", ["TEST", "PATIENT", "ANONYMOUS^PATIENT", "NAME^PATIENT^NAME", "TRAIN", "Test",
                                   "CHEST", "Axial", "root", "quarantined", "series of", "  ", "n/a"])
def test_placeholders_and_common_words_are_generic_values(value):
    assert generic_value(value)


@pytest.mark.parametrize(("value", "kind"), [
    ("DOE^JANE", "person"), ("GRAY^VAL", "person"), ("BROWN^ROSE", "person"), ("LI^XI", "person"),
    ("KOWALSKI", "text"), ("garcia", "text"), ("MRN0012345", "name"), ("General Hospital", "name"),
    ("St Mary", "name"), ("TEST^KOWALSKI", "person"), ("series of DOE^JANE", "text"), ("20240115", "name"),
    ("PAT-7731", "name"), ("TEST-001", "text"), ("scan 22.07.2019", "text"), ("Thorax nativ Kowalski", "text")])
def test_names_ids_and_dates_are_not_generic(value, kind):
    assert not generic_value(value, kind=kind)


@pytest.mark.parametrize("value", ["Routine Chest", "Lung 1.25mm", "CT CHEST W/O CONTRAST", "Emergency Radiology",
                                   "Annex E Basic Profile", "Structured Report", "follow-up"])
def test_descriptions_made_of_common_words_are_generic_text(value):
    assert generic_value(value, kind="text")


def test_class_names_are_generic_values_only_as_given():
    assert generic_value("Kikuchi disease", allowed=["kikuchi  DISEASE"])
    assert not generic_value("Kikuchi disease")


@pytest.mark.parametrize("component", ["train_00001.png", "IM-0001-0001.dcm", "sub-01_ses-02_T1w.nii.gz",
                                       "3fa85f64-5717-4562-b3fc-2c963f66afa6.png", "5f2b9c0e7a1d.png",
                                       "person1_bacteria_1.jpeg", "case_0012.nii.gz", "CT", "notes.txt"])
def test_technical_file_names_are_generic_components(component):
    assert generic_component(component)


@pytest.mark.parametrize("component", ["chest_john_smith.png", "JOSÉ_NÚÑEZ.png", "mueller, hans.png",
                                       "cxr 12-25-1957.png", "dob_1957-3-9_garcia.png", "25.12.1957.png",
                                       "maria.garcia@example.org.png", "smith^john.png", "scan_1234567.dcm",
                                       "1.2.840.113619.2.55.dcm", "js_cxr.png", "J.D", "J_D_0042.png",
                                       "E1234567", "abe19570722.png", "555-123-4567", "123-45-6789",
                                       "079 123 45 67.png", "2019,07,22", "2019_07", "M\udcfcller.dcm",
                                       "12-25.png", "cxr 25.12.png"])
def test_names_dates_ids_and_emails_are_not_generic_components(component):
    assert not generic_component(component)


def test_class_name_words_make_a_folder_generic():
    assert not generic_component("cardiomegaly")
    assert generic_component("cardiomegaly", allowed_words=["cardiomegaly"])


def test_two_characters_are_enough_for_a_chinese_japanese_or_korean_name():
    from medtl.data.needles import identifying_needles

    needles = identifying_needles([("山田^太郎", "", "person"), ("김^민수", "", "person")]).labels
    assert {"山田", "太郎", "민수"} <= set(needles)
    assert identifying_needles([("LI^XI", "", "person")]).labels.keys() >= {"li xi", "xi li"}


@pytest.mark.parametrize("component", ["x_3.5mm.png", "v1.2.png", "img_0001.png", "sub-01_ses-02_T1w.nii.gz"])
def test_decimals_and_versions_are_no_month_and_day(component):
    assert generic_component(component)


def test_did_you_mean_lists_equally_close_names_in_name_order():
    from medtl.errors import did_you_mean

    encoders = ["resnet18", "efficientnet_lite2", "efficientnet_lite0", "efficientnet_lite1"]
    assert did_you_mean("efficientnet_lite", encoders) == (
        "did you mean 'efficientnet_lite0' or 'efficientnet_lite1' or 'efficientnet_lite2'?")
    assert did_you_mean("efficientnet_lite1x", encoders).startswith("did you mean 'efficientnet_lite1'")
