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

Who sent it: each message is matched to a registered sender (:mod:`.senders`), whose
partition it goes into. With authentication on, a message of no registered (or an
unauthorized) sender is answered AR and not stored, and every message is audited; the
audit records of a group are appended in the transaction of its rows, so a failed
audit write fails (AR) the messages too.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
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
from medlake.clinical.hl7.senders import (
    Hl7Sender,
    PeerIdentity,
    SenderDirectory,
    sender_principal,
)
from medlake.clinical.hl7.validation import validate
from medlake.security import Action, AuditRecord, PrincipalKind, authorize
from medlake.security.audit import (
    ACCESS_DENIED,
    AUDITED_ACTIONS,
    AUTHENTICATION_FAILED,
    Outcome,
    append_audits,
)

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

    def store(
        self, batch: Sequence[MessageRecord], audit: AuditBuilder | None = None
    ) -> list[Stored]:
        """Insert ``batch`` and the audit records ``audit`` makes of its stored rows, in
        one transaction (committed when this returns); raises what the write raised, so
        a failed audit write fails the messages too."""
        request = _Request(list(batch), audit)
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

    def _connect(self, *, single_insert: bool) -> Connection:
        """A connection for the group's writes: a single insert (one message, no audit
        records) runs in autocommit (durable when it returns, without the round trips of
        BEGIN and COMMIT), anything more in one transaction."""
        conn = self._engine.connect()
        if single_insert:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    def _write(self, taken: list[_Request]) -> None:
        batch = [record for request in taken for record in request.records]
        audited = any(request.audit is not None for request in taken)
        try:
            single = len(batch) == 1 and not audited
            with self._write_lock or nullcontext(), self._connect(single_insert=single) as conn:
                stored = records.insert_messages(conn, batch)
                start = 0
                for request in taken:
                    request.stored = stored[start : start + len(request.records)]
                    start += len(request.records)
                audits = [a for r in taken if r.audit is not None for a in r.audit(r.stored)]
                append_audits(conn, audits)
                conn.commit()
        except Exception as exc:  # every waiting sender must hear of it
            for request in taken:
                request.error = exc
                request.stored = []
                request.done = True
            return
        for request in taken:
            request.done = True


#: Makes the audit records of a group of messages once their rows are inserted.
AuditBuilder = Callable[[list[Stored]], list[AuditRecord]]


@dataclass
class _Request:
    records: list[MessageRecord]
    audit: AuditBuilder | None = None
    stored: list[Stored] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False


@dataclass
class _Prepared:
    record: MessageRecord | None  # None: refused (the sender may not send), not stored
    header: Header | None
    issues: list[Hl7Issue]
    answer: bool  # whether the sender waits for an ACK
    sender: Hl7Sender | None = None
    refusal: AuditRecord | None = None  # the audit record of a refused message


class Receiver:
    """Stores received messages and framing errors, and builds their ACKs.

    ``senders`` identifies each message's sender (its partition replaces ``partition``).
    With ``require_sender`` (authentication on) a message no registered sender matches,
    or whose sender the policy refuses, is answered AR and not stored, and every message
    is audited: an accepted one in the transaction of its row (a failed audit write
    fails the message), a refused one as a failed authentication or access.
    """

    def __init__(
        self,
        engine: Engine,
        partition: str,
        max_message_bytes: int,
        on_accepted: Callable[[], None] | None = None,
        write_lock: AbstractContextManager[Any] | None = None,
        *,
        senders: SenderDirectory | None = None,
        require_sender: bool = False,
    ) -> None:
        self.partition = partition
        self.max_message_bytes = max_message_bytes
        self.senders = senders
        self.require_sender = require_sender
        self._commit = GroupCommit(engine, write_lock)
        self._on_accepted = on_accepted
        self._last_activity = -1e9

    def idle_seconds(self) -> float:
        """Seconds since messages last arrived (the mapper yields while they do)."""
        return time.monotonic() - self._last_activity

    def handle(self, events: Sequence[MllpEvent], peer: PeerIdentity | None) -> bytes:
        """Store every event's row in one commit; return the framed ACKs to send back,
        in order (empty when none is due)."""
        now = dt.datetime.now(dt.UTC)
        self._last_activity = time.monotonic()
        label = peer.label if peer is not None else None
        prepared = [self._prepare(event, peer, now) for event in events]
        kept = [p for p in prepared if p.record is not None]
        audit = partial(self._audit_records, prepared, peer) if self.require_sender else None
        try:
            stored = self._commit.store([p.record for p in kept if p.record is not None], audit)
        except Exception as exc:
            log.exception("HL7 messages from %s could not be stored", label)
            return self._not_stored(prepared, exc)
        where_of = dict(zip(map(id, kept), stored, strict=True))
        acks = []
        accepted = False
        for item in prepared:
            where = where_of.get(id(item))
            if item.record is None or where is None:  # refused: not stored
                log.warning("HL7 message from %s refused: %s", label, item.issues[0].message)
                if item.answer:
                    acks.append(frame(build_ack(item.header, "AR", "", item.issues)))
                continue
            if item.record.status == records.RECEIVED and where.duplicate_of is None:
                accepted = True
            if item.record.status == records.REJECTED:
                # Codes and locations only: the error texts quote field values (PHI);
                # they are on the message's record.
                found = [f"{int(i.code)} {i.location}".strip() for i in item.issues]
                log.warning(
                    "HL7 message %d from %s rejected (%s): %s",
                    where.id, label, item.record.ack_code or "no ACK",
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

    def _audit_records(
        self, prepared: list[_Prepared], peer: PeerIdentity | None, stored: list[Stored]
    ) -> list[AuditRecord]:
        """The audit records of a group: one per stored row (who sent which message into
        which partition, and how it was answered) and one per refused message."""
        out: list[AuditRecord] = []
        rows = iter(stored)
        for item in prepared:
            if item.record is None:
                if item.refusal is not None:
                    out.append(item.refusal)
                continue
            out.append(receipt_record(item.record, next(rows), item.sender, peer))
        return out

    def _prepare(self, event: MllpEvent, peer: PeerIdentity | None, now: dt.datetime) -> _Prepared:
        label = peer.label if peer is not None else None
        failure: Exception | None = None
        try:
            decoded = _decoded(event)
        except Exception as exc:  # a bug: the sender is then known by the network alone
            decoded, failure = None, exc
        header = decoded.header if decoded is not None else None
        try:
            sender, refusal = self._sender(event, header, peer)
        except Exception as exc:  # the senders could not be read: nothing is stored
            log.error("HL7 sender of a message from %s not checked: %s", label, exc)
            issue = Hl7Issue(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                f"the sender could not be checked ({type(exc).__name__}); send it again later",
                reject=True,
            )
            return _Prepared(None, header, [issue], _answered(event))
        if refusal is not None:
            return refusal
        partition = sender.partition if sender is not None else self.partition
        try:
            if failure is not None:
                raise failure
            if isinstance(event, Block):
                assert decoded is not None
                prepared = self._message(event.payload, decoded, partition, label, now)
            else:
                prepared = self._framing_error(event, decoded, partition, label, now)
        except Exception as exc:  # a bug must not lose the message: store it as failed
            log.error("HL7 message from %s could not be read: %s", label, type(exc).__name__)
            log.debug("HL7 message from %s: reading failed", label, exc_info=True)
            payload = event.payload if isinstance(event, Block) else getattr(event, "head", b"")
            issue = Hl7Issue(ErrorCode.APPLICATION_INTERNAL_ERROR, f"internal error: {exc}")
            record = self._record(payload, None, len(payload), now, partition, label, [issue], "AR")
            prepared = _Prepared(record, None, [issue], isinstance(event, Block))
        prepared.sender = sender
        return prepared

    def _sender(
        self, event: MllpEvent, header: Header | None, peer: PeerIdentity | None
    ) -> tuple[Hl7Sender | None, _Prepared | None]:
        """The event's registered sender, and with ``require_sender`` the refusal of an
        event from an unregistered or unauthorized one (None when it may be stored)."""
        sender = self.senders.identify(peer, header) if self.senders is not None else None
        if not self.require_sender:
            return sender, None
        if sender is None:
            reason = _unknown_sender(header, peer)
            event_type = AUTHENTICATION_FAILED
        else:
            decision = authorize(
                sender_principal(sender, peer), Action.HL7_RECEIVE, sender.partition
            )
            if decision.allowed:
                return sender, None
            reason, event_type = decision.reason, ACCESS_DENIED
        issue = Hl7Issue(
            ErrorCode.APPLICATION_INTERNAL_ERROR, f"sender not authorized: {reason}", reject=True
        )
        refusal = AuditRecord(
            event=event_type,
            operation=Action.HL7_RECEIVE.value,
            actor=sender.name if sender is not None else "(unregistered)",
            actor_kind=PrincipalKind.HL7_SENDER.value,
            actor_name=sender_principal(sender, peer).display_name if sender else None,
            source_address=peer.address if peer is not None else None,
            partition=sender.partition if sender is not None else None,
            request=_request_text(header),
            outcome=Outcome.MINOR_FAILURE,
            detail=reason,
        )
        return sender, _Prepared(None, header, [issue], _answered(event), sender, refusal)

    def _message(
        self,
        payload: bytes,
        decoded: DecodedMessage,
        partition: str,
        peer: str | None,
        now: dt.datetime,
    ) -> _Prepared:
        _parsed, issues = validate(decoded)
        ack_code = acknowledgment_code(issues)
        record = self._record(
            payload, decoded, len(payload), now, partition, peer, issues, ack_code
        )
        return _Prepared(record, decoded.header, issues, answer=True)

    def _framing_error(
        self,
        event: MllpEvent,
        decoded: DecodedMessage | None,
        partition: str,
        peer: str | None,
        now: dt.datetime,
    ) -> _Prepared:
        header = decoded.header if decoded is not None else None
        if isinstance(event, StrayBytes) and event.terminated:
            issue = Hl7Issue(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                "the message was sent without the MLLP start block (0x0B)",
            )
            payload = event.data.removesuffix(b"\x1c\r")
            record = self._record(payload, decoded, event.size, now, partition, peer, [issue], "AR")
            record.error_code = "MLLP-START"
            return _Prepared(record, header, [issue], answer=True)
        if isinstance(event, OversizedBlock):
            issue = Hl7Issue(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                f"the message is {event.size} bytes long, more than the "
                f"{self.max_message_bytes} accepted (mllp_max_message_bytes)",
            )
            record = self._record(
                event.head, decoded, event.size, now, partition, peer, [issue], "AR"
            )
            record.error_code = "MLLP-SIZE"
            return _Prepared(record, header, [issue], answer=True)
        if isinstance(event, StrayBytes):
            issue = Hl7Issue(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"{event.size} bytes outside an MLLP block (before a start block 0x0B, "
                "or left when the connection closed) were ignored",
            )
            record = self._record(event.data, None, event.size, now, partition, peer, [issue], None)
            record.error_code = "MLLP-STRAY"
            return _Prepared(record, None, [issue], answer=False)
        assert isinstance(event, UnterminatedBlock)
        issue = Hl7Issue(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            f"the message ({event.size} bytes) had no MLLP end block (0x1C 0x0D) when the "
            "connection closed or the next start block came",
        )
        record = self._record(event.head, decoded, event.size, now, partition, peer, [issue], None)
        record.error_code = "MLLP-END"
        return _Prepared(record, header, [issue], answer=False)

    def _record(
        self,
        payload: bytes,
        decoded: DecodedMessage | None,
        size: int,
        now: dt.datetime,
        partition: str,
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
            partition=partition,
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


def _answered(event: MllpEvent) -> bool:
    """Whether the sender of ``event`` waits for an ACK: it sent a whole message (an end
    block), even one without its start block or over the size limit."""
    if isinstance(event, StrayBytes):
        return event.terminated
    return isinstance(event, Block | OversizedBlock)


def _decoded(event: MllpEvent) -> DecodedMessage | None:
    """The event's message as far as it can be read (None: stray bytes, no message)."""
    if isinstance(event, Block):
        return decode_message(event.payload)
    if isinstance(event, StrayBytes):
        return decode_message(event.data.removesuffix(b"\x1c\r")) if event.terminated else None
    if isinstance(event, OversizedBlock | UnterminatedBlock):
        return decode_message(event.head)
    return None


def _request_text(header: Header | None) -> str:
    """``MLLP ADT^A01 MSH-10=123`` (what the audit record says was sent; no PHI)."""
    if header is None:
        return "MLLP (no MSH)"
    return f"MLLP {header.message_type or '?'} MSH-10={header.control_id or ''}"[:255]


def _unknown_sender(header: Header | None, peer: PeerIdentity | None) -> str:
    """Why no registered sender matched: what the message and connection said."""
    said = "no MSH" if header is None else f"MSH-3 {header.get(3)!r}, MSH-4 {header.get(4)!r}"
    where = peer.address if peer is not None else "an unknown address"
    certificate = (
        f"TLS client certificate {peer.tls_subject!r}"
        if peer is not None and peer.tls_subject
        else ("TLS without a client certificate" if peer is not None and peer.tls else "no TLS")
    )
    return (
        f"no registered HL7 sender matches {where} ({said}, {certificate}); "
        "register it with `medlake hl7 senders add`"
    )


def receipt_record(
    record: MessageRecord, where: Stored, sender: Hl7Sender | None, peer: PeerIdentity | None
) -> AuditRecord:
    """The audit record of a stored message: its sender, partition, type, MSH-10, row
    and answer (a Patient Record event, action C; minor failure when not accepted)."""
    accepted = record.ack_code == "AA"
    status = "duplicate" if where.duplicate_of is not None else record.status
    detail = f"hl7_messages {where.id}: {status}, ACK {record.ack_code or 'none'}"
    if where.duplicate_of is not None:
        detail += f" (duplicate of {where.duplicate_of})"
    if record.error_code:
        detail += f", error {record.error_code}"
    message_type = record.message_type or "?"
    return AuditRecord(
        event=AUDITED_ACTIONS[Action.HL7_RECEIVE],
        operation=Action.HL7_RECEIVE.value,
        actor=sender.name if sender is not None else "(unregistered)",
        actor_kind=PrincipalKind.HL7_SENDER.value,
        actor_name=sender_principal(sender, peer).display_name if sender else None,
        source_address=peer.address if peer is not None else None,
        partition=record.partition,
        request=f"MLLP {message_type} MSH-10={record.control_id or ''}"[:255],
        outcome=Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
        detail=detail,
    )
