"""What counts as identifying in a DICOM header: DICOM PS3.15 Annex E, Basic Profile.

`IDENTIFYING_KEYWORDS` lists every attribute of Table E.1-1 (Basic Application Level
Confidentiality Profile) that pydicom's dictionary names; `identifying_values` collects the values
of those attributes (and of every person name, instance UID, date, AE title and private string)
found in a dataset. The manifest layer uses the values to alias file names and to scan what it
writes for PHI, so the collection errs on the side of too much, minus values so short or generic
that they would raise false alarms everywhere.

Nothing here logs or prints a value.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary
from pydicom.valuerep import PersonName

from medtl.vocabulary import generic_value, long_enough

# Table E.1-1 of DICOM PS3.15 (2025 edition), every row the Basic Profile acts on (D, Z, X, U, C
# and their combinations), by pydicom keyword. Rows pydicom 3.0 cannot name are in _NEWER_TAGS.
IDENTIFYING_KEYWORDS: frozenset[str] = frozenset(
    """
    AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate AcquisitionDateTime
    AcquisitionDeviceProcessingDescription AcquisitionFieldOfViewLabel AcquisitionProtocolDescription
    AcquisitionTime AcquisitionUID ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial
    AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime
    AffectedSOPInstanceUID Allergies AnnotationGroupDescription AnnotationGroupLabel AnnotationGroupUID
    ApprovalStatusDateTime Arbitrary AssertionDateTime AssertionExpirationDateTime
    AttributeModificationDateTime AuthorObserverSequence BarcodeValue BeamDescription
    BeamHoldTransitionDateTime BolusDescription BranchOfService CalibrationDate CalibrationDateTime
    CalibrationTime CameraOwnerName CassetteID CertificateOfSigner CertifiedTimestamp
    ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolEthicsCommitteeApprovalNumber
    ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialProtocolName
    ClinicalTrialSeriesDescription ClinicalTrialSeriesID ClinicalTrialSiteID ClinicalTrialSiteName
    ClinicalTrialSponsorName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID
    ClinicalTrialTimePointDescription ClinicalTrialTimePointID CommentsOnRadiationDose
    CommentsOnThePerformedProcedureStep CompensatorDescription ConcatenationUID
    ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConceptualVolumeUID
    ConfidentialityConstraintOnPatientDataDescription ConstituentConceptualVolumeUID
    ConsultingPhysicianIdentificationSequence ConsultingPhysicianName ContainerComponentID
    ContainerDescription ContainerIdentifier ContentCreatorIdentificationCodeSequence ContentCreatorName
    ContentDate ContentSequence ContentTime ContextGroupLocalVersion ContextGroupVersion
    ContrastBolusAgent ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime
    ContributionDescription CountryOfResidence CreationDate CreationTime CurrentObserverTrial
    CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding Date
    DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration
    DateOfLastDetectorCalibration DateOfManufacture DateOfSecondaryCapture DateTime
    DateTimeOfLastCalibration DecayCorrectionDateTime DecompositionDescription DerivationDescription
    DestinationAE DetectorID DeviceAlternateIdentifier DeviceDescription DeviceLabel DeviceSerialNumber
    DeviceSettingDescription DeviceUID DigitalSignatureDateTime DigitalSignatureUID
    DigitalSignaturesSequence DimensionOrganizationUID DischargeDate DischargeDiagnosisDescription
    DischargeTime DisplacementReferenceLabel DistributionAddress DistributionName
    DoseReferenceDescription DoseReferenceUID DosimetricObjectiveUID EffectiveDateTime
    EncapsulatedDocument EndAcquisitionDateTime EntityDescription EntityLabel EntityLongLabel EntityName
    EquipmentFrameOfReferenceDescription EthicsCommitteeApprovalEffectivenessEndDate
    EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup EthnicGroupCodeSequence
    ExclusionStartDateTime ExpectedCompletionDateTime FailedSOPInstanceUIDList FiducialUID
    FillerOrderNumberImagingServiceRequest FilterLookupTableDescription FindingsGroupRecordingDateTrial
    FindingsGroupRecordingTimeTrial FirstTreatmentDate FixationDeviceDescription FlowIdentifier
    FlowIdentifierSequence FractionGroupDescription FractionationNotes FrameAcquisitionDateTime
    FrameComments FrameOfReferenceUID FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse
    GantryID GeneratorID GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDateStamp GPSDestBearing
    GPSDestBearingRef GPSDestDistance GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef
    GPSDestLongitude GPSDestLongitudeRef GPSDifferential GPSDOP GPSImgDirection GPSImgDirectionRef
    GPSLatitude GPSLatitudeRef GPSLongitude GPSLongitudeRef GPSMapDatum GPSMeasureMode
    GPSProcessingMethod GPSSatellites GPSSpeed GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef
    GPSVersionID GraphicAnnotationSequence HangingProtocolCreationDateTime HL7DocumentEffectiveTime
    HumanPerformerName HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
    ImagePresentationComments ImagingServiceRequestComments ImpedanceMeasurementDateTime Impressions
    InformationIssueDateTime InstanceCoercionDateTime InstanceCreationDate InstanceCreationTime
    InstanceCreatorUID InstanceOriginStatus InstitutionAddress InstitutionCodeSequence InstitutionName
    InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InstructionPerformedDateTime
    InsurancePlanIdentification IntendedFractionStartTime IntendedPhaseEndDate IntendedPhaseStartDate
    IntendedRecipientsOfResultsIdentificationSequence InterlockDateTime InterlockDescription
    InterlockOriginDescription InterpretationApprovalDate InterpretationApprovalTime
    InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription
    InterpretationID InterpretationIDIssuer InterpretationRecordedDate InterpretationRecordedTime
    InterpretationRecorder InterpretationText InterpretationTranscriber InterpretationTranscriptionDate
    InterpretationTranscriptionTime InterventionDrugStartTime InterventionDrugStopTime
    IrradiationEventUID IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest
    IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfClinicalTrialProtocolID
    IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID IssuerOfClinicalTrialSubjectID
    IssuerOfClinicalTrialSubjectReadingID IssuerOfClinicalTrialTimePointID IssuerOfPatientID
    IssuerOfServiceEpisodeID IssuerOfServiceEpisodeIDSequence IssuerOfTheContainerIdentifierSequence
    IssuerOfTheSpecimenIdentifierSequence LabelText LargePaletteColorLookupTableUID LastMenstrualDate
    LensMake LensModel LensSerialNumber LensSpecification LongDeviceDescription MAC MakerNote
    ManufacturerDeviceClassUID ManufacturerDeviceIdentifier MediaStorageSOPInstanceUID MedicalAlerts
    MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDate
    ModifiedImageDescription ModifiedImageTime ModifyingDeviceID ModifyingSystem MostRecentTreatmentDate
    MultienergyAcquisitionDescription MultiplexGroupUID NameOfPhysiciansReadingStudy
    NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
    NonconformingModifiedAttributesSequence ObservationDateTime ObservationDateTrial
    ObservationStartDateTime ObservationSubjectUIDTrial ObservationTimeTrial ObservationUID Occupation
    OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber
    OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation OriginalAttributesSequence
    Originator OtherClinicalTrialProtocolIDsSequence OtherPatientIDs OtherPatientIDsSequence
    OtherPatientNames OverlayDate OverlayTime OverrideDateTime PaletteColorLookupTableUID
    ParticipantSequence ParticipationDateTime PatientAddress PatientAge PatientBirthDate
    PatientBirthName PatientBirthTime PatientComments PatientID PatientInstitutionResidence
    PatientInsurancePlanCodeSequence PatientMotherBirthName PatientName
    PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
    PatientReligiousPreference PatientSetupPhotoDescription PatientSetupUID PatientSex
    PatientSexNeutered PatientSize PatientState PatientTelecomInformation PatientTelephoneNumbers
    PatientTransportArrangements PatientTreatmentPreparationMethodDescription
    PatientTreatmentPreparationProcedureParameterDescription PatientWeight PerformedLocation
    PerformedProcedureStepDescription PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime
    PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate
    PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
    PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
    PersonIdentificationCodeSequence PersonName PersonTelecomInformation PersonTelephoneNumbers
    PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence PlacerOrderNumberImagingServiceRequest PlateID
    PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication
    PregnancyStatus PrescriptionDescription PrescriptionNotes PrescriptionNotesSequence
    PresentationCreationDate PresentationCreationTime PresentationDisplayCollectionUID
    PresentationSequenceCollectionUID PriorTreatmentDoseDescription ProcedureStepCancellationDateTime
    ProductExpirationDateTime ProtocolName PyramidDescription PyramidLabel PyramidUID
    RadiationDoseIdentificationLabel RadiationDoseInVivoMeasurementLabel
    RadiationGenerationModeDescription RadiationGenerationModeLabel RadiopharmaceuticalStartDateTime
    RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime
    ReasonForOmissionDescription ReasonForRequestedProcedureCodeSequence ReasonForStudy
    ReasonForSuperseding ReasonForTheAttributeModification ReasonForTheImagingServiceRequest
    ReasonForTheRequestedProcedure ReasonForVisit ReasonForVisitCodeSequence ReceivingAE
    RecordedRTControlPointDateTime ReferencedConceptualVolumeUID ReferencedDateTime
    ReferencedDigitalSignatureSequence ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID
    ReferencedFiducialsUID ReferencedFrameOfReferenceUID
    ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedImageSequence
    ReferencedObservationUIDTrial ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
    ReferencedPatientSequence ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence
    ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedStudySequence
    ReferencedTreatmentPositionGroupUID ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
    ReferringPhysicianName ReferringPhysicianTelephoneNumbers RegionOfResidence
    RelatedFrameOfReferenceUID RequestAttributesSequence RequestedContrastAgent
    RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
    RequestedProcedureLocation RequestedSOPInstanceUID RequestedSeriesDescription RequestingAE
    RequestingPhysician RequestingService RespiratoryMotionCompensationTechniqueDescription
    ResponsibleOrganization ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsID
    ResultsIDIssuer RetrieveAETitle ReviewDate ReviewTime ReviewerName ROICreatorSequence ROIDateTime
    ROIDescription ROIGenerationDescription ROIInterpreter ROIInterpreterSequence ROIName
    ROIObservationDateTime ROIObservationDescription ROIObservationLabel RTAccessoryDeviceSlotID
    RTAccessoryHolderSlotID RTPhysicianIntentNarrative RTPlanDate RTPlanDescription RTPlanLabel
    RTPlanName RTPlanTime RTPrescriptionLabel RTToleranceSetLabel RTTreatmentApproachLabel
    RTTreatmentPhaseUID SafePositionExitDate SafePositionExitTime SafePositionReturnDate
    SafePositionReturnTime ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate
    ScheduledDischargeTime ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
    ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID ScheduledProcedureStepLocation
    ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
    ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle
    ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
    ScheduledStudyLocation ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime
    ScheduledStudyStopDate ScheduledStudyStopTime SelectorAEValue SelectorASValue SelectorDAValue
    SelectorDTValue SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue
    SelectorSTValue SelectorTMValue SelectorUNValue SelectorURValue SelectorUTValue SeriesDate
    SeriesDescription SeriesInstanceUID SeriesTime ServiceEpisodeDescription ServiceEpisodeID
    SetupTechniqueDescription ShieldingDeviceDescription SlideIdentifier SmokingStatus
    SOPAuthorizationDateTime SOPInstanceUID SourceConceptualVolumeUID SourceEndDateTime
    SourceFrameOfReferenceUID SourceIdentifier SourceImageSequence SourceManufacturer
    SourceOfPreviousValues SourceSerialNumber SourceStartDateTime SourceStrengthReferenceDate
    SourceStrengthReferenceTime SpecialNeeds SpecimenAccessionNumber SpecimenDetailedDescription
    SpecimenIdentifier SpecimenPreparationSequence SpecimenShortDescription SpecimenUID
    StartAcquisitionDateTime StationAETitle StationName StorageMediaFileSetUID StructureSetDate
    StructureSetDescription StructureSetLabel StructureSetName StructureSetTime StudyArrivalDate
    StudyArrivalTime StudyComments StudyCompletionDate StudyCompletionTime StudyDate StudyDescription
    StudyID StudyIDIssuer StudyInstanceUID StudyReadDate StudyReadTime StudyTime StudyVerifiedDate
    StudyVerifiedTime SubstanceAdministrationDateTime SynchronizationFrameOfReferenceUID
    TableTopPositionAlignmentUID TargetUID TelephoneNumberTrial TemplateExtensionCreatorUID
    TemplateExtensionOrganizationUID TemplateLocalVersion TemplateVersion TextComments TextString Time
    TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration TimeOfLastDetectorCalibration
    TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
    TrackingUID TransactionUID TransducerIdentificationSequence TreatmentControlPointDate
    TreatmentControlPointTime TreatmentDate TreatmentMachineName TreatmentPositionGroupLabel
    TreatmentPositionGroupUID TreatmentSessionUID TreatmentSite TreatmentSites TreatmentTechniqueNotes
    TreatmentTime TreatmentToleranceViolationDateTime TreatmentToleranceViolationDescription UDISequence
    UID UniqueDeviceIdentifier UserContentLabel UserContentLongLabel VerbalSourceIdentifierCodeSequenceTrial
    VerbalSourceTrial VerificationDateTime VerifyingObserverIdentificationCodeSequence
    VerifyingObserverName VerifyingObserverSequence VerifyingOrganization VisitComments
    WaveformFilterDescription XRayDetectorID XRayDetectorLabel XRaySourceID
    """.split()
)

# Table E.1-1 rows added to the standard after pydicom 3.0's dictionary (gender identity, names to
# use, pronouns, diagnoses, ...): matched by tag because pydicom has no keyword for them.
_NEWER_TAGS: frozenset[int] = frozenset(
    int(t, 16)
    for t in """
    00100011 00100012 00100013 00100014 00100015 00100016 00100041 00100042 00100043 00100044
    00100045 00100046 00100047 00102162 00081301 00081302 00081303 00081304 0040A034 0040A035
    0040B034 0040B036 0040B03B 0040B03F
    """.split()
)

MIN_VALUE_LENGTH = 3
"""Values shorter than this ("M", "F", "1") would match almost anything, so they are not collected
(2 characters suffice in Chinese, Japanese and Korean: `medtl.vocabulary.long_enough`)."""

# Code-sequence plumbing inside identifying sequences: vocabulary of the standard, not of a person.
_CODE_KEYWORDS = frozenset(
    """CodeValue CodingSchemeDesignator CodingSchemeVersion CodeMeaning ContextIdentifier MappingResource
    ContextUID ValueType RelationshipType ContinuityOfContent LongCodeValue URNCodeValue""".split()
)
# Inside an identifying or private sequence, these VRs can carry names, IDs or free text; CS
# (enumerated codes such as "MONOCHROME2") and numbers cannot.
_CONTEXT_VRS = frozenset("AE DA DT LO LT PN SH ST UC UI UN UR UT".split())
# Wherever they appear, these identify: person names, dates, instance UIDs, AE titles.
_ALWAYS_VRS = frozenset("AE DA DT PN UI".split())
_SKIPPED_VRS = frozenset("OB OD OF OL OV OW DS IS FL FD SL SS UL US SV UV AT TM SQ".split())
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]+$")
# Standard UIDs (SOP classes, transfer syntaxes, context groups) use the DICOM root: never a patient's.
_DICOM_ROOT = "1.2.840.10008."
# Name the software that wrote the file, the same in every file it writes.
_SOFTWARE_KEYWORDS = frozenset(("ImplementationClassUID", "ImplementationVersionName"))


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's and highdicom's warnings and log records: they can quote header values (PHI).

    pydicom converts raw values lazily and warns about invalid ones with the value in the
    message, so every read, decode or value access of a dataset runs inside this.
    Usable as a decorator (`@quiet_pydicom()`).
    """
    # Disabling "pydicom" alone is not enough: its child loggers (pydicom.pixels.decoders.base
    # logs decoder failures with a traceback) still propagate through it to the root handlers.
    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom")]
    saved = [(logger.disabled, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.disabled, logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, (disabled, propagate) in zip(loggers, saved, strict=True):
            logger.disabled, logger.propagate = disabled, propagate


@quiet_pydicom()
def identifying_values(ds: Dataset) -> frozenset[tuple[str, str]]:
    """Collect every identifying value of a dataset with the attribute it came from.

    Collected, recursively through sequences and the file meta header: values of
    `IDENTIFYING_KEYWORDS`; names, IDs and free text inside an identifying sequence (for example
    `RequestAttributesSequence`, `ContentSequence`); every person name; every UID that is not a
    standard one; every date and date-time; every AE title; and the string values of private
    (odd-group) elements. Left out: numbers (weight, size, vendor numbers), times of day,
    enumerated codes, values shorter than `MIN_VALUE_LENGTH`, and values that are only generic
    words (`medtl.vocabulary.generic_value`: "ANONYMOUS", "TEST^PATIENT", "CHEST"): they identify
    no one and would make every scan of the outputs fire.

    Args:
        ds: A pydicom dataset (read with or without pixel data).

    Returns:
        (value, attribute) pairs: the value stripped of padding (multi-valued elements give one
        pair per value), the attribute as its keyword or "private tag (gggg,eeee)". The attribute
        lets a refusal name the field at fault without quoting the value.

    Example:
        >>> sorted(identifying_values(ds))  # doctest: +SKIP
        [('1.2.826.0.1.3680043.8.498.1', 'StudyInstanceUID'), ('DOE^JANE', 'PatientName'), ...]
    """
    found: set[tuple[str, str]] = set()
    meta = getattr(ds, "file_meta", None)
    for source in (meta, ds):
        if source is not None:
            found.update(_walk(source, inside_identifying=False, inside_private=False))
    return frozenset(found)


# Slices of one series repeat most header elements byte for byte (names, IDs, dates, study
# UIDs), and converting raw values is most of the walk's cost: the pairs of a raw element are
# kept by its bytes and everything its conversion depends on (VR, encoding, character set,
# context). pydicom has no such cache. Only inside `values_kept_between_files` (None outside it,
# so no identifying value outlives the discovery that read it); bounded.
_MEMO: dict[tuple, tuple[tuple[str, str], ...]] | None = None
_MEMO_LIMIT = 20_000


@contextlib.contextmanager
def values_kept_between_files() -> Iterator[None]:
    """Within the block, `identifying_values` reuses what it converted in earlier files; dropped after.

    Worker processes forked inside the block keep their own copy until they end.
    """
    global _MEMO
    _MEMO = {}
    try:
        yield
    finally:
        _MEMO = None


# Attributes naming or numbering a person, place, device or record: several common words there
# ("St Mary", "General Hospital") still name something; descriptions and comments are free text.
_NAME_ATTRIBUTE = re.compile(r"Name|Address|Institution|Station|Location|Residence|Telephone|Telecom|ID$|IDs|"
                             r"Identifier|Number|UID|Date|Time|Age$|Sex$|Birth|Issuer|Serial")


# Free text whatever else the keyword says (ProtocolName, InstitutionalDepartmentName, ...).
_TEXT_ATTRIBUTE = re.compile(r"Description|Comment|Protocol|Department|Label|Text|Reason|Notes|History|Impressions|"
                             r"Diagnos|Procedure|Meaning|Setup|Technique")


def attribute_kind(attribute: str) -> str:
    """How `medtl.vocabulary.generic_value` reads a value of this attribute: person, name or text.

    "person" for person names (VR PN), "name" for attributes that name or number something
    (InstitutionName, StationName, IDs, dates), "text" for descriptions, comments and private
    strings.
    """
    with contextlib.suppress(KeyError, ValueError):
        if dictionary_VR(attribute) == "PN":
            return "person"
    if attribute.startswith("private") or _TEXT_ATTRIBUTE.search(attribute):
        return "text"
    return "name" if _NAME_ATTRIBUTE.search(attribute) else "text"


def _walk(ds: Dataset, *, inside_identifying: bool, inside_private: bool) -> Iterator[tuple[str, str]]:
    """Yield (value, attribute) of every identifying element worth keeping, recursing into sequences."""
    charset: tuple | None = ()  # the dataset's character set, looked up once it is needed
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement):
            if not _may_identify(raw, inside_identifying or inside_private):
                continue  # pydicom converts values on access; most elements never need it
            memo = _MEMO
            if memo is not None and charset == ():
                charset = _charset(ds)
            key = _memo_key(raw, charset, inside_identifying, inside_private) if memo is not None and charset else None
            if key is not None:
                pairs = memo.get(key)
                if pairs is None:
                    if len(memo) >= _MEMO_LIMIT:
                        memo.clear()
                    pairs = memo[key] = tuple(_pairs(ds[tag], inside_identifying, inside_private))
                yield from pairs
                continue
        elem = ds[tag]
        if elem.VR == "SQ":
            listed, private = _is_listed(elem), inside_private or elem.tag.is_private
            for item in elem.value or ():
                yield from _walk(item, inside_identifying=inside_identifying or listed, inside_private=private)
            continue
        yield from _pairs(elem, inside_identifying, inside_private)


def _memo_key(raw: RawDataElement, charset: tuple, inside_identifying: bool, inside_private: bool) -> tuple | None:
    """What a raw element's pairs depend on, or None when its conversion depends on other elements.

    Private tags (their VR comes from the private creator), UN, ambiguous VRs ("US or SS") and
    sequences are walked as before, never kept.
    """
    if raw.tag.is_private or not isinstance(raw.value, bytes):
        return None  # a value not read yet (deferred) has no bytes to compare
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if vr in ("SQ", "UN") or " or " in vr:
        return None
    return (int(raw.tag), vr, raw.value, raw.is_little_endian, raw.is_implicit_VR, charset,
            inside_identifying, inside_private)


def _charset(ds: Dataset) -> tuple[str, ...] | None:
    """The encodings pydicom decodes the dataset's text with (its own or its parent's), None if unknown."""
    encodings = getattr(ds, "_character_set", None)  # pydicom's own lookup, inheritance included
    return tuple(encodings) if isinstance(encodings, list | tuple) and encodings else None


def _pairs(elem: DataElement, inside_identifying: bool, inside_private: bool) -> Iterator[tuple[str, str]]:
    """(value, attribute) of one element that is not a sequence, if it identifies and is worth keeping."""
    listed = _is_listed(elem)
    private = inside_private or elem.tag.is_private
    if elem.tag.is_private and 0x0010 <= elem.tag.element <= 0x00FF:
        return  # private creator: names the vendor's dictionary, not a person
    if elem.keyword in _SOFTWARE_KEYWORDS:
        return
    field = elem.keyword or f"private tag ({elem.tag.group:04X},{elem.tag.element:04X})"
    if listed or elem.VR in _ALWAYS_VRS or (
        (inside_identifying or private) and elem.VR in _CONTEXT_VRS and elem.keyword not in _CODE_KEYWORDS
    ):
        for vr, value in _element_values(elem, numbers_ok=not private):
            kind = "person" if vr == "PN" else attribute_kind(field)
            yield from ((text, field) for text in _texts(vr, value) if _worth_keeping(text, kind, vr))


def _may_identify(raw: RawDataElement, inside: bool) -> bool:
    """Whether `_walk` could yield a not yet converted element, judged from its tag and VR alone.

    True whenever unsure (private tags, VRs the dictionary leaves open, UN): those are converted
    and judged as before. `inside`: within an identifying or private sequence.
    """
    tag = raw.tag
    if tag.is_private or raw.VR == "UN":
        return True
    try:
        vr = raw.VR or dictionary_VR(tag)
        keyword = keyword_for_tag(tag)
    except KeyError:  # not in the dictionary: pydicom reads it as UN
        return True
    if " or " in vr or vr == "SQ":
        return True  # the dictionary leaves it open ("US or SS"); sequences (their items are walked)
    if _listed(keyword, tag):
        return True
    if vr in _SKIPPED_VRS or keyword in _SOFTWARE_KEYWORDS:
        return False
    return vr in _ALWAYS_VRS or (inside and vr in _CONTEXT_VRS and keyword not in _CODE_KEYWORDS)


def _is_listed(elem: DataElement) -> bool:
    return _listed(elem.keyword, elem.tag)


def _listed(keyword: str, tag: BaseTag) -> bool:
    if keyword in IDENTIFYING_KEYWORDS or int(tag) in _NEWER_TAGS:
        return True
    # Overlay comments live in the repeating groups 60xx (Table E.1-1 row "Overlay Comments").
    return 0x6000 <= tag.group <= 0x60FF and tag.element == 0x4000


def _element_values(elem: DataElement, *, numbers_ok: bool) -> Iterator[tuple[str, object]]:
    vr = str(elem.VR)
    if vr in _SKIPPED_VRS:
        return  # bulk data, numbers and times of day identify no one and match any number in outputs
    value = _decode_unknown(elem.value) if vr == "UN" else elem.value
    if value is None or value == "":
        return
    items = value if isinstance(value, list | tuple | MultiValue) else [value]
    for item in items:
        if item is None:
            continue
        text = str(item).strip()
        if vr == "UI" and (text in UID_dictionary or text.startswith(_DICOM_ROOT)):
            continue  # a standard UID: the same for everyone
        if not numbers_ok and _NUMBER.match(text):
            continue  # vendor numbers in private tags
        yield vr, item


def _decode_unknown(value: object) -> str | None:
    """Text of a UN element (private tags read without a dictionary), if it is printable ASCII."""
    if not isinstance(value, bytes | bytearray):
        return None
    text = bytes(value).rstrip(b"\x00 ").decode("ascii", errors="replace")
    return text if _PRINTABLE.match(text or "\x00") else None


def _texts(vr: str, value: object) -> Iterator[str]:
    """The stored text of one value; multi-valued text ("A\\B") gives each value."""
    if vr == "PN" or isinstance(value, PersonName):
        yield str(value).strip()
        return
    for text in str(value).split("\\"):
        text = text.strip().strip("\x00").strip()
        if text:
            yield text


def _worth_keeping(value: str, kind: str, vr: str) -> bool:
    # UIDs, dates and AE titles identify whatever words they hold; other values unless generic.
    if not long_enough(value) or (vr not in _ALWAYS_VRS - {"PN"} and generic_value(value, kind=kind)):
        return False
    # Zero dates and dummy values ("00000000", "0.0.0") and fragments such as "e+1" carry nothing.
    return bool(value.strip("0.-^ :+")) and long_enough("".join(c for c in value if c.isalnum()))
