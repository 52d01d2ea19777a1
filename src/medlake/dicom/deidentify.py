"""De-identification of DICOM headers: PS3.15 Annex E, Basic Application Level
Confidentiality Profile with the Clean Descriptors Option.

Pure functions over a :class:`pydicom.Dataset` (no index, no HTTP): the de-identified
views of the researcher role (``medlake.dicomweb.deidentified``) run every header they
serve, from QIDO-RS results to retrieved Part-10 files, through :func:`deidentify`.

What is done, in order, at every nesting level (items of sequences too):

1. The actions of Table E.1-1 for the attributes listed in :data:`PROFILE` (D dummy,
   Z zero length, X remove, K keep, C clean, U replace UID). Where the table offers a
   choice (X/Z, X/D, Z/D, X/Z/D) the zero-length value is used: the attribute stays
   present (type 2 in most IODs) and holds nothing. Two D actions are made stricter:
   Graphic Annotation Sequence is removed (its text objects can hold names) and Person
   Identification Code Sequence emptied.
2. Conservative rules for what the table does not list, so an attribute missing from
   :data:`PROFILE` cannot leak: private elements, curves (50xx) and overlays (60xx) are
   removed; every PN is emptied; every DA/DT/TM is removed; every UI that is not a
   UID registered by the standard (SOP Classes, transfer syntaxes, coding schemes) is
   replaced; every text element whose keyword names comments is removed.
3. Patient Identity Removed ``YES``, De-identification Method (and its Code Sequence:
   113100 Basic Profile, 113105 Clean Descriptors), Longitudinal Temporal Information
   Modified ``REMOVED`` (dates are removed, not shifted).

UIDs become ``2.25.{n}`` with ``n`` from an HMAC-SHA256 keyed by a per-lake secret over
the scope (partition) and the UID: the same study gets the same pseudonym on every call,
references between instances stay consistent, and nobody without the key can compute a
pseudonym from a UID they know. The Patient ID becomes a pseudonym made the same way
(the table's Z allows "a dummy value consistent with the VR"), so studies of one patient
stay grouped. :class:`Pseudonyms` remembers what it issued, so the caller can record the
way back (the views take pseudonyms in later requests).

Pixel data is never touched: burned-in annotation is out of scope (no Clean Pixel Data
Option).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import uuid
from collections.abc import Callable

from pydicom import DataElement, Dataset, Sequence
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue

__all__ = [
    "METHOD_CODES",
    "METHOD_DESCRIPTION",
    "PROFILE",
    "Action",
    "Pseudonyms",
    "deidentify",
]


class Action(enum.StrEnum):
    """The action codes of PS3.15 Table E.1-1."""

    DUMMY = "D"
    ZERO = "Z"
    REMOVE = "X"
    KEEP = "K"
    CLEAN = "C"
    UID = "U"


D, Z, X, K, C, U = (
    Action.DUMMY, Action.ZERO, Action.REMOVE, Action.KEEP, Action.CLEAN, Action.UID,
)  # fmt: skip

#: Table E.1-1, Basic Profile with the Clean Descriptors Option column applied, by keyword.
_TABLE: dict[str, Action] = {
    # patient
    "PatientName": Z, "PatientID": Z, "PatientBirthDate": Z, "PatientSex": Z,
    "PatientBirthTime": X, "OtherPatientIDs": X, "OtherPatientIDsSequence": X,
    "OtherPatientNames": X, "PatientBirthName": X, "PatientAge": X, "PatientSize": X,
    "PatientWeight": X, "PatientAddress": X, "PatientMotherBirthName": X,
    "PatientTelephoneNumbers": X, "PatientTelecomInformation": X, "MilitaryRank": X,
    "BranchOfService": X, "MedicalRecordLocator": X, "MedicalAlerts": X, "Allergies": X,
    "CountryOfResidence": X, "RegionOfResidence": X, "EthnicGroup": X, "Occupation": X,
    "SmokingStatus": X, "AdditionalPatientHistory": C, "PregnancyStatus": X,
    "LastMenstrualDate": X, "PatientReligiousPreference": X, "PatientComments": X,
    "IssuerOfPatientID": X, "IssuerOfPatientIDQualifiersSequence": X,
    "PatientInsurancePlanCodeSequence": X, "PatientPrimaryLanguageCodeSequence": X,
    "PatientPrimaryLanguageModifierCodeSequence": X, "InsurancePlanIdentification": X,
    "ResponsiblePerson": X, "ResponsibleOrganization": X, "PatientSexNeutered": Z,
    "PatientState": X, "PatientTransportArrangements": X, "ReferencedPatientSequence": X,
    "ReferencedPatientAliasSequence": X, "PatientInstitutionResidence": X,
    "SpecialNeeds": X, "CurrentPatientLocation": X,
    # visit / admission / service episode
    "AdmissionID": X, "IssuerOfAdmissionID": X, "AdmittingDate": X, "AdmittingTime": X,
    "AdmittingDiagnosesDescription": C, "AdmittingDiagnosesCodeSequence": X,
    "DischargeDiagnosisDescription": X, "ServiceEpisodeID": X, "ServiceEpisodeDescription": X,
    "IssuerOfServiceEpisodeID": X, "VisitComments": X,
    "ScheduledPatientInstitutionResidence": X,
    # study
    "StudyDate": Z, "StudyTime": Z, "AccessionNumber": Z, "StudyID": Z,
    "ReferringPhysicianName": Z, "ReferringPhysicianAddress": X,
    "ReferringPhysicianTelephoneNumbers": X, "ReferringPhysicianIdentificationSequence": X,
    "StudyDescription": C, "StudyComments": C, "StudyIDIssuer": X, "ReasonForStudy": C,
    "RequestingPhysician": X, "RequestingService": X, "RequestedContrastAgent": C,
    "NameOfPhysiciansReadingStudy": X, "PhysiciansReadingStudyIdentificationSequence": X,
    "PhysiciansOfRecord": X, "PhysiciansOfRecordIdentificationSequence": X,
    "ReferencedStudySequence": Z, "ProcedureCodeSequence": K,
    "TimezoneOffsetFromUTC": X, "ScheduledStudyLocation": X,
    "ScheduledStudyLocationAETitle": X,
    # series / equipment
    "SeriesDate": Z, "SeriesTime": Z, "SeriesDescription": C, "ProtocolName": C,
    "OperatorsName": Z, "OperatorIdentificationSequence": Z, "PerformingPhysicianName": X,
    "PerformingPhysicianIdentificationSequence": X, "InstitutionName": Z,
    "InstitutionAddress": X, "InstitutionCodeSequence": Z, "InstitutionalDepartmentName": X,
    "StationName": Z, "DeviceSerialNumber": Z, "DeviceUID": U, "DetectorID": Z,
    "GantryID": X, "GeneratorID": X, "CassetteID": X, "PlateID": X,
    "ReferencedPerformedProcedureStepSequence": Z,
    "PerformedProcedureStepDescription": C, "PerformedProcedureStepID": X,
    "PerformedProcedureStepStartDate": X, "PerformedProcedureStepStartTime": X,
    "PerformedProcedureStepEndDate": X, "PerformedProcedureStepEndTime": X,
    "PerformedLocation": X, "PerformedStationAETitle": X, "PerformedStationName": X,
    "PerformedStationNameCodeSequence": X, "PerformedStationGeographicLocationCodeSequence": X,
    "CommentsOnThePerformedProcedureStep": C, "RequestAttributesSequence": X,
    "RequestedProcedureDescription": C, "RequestedProcedureID": X,
    "RequestedProcedureComments": X, "RequestedProcedureLocation": X,
    "ReasonForTheImagingServiceRequest": X, "ImagingServiceRequestComments": X,
    "PlacerOrderNumberImagingServiceRequest": Z, "FillerOrderNumberImagingServiceRequest": Z,
    "OrderEnteredBy": X, "OrderEntererLocation": X, "OrderCallbackPhoneNumber": X,
    "NamesOfIntendedRecipientsOfResults": X,
    "IntendedRecipientsOfResultsIdentificationSequence": X,
    "ScheduledProcedureStepDescription": C, "ScheduledPerformingPhysicianName": X,
    "ScheduledStationName": X, "ScheduledStationAETitle": X, "ScheduledProcedureStepLocation": X,
    "PreMedication": X, "ActualHumanPerformersSequence": X, "HumanPerformerName": X,
    "HumanPerformerOrganization": X, "ScheduledHumanPerformersSequence": X,
    # instance / acquisition
    "ContentDate": Z, "ContentTime": Z, "AcquisitionDate": Z, "AcquisitionTime": Z,
    "AcquisitionDateTime": Z, "InstanceCreationDate": X, "InstanceCreationTime": X,
    "InstanceCreatorUID": U, "AcquisitionComments": C, "AcquisitionProtocolDescription": C,
    "AcquisitionDeviceProcessingDescription": C, "ContrastBolusAgent": C,
    "DerivationDescription": C, "ImageComments": C, "FrameComments": C,
    "ImagePresentationComments": X, "IdentifyingComments": X, "AcquisitionContextSequence": X,
    "IconImageSequence": X, "ReferencedImageSequence": K, "SourceImageSequence": K,
    "ContentCreatorName": Z, "ContentCreatorIdentificationCodeSequence": X,
    "ModifiedImageDescription": X, "ModifyingDeviceID": X, "ModifyingDeviceManufacturer": X,
    "DigitalSignaturesSequence": X, "DigitalSignatureUID": X, "MAC": X,
    "ModifiedAttributesSequence": X, "OriginalAttributesSequence": X,
    "ReferencedDigitalSignatureSequence": X, "ReferencedSOPInstanceMACSequence": X,
    "DataSetTrailingPadding": X, "TextString": X, "TextComments": X,
    # structured reports / observers
    "ContentSequence": X, "VerifyingObserverName": D, "VerifyingObserverSequence": D,
    "VerifyingObserverIdentificationCodeSequence": Z, "VerifyingOrganization": X,
    "PersonName": D, "PersonIdentificationCodeSequence": Z, "PersonAddress": X,
    "PersonTelephoneNumbers": X, "AuthorObserverSequence": X, "ParticipantSequence": X,
    "CustodialOrganizationSequence": X, "GraphicAnnotationSequence": X,
    # UIDs that identify instances (every other non-registered UI is replaced as well)
    "StudyInstanceUID": U, "SeriesInstanceUID": U, "SOPInstanceUID": U,
    "MediaStorageSOPInstanceUID": U, "ReferencedSOPInstanceUID": U,
    "FrameOfReferenceUID": U, "SynchronizationFrameOfReferenceUID": U,
    "ReferencedFrameOfReferenceUID": U, "RelatedFrameOfReferenceUID": U,
    "ConcatenationUID": U, "DimensionOrganizationUID": U, "IrradiationEventUID": U,
    "TransactionUID": U, "UID": U,
    # file meta: the sender's AE title names a place
    "SourceApplicationEntityTitle": X,
}  # fmt: skip

#: Table E.1-1 (as used here) by tag.
PROFILE: dict[int, Action] = {}
for _keyword, _action in _TABLE.items():
    _tag = tag_for_keyword(_keyword)
    assert _tag is not None, _keyword
    PROFILE[_tag] = _action

#: Written into every de-identified header (De-identification Method, 0012,0063).
METHOD_DESCRIPTION = "PS3.15 E.1 Basic Profile, Clean Descriptors Option (medlake)"
#: De-identification Method Code Sequence (CID 7050): Basic Profile, Clean Descriptors.
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113105", "Clean Descriptors Option"),
)

_DUMMY = {
    "PN": "ANONYMOUS", "LO": "ANONYMOUS", "SH": "ANONYMOUS", "CS": "ANONYMOUS",
    "LT": "ANONYMOUS", "ST": "ANONYMOUS", "UT": "ANONYMOUS", "AE": "ANONYMOUS",
    "DA": "19000101", "TM": "000000", "DT": "19000101000000",
}  # fmt: skip
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
#: Words of free text shorter than this are not treated as identifying (initials).
_MIN_CLEANED = 2


class Pseudonyms:
    """Deterministic pseudonyms keyed by a secret, within one scope (a partition).

    ``issued`` maps every pseudonym handed out to the value it replaced, for the caller
    to record (the views accept pseudonyms in later requests).
    """

    def __init__(self, key: bytes, scope: str) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key
        self._scope = scope
        self.issued: dict[str, tuple[str, str]] = {}

    def _digest(self, kind: str, value: str) -> bytes:
        message = f"{kind}\x00{self._scope}\x00{value}".encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """``2.25.{n}`` for a UID (``n``: 128 bits of the HMAC, as a version-4 UUID)."""
        value = value.strip("\x00 ")
        if not value:
            return value
        pseudonym = f"2.25.{uuid.UUID(bytes=self._digest('uid', value)[:16], version=4).int}"
        self.issued[pseudonym] = ("uid", value)
        return pseudonym

    def patient_id(self, value: str) -> str:
        """A Patient ID pseudonym (16 upper-case hex digits), empty for an empty ID."""
        value = value.strip()
        if not value:
            return ""
        pseudonym = self._digest("patient", value)[:8].hex().upper()
        self.issued[pseudonym] = ("patient", value)
        return pseudonym

    def resource_id(self, resource_type: str, value: str) -> str:
        """A FHIR logical id pseudonym (32 lower-case hex digits) of ``Type/id``."""
        pseudonym = self._digest("fhir", f"{resource_type}/{value}")[:16].hex()
        self.issued[pseudonym] = (f"fhir:{resource_type}", value)
        return pseudonym


def deidentify(dataset: Dataset, pseudonyms: Pseudonyms) -> Dataset:
    """De-identify ``dataset`` in place (and its file meta, when it has one); returns it."""
    secrets = _identifying_words(dataset)
    _apply(dataset, pseudonyms, secrets)
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        _apply(meta, pseudonyms, secrets)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD_DESCRIPTION
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    dataset.DeidentificationMethodCodeSequence = Sequence(codes)
    dataset.LongitudinalTemporalInformationModified = "REMOVED"
    return dataset


def _identifying_words(dataset: Dataset) -> list[str]:
    """Values a Clean action removes from descriptions: the patient's names and IDs."""
    words: set[str] = set()
    for keyword in ("PatientName", "OtherPatientNames", "PatientBirthName"):
        for value in _values(_element(dataset, keyword)):
            words.update(re.split(r"[\^=\s,]+", value))
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate"):
        words.update(_values(_element(dataset, keyword)))
    return sorted((w for w in words if len(w) >= _MIN_CLEANED), key=len, reverse=True)


def _element(dataset: Dataset, keyword: str) -> DataElement | None:
    tag = tag_for_keyword(keyword)
    return dataset[tag] if tag is not None and tag in dataset else None


def _values(element: DataElement | None) -> list[str]:
    if element is None or element.VR == "SQ":
        return []
    return [str(v).strip() for v in _as_list(element.value) if str(v).strip()]


def _as_list(value: object) -> list[object]:
    """The values of an element: none, one, or each of a multi-valued one."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _apply(dataset: Dataset, pseudonyms: Pseudonyms, secrets: list[str]) -> None:
    """The profile and the conservative rules at one nesting level (then recursively)."""
    for tag in list(dataset.keys()):
        element = dataset[tag]
        action = _action_of(element)
        if action is Action.REMOVE:
            del dataset[tag]
        elif action is Action.ZERO:
            element.value = _zero(element, pseudonyms)
        elif action is Action.DUMMY:
            if element.VR == "SQ":
                _recurse(element, pseudonyms, secrets)
            else:
                element.value = _DUMMY.get(element.VR, "ANONYMOUS" if element.VR else None)
        elif action is Action.UID:
            element.value = _map_values(element.value, pseudonyms.uid)
        elif action is Action.CLEAN:
            element.value = _map_values(element.value, lambda v: _clean(v, secrets))
        elif element.VR == "SQ":
            _recurse(element, pseudonyms, secrets)


def _recurse(element: DataElement, pseudonyms: Pseudonyms, secrets: list[str]) -> None:
    for item in element.value or []:
        _apply(item, pseudonyms, secrets)


def _action_of(element: DataElement) -> Action:
    """The table's action, else that of the conservative rules."""
    tag = int(element.tag)
    if element.tag.is_private or (tag >> 16) & 0xFF00 in (0x5000, 0x6000):
        return Action.REMOVE
    listed = PROFILE.get(tag)
    if listed is not None:
        return listed
    vr = element.VR
    if vr == "PN":
        return Action.ZERO
    if vr in _DATE_VRS:
        return Action.REMOVE
    if vr == "UI":
        registered = all(str(v) in UID_dictionary for v in _as_list(element.value))
        return Action.KEEP if registered else Action.UID
    if vr in _TEXT_VRS and "Comment" in (keyword_for_tag(tag) or ""):
        return Action.REMOVE
    return Action.KEEP


def _zero(element: DataElement, pseudonyms: Pseudonyms) -> object:
    if element.keyword == "PatientID":
        return pseudonyms.patient_id(str(element.value or ""))
    if element.VR == "SQ":
        return Sequence([])
    return None


def _map_values(value: object, function: Callable[[str], str]) -> object:
    """``function`` over each value of a (possibly multi-valued) string element."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        return [function(str(v)) for v in value]
    return function(str(value))


def _clean(text: str, secrets: list[str]) -> str:
    """``text`` without any of the header's identifying values (case-insensitive)."""
    for word in secrets:
        # whole words only: a short name must not cut letters out of other words
        pattern = rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])"
        text = re.sub(pattern, "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()
