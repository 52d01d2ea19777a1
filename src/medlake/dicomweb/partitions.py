"""Partitions: independent namespaces of studies inside one archive."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select

from medlake.errors import Conflict
from medlake.index.schema import partitions
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.types import check_partition


def _as_json(row: Any) -> dict[str, Any]:
    created: dt.datetime = row.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)
    return {"partitionName": row.name, "partitionKey": row.id, "createdDate": created.isoformat()}


def list_partitions(archive: Archive) -> list[dict[str, Any]]:
    """Every partition, oldest first."""
    with archive.engine.connect() as conn:
        return [_as_json(r) for r in conn.execute(select(partitions).order_by(partitions.c.id))]


def create_partition(archive: Archive, name: str) -> dict[str, Any]:
    """Create a partition; Conflict when it exists."""
    check_partition(name)
    with archive.engine.begin() as conn:
        if partition_id(conn, name, create=False) is not None:
            raise Conflict(f"partition {name!r} already exists")
        partition_id(conn, name, create=True)
        row = conn.execute(select(partitions).where(partitions.c.name == name)).one()
    return _as_json(row)
