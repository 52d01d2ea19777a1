"""Finding stored instances in the index for retrieve, metadata and delete."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from medlake.dicomweb.lifecycle import warm_up
from medlake.errors import NotFound
from medlake.index.schema import instances, partitions, series, studies
from medlake.index.writes import utcnow
from medlake.storage.base import BlobStore, Tier
from medlake.types import check_uid


@dataclass(frozen=True)
class StoredInstance:
    """Where one instance lives and what the index knows of its pixel data."""

    id: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str
    blob_key: str
    size: int
    encapsulated: bool
    frames: str | None
    number_of_frames: int | None
    tier: str


def find_instances(
    conn: Connection,
    partition: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[StoredInstance]:
    """Instances of a study / series / single instance, in series then instance order.

    Raises NotFound (naming what is missing) when nothing matches.
    """
    check_uid(study_uid, "StudyInstanceUID")
    if series_uid is not None:
        check_uid(series_uid, "SeriesInstanceUID")
    if sop_uid is not None:
        check_uid(sop_uid, "SOPInstanceUID")
    part = conn.execute(select(partitions.c.id).where(partitions.c.name == partition)).scalar()
    if part is None:
        raise NotFound(f"partition {partition!r} does not exist")
    query = (
        select(
            instances.c.id, studies.c.study_uid, series.c.series_uid, instances.c.sop_uid,
            instances.c.sop_class_uid, instances.c.transfer_syntax_uid, instances.c.blob_key,
            instances.c.size, instances.c.encapsulated, instances.c.frames,
            instances.c.number_of_frames, instances.c.tier,
        )
        .join(series, series.c.id == instances.c.series_id)
        .join(studies, studies.c.id == instances.c.study_id)
        .where(
            instances.c.partition_id == part,
            studies.c.partition_id == part,
            studies.c.study_uid == study_uid,
        )
        .order_by(series.c.series_number, series.c.id, instances.c.instance_number, instances.c.id)
    )  # fmt: skip
    if series_uid is not None:
        query = query.where(series.c.series_uid == series_uid, series.c.partition_id == part)
    if sop_uid is not None:
        query = query.where(instances.c.sop_uid == sop_uid)
    found = [StoredInstance(**row._mapping) for row in conn.execute(query)]
    if not found:
        raise NotFound(_missing(study_uid, series_uid, sop_uid))
    return found


def _missing(study_uid: str, series_uid: str | None, sop_uid: str | None) -> str:
    if sop_uid is not None:
        return f"instance {sop_uid} of series {series_uid} in study {study_uid} is not stored"
    if series_uid is not None:
        return f"series {series_uid} of study {study_uid} is not stored"
    return f"study {study_uid} is not stored"


def touch(conn: Connection, found: list[StoredInstance], blobs: BlobStore | None = None) -> None:
    """Record a read: last access time, and (given the ``blobs`` to move them in) a
    cool/cold blob goes back to hot."""
    ids = [i.id for i in found]
    now = utcnow()
    # Hour granularity is plenty for day-based lifecycle rules and keeps reads write-free.
    stale = now - dt.timedelta(hours=1)
    for start in range(0, len(ids), 500):
        conn.execute(
            update(instances)
            .where(
                instances.c.id.in_(ids[start : start + 500]), instances.c.last_accessed_at < stale
            )
            .values(last_accessed_at=now)
        )
    cooler = [(i.id, i.blob_key, Tier(i.tier)) for i in found if i.tier != Tier.HOT]
    if cooler and blobs is not None:
        warm_up(conn, blobs, cooler, now)
