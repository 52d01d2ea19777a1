"""The searchable DICOM attributes (PS3.18 Table 10.6.1-5) and their index columns.

One registry serves QIDO-RS and (later) C-FIND: the query builder looks up an
attribute here to learn its level, VR (which decides the matching rules) and
the column it is stored in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword


class Level(enum.StrEnum):
    """Query/retrieve level."""

    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True)
class Attribute:
    """A searchable attribute: DICOM keyword and tag, VR, level, index column."""

    keyword: str
    tag: int
    vr: str
    level: Level
    column: str
    #: Computed by the index (counts, modality list); returned but not stored per instance.
    computed: bool = False

    @property
    def tag_hex(self) -> str:
        """The tag as DICOM JSON writes it, e.g. ``0020000D``."""
        return f"{self.tag:08X}"


def _attr(keyword: str, level: Level, column: str, *, computed: bool = False) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, tag, dictionary_VR(tag), level, column, computed)


S, SE, IN = Level.STUDY, Level.SERIES, Level.INSTANCE

#: Every attribute with an index column, in the order QIDO returns them.
ATTRIBUTES: tuple[Attribute, ...] = (
    _attr("SpecificCharacterSet", S, "specific_character_set"),
    _attr("StudyDate", S, "study_date"),
    _attr("StudyTime", S, "study_time"),
    _attr("AccessionNumber", S, "accession_number"),
    _attr("ModalitiesInStudy", S, "modalities_in_study", computed=True),
    _attr("ReferringPhysicianName", S, "referring_physician_name"),
    _attr("TimezoneOffsetFromUTC", S, "timezone_offset_from_utc"),
    _attr("StudyDescription", S, "study_description"),
    _attr("PatientName", S, "patient_name"),
    _attr("PatientID", S, "patient_id"),
    _attr("IssuerOfPatientID", S, "issuer_of_patient_id"),
    _attr("PatientBirthDate", S, "patient_birth_date"),
    _attr("PatientSex", S, "patient_sex"),
    _attr("StudyInstanceUID", S, "study_uid"),
    _attr("StudyID", S, "study_id"),
    _attr("NumberOfStudyRelatedSeries", S, "num_series", computed=True),
    _attr("NumberOfStudyRelatedInstances", S, "num_instances", computed=True),
    _attr("Modality", SE, "modality"),
    _attr("SeriesDescription", SE, "series_description"),
    _attr("BodyPartExamined", SE, "body_part_examined"),
    _attr("SeriesInstanceUID", SE, "series_uid"),
    _attr("SeriesNumber", SE, "series_number"),
    _attr("PerformedProcedureStepStartDate", SE, "pps_start_date"),
    _attr("PerformedProcedureStepStartTime", SE, "pps_start_time"),
    _attr("NumberOfSeriesRelatedInstances", SE, "num_instances", computed=True),
    _attr("SOPClassUID", IN, "sop_class_uid"),
    _attr("SOPInstanceUID", IN, "sop_uid"),
    _attr("InstanceNumber", IN, "instance_number"),
    _attr("Rows", IN, "rows"),
    _attr("Columns", IN, "columns"),
    _attr("BitsAllocated", IN, "bits_allocated"),
    _attr("NumberOfFrames", IN, "number_of_frames"),
    _attr("AvailableTransferSyntaxUID", IN, "transfer_syntax_uid"),
)

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}
BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES}

#: Tags kept in each level's extra-attributes JSON (returned by includefield, not matched).
STUDY_MODULE_GROUPS = (0x0010,)
STUDY_EXTRA_TAGS = frozenset(
    tag_for_keyword(k) or 0
    for k in (
        "StudyDescription",
        "ProcedureCodeSequence",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "InstitutionName",
        "ReferencedStudySequence",
    )
)
SERIES_EXTRA_TAGS = frozenset(
    tag_for_keyword(k) or 0
    for k in (
        "Manufacturer",
        "ManufacturerModelName",
        "StationName",
        "InstitutionalDepartmentName",
        "ProtocolName",
        "Laterality",
        "PatientPosition",
        "FrameOfReferenceUID",
        "OperatorsName",
        "PerformedProcedureStepDescription",
        "RequestAttributesSequence",
        "SeriesDate",
        "SeriesTime",
    )
)


def lookup(name: str) -> tuple[int, str] | None:
    """(tag, keyword) of a DICOM attribute named by keyword or 8-digit hex tag."""
    if len(name) == 8:
        try:
            tag = int(name, 16)
        except ValueError:
            tag = None
        if tag is not None:
            return tag, keyword_for_tag(tag) or name.upper()
    tag = tag_for_keyword(name)
    if tag is None:
        return None
    return tag, name


def extra_level(tag: int) -> Level | None:
    """The level at which a non-column attribute is kept for includefield."""
    if tag >> 16 in STUDY_MODULE_GROUPS or tag in STUDY_EXTRA_TAGS:
        return Level.STUDY
    if tag in SERIES_EXTRA_TAGS:
        return Level.SERIES
    return None
