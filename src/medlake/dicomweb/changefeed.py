"""The change feed: every create, update and delete, in sequence order."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from medlake.errors import InvalidInput
from medlake.index.schema import change_feed
from medlake.ingest.archive import Archive

MAX_LIMIT = 1000


def _entry(row: Any) -> dict[str, Any]:
    timestamp = row.timestamp
    if timestamp.tzinfo is None:  # SQLite hands back naive UTC
        timestamp = timestamp.replace(tzinfo=dt.UTC)
    return {
        "Sequence": row.sequence,
        "PartitionName": row.partition,
        "StudyInstanceUID": row.study_uid,
        "SeriesInstanceUID": row.series_uid,
        "SOPInstanceUID": row.sop_uid,
        "Action": row.action,
        "State": row.state,
        "Timestamp": timestamp.isoformat(),
    }


def parse_time(value: str | None, name: str) -> dt.datetime | None:
    """An ISO 8601 timestamp parameter (naive means UTC)."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"{name} {value!r} is not an ISO 8601 date-time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def read_feed(
    archive: Archive,
    *,
    start_time: dt.datetime | None = None,
    end_time: dt.datetime | None = None,
    offset: int = 0,
    limit: int = 100,
    partition: str | None = None,
) -> list[dict[str, Any]]:
    """Entries in sequence order, from ``offset`` (a sequence number) on, in the time window."""
    if limit < 1 or limit > MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    if offset < 0:
        raise InvalidInput(f"offset must be non-negative, not {offset}")
    if start_time and end_time and start_time > end_time:
        raise InvalidInput("startTime is after endTime")
    query = select(change_feed).where(change_feed.c.sequence > offset)
    if start_time:
        query = query.where(change_feed.c.timestamp >= start_time)
    if end_time:
        query = query.where(change_feed.c.timestamp < end_time)
    if partition:
        query = query.where(change_feed.c.partition == partition)
    query = query.order_by(change_feed.c.sequence).limit(limit)
    with archive.engine.connect() as conn:
        return [_entry(row) for row in conn.execute(query)]


def latest(archive: Archive) -> dict[str, Any] | None:
    """The newest entry, or None when nothing was ever stored."""
    with archive.engine.connect() as conn:
        newest = conn.execute(select(func.max(change_feed.c.sequence))).scalar()
        if newest is None:
            return None
        row = conn.execute(select(change_feed).where(change_feed.c.sequence == newest)).one()
    return _entry(row)
