"""The ``hl7_messages`` table: every message received, as received, with its outcome.

Rows are written by the listener (one short transaction per group of messages, before
their ACKs go out), updated by the mapper (received -> mapped / failed) and read by
``GET /hl7/messages`` and ``medlake hl7 ls``.

Duplicates: a message is a duplicate when an earlier message of the same partition
with the same sending application (MSH-3), sending facility (MSH-4) and message
control ID (MSH-10) was accepted (ACK ``AA``). MSH-10 is the sender's unique number of
the message (HL7 v2.5.1 section 2.14.9.10), so a second message carrying it is a
re-send after a lost ACK, whatever its MSH-7 says; it is stored (status ``duplicate``,
``duplicate_of`` the first) and acknowledged AA, and not mapped again. A re-send of a
message that was rejected is not a duplicate: the first one was never accepted.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, String, bindparam, case, func, insert, select, update

from medlake.clinical.hl7.message import codec_for
from medlake.errors import InvalidInput, NotFound
from medlake.index.schema import hl7_messages

T = hl7_messages.c

RECEIVED = "received"
MAPPED = "mapped"
FAILED = "failed"
REJECTED = "rejected"
DUPLICATE = "duplicate"
STATUSES = (RECEIVED, MAPPED, FAILED, REJECTED, DUPLICATE)


@dataclass
class MessageRecord:
    """A message (or framing error) about to be stored."""

    received_at: dt.datetime
    partition: str
    peer: str | None
    size: int
    raw_text: str | None
    raw_bytes: bytes | None
    status: str
    ack_code: str | None
    control_id: str | None = None
    message_type: str | None = None
    version: str | None = None
    sending_application: str | None = None
    sending_facility: str | None = None
    charset: str | None = None
    error_code: str | None = None
    error_text: str | None = None

    def values(self) -> dict[str, Any]:
        """Column values, each cut to its column's length."""
        return {
            "received_at": self.received_at,
            "partition": self.partition,
            "peer": _cut(self.peer, 64),
            "control_id": _cut(self.control_id, 199),
            "message_type": _cut(self.message_type, 16),
            "version": _cut(self.version, 16),
            "sending_application": _cut(self.sending_application, 255),
            "sending_facility": _cut(self.sending_facility, 255),
            "charset": _cut(self.charset, 32),
            "size": self.size,
            "raw_text": self.raw_text,
            "raw_bytes": self.raw_bytes,
            "status": self.status,
            "ack_code": self.ack_code,
            "error_code": _cut(self.error_code, 16),
            "error_text": self.error_text,
        }

    @property
    def duplicate_key(self) -> tuple[str, str | None, str | None, str] | None:
        """What makes two accepted messages the same message, or None (not accepted,
        or no MSH-10)."""
        if self.ack_code != "AA" or not self.control_id:
            return None
        return (
            self.partition,
            _cut(self.sending_application, 255),
            _cut(self.sending_facility, 255),
            _cut(self.control_id, 199) or "",
        )


def _cut(value: str | None, length: int) -> str | None:
    if value is None or value == "":
        return None
    return value[:length]


@dataclass(frozen=True)
class Stored:
    """Where a record went: its row id, and the first message it duplicates."""

    id: int
    duplicate_of: int | None


#: Columns a new row's values fill (``duplicate_of`` and ``status`` are decided apart).
_FILLED = [
    c.name
    for c in hl7_messages.c
    if c.name not in ("id", "duplicate_of", "status", "resource_refs", "mapped_at")
]
#: The first accepted message with the record's sender and MSH-10 (an empty MSH-3 /
#: MSH-4 is stored as NULL: IS NOT DISTINCT FROM lets NULL match NULL).
_ORIGINAL = (
    select(T.id)
    .where(
        T.control_id == bindparam("p_control_id"),
        T.sending_application.is_not_distinct_from(
            bindparam("p_sending_application", type_=String)
        ),
        T.sending_facility.is_not_distinct_from(bindparam("p_sending_facility", type_=String)),
        T.partition == bindparam("p_partition"),
        T.ack_code == "AA",
        T.duplicate_of.is_(None),
    )
    .order_by(T.id)
    .limit(1)
    .scalar_subquery()
)
#: Statements built once (the acknowledgement path runs one per message). An accepted
#: message finds its original in the same statement, so storing it is one round trip.
_INSERT = (
    insert(hl7_messages)
    .values({name: bindparam(f"p_{name}") for name in [*_FILLED, "status", "duplicate_of"]})
    .returning(T.id)
)
_INSERT_ACCEPTED = (
    insert(hl7_messages)
    .values(
        {
            **{name: bindparam(f"p_{name}") for name in _FILLED},
            "duplicate_of": _ORIGINAL,
            "status": case((_ORIGINAL.is_(None), bindparam("p_status")), else_=DUPLICATE),
        }
    )
    .returning(T.id, T.duplicate_of)
)


def insert_messages(conn: Connection, records: Sequence[MessageRecord]) -> list[Stored]:
    """Insert ``records`` in order (the caller commits, or runs in autocommit for a
    single record: each insert is one statement), marking duplicates."""
    first_of: dict[tuple[str, str | None, str | None, str], int] = {}
    out: list[Stored] = []
    for record in records:
        key = record.duplicate_key
        values = {f"p_{name}": value for name, value in record.values().items()}
        if key is not None and key in first_of:  # a re-send within the same commit
            values.update(p_status=DUPLICATE, p_duplicate_of=first_of[key])
            stored = Stored(conn.execute(_INSERT, values).scalar_one(), first_of[key])
        elif key is not None:
            row = conn.execute(_INSERT_ACCEPTED, values).one()
            stored = Stored(row.id, row.duplicate_of)
            if stored.duplicate_of is None:
                first_of[key] = stored.id
        else:
            values["p_duplicate_of"] = None
            stored = Stored(conn.execute(_INSERT, values).scalar_one(), None)
        out.append(stored)
    return out


@dataclass(frozen=True)
class MessageRow:
    """A stored message as the API and CLI show it."""

    id: int
    received_at: dt.datetime
    partition: str
    peer: str | None
    control_id: str | None
    message_type: str | None
    version: str | None
    sending_application: str | None
    sending_facility: str | None
    charset: str | None
    size: int
    status: str
    ack_code: str | None
    error_code: str | None
    error_text: str | None
    duplicate_of: int | None
    resources: list[str] = field(default_factory=list)
    mapped_at: dt.datetime | None = None
    raw_text: str | None = None
    raw_bytes: bytes | None = None

    def to_json(self, *, raw: bool = False) -> dict[str, Any]:
        """JSON of the row; ``raw`` adds the message itself (``raw`` text with segments
        separated by CR, or ``rawBase64`` when the bytes did not decode)."""
        out: dict[str, Any] = {
            "id": self.id,
            "receivedAt": self.received_at.isoformat(),
            "partition": self.partition,
            "peer": self.peer,
            "controlId": self.control_id,
            "messageType": self.message_type,
            "version": self.version,
            "sendingApplication": self.sending_application,
            "sendingFacility": self.sending_facility,
            "charset": self.charset,
            "size": self.size,
            "status": self.status,
            "ackCode": self.ack_code,
            "errorCode": self.error_code,
            "error": self.error_text,
            "duplicateOf": self.duplicate_of,
            "resources": self.resources,
            "mappedAt": self.mapped_at.isoformat() if self.mapped_at else None,
        }
        if raw:
            out["raw"] = self.raw_text
            out["rawBase64"] = (
                base64.b64encode(self.raw_bytes).decode("ascii") if self.raw_bytes else None
            )
        return out

    @property
    def payload(self) -> bytes:
        """The message bytes as far as they were kept (text re-encoded with its codec)."""
        if self.raw_bytes is not None:
            return self.raw_bytes
        return (self.raw_text or "").encode(codec_for(self.charset), "replace")


_SUMMARY = [c for c in hl7_messages.c if c.name not in ("raw_text", "raw_bytes")]


def _row(row: Any, *, raw: bool) -> MessageRow:
    refs = orjson.loads(row.resource_refs) if row.resource_refs else []
    received = row.received_at
    if received.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
        received = received.replace(tzinfo=dt.UTC)
    mapped = row.mapped_at
    if mapped is not None and mapped.tzinfo is None:
        mapped = mapped.replace(tzinfo=dt.UTC)
    return MessageRow(
        id=row.id,
        received_at=received,
        partition=row.partition,
        peer=row.peer,
        control_id=row.control_id,
        message_type=row.message_type,
        version=row.version,
        sending_application=row.sending_application,
        sending_facility=row.sending_facility,
        charset=row.charset,
        size=row.size,
        status=row.status,
        ack_code=row.ack_code,
        error_code=row.error_code,
        error_text=row.error_text,
        duplicate_of=row.duplicate_of,
        resources=refs,
        mapped_at=mapped,
        raw_text=row.raw_text if raw else None,
        raw_bytes=row.raw_bytes if raw else None,
    )


@dataclass(frozen=True)
class MessageQuery:
    """Filters of a message listing (all optional)."""

    message_type: str | None = None
    status: str | None = None
    control_id: str | None = None
    since: dt.datetime | None = None
    partition: str | None = None
    limit: int = 100
    offset: int = 0

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")


def list_messages(conn: Connection, query: MessageQuery) -> tuple[int, list[MessageRow]]:
    """Messages matching ``query``, newest first, and how many match in all."""
    conditions = []
    if query.message_type:
        conditions.append(T.message_type == query.message_type)
    if query.status:
        conditions.append(T.status == query.status)
    if query.control_id:
        conditions.append(T.control_id == query.control_id)
    if query.since:
        conditions.append(T.received_at >= query.since)
    if query.partition:
        conditions.append(T.partition == query.partition)
    total = conn.execute(select(func.count()).select_from(hl7_messages).where(*conditions)).scalar()
    rows = conn.execute(
        select(*_SUMMARY)
        .where(*conditions)
        .order_by(T.id.desc())
        .limit(query.limit)
        .offset(query.offset)
    ).all()
    return int(total or 0), [_row(r, raw=False) for r in rows]


def get_message(conn: Connection, message_id: int) -> MessageRow:
    """One stored message with its raw content; NotFound when there is none."""
    row = conn.execute(select(hl7_messages).where(T.id == message_id)).first()
    if row is None:
        raise NotFound(f"HL7 message {message_id} does not exist")
    return _row(row, raw=True)


def pending(conn: Connection, limit: int) -> list[MessageRow]:
    """Accepted messages not mapped yet, oldest first (the mapper's input)."""
    rows = conn.execute(
        select(hl7_messages).where(T.status == RECEIVED).order_by(T.id).limit(limit)
    ).all()
    return [_row(r, raw=True) for r in rows]


def mark_mapped(
    conn: Connection, message_id: int, resources: list[str], note: str | None = None
) -> None:
    """The message's resources are in the FHIR store."""
    conn.execute(
        update(hl7_messages)
        .where(T.id == message_id)
        .values(
            status=MAPPED,
            resource_refs=orjson.dumps(resources).decode(),
            mapped_at=dt.datetime.now(dt.UTC),
            error_text=note,
        )
    )


def mark_failed(conn: Connection, message_id: int, error: str) -> None:
    """The message could not be mapped (it stays stored, with why)."""
    conn.execute(
        update(hl7_messages)
        .where(T.id == message_id)
        .values(status=FAILED, error_text=error, mapped_at=dt.datetime.now(dt.UTC))
    )
