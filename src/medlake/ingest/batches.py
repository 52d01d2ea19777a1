"""Batch records: every ingest run (a bulk import, a drop-zone burst, a STOW-RS request,
a DIMSE association) is a row of ``batches`` with its counts, timings and verdict, and
every rejected or warned file a row of ``ingest_errors``.

Counts and error rows are written by :func:`record_files` **in the transaction that
stores the files**, so after a crash they never disagree with the index: a file is
counted exactly when its outcome is committed.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, RowMapping, bindparam, func, insert, select, update

from medlake.errors import InvalidState, NotFound
from medlake.index.schema import batches, ingest_errors, work_queue
from medlake.index.writes import utcnow
from medlake.ingest.validation import Finding


class BatchKind(enum.StrEnum):
    """What produced a batch."""

    INGEST = "ingest"  # medlake ingest PATH_OR_URL
    WATCH = "watch"  # a burst of files in a drop zone
    STOW = "stow"  # one STOW-RS request
    DIMSE = "dimse"  # one DIMSE association


class BatchStatus(enum.StrEnum):
    """Where a batch is in its life."""

    RUNNING = "running"
    PAUSED = "paused"  # too many rejections; `medlake batch resume ID`
    COMPLETED = "completed"  # every file has an outcome and reconciliation balanced
    FAILED = "failed"  # reconciliation found a difference (listed in detail)


class FileOutcome(enum.StrEnum):
    """What one file of a batch came to."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same instance (same bytes) or clinical file was there
    REJECTED = "rejected"  # a rule or a conflict kept it out; the file is kept aside
    FAILED = "failed"  # the source, the lake or the index failed; retry may succeed


@dataclass(frozen=True)
class Batch:
    """One row of ``batches``."""

    id: str
    kind: str
    partition: str
    source: str
    status: str
    seen: int
    stored: int
    duplicates: int
    rejected: int
    bytes: int
    verdict: str | None
    detail: dict[str, Any]
    started_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def balanced(self) -> bool:
        """Whether the counts add up: seen = stored + duplicates + rejected."""
        return self.seen == self.stored + self.duplicates + self.rejected

    def to_json(self) -> dict[str, Any]:
        """The batch as JSON (HTTP and ``--json`` output)."""
        elapsed = ((self.finished_at or self.updated_at) - self.started_at).total_seconds()
        return {
            "id": self.id,
            "kind": self.kind,
            "partition": self.partition,
            "source": self.source,
            "status": self.status,
            "seen": self.seen,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "bytes": self.bytes,
            "verdict": self.verdict,
            "detail": self.detail,
            "startedAt": self.started_at.isoformat(),
            "updatedAt": self.updated_at.isoformat(),
            "finishedAt": self.finished_at.isoformat() if self.finished_at else None,
            "seconds": round(max(elapsed, 0.0), 3),
        }


@dataclass(frozen=True)
class IngestError:
    """One row of ``ingest_errors``: a file that was rejected or warned about, and why."""

    id: int
    batch_id: str
    source: str
    rule: str
    severity: str
    message: str
    sop_uid: str | None
    kept_at: str | None
    created_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        """The row as JSON."""
        return {
            "id": self.id,
            "batchId": self.batch_id,
            "source": self.source,
            "rule": self.rule,
            "severity": self.severity,
            "message": self.message,
            "sopInstanceUID": self.sop_uid,
            "keptAt": self.kept_at,
            "createdAt": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class FileRecord:
    """The outcome of one file, as :func:`record_files` writes it."""

    source: str
    outcome: FileOutcome
    size: int
    sop_uid: str | None = None
    #: Rejecting and warning findings (and failures, as findings of OUTCOME_RULES).
    findings: Sequence[Finding] = ()
    #: Where the rejected file was set aside.
    kept_at: str | None = None
    queue_id: int | None = None


@dataclass(frozen=True)
class NewBatch:
    """A batch created, counted and closed in the transaction of one store call
    (STOW-RS: one batch per request)."""

    id: str
    kind: BatchKind
    partition: str
    source: str
    started_at: dt.datetime


@dataclass(frozen=True)
class BatchCounts:
    """Counts and status of a batch right after a commit."""

    seen: int
    stored: int
    duplicates: int
    rejected: int
    status: str


@dataclass
class BatchLedger:
    """Where a store call records its files: the batch, each file's source name and,
    for queued work, the work-queue item of each file."""

    batch_id: str
    sources: Sequence[str]
    queue_ids: Sequence[int] | None = None
    new_batch: NewBatch | None = None
    #: Set by :func:`record_files` once the outcomes are written.
    counts: BatchCounts | None = field(default=None)


def new_batch_id() -> str:
    """A fresh batch id (a UUID)."""
    return str(uuid.uuid4())


def request_ledger(
    kind: BatchKind,
    partition: str,
    source: str,
    count: int,
    started_at: dt.datetime | None = None,
) -> BatchLedger:
    """A ledger for one request of ``count`` files that is its own batch (STOW-RS: one
    batch per request). Its files are named ``part 1`` … ``part N`` in error rows."""
    batch_id = new_batch_id()
    return BatchLedger(
        batch_id,
        sources=[f"part {i}" for i in range(1, count + 1)],
        new_batch=NewBatch(batch_id, kind, partition, source, started_at or utcnow()),
    )


def _batch(row: RowMapping) -> Batch:
    return Batch(
        id=row["id"],
        kind=row["kind"],
        partition=row["partition"],
        source=row["source"],
        status=row["status"],
        seen=row["seen"],
        stored=row["stored"],
        duplicates=row["duplicates"],
        rejected=row["rejected"],
        bytes=row["bytes"],
        verdict=row["verdict"],
        detail=orjson.loads(row["detail"]) if row["detail"] else {},
        started_at=_aware(row["started_at"]),
        updated_at=_aware(row["updated_at"]),
        finished_at=_aware(row["finished_at"]) if row["finished_at"] else None,
    )


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; medlake stores UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def create_batch(
    conn: Connection,
    kind: BatchKind,
    partition: str,
    source: str,
    detail: dict[str, Any] | None = None,
) -> Batch:
    """Insert a running batch and return it."""
    now = utcnow()
    batch_id = new_batch_id()
    conn.execute(
        insert(batches).values(
            id=batch_id, kind=kind.value, partition=partition, source=source,
            status=BatchStatus.RUNNING.value, seen=0, stored=0, duplicates=0, rejected=0,
            bytes=0, detail=orjson.dumps(detail or {}).decode(), started_at=now, updated_at=now,
        )
    )  # fmt: skip
    return get_batch(conn, batch_id)


def get_batch(conn: Connection, batch_id: str) -> Batch:
    """The batch ``batch_id``, or :class:`NotFound`."""
    row = conn.execute(select(batches).where(batches.c.id == batch_id)).mappings().first()
    if row is None:
        raise NotFound(f"batch {batch_id} does not exist")
    return _batch(row)


def find_open_batch(conn: Connection, kind: BatchKind, partition: str, source: str) -> Batch | None:
    """The newest running or paused batch of ``kind`` reading ``source`` into ``partition``."""
    row = (
        conn.execute(
            select(batches)
            .where(
                batches.c.kind == kind.value,
                batches.c.partition == partition,
                batches.c.source == source,
                batches.c.status.in_([BatchStatus.RUNNING.value, BatchStatus.PAUSED.value]),
            )
            .order_by(batches.c.started_at.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return _batch(row) if row is not None else None


def list_batches(
    conn: Connection,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Batch]:
    """Batches, newest first."""
    query = select(batches).order_by(batches.c.started_at.desc(), batches.c.id)
    if kind:
        query = query.where(batches.c.kind == kind)
    if status:
        query = query.where(batches.c.status == status)
    rows = conn.execute(query.limit(limit).offset(offset)).mappings()
    return [_batch(row) for row in rows]


def list_errors(
    conn: Connection, batch_id: str, *, limit: int = 100, offset: int = 0
) -> list[IngestError]:
    """The ``ingest_errors`` rows of a batch, in the order they were written."""
    rows = conn.execute(
        select(ingest_errors)
        .where(ingest_errors.c.batch_id == batch_id)
        .order_by(ingest_errors.c.id)
        .limit(limit)
        .offset(offset)
    ).mappings()
    return [
        IngestError(
            id=r["id"], batch_id=r["batch_id"], source=r["source"], rule=r["rule"],
            severity=r["severity"], message=r["message"], sop_uid=r["sop_uid"],
            kept_at=r["kept_at"], created_at=_aware(r["created_at"]),
        )
        for r in rows
    ]  # fmt: skip


def count_errors(conn: Connection, batch_id: str) -> dict[str, int]:
    """Error rows of a batch by severity."""
    rows = conn.execute(
        select(ingest_errors.c.severity, func.count())
        .where(ingest_errors.c.batch_id == batch_id)
        .group_by(ingest_errors.c.severity)
    ).all()
    return {severity: count for severity, count in rows}


# Built once: a C-STORE records its outcome with this statement in every transaction.
_ADD_TO_BATCH = (
    update(batches)
    .where(batches.c.id == bindparam("b_id"))
    .values(
        seen=batches.c.seen + bindparam("b_seen"),
        stored=batches.c.stored + bindparam("b_stored"),
        duplicates=batches.c.duplicates + bindparam("b_duplicates"),
        rejected=batches.c.rejected + bindparam("b_rejected"),
        bytes=batches.c.bytes + bindparam("b_bytes"),
        updated_at=bindparam("b_now"),
    )
    .returning(
        batches.c.seen, batches.c.stored, batches.c.duplicates, batches.c.rejected,
        batches.c.status,
    )
)  # fmt: skip


def record_files(conn: Connection, ledger: BatchLedger, records: Sequence[FileRecord]) -> None:
    """Write the outcomes of ``records`` into their batch, in the caller's transaction:
    the batch counts, one ``ingest_errors`` row per finding, and the work-queue items.

    A :class:`NewBatch` ledger inserts its batch here, already completed and balanced
    (its counts come from ``records`` and commit with the files they count).
    """
    now = utcnow()
    seen = len(records)
    stored = sum(r.outcome is FileOutcome.STORED for r in records)
    duplicates = sum(r.outcome is FileOutcome.DUPLICATE for r in records)
    rejected = seen - stored - duplicates
    size = sum(r.size for r in records)
    if ledger.new_batch is not None:
        new = ledger.new_batch
        conn.execute(
            insert(batches).values(
                id=new.id, kind=new.kind.value, partition=new.partition, source=new.source,
                status=BatchStatus.COMPLETED.value, seen=seen, stored=stored,
                duplicates=duplicates, rejected=rejected, bytes=size,
                verdict="balanced", detail="{}", started_at=new.started_at, updated_at=now,
                finished_at=now,
            )
        )  # fmt: skip
        ledger.counts = BatchCounts(seen, stored, duplicates, rejected, BatchStatus.COMPLETED)
    else:
        row = conn.execute(
            _ADD_TO_BATCH,
            {
                "b_id": ledger.batch_id, "b_seen": seen, "b_stored": stored,
                "b_duplicates": duplicates, "b_rejected": rejected, "b_bytes": size, "b_now": now,
            },
        ).one()  # fmt: skip
        ledger.counts = BatchCounts(*row)
    errors = [
        {
            "batch_id": ledger.batch_id,
            "source": r.source,
            "rule": finding.rule,
            "severity": finding.severity.value,
            "message": finding.message,
            "sop_uid": r.sop_uid,
            "kept_at": r.kept_at,
            "created_at": now,
        }
        for r in records
        for finding in r.findings
    ]
    if errors:
        conn.execute(insert(ingest_errors), errors)
    queued = [r for r in records if r.queue_id is not None]
    if queued:
        conn.execute(
            update(work_queue)
            .where(work_queue.c.id == bindparam("qid"))
            .values(
                status="done",
                outcome=bindparam("qoutcome"),
                sop_uid=bindparam("qsop"),
                finished_at=now,
            ),
            [{"qid": r.queue_id, "qoutcome": r.outcome.value, "qsop": r.sop_uid} for r in queued],
        )


def update_detail(conn: Connection, batch_id: str, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the batch's ``detail`` JSON; returns the new detail."""
    current = conn.execute(select(batches.c.detail).where(batches.c.id == batch_id)).scalar()
    detail = orjson.loads(current) if current else {}
    detail.update(changes)
    conn.execute(
        update(batches)
        .where(batches.c.id == batch_id)
        .values(detail=orjson.dumps(detail).decode(), updated_at=utcnow())
    )
    return dict(detail)


def pause_if_rejecting(
    conn: Connection, batch: Batch, counts: BatchCounts, rate: float, min_files: int
) -> str | None:
    """Pause ``batch`` when its rejection rate since it (re)started exceeds ``rate``.

    Returns the reason when it paused it (status running -> paused), else None.
    """
    window = batch.detail.get("window", {})
    seen = counts.seen - int(window.get("seen", 0))
    rejected = counts.rejected - int(window.get("rejected", 0))
    if seen < max(min_files, 1) or rejected / seen <= rate:
        return None
    reason = (
        f"{rejected} of the last {seen} files were rejected ({rejected / seen:.0%}, more than "
        f"ingest_pause_rejection_rate {rate:.0%}); fix the cause, then "
        f"`medlake batch resume {batch.id}`"
    )
    changed = conn.execute(
        update(batches)
        .where(batches.c.id == batch.id, batches.c.status == BatchStatus.RUNNING.value)
        .values(status=BatchStatus.PAUSED.value, updated_at=utcnow())
    ).rowcount
    if changed:
        update_detail(conn, batch.id, pause_reason=reason)
        return reason
    return None


def resume_batch(engine: Engine, batch_id: str, *, retry_failed: bool = False) -> Batch:
    """Set a paused (or interrupted running) batch running again.

    The rejection-rate window restarts at the current counts. With ``retry_failed``,
    files whose outcome was ``failed`` (source, lake or index failures) are queued
    again and taken out of the counts; their error rows stay, as history.
    """
    with engine.begin() as conn:
        batch = get_batch(conn, batch_id)
        if batch.status not in (BatchStatus.PAUSED, BatchStatus.RUNNING):
            raise InvalidState(f"batch {batch_id} is {batch.status}; only a paused or "
                               "interrupted batch can be resumed")  # fmt: skip
        if retry_failed:
            _requeue_failed(conn, batch_id)
            batch = get_batch(conn, batch_id)
        conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(status=BatchStatus.RUNNING.value, updated_at=utcnow())
        )
        update_detail(
            conn, batch_id, window={"seen": batch.seen, "rejected": batch.rejected},
            pause_reason=None,
        )  # fmt: skip
        return get_batch(conn, batch_id)


def _requeue_failed(conn: Connection, batch_id: str) -> None:
    failed = conn.execute(
        select(func.count(), func.coalesce(func.sum(work_queue.c.size), 0)).where(
            work_queue.c.batch_id == batch_id, work_queue.c.outcome == FileOutcome.FAILED.value
        )
    ).one()
    if not failed[0]:
        return
    conn.execute(
        update(work_queue)
        .where(work_queue.c.batch_id == batch_id, work_queue.c.outcome == FileOutcome.FAILED.value)
        .values(status="pending", outcome=None, claimed_by=None, claimed_at=None)
    )
    conn.execute(
        update(batches)
        .where(batches.c.id == batch_id)
        .values(
            seen=batches.c.seen - failed[0],
            rejected=batches.c.rejected - failed[0],
            bytes=batches.c.bytes - failed[1],
        )
    )


def finish_batch(
    conn: Connection, batch_id: str, *, differences: Sequence[str], extra: dict[str, Any]
) -> Batch:
    """Close a batch with its reconciliation: completed + balanced, or failed + mismatch."""
    now = utcnow()
    status = BatchStatus.FAILED if differences else BatchStatus.COMPLETED
    conn.execute(
        update(batches)
        .where(batches.c.id == batch_id)
        .values(
            status=status.value,
            verdict="mismatch" if differences else "balanced",
            finished_at=now,
            updated_at=now,
        )
    )
    update_detail(conn, batch_id, differences=list(differences), **extra)
    return get_batch(conn, batch_id)


__all__ = [
    "Batch",
    "BatchCounts",
    "BatchKind",
    "BatchLedger",
    "BatchStatus",
    "FileOutcome",
    "FileRecord",
    "IngestError",
    "NewBatch",
    "count_errors",
    "create_batch",
    "find_open_batch",
    "finish_batch",
    "get_batch",
    "list_batches",
    "list_errors",
    "new_batch_id",
    "pause_if_rejecting",
    "record_files",
    "request_ledger",
    "resume_batch",
    "update_detail",
]
