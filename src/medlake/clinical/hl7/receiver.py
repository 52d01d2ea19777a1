"""From MLLP events to stored rows and ACKs: the acknowledgement path.

For each message the receiver reads the MSH, validates the message (no FHIR work),
builds its row and, once the row is committed, its ACK. Rows of messages that arrive
together (pipelined on one connection, or on several connections at once) share one
transaction through :class:`GroupCommit`, so a burst costs one commit, not one each.
Mapping to FHIR happens later, from the stored rows (:mod:`.mapper`).

Framing errors are stored too (status ``rejected``, ``error_code`` ``MLLP-…``):
``MLLP-STRAY`` bytes outside a block, ``MLLP-START`` a message ended with the end
block but sent without the start block (answered AR, as its sender waits),
``MLLP-END`` a block cut off by the connection closing or a new start block, and
``MLLP-SIZE`` a block over ``mllp_max_message_bytes`` (its first 64 KiB kept,
answered AR).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from medlake.clinical.hl7 import records
from medlake.clinical.hl7.ack import build_ack
from medlake.clinical.hl7.errors import ErrorCode, Hl7Issue, acknowledgment_code
from medlake.clinical.hl7.framing import (
    Block,
    MllpEvent,
    OversizedBlock,
    StrayBytes,
    UnterminatedBlock,
    frame,
)
from medlake.clinical.hl7.message import DecodedMessage, Header, decode_message
from medlake.clinical.hl7.records import MessageRecord, Stored
from medlake.clinical.hl7.validation import validate

log = logging.getLogger(__name__)


class GroupCommit:
    """Leader/follower group commit of message rows.

    A thread that finds no commit running writes every queued request in one
    transaction (its own and those that arrived meanwhile) and wakes their threads;
    a thread that finds one running waits, and either finds its request done or leads
    the next commit. A lone connection never waits for anyone, and many connections
    share commits.
    """

    def __init__(
        self, engine: Engine, write_lock: AbstractContextManager[Any] | None = None
    ) -> None:
        self._engine = engine
        # SQLite has one writer: queue behind this process's other writers on their lock
        # rather than in SQLite's busy handler, which sleeps in steps of up to 100 ms.
        self._write_lock = write_lock if engine.dialect.name == "sqlite" else None
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._writing = False

    def store(self, batch: Sequence[MessageRecord]) -> list[Stored]:
        """Insert ``batch`` (committed when this returns); raises what the write raised."""
        request = _Request(list(batch))
        with self._cond:
            self._queue.append(request)
            while self._writing and not request.done:
                self._cond.wait()
            if not request.done:
                self._writing = True
                taken, self._queue = self._queue, []
            else:
                taken = []
        if taken:
            try:
                self._write(taken)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        return request.stored

    def _connect(self, count: int) -> Connection:
        """A connection for ``count`` inserts: one insert runs in autocommit (durable
        when it returns, without the round trips of BEGIN and COMMIT), several in one
        transaction."""
        conn = self._engine.connect()
        if count == 1:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    def _write(self, taken: list[_Request]) -> None:
        batch = [record for request in taken for record in request.records]
        try:
            with self._write_lock or nullcontext(), self._connect(len(batch)) as conn:
                stored = records.insert_messages(conn, batch)
                conn.commit()
        except Exception as exc:  # every waiting sender must hear of it
            for request in taken:
                request.error = exc
                request.done = True
            return
        start = 0
        for request in taken:
            request.stored = stored[start : start + len(request.records)]
            start += len(request.records)
            request.done = True


@dataclass
class _Request:
    records: list[MessageRecord]
    stored: list[Stored] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False


@dataclass
class _Prepared:
    record: MessageRecord
    header: Header | None
    issues: list[Hl7Issue]
    answer: bool  # whether the sender waits for an ACK


class Receiver:
    """Stores received messages and framing errors, and builds their ACKs."""

    def __init__(
        self,
        engine: Engine,
        partition: str,
        max_message_bytes: int,
        on_accepted: Callable[[], None] | None = None,
        write_lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.partition = partition
        self.max_message_bytes = max_message_bytes
        self._commit = GroupCommit(engine, write_lock)
        self._on_accepted = on_accepted
        self._last_activity = -1e9

    def idle_seconds(self) -> float:
        """Seconds since messages last arrived (the mapper yields while they do)."""
        return time.monotonic() - self._last_activity

    def handle(self, events: Sequence[MllpEvent], peer: str | None) -> bytes:
        """Store every event's row in one commit; return the framed ACKs to send back,
        in order (empty when none is due)."""
        now = dt.datetime.now(dt.UTC)
        self._last_activity = time.monotonic()
        prepared = [self._prepare(event, peer, now) for event in events]
        try:
            stored = self._commit.store([p.record for p in prepared])
        except Exception as exc:
            log.exception("HL7 messages from %s could not be stored", peer)
            return self._not_stored(prepared, exc)
        acks = []
        accepted = False
        for item, where in zip(prepared, stored, strict=True):
            if item.record.status == records.RECEIVED and where.duplicate_of is None:
                accepted = True
            if item.record.status == records.REJECTED:
                # Codes and locations only: the error texts quote field values (PHI);
                # they are on the message's record.
                found = [f"{int(i.code)} {i.location}".strip() for i in item.issues]
                log.warning(
                    "HL7 message %d from %s rejected (%s): %s",
                    where.id, peer, item.record.ack_code or "no ACK",
                    ", ".join(found) or item.record.error_code,
                )  # fmt: skip
            if item.answer:
                ack_code = item.record.ack_code or "AR"
                acks.append(frame(build_ack(item.header, ack_code, f"ACK{where.id}", item.issues)))
        if accepted and self._on_accepted is not None:
            self._on_accepted()
        return b"".join(acks)

    def _not_stored(self, prepared: list[_Prepared], exc: Exception) -> bytes:
        """AR for each message that waits for an ACK: nothing was stored, send it again."""
        issue = Hl7Issue(
            ErrorCode.APPLICATION_INTERNAL_ERROR,
            f"the message could not be stored ({type(exc).__name__}); send it again later",
        )
        return b"".join(frame(build_ack(p.header, "AR", "", [issue])) for p in prepared if p.answer)

    def _prepare(self, event: MllpEvent, peer: str | None, now: dt.datetime) -> _Prepared:
        try:
            if isinstance(event, Block):
                return self._message(event.payload, peer, now)
            return self._framing_error(event, peer, now)
        except Exception as exc:  # a bug must not lose the message: store it as failed
            log.error("HL7 message from %s could not be read: %s", peer, type(exc).__name__)
            log.debug("HL7 message from %s: reading failed", peer, exc_info=True)
            payload = event.payload if isinstance(event, Block) else getattr(event, "head", b"")
            issue = Hl7Issue(ErrorCode.APPLICATION_INTERNAL_ERROR, f"internal error: {exc}")
            record = self._record(payload, None, len(payload), now, peer, [issue], "AR")
            return _Prepared(record, None, [issue], isinstance(event, Block))

    def _message(self, payload: bytes, peer: str | None, now: dt.datetime) -> _Prepared:
        decoded = decode_message(payload)
        _parsed, issues = validate(decoded)
        ack_code = acknowledgment_code(issues)
        record = self._record(payload, decoded, len(payload), now, peer, issues, ack_code)
        return _Prepared(record, decoded.header, issues, answer=True)

    def _framing_error(self, event: MllpEvent, peer: str | None, now: dt.datetime) -> _Prepared:
        if isinstance(event, StrayBytes) and event.terminated:
            payload = event.data.removesuffix(b"\x1c\r")
            decoded = decode_message(payload)
            issue = Hl7Issue(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                "the message was sent without the MLLP start block (0x0B)",
            )
            record = self._record(payload, decoded, event.size, now, peer, [issue], "AR")
            record.error_code = "MLLP-START"
            return _Prepared(record, decoded.header, [issue], answer=True)
        if isinstance(event, OversizedBlock):
            decoded = decode_message(event.head)
            issue = Hl7Issue(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                f"the message is {event.size} bytes long, more than the "
                f"{self.max_message_bytes} accepted (mllp_max_message_bytes)",
            )
            record = self._record(event.head, decoded, event.size, now, peer, [issue], "AR")
            record.error_code = "MLLP-SIZE"
            return _Prepared(record, decoded.header, [issue], answer=True)
        if isinstance(event, StrayBytes):
            issue = Hl7Issue(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"{event.size} bytes outside an MLLP block (before a start block 0x0B, "
                "or left when the connection closed) were ignored",
            )
            record = self._record(event.data, None, event.size, now, peer, [issue], None)
            record.error_code = "MLLP-STRAY"
            return _Prepared(record, None, [issue], answer=False)
        assert isinstance(event, UnterminatedBlock)
        decoded = decode_message(event.head)
        issue = Hl7Issue(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            f"the message ({event.size} bytes) had no MLLP end block (0x1C 0x0D) when the "
            "connection closed or the next start block came",
        )
        record = self._record(event.head, decoded, event.size, now, peer, [issue], None)
        record.error_code = "MLLP-END"
        return _Prepared(record, decoded.header, [issue], answer=False)

    def _record(
        self,
        payload: bytes,
        decoded: DecodedMessage | None,
        size: int,
        now: dt.datetime,
        peer: str | None,
        issues: list[Hl7Issue],
        ack_code: str | None,
    ) -> MessageRecord:
        header = decoded.header if decoded is not None else None
        text = decoded.text if decoded is not None and decoded.exact else None
        if text is not None and "\x00" in text:  # PostgreSQL text cannot hold NUL
            text = None
        accepted = ack_code == "AA"
        return MessageRecord(
            received_at=now,
            partition=self.partition,
            peer=peer,
            size=size,
            raw_text=text,
            raw_bytes=None if text is not None else payload,
            status=records.RECEIVED if accepted else records.REJECTED,
            ack_code=ack_code,
            control_id=header.control_id if header else None,
            message_type=header.message_type if header else None,
            version=header.version if header else None,
            sending_application=header.get(3) if header else None,
            sending_facility=header.get(4) if header else None,
            charset=header.charset if header else None,
            error_code=str(int(issues[0].code)) if issues else None,
            error_text="\n".join(issue.describe() for issue in issues) or None,
        )
