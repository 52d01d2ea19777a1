"""Access tiers and the lifecycle policy: blobs not read for a while move to cheaper
tiers (hot -> cool -> cold) and a read brings them back to hot.

Every tier stays readable (see :mod:`medlake.storage.base`); the index records each
instance's tier and last access, and the blob store moves the bytes with its own
mechanism where it has one (S3 storage class, Azure access tier). The policy
itself is the pure function :func:`target_tier`, so it is tested without a lake.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, update

from medlake.config import Settings
from medlake.errors import InvalidInput, MedlakeError
from medlake.index.schema import instances
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.storage.base import BlobStore, Tier

log = logging.getLogger(__name__)

#: Instances examined per transaction.
LIFECYCLE_BATCH = 500
#: Most error messages a report keeps (the count covers all of them).
MAX_REPORTED_ERRORS = 50
#: Tier moves in flight at once (an S3 storage-class change is a server-side copy).
_MOVERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="medlake-lifecycle")
#: Blobs being brought back to hot after a read (kept apart from lifecycle runs).
_WARMERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medlake-warm-up")
_RANK = {Tier.HOT: 0, Tier.COOL: 1, Tier.COLD: 2}


@dataclass(frozen=True)
class LifecyclePolicy:
    """How long a blob stays unread before it moves to the cool and the cold tier."""

    cool_after: dt.timedelta
    cold_after: dt.timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> LifecyclePolicy:
        """The policy of ``cool_after_days`` / ``cold_after_days``, checked."""
        cool, cold = settings.cool_after_days, settings.cold_after_days
        if cool <= 0 or cold <= 0:
            raise InvalidInput(
                f"cool_after_days ({cool}) and cold_after_days ({cold}) must be positive"
            )
        if cold < cool:
            raise InvalidInput(
                f"cold_after_days ({cold}) must not be less than cool_after_days ({cool})"
            )
        return cls(dt.timedelta(days=cool), dt.timedelta(days=cold))


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC time (SQLite hands back naive UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def target_tier(
    current: Tier, last_accessed_at: dt.datetime, now: dt.datetime, policy: LifecyclePolicy
) -> Tier | None:
    """The tier a blob should move to now, or None to leave it.

    The policy only moves blobs colder; reads (not the policy) warm them up.
    """
    idle = as_utc(now) - as_utc(last_accessed_at)
    if idle >= policy.cold_after:
        wanted = Tier.COLD
    elif idle >= policy.cool_after:
        wanted = Tier.COOL
    else:
        return None
    return wanted if _RANK[wanted] > _RANK[current] else None


@dataclass
class LifecycleReport:
    """What one lifecycle run did."""

    now: dt.datetime
    examined: int = 0
    to_cool: int = 0
    to_cold: int = 0
    failed: int = 0
    dry_run: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def moved(self) -> int:
        """Blobs moved (or, in a dry run, that would move)."""
        return self.to_cool + self.to_cold

    def record_failure(self, message: str) -> None:
        """Count a blob that could not move; keep the first messages."""
        self.failed += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(message)


@dataclass(frozen=True)
class _Candidate:
    id: int
    blob_key: str
    tier: Tier
    last_accessed_at: dt.datetime
    target: Tier


def _candidates_query(now: dt.datetime, policy: LifecyclePolicy) -> Any:
    """Instances the policy may move: not cold yet and unread for at least cool_after."""
    return select(
        instances.c.id, instances.c.blob_key, instances.c.tier, instances.c.last_accessed_at
    ).where(
        instances.c.tier.in_((Tier.HOT.value, Tier.COOL.value)),
        instances.c.last_accessed_at <= now - policy.cool_after,
    )


def count_candidates(archive: Archive, now: dt.datetime | None = None) -> int:
    """How many instances a run at ``now`` examines (for a progress bar)."""
    now = now or utcnow()
    policy = LifecyclePolicy.from_settings(archive.settings)
    with archive.engine.connect() as conn:
        query = _candidates_query(now, policy).subquery()
        return int(conn.execute(select(func.count()).select_from(query)).scalar_one())


def run_lifecycle(
    archive: Archive,
    now: dt.datetime | None = None,
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    batch_size: int = LIFECYCLE_BATCH,
) -> LifecycleReport:
    """Apply the lifecycle policy of ``archive.settings`` as of ``now`` (default: the
    current time): move each unread blob to the tier it is due for.

    A blob that fails to move keeps its tier and is counted in ``failed``; the run
    goes on. ``progress`` is called with the number of instances examined per batch.
    """
    now = as_utc(now or utcnow())
    policy = LifecyclePolicy.from_settings(archive.settings)
    report = LifecycleReport(now, dry_run=dry_run)
    last_id = 0
    while True:
        with archive.engine.connect() as conn:
            rows = conn.execute(
                _candidates_query(now, policy)
                .where(instances.c.id > last_id)
                .order_by(instances.c.id)
                .limit(batch_size)
            ).all()
        if not rows:
            break
        last_id = rows[-1].id
        report.examined += len(rows)
        due = [
            _Candidate(r.id, r.blob_key, Tier(r.tier), r.last_accessed_at, target)
            for r in rows
            if (target := target_tier(Tier(r.tier), r.last_accessed_at, now, policy))
        ]
        moved = due if dry_run else _move(archive, due, report)
        for candidate in moved:
            if candidate.target is Tier.COOL:
                report.to_cool += 1
            else:
                report.to_cold += 1
        if progress is not None:
            progress(len(rows))
    return report


def _move(archive: Archive, due: Sequence[_Candidate], report: LifecycleReport) -> list[_Candidate]:
    """Move the blobs, then record the tiers of those that moved; returns them."""
    outcomes = list(_MOVERS.map(lambda c: _set_tier(archive.blobs, c.blob_key, c.target), due))
    moved = []
    for c, error in zip(due, outcomes, strict=True):
        if error is None:
            moved.append(c)
        else:
            report.record_failure(f"{c.blob_key}: cannot move to {c.target}: {error}")
    if not moved:
        return []
    with archive.engine.begin() as conn:
        # Only rows nobody read meanwhile: a read that raced the move wins.
        conn.execute(
            update(instances)
            .where(
                instances.c.id == bindparam("b_id"),
                instances.c.tier == bindparam("b_tier"),
                instances.c.last_accessed_at == bindparam("b_seen"),
            )
            .values(tier=bindparam("b_target")),
            [
                {"b_id": c.id, "b_tier": c.tier.value, "b_seen": c.last_accessed_at,
                 "b_target": c.target.value}
                for c in moved
            ],
        )  # fmt: skip
        current = dict(
            conn.execute(
                select(instances.c.id, instances.c.tier).where(
                    instances.c.id.in_([c.id for c in moved])
                )
            ).all()
        )
    recorded = [c for c in moved if current.get(c.id) == c.target.value]
    for c in moved:
        if c.id in current and current[c.id] != c.target.value:
            # Read (or changed) while it moved: put the blob back where the index says.
            error = _set_tier(archive.blobs, c.blob_key, Tier(current[c.id]))
            if error is not None:
                report.record_failure(f"{c.blob_key}: cannot move back to {current[c.id]}: {error}")
    return recorded


def _set_tier(blobs: BlobStore, key: str, tier: Tier) -> str | None:
    """Move one blob; the error message, or None on success."""
    try:
        blobs.set_tier(key, tier)
    except MedlakeError as exc:
        return exc.message
    except Exception as exc:  # one bad blob must not stop the run
        return f"{exc.__class__.__name__}: {exc}"
    return None


def warm_up(
    conn: Connection, blobs: BlobStore, reads: Sequence[tuple[int, str, Tier]], now: dt.datetime
) -> list[Future[None]]:
    """Bring blobs that were just read back to the hot tier; ``reads`` holds
    (instance id, blob key, current tier) of cool/cold ones.

    The index says hot at once (in the caller's transaction); the blobs move in the
    background so the read is not delayed. A blob that fails to move gets its old
    tier back in the index, and the next read tries again.
    """
    if not reads:
        return []
    conn.execute(
        update(instances)
        .where(instances.c.id.in_([instance_id for instance_id, _, _ in reads]))
        .values(tier=Tier.HOT.value, last_accessed_at=now)
    )
    engine = conn.engine
    return [
        _WARMERS.submit(_warm_blob, engine, blobs, instance_id, key, tier)
        for instance_id, key, tier in reads
    ]


def _warm_blob(engine: Engine, blobs: BlobStore, instance_id: int, key: str, old: Tier) -> None:
    error = _set_tier(blobs, key, Tier.HOT)
    if error is None:
        return
    log.warning("cannot move %s back to the hot tier (it stays %s): %s", key, old, error)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(instances)
                .where(instances.c.id == instance_id, instances.c.tier == Tier.HOT.value)
                .values(tier=old.value)
            )
    except Exception:  # the index then says hot for a cooler blob: still readable
        log.exception("cannot record that %s stays in the %s tier", key, old)


@dataclass(frozen=True)
class TierUsage:
    """Instances and bytes in one tier."""

    instances: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class LifecycleStatus:
    """Usage per tier, and how many instances a run now would move to each tier."""

    now: dt.datetime
    policy: LifecyclePolicy
    usage: dict[Tier, TierUsage]
    due: dict[Tier, int]


def lifecycle_status(archive: Archive, now: dt.datetime | None = None) -> LifecycleStatus:
    """Counts per tier and the moves due at ``now`` (default: the current time)."""
    now = as_utc(now or utcnow())
    policy = LifecyclePolicy.from_settings(archive.settings)
    seen = instances.c.last_accessed_at
    with archive.engine.connect() as conn:
        usage = {
            Tier(tier): TierUsage(int(count), int(size or 0))
            for tier, count, size in conn.execute(
                select(instances.c.tier, func.count(), func.sum(instances.c.size)).group_by(
                    instances.c.tier
                )
            )
        }
        to_cold = conn.execute(
            select(func.count()).where(
                instances.c.tier.in_((Tier.HOT.value, Tier.COOL.value)),
                seen <= now - policy.cold_after,
            )
        ).scalar_one()
        to_cool = conn.execute(
            select(func.count()).where(
                instances.c.tier == Tier.HOT.value,
                seen <= now - policy.cool_after,
                seen > now - policy.cold_after,
            )
        ).scalar_one()
    return LifecycleStatus(
        now,
        policy,
        {tier: usage.get(tier, TierUsage()) for tier in Tier},
        {Tier.COOL: int(to_cool), Tier.COLD: int(to_cold)},
    )


__all__ = [
    "LIFECYCLE_BATCH",
    "LifecyclePolicy",
    "LifecycleReport",
    "LifecycleStatus",
    "TierUsage",
    "as_utc",
    "count_candidates",
    "lifecycle_status",
    "run_lifecycle",
    "target_tier",
    "warm_up",
]
