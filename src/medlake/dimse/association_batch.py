"""One ingest batch per DIMSE association (kind ``dimse``), like one per STOW-RS request.

:func:`open_association_batch` is the single place where the DIMSE gateway meets
:mod:`medlake.ingest.batches`: the batch row is created at the association's first
C-STORE (an association that only echoes or queries leaves no batch), every C-STORE
records its outcome in the transaction that stores the instance (through the
ledger handed to ``store_instances``), an abort mid-transfer records an error for
the instance that never arrived whole, and the end of the association closes the
batch with a reconciliation: C-STORE requests handled = files the batch counted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from medlake.ingest.archive import Archive
from medlake.ingest.batches import (
    BatchKind,
    BatchLedger,
    FileOutcome,
    FileRecord,
    create_batch,
    finish_batch,
    get_batch,
    record_files,
)
from medlake.ingest.events import BatchFinished
from medlake.ingest.validation import Finding, Severity

log = logging.getLogger(__name__)


@dataclass
class AssociationBatch:
    """The batch of one association; thread-safe (handlers of one association run in
    its own thread, but release and abort events may come from the DUL thread)."""

    archive: Archive
    partition: str
    source: str
    batch_id: str | None = None
    #: C-STORE requests whose outcome was (or should have been) recorded.
    requests: int = 0
    #: Requests whose outcome could not be recorded (the index was unreachable).
    unrecorded: int = 0
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ledger(self, sop_uid: str | None, message_id: int) -> BatchLedger | None:
        """The ledger for one C-STORE (creating the batch on first use); None when the
        batch row cannot be created (the store goes on, unrecorded, and is counted)."""
        with self._lock:
            self.requests += 1
            if self.batch_id is None:
                try:
                    with self.archive.engine.begin() as conn:
                        batch = create_batch(conn, BatchKind.DIMSE, self.partition, self.source)
                    self.batch_id = batch.id
                except SQLAlchemyError as exc:
                    log.error("cannot create the batch of %s: %s", self.source, exc)
                    self.unrecorded += 1
                    return None
        return BatchLedger(self.batch_id, sources=[_source(message_id, sop_uid)])

    def after_store(self, ledger: BatchLedger | None) -> None:
        """Note a C-STORE whose ledger was not written (``counts`` stays None)."""
        if ledger is None or ledger.counts is None:
            with self._lock:
                if ledger is not None:
                    self.unrecorded += 1

    def record_failure(
        self, message_id: int, sop_uid: str | None, size: int, rule: str, message: str
    ) -> None:
        """Record a C-STORE that ended without a stored file and never reached the store
        path (the peer aborted mid-transfer): one failed file, one ``ingest_errors`` row."""
        ledger = self.ledger(sop_uid, message_id)
        if ledger is None:
            return
        record = FileRecord(
            source=ledger.sources[0], outcome=FileOutcome.FAILED, size=size, sop_uid=sop_uid,
            findings=[Finding(rule, Severity.ERROR, message)],
        )  # fmt: skip
        try:
            with self.archive.engine.begin() as conn:
                record_files(conn, ledger, [record])
        except SQLAlchemyError as exc:
            log.error("cannot record %s in batch %s: %s", message, ledger.batch_id, exc)
            with self._lock:
                self.unrecorded += 1

    def close(self, ended: str) -> None:
        """Close the batch (if the association stored anything): reconciled, with how the
        association ``ended`` (``released``, ``aborted``, ``closed``) in its detail."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            batch_id = self.batch_id
        if batch_id is None:
            return
        try:
            with self.archive.engine.begin() as conn:
                counted = get_batch(conn, batch_id).seen
                differences = []
                if counted != self.requests:
                    differences.append(
                        f"{self.requests} C-STORE requests handled, {counted} recorded in the "
                        f"batch ({self.unrecorded} could not be recorded)"
                    )
                batch = finish_batch(
                    conn, batch_id, differences=differences,
                    extra={"association": ended, "c_store_requests": self.requests},
                )  # fmt: skip
        except SQLAlchemyError as exc:
            log.error("cannot close batch %s of %s: %s", batch_id, self.source, exc)
            return
        if self.archive.events.listening:
            self.archive.events.emit(
                BatchFinished(batch.id, batch.status, batch.verdict or "", differences)
            )


def _source(message_id: int, sop_uid: str | None) -> str:
    """How a C-STORE is named in ``ingest_errors`` (its last part names a kept-aside file)."""
    return f"C-STORE #{message_id}/{sop_uid or 'unknown-SOP-Instance'}.dcm"


def open_association_batch(archive: Archive, partition: str, source: str) -> AssociationBatch:
    """The batch of an association storing into ``partition``; ``source`` names the
    association (calling AE, peer address) in the batch row."""
    return AssociationBatch(archive, partition, source)


__all__ = ["AssociationBatch", "open_association_batch"]
