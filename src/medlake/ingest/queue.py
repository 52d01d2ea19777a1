"""The durable work queue of a batch (``work_queue``): discovered files wait here until a
worker claims them; the outcome of each is written with the files it stored.

Claim semantics:

- A claim is one statement, ``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING``; on
  PostgreSQL the sub-select is ``FOR UPDATE SKIP LOCKED``, so workers on several
  machines claim disjoint items without waiting for each other. SQLite has one
  writer at a time, so the same statement is already exclusive there.
- A claim names its worker (``host:pid:nonce``) and its time. An item is finished
  (``done`` with its outcome) in the transaction that stores its file; until then it
  can be claimed again when its worker is gone: at once when the worker ran on this
  host and its process no longer exists (``kill -9``), else after
  ``ingest_claim_timeout`` seconds.
- Completing an item twice is harmless: the second store of the same bytes is a
  duplicate, and :func:`still_mine` lets a worker drop items that were re-claimed
  before it finished them.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from medlake.index.schema import work_queue
from medlake.index.writes import utcnow

_INSERT_CHUNK = 1000


@dataclass(frozen=True)
class WorkItem:
    """A claimed file: its queue id, its source name and (when discovery knew it) size."""

    id: int
    source: str
    size: int | None


@dataclass(frozen=True)
class Worker:
    """Identity of a claiming worker: ``host:pid:nonce`` (at most 64 characters)."""

    host: str
    pid: int
    nonce: str

    @classmethod
    def here(cls) -> Worker:
        """A fresh identity for a worker of this process."""
        return cls(socket.gethostname()[:40], os.getpid(), uuid.uuid4().hex[:12])

    @property
    def name(self) -> str:
        """The ``claimed_by`` value."""
        return f"{self.host}:{self.pid}:{self.nonce}"

    @classmethod
    def parse(cls, name: str) -> Worker | None:
        """The worker of a ``claimed_by`` value, or None when it is not one of ours."""
        parts = name.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])


def enqueue(conn: Connection, batch_id: str, items: Iterable[tuple[str, int | None]]) -> None:
    """Add ``(source, size)`` items as pending; sources already queued in the batch are
    skipped (so discovering again after a crash adds only what is new)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    rows = [
        {"batch_id": batch_id, "source": source, "size": size, "status": "pending", "attempts": 0}
        for source, size in items
    ]
    for start in range(0, len(rows), _INSERT_CHUNK):
        conn.execute(
            dialect.insert(work_queue).on_conflict_do_nothing(),
            rows[start : start + _INSERT_CHUNK],
        )


def claim(engine: Engine, batch_id: str, worker: Worker, limit: int) -> list[WorkItem]:
    """Claim up to ``limit`` pending items of the batch, oldest first, in one statement."""
    pending = (
        select(work_queue.c.id)
        .where(work_queue.c.batch_id == batch_id, work_queue.c.status == "pending")
        .order_by(work_queue.c.id)
        .limit(limit)
    )
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            pending = pending.with_for_update(skip_locked=True)
        rows = conn.execute(
            update(work_queue)
            .where(work_queue.c.id.in_(pending.scalar_subquery()))
            .values(
                status="claimed",
                claimed_by=worker.name,
                claimed_at=utcnow(),
                attempts=work_queue.c.attempts + 1,
            )
            .returning(work_queue.c.id, work_queue.c.source, work_queue.c.size)
        ).all()
    return sorted((WorkItem(r.id, r.source, r.size) for r in rows), key=lambda item: item.id)


def still_mine(conn: Connection, worker: Worker, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` are still claimed by ``worker`` (the others were re-claimed)."""
    mine: set[int] = set()
    for start in range(0, len(ids), 500):
        mine.update(
            conn.execute(
                select(work_queue.c.id).where(
                    work_queue.c.id.in_(ids[start : start + 500]),
                    work_queue.c.status == "claimed",
                    work_queue.c.claimed_by == worker.name,
                )
            ).scalars()
        )
    return mine


def release(engine: Engine, worker: Worker, ids: Sequence[int]) -> None:
    """Put items this worker claimed but will not finish back to pending."""
    if not ids:
        return
    with engine.begin() as conn:
        conn.execute(
            update(work_queue)
            .where(work_queue.c.id.in_(list(ids)), work_queue.c.claimed_by == worker.name,
                   work_queue.c.status == "claimed")
            .values(status="pending", claimed_by=None, claimed_at=None)
        )  # fmt: skip


def release_abandoned(engine: Engine, batch_id: str, timeout_seconds: float) -> list[Worker]:
    """Put back to pending the items claimed by workers that are gone: processes of this
    host that no longer exist, and claims older than ``timeout_seconds``.

    Returns the workers whose claims were released (their staging folders can go).
    """
    here = socket.gethostname()[:40]
    cutoff = utcnow() - dt.timedelta(seconds=timeout_seconds)
    with engine.begin() as conn:
        claimers = conn.execute(
            select(work_queue.c.claimed_by, func.min(work_queue.c.claimed_at))
            .where(work_queue.c.batch_id == batch_id, work_queue.c.status == "claimed")
            .group_by(work_queue.c.claimed_by)
        ).all()
        gone: list[Worker] = []
        names: list[str] = []
        for name, _oldest in claimers:
            worker = Worker.parse(name or "")
            if worker is not None and worker.host == here and not _alive(worker.pid):
                gone.append(worker)
                names.append(name)
        conditions = [work_queue.c.claimed_at < cutoff]
        if names:
            conditions.append(work_queue.c.claimed_by.in_(names))
        conn.execute(
            update(work_queue)
            .where(
                and_(work_queue.c.batch_id == batch_id, work_queue.c.status == "claimed"),
                or_(*conditions),
            )
            .values(status="pending", claimed_by=None, claimed_at=None)
        )
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def status_counts(conn: Connection, batch_id: str) -> dict[str, int]:
    """Items of the batch by status (``pending``, ``claimed``, ``done``)."""
    rows = conn.execute(
        select(work_queue.c.status, func.count())
        .where(work_queue.c.batch_id == batch_id)
        .group_by(work_queue.c.status)
    ).all()
    return {status: count for status, count in rows}


def queued_size(conn: Connection, batch_id: str) -> tuple[int, int]:
    """(items, bytes) of the batch that have no outcome yet."""
    row = conn.execute(
        select(func.count(), func.coalesce(func.sum(work_queue.c.size), 0)).where(
            work_queue.c.batch_id == batch_id, work_queue.c.status != "done"
        )
    ).one()
    return int(row[0]), int(row[1])


def outcomes(conn: Connection, batch_id: str, sources: Sequence[str]) -> dict[str, str]:
    """The outcome of each finished item among ``sources``."""
    found: dict[str, str] = {}
    for start in range(0, len(sources), 500):
        rows = conn.execute(
            select(work_queue.c.source, work_queue.c.outcome).where(
                work_queue.c.batch_id == batch_id,
                work_queue.c.source.in_(sources[start : start + 500]),
                work_queue.c.status == "done",
            )
        ).all()
        found.update({source: outcome for source, outcome in rows})
    return found


def drop_queue(conn: Connection, batch_id: str) -> int:
    """Delete the batch's queue items (once it is finished); returns how many."""
    return int(conn.execute(delete(work_queue).where(work_queue.c.batch_id == batch_id)).rowcount)


__all__ = [
    "WorkItem",
    "Worker",
    "claim",
    "drop_queue",
    "enqueue",
    "outcomes",
    "queued_size",
    "release",
    "release_abandoned",
    "status_counts",
    "still_mine",
]
