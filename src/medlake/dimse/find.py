"""C-FIND: a Query/Retrieve identifier turned into the QIDO query, and matches back
into identifiers (PS3.4 C.4.1).

The identifier's elements with a value are matching keys, the empty ones return
keys. Matching keys go through the same :class:`~medlake.index.qido.QidoQuery` and
the same matching rules as QIDO-RS (:func:`medlake.dicomweb.search.matching_key`,
:mod:`medlake.index.qido`); each match is built from the same DICOM JSON that QIDO-RS
returns (:func:`medlake.dicomweb.search.to_dicom_json`), then cut down to the
requested keys. PATIENT level is answered from the studies, grouped by patient.

Keys medlake cannot match on or return (sequences, attributes that are not indexed)
are left out of the answer, and the matches are then sent with status 0xFF01
("optional keys not supported") instead of 0xFF00, as PS3.4 C.4.1.1.4 provides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from medlake.dicom.attributes import BY_TAG, Level, extra_level
from medlake.dicomweb.search import (
    add_filter,
    matching_key,
    ready_extended_tags,
    to_dicom_json,
)
from medlake.dimse.contexts import STUDY_ROOT_MODELS
from medlake.errors import InvalidInput
from medlake.index.qido import MAX_LIMIT, ExtendedTag, QidoQuery, fetch_page, row_key
from medlake.ingest.archive import Archive

#: C-FIND statuses (PS3.4 C.4.1.1.4).
PENDING = 0xFF00
PENDING_UNSUPPORTED_KEYS = 0xFF01
CANCELLED = 0xFE00

#: Query/Retrieve levels and the QIDO level that answers each (PATIENT: studies, grouped).
LEVELS: dict[str, Level] = {
    "PATIENT": Level.STUDY,
    "STUDY": Level.STUDY,
    "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}
_RANK = {"PATIENT": 0, "STUDY": 1, "SERIES": 2, "IMAGE": 3}

_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005
_RETRIEVE_AE_TITLE = 0x00080054
_PATIENT_ID = 0x00100020
_ISSUER_OF_PATIENT_ID = 0x00100021
#: Attributes of the patient level (Patient Root, PS3.4 C.6.1.1.2): the patient's own.
_PATIENT_TAGS = frozenset(t for t in BY_TAG if t >> 16 == 0x0010)
_PATIENT_COUNTS = {
    0x00201200: "studies",  # NumberOfPatientRelatedStudies
    0x00201202: "series",  # NumberOfPatientRelatedSeries
    0x00201204: "instances",  # NumberOfPatientRelatedInstances
}
#: The unique key of each level, returned whether asked for or not.
_UNIQUE_KEYS = {
    "PATIENT": (_PATIENT_ID,),
    "STUDY": (0x0020000D,),
    "SERIES": (0x0020000D, 0x0020000E),
    "IMAGE": (0x0020000D, 0x0020000E, 0x00080018),
}


class InvalidIdentifier(InvalidInput):
    """The C-FIND / C-MOVE / C-GET identifier cannot be answered (bad level or key value)."""

    dicom_reason = 0xA900  # Identifier does not match SOP Class


@dataclass
class FindRequest:
    """A parsed C-FIND identifier."""

    level: str
    query: QidoQuery
    #: Tags asked for, in the identifier's order (matching and return keys).
    requested: list[int] = field(default_factory=list)
    #: Keywords of keys that cannot be matched or returned (answers carry 0xFF01).
    unsupported: list[str] = field(default_factory=list)
    #: The extended query tags that were ready when the query was parsed.
    extended: dict[int, ExtendedTag] = field(default_factory=dict)

    @property
    def status(self) -> int:
        """The Pending status of each match."""
        return PENDING_UNSUPPORTED_KEYS if self.unsupported else PENDING


def query_level(identifier: Dataset, model: str) -> str:
    """The identifier's QueryRetrieveLevel, checked against the information model."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise InvalidIdentifier(
            f"QueryRetrieveLevel {level or '(missing)'!r} is not one of "
            "PATIENT, STUDY, SERIES, IMAGE"
        )
    if level == "PATIENT" and model in STUDY_ROOT_MODELS:
        raise InvalidIdentifier("the Study Root information model has no PATIENT level")
    return level


def parse_identifier(
    identifier: Dataset, partition: str, model: str, extended: dict[int, ExtendedTag]
) -> FindRequest:
    """The QIDO query and requested keys of a C-FIND identifier."""
    level = query_level(identifier, model)
    query = QidoQuery(LEVELS[level], partition, limit=MAX_LIMIT)
    request = FindRequest(level, query, extended=extended)
    for element in identifier:
        tag = int(element.tag)
        if tag in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET) or tag >> 16 in (0, 2):
            continue
        request.requested.append(tag)
        value = _key_value(element)
        key = matching_key(tag, extended) if _at_level(tag, level, extended) else None
        if value and key is not None:
            add_filter(request.query, key, value)
        elif value or not _returnable(tag, level, extended):
            request.unsupported.append(element.keyword or f"{tag:08X}")
    return request


def _at_level(tag: int, level: str, extended: dict[int, ExtendedTag]) -> bool:
    """Whether a key on ``tag`` belongs to ``level`` or a level above it."""
    if level == "PATIENT":
        return tag in _PATIENT_TAGS
    attr = BY_TAG.get(tag)
    key_level = attr.level if attr is not None else getattr(extended.get(tag), "level", None)
    if key_level is None:
        return False
    return _RANK[_level_name(key_level)] <= _RANK[level]


def _level_name(level: Level) -> str:
    return {Level.STUDY: "STUDY", Level.SERIES: "SERIES", Level.INSTANCE: "IMAGE"}[level]


def _returnable(tag: int, level: str, extended: dict[int, ExtendedTag]) -> bool:
    """Whether medlake can return ``tag`` at ``level`` (with its value, or empty)."""
    if tag == _RETRIEVE_AE_TITLE or tag in _UNIQUE_KEYS[level]:
        return True
    if level == "PATIENT":
        return (
            tag in _PATIENT_TAGS
            or tag in _PATIENT_COUNTS
            or (tag >> 16 == 0x0010 and extra_level(tag) is Level.STUDY)
        )
    if tag == 0x00080056:  # InstanceAvailability
        return True
    attr = BY_TAG.get(tag)
    if attr is not None:
        return tag in _counts(level) if attr.computed else _at_level(tag, level, extended)
    kept = extra_level(tag)
    return kept is not None and _RANK[_level_name(kept)] <= _RANK[level]


def _counts(level: str) -> frozenset[int]:
    """Computed counts returned at ``level`` (QIDO returns the same)."""
    if level == "STUDY":
        return frozenset({0x00080061, 0x00201206, 0x00201208})
    if level == "SERIES":
        return frozenset({0x00201209})
    return frozenset()


def _key_value(element: DataElement) -> str:
    """A matching key's value as the string QIDO-RS would get in its URL."""
    if element.VR == "SQ":
        return "" if not element.value else "(sequence)"
    value = element.value
    if value is None or value == "" or value == b"":
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_scalar(v) for v in value)
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, PersonName):
        return str(value).strip()
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return str(value).strip()


def find(
    archive: Archive,
    identifier: Dataset,
    partition: str,
    model: str,
    *,
    retrieve_ae_title: str,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, Dataset | None]]:
    """The C-FIND answer: ``(Pending status, identifier)`` per match, or a Cancel status.

    Raises :class:`InvalidIdentifier` (0xA900) for an identifier that cannot be answered.
    """
    with archive.engine.connect() as conn:
        extended = ready_extended_tags(conn)
    request = parse_identifier(identifier, partition, model, extended)
    rows = _patients(archive, request) if request.level == "PATIENT" else _rows(archive, request)
    for row in rows:
        if cancelled():
            yield CANCELLED, None
            return
        yield request.status, _answer(row, request, partition, retrieve_ae_title)


def _rows(archive: Archive, request: FindRequest) -> Iterator[Any]:
    """Every matching row, one page (one short read) at a time."""
    query = request.query
    while True:
        try:
            with archive.engine.connect() as conn:
                page = fetch_page(conn, query)
        except InvalidInput as exc:
            raise InvalidIdentifier(exc.message) from exc
        yield from page
        if len(page) < query.limit:
            return
        query.offset += len(page)


def _patients(archive: Archive, request: FindRequest) -> Iterator[dict[str, Any]]:
    """PATIENT level: the matching studies grouped by (PatientID, IssuerOfPatientID);
    each group is answered from its first study, with the patient's counts."""
    groups: dict[tuple[Any, Any], dict[str, Any]] = {}
    for row in _rows(archive, request):
        key = (row[row_key(Level.STUDY, "patient_id")],
               row[row_key(Level.STUDY, "issuer_of_patient_id")])  # fmt: skip
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"row": row, "studies": 0, "series": 0, "instances": 0}
        group["studies"] += 1
        group["series"] += row[row_key(Level.STUDY, "num_series")] or 0
        group["instances"] += row[row_key(Level.STUDY, "num_instances")] or 0
    yield from groups.values()


def _answer(row: Any, request: FindRequest, partition: str, retrieve_ae_title: str) -> Dataset:
    """One match as an identifier: the requested keys medlake can return (empty when
    this match has no value), the unique keys of the level, QueryRetrieveLevel."""
    level = request.level
    if level == "PATIENT":
        group, row = row, row["row"]
    known = to_dicom_json(row, request.query.level, None, "", partition)
    if level == "PATIENT":
        for tag, name in _PATIENT_COUNTS.items():
            known[f"{tag:08X}"] = {"vr": "IS", "Value": [group[name]]}
    known[f"{_RETRIEVE_AE_TITLE:08X}"] = {"vr": "AE", "Value": [retrieve_ae_title]}
    answer: dict[str, Any] = {}
    for tag in (*_UNIQUE_KEYS[level], *request.requested):
        tag_hex = f"{tag:08X}"
        if tag_hex not in answer and _returnable(tag, level, request.extended):
            answer[tag_hex] = known.get(tag_hex) or {"vr": _vr(tag)}
    ds = Dataset.from_json(answer)
    ds.QueryRetrieveLevel = level
    if _needs_unicode(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _vr(tag: int) -> str:
    attr = BY_TAG.get(tag)
    if attr is not None:
        return attr.vr
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _needs_unicode(ds: Dataset) -> bool:
    for element in ds:
        value = element.value
        values = value if isinstance(value, MultiValue | list) else [value]
        for v in values:
            if isinstance(v, str | PersonName) and not str(v).isascii():
                return True
    return False


__all__ = [
    "CANCELLED",
    "LEVELS",
    "PENDING",
    "PENDING_UNSUPPORTED_KEYS",
    "FindRequest",
    "InvalidIdentifier",
    "find",
    "parse_identifier",
    "query_level",
]
