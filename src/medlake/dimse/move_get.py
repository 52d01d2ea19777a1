"""C-MOVE and C-GET as an SCP: the instances a retrieve identifier names, sent as stored.

The identifier's unique keys (PatientID, StudyInstanceUID, SeriesInstanceUID,
SOPInstanceUID, each a single value or a list) become an instance-level
:class:`~medlake.index.qido.QidoQuery`, so retrieve and C-FIND / QIDO-RS read the
index the same way. A retrieve counts as a read of each instance (last access time,
cool/cold tiers back to hot), as a WADO-RS retrieve does.

pynetdicom runs the sub-operations: these generators yield what its C-MOVE / C-GET
service classes expect (destination, number of sub-operations, then one pending
status with a data set per instance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import build_context, evt

from medlake.dicom.attributes import BY_KEYWORD, Level
from medlake.dicomweb.locate import StoredInstance, touch
from medlake.dimse._transport import set_tcp_nodelay
from medlake.dimse.ae_registry import CallingAeRules, find_ae
from medlake.dimse.contexts import VERIFICATION, sending_contexts
from medlake.dimse.find import InvalidIdentifier, query_level
from medlake.dimse.store import NOT_AUTHORISED, status
from medlake.errors import InvalidInput, MedlakeError
from medlake.index.qido import MAX_LIMIT, QidoQuery, fetch_page, row_key
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCELLED = 0xFE00
#: The unique key each level must name (PS3.4 C.4.2.2.1, hierarchical retrieve).
_LEVEL_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_KEY_ORDER = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def instances_to_retrieve(
    archive: Archive, identifier: Dataset, partition: str, model: str
) -> list[StoredInstance]:
    """The stored instances a C-MOVE / C-GET identifier names (and records their read)."""
    level = query_level(identifier, model)
    query = QidoQuery(Level.INSTANCE, partition, limit=MAX_LIMIT)
    for keyword in _KEY_ORDER[: _KEY_ORDER.index(_LEVEL_KEYS[level]) + 1]:
        value = identifier.get(keyword)
        text = "\\".join(str(v) for v in value) if _is_list(value) else str(value or "").strip()
        if not text and keyword == _LEVEL_KEYS[level]:
            raise InvalidIdentifier(f"a {level}-level retrieve needs {keyword} in the identifier")
        if text:
            query.filters.append((BY_KEYWORD[keyword], text))
    found: list[StoredInstance] = []
    try:
        with archive.engine.begin() as conn:
            while True:
                page = fetch_page(conn, query)
                found.extend(_stored(row) for row in page)
                if len(page) < query.limit:
                    break
                query.offset += len(page)
            if found:
                touch(conn, found, archive.blobs)
    except InvalidInput as exc:
        raise InvalidIdentifier(exc.message) from exc
    return found


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _stored(row: Any) -> StoredInstance:
    def col(name: str) -> Any:
        return row[row_key(Level.INSTANCE, name)]

    return StoredInstance(
        id=col("id"), study_uid=row[row_key(Level.STUDY, "study_uid")],
        series_uid=row[row_key(Level.SERIES, "series_uid")], sop_uid=col("sop_uid"),
        sop_class_uid=col("sop_class_uid"), transfer_syntax_uid=col("transfer_syntax_uid"),
        blob_key=col("blob_key"), size=col("size"), encapsulated=bool(col("encapsulated")),
        frames=col("frames"), number_of_frames=col("number_of_frames"), tier=col("tier"),
    )  # fmt: skip


def read_for_sending(archive: Archive, stored: StoredInstance) -> Dataset:
    """The stored instance as a data set pynetdicom can send (its File Meta says the
    transfer syntax). A file that cannot be read becomes a stub with only its UIDs, so
    the sub-operation fails and is reported with its SOP Instance UID."""
    try:
        with archive.blobs.open(stored.blob_key) as fh:
            return pydicom.dcmread(fh)
    except (OSError, MedlakeError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        log.error("cannot read %s (%s) to send it: %s", stored.sop_uid, stored.blob_key, exc)
        stub = Dataset()
        stub.SOPClassUID = stored.sop_class_uid or ""
        stub.SOPInstanceUID = stored.sop_uid
        return stub


def _sub_operations(
    archive: Archive, found: list[StoredInstance], cancelled: Callable[[], bool]
) -> Iterator[tuple[int, Dataset | None]]:
    for stored in found:
        if cancelled():
            yield CANCELLED, None
            return
        yield PENDING, read_for_sending(archive, stored)


def handle_move(archive: Archive, rules: CallingAeRules, event: Any) -> Iterator[Any]:
    """The EVT_C_MOVE handler: destination from the registered AEs (unknown: 0xA801),
    then one C-STORE sub-operation per instance over a new association to it."""
    destination = str(event.move_destination or "").strip()
    with archive.engine.connect() as conn:
        peer = find_ae(conn, destination)
    if peer is None:
        log.warning("C-MOVE from %s to unknown destination %r", rules.calling_ae, destination)
        yield None, None  # pynetdicom answers 0xA801 (move destination unknown)
        return
    failure: MedlakeError | None = None
    try:
        found = _checked_instances(archive, rules, event)
        contexts, _left = sending_contexts(
            (s.sop_class_uid or "", s.transfer_syntax_uid) for s in found
        )
    except MedlakeError as exc:
        # pynetdicom opens the sub-association before it takes a status, so a refusal
        # still connects to the destination (with a Verification context only).
        failure, found, contexts = exc, [], [build_context(VERIFICATION)]
    yield (
        peer.host,
        peer.port,
        {
            "contexts": contexts,
            "evt_handlers": [(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            "max_pdu": archive.settings.dimse_max_pdu,
        },
    )
    if failure is not None:
        yield 1  # one pseudo sub-operation, so that the failure status is sent
        yield _failure(failure), None
        return
    yield len(found)
    yield from _sub_operations(archive, found, lambda: bool(event.is_cancelled))


def handle_get(archive: Archive, rules: CallingAeRules, event: Any) -> Iterator[Any]:
    """The EVT_C_GET handler: one C-STORE sub-operation per instance, on the same
    association (the requestor must have offered storage contexts in the SCP role)."""
    try:
        found = _checked_instances(archive, rules, event)
    except MedlakeError as exc:
        yield 1
        yield _failure(exc), None
        return
    yield len(found)
    yield from _sub_operations(archive, found, lambda: bool(event.is_cancelled))


def _checked_instances(archive: Archive, rules: CallingAeRules, event: Any) -> list[StoredInstance]:
    if not rules.allow_query:
        raise _NotAuthorised(f"AE {rules.calling_ae} may not query or retrieve")
    model = str(event.request.AffectedSOPClassUID)
    return instances_to_retrieve(archive, event.identifier, rules.partition, model)


class _NotAuthorised(MedlakeError):
    dicom_reason = NOT_AUTHORISED


def _failure(exc: MedlakeError) -> Dataset:
    """Identifier problems are 0xA900, a refused AE 0x0124, anything else (the index
    could not be read) 0xA701, out of resources: unable to calculate the matches."""
    code = exc.dicom_reason if exc.dicom_reason in (0xA900, NOT_AUTHORISED) else 0xA701
    return status(code, exc.message)


__all__ = [
    "handle_get",
    "handle_move",
    "instances_to_retrieve",
    "read_for_sending",
]
