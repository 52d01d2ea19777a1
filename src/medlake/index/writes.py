"""Writing instances into the index: the study/series/instance hierarchy, the flat
metadata table and the change feed, in one transaction per batch."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from medlake.index.extended_values import HeaderSource, InstanceRef, index_new_instances
from medlake.index.schema import (
    change_feed,
    instance_metadata,
    instances,
    partitions,
    series,
    studies,
)

STUDY_COLUMNS = (
    "specific_character_set", "study_date", "study_time", "accession_number",
    "referring_physician_name", "timezone_offset_from_utc", "study_description",
    "patient_name", "patient_id", "issuer_of_patient_id", "patient_birth_date",
    "patient_sex", "study_id",
)  # fmt: skip
SERIES_COLUMNS = (
    "modality", "series_description", "body_part_examined", "series_number",
    "pps_start_date", "pps_start_time",
)  # fmt: skip
INSTANCE_COLUMNS = (
    "sop_class_uid", "instance_number", "rows", "columns", "bits_allocated",
    "number_of_frames", "transfer_syntax_uid",
)  # fmt: skip
FLAT_COLUMNS = (
    "patient_id", "patient_name", "patient_birth_date", "patient_sex", "study_date",
    "study_description", "accession_number", "modality", "body_part_examined",
    "series_description", "sop_class_uid", "instance_number", "rows", "columns",
    "number_of_frames", "transfer_syntax_uid",
)  # fmt: skip


def utcnow() -> dt.datetime:
    """The current time, timezone-aware (UTC)."""
    return dt.datetime.now(dt.UTC)


def person_name_search(name: str | None) -> str | None:
    """Search form of a person name: upper case, so PN matching ignores case."""
    return name.upper() if name else None


@dataclass
class InstanceRow:
    """Everything the index records about one stored instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    values: dict[str, Any]
    blob_key: str
    size: int
    sha256: str
    encapsulated: bool
    frames: list[list[list[int]]] | None
    study_extra: dict[str, Any] = field(default_factory=dict)
    series_extra: dict[str, Any] = field(default_factory=dict)
    #: The header (or a loader of it), for extended query tags; None = not needed.
    dataset: HeaderSource = None
    #: The ingest batch storing this instance (``instances.batch_id``).
    batch_id: str | None = None


@dataclass(frozen=True)
class ExistingInstance:
    """What is already stored under a SOPInstanceUID."""

    id: int
    sha256: str
    blob_key: str
    study_uid: str
    series_uid: str


def _insert_ignoring_conflicts(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def lock_instances(conn: Connection, partition_name: str, sop_uids: Sequence[str]) -> None:
    """Serialise writers of the same instances until the caller's transaction ends.

    PostgreSQL: transaction-level advisory locks on each (partition, SOP Instance
    UID), taken in sorted order so two writers cannot deadlock. SQLite: a no-op
    write takes the database write lock now rather than at the first INSERT.
    """
    if conn.dialect.name == "postgresql":
        for uid in sorted(set(sop_uids)):
            conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                {"key": f"{partition_name}/{uid}"},
            )
    elif conn.dialect.name == "sqlite":
        conn.execute(text("UPDATE partitions SET name = name WHERE 1 = 0"))


def partition_id(conn: Connection, name: str, *, create: bool) -> int | None:
    """The id of partition ``name``; created on first use when ``create``."""
    found: int | None = conn.execute(
        select(partitions.c.id).where(partitions.c.name == name)
    ).scalar()
    if found is not None or not create:
        return found
    _insert_ignoring_conflicts(conn, partitions, [{"name": name, "created_at": utcnow()}])
    created: int = conn.execute(
        select(partitions.c.id).where(partitions.c.name == name)
    ).scalar_one()
    return created


def find_existing(
    conn: Connection, partition: int, sop_uids: Iterable[str]
) -> dict[str, ExistingInstance]:
    """Already-stored instances among ``sop_uids`` in the partition, by SOPInstanceUID."""
    uids = list(set(sop_uids))
    found: dict[str, ExistingInstance] = {}
    for start in range(0, len(uids), 500):
        rows = conn.execute(
            select(
                instances.c.id, instances.c.sop_uid, instances.c.sha256, instances.c.blob_key,
                studies.c.study_uid, series.c.series_uid,
            )
            .join(series, series.c.id == instances.c.series_id)
            .join(studies, studies.c.id == instances.c.study_id)
            .where(
                instances.c.partition_id == partition,
                instances.c.sop_uid.in_(uids[start : start + 500]),
            )
        )  # fmt: skip
        for row in rows:
            found[row.sop_uid] = ExistingInstance(
                row.id, row.sha256, row.blob_key, row.study_uid, row.series_uid
            )
    return found


def write_instances(
    conn: Connection, partition_name: str, rows: Sequence[InstanceRow], replaced: dict[str, int]
) -> None:
    """Insert ``rows`` (and replace the instances whose ids ``replaced`` maps by SOP UID)
    in the caller's transaction; refresh counts of every touched series and study."""
    if not rows:
        return
    now = utcnow()
    part = partition_id(conn, partition_name, create=True)
    assert part is not None
    if replaced:
        conn.execute(delete(instances).where(instances.c.id.in_(list(replaced.values()))))
    study_ids = _ensure_studies(conn, part, rows, now)
    series_ids = _ensure_series(conn, part, rows, study_ids, now)
    if replaced:
        replacing = [r for r in rows if r.sop_uid in replaced]
        _take_attributes_of(conn, replacing, study_ids, series_ids, now)
    instance_rows = [
        {
            "partition_id": part,
            "study_id": study_ids[r.study_uid],
            "series_id": series_ids[r.series_uid],
            "sop_uid": r.sop_uid,
            **{c: r.values.get(c) for c in INSTANCE_COLUMNS},
            "blob_key": r.blob_key,
            "size": r.size,
            "sha256": r.sha256,
            "encapsulated": r.encapsulated,
            "frames": orjson.dumps(r.frames).decode() if r.frames is not None else None,
            "tier": "hot",
            "last_accessed_at": now,
            "created_at": now,
            "batch_id": r.batch_id,
        }
        for r in rows
    ]
    # RETURNING instead of a follow-up SELECT … IN (…): that SELECT walked the partition
    # on a PostgreSQL without statistics (scale benchmark).
    ids: dict[str, int] = dict(
        conn.execute(
            insert(instances).returning(
                instances.c.sop_uid, instances.c.id, sort_by_parameter_order=True
            ),
            instance_rows,
        ).all()
    )
    conn.execute(
        insert(instance_metadata),
        [
            {
                "instance_id": ids[r.sop_uid],
                "partition": partition_name,
                "study_uid": r.study_uid,
                "series_uid": r.series_uid,
                "sop_uid": r.sop_uid,
                **{c: r.values.get(c) for c in FLAT_COLUMNS},
                "blob_key": r.blob_key,
                "size": r.size,
                "stored_at": now,
            }
            for r in rows
        ],
    )
    index_new_instances(
        conn,
        [(InstanceRef(ids[r.sop_uid], study_ids[r.study_uid], series_ids[r.series_uid]), r.dataset)
         for r in rows],
        now,
    )  # fmt: skip
    _record_changes(conn, partition_name, rows, replaced, now)
    refresh_counts(conn, set(study_ids.values()), set(series_ids.values()), now)


def _ensure_studies(
    conn: Connection, part: int, rows: Sequence[InstanceRow], now: dt.datetime
) -> dict[str, int]:
    first: dict[str, InstanceRow] = {}
    for r in rows:
        first.setdefault(r.study_uid, r)
    new = [
        {
            "partition_id": part,
            "study_uid": uid,
            **_study_values(r),
            "num_series": 0,
            "num_instances": 0,
            "created_at": now,
            "updated_at": now,
        }
        for uid, r in first.items()
    ]
    return _insert_and_map_ids(conn, studies, "study_uid", part, new)


def _ensure_series(
    conn: Connection,
    part: int,
    rows: Sequence[InstanceRow],
    study_ids: dict[str, int],
    now: dt.datetime,
) -> dict[str, int]:
    first: dict[str, InstanceRow] = {}
    for r in rows:
        first.setdefault(r.series_uid, r)
    new = [
        {
            "partition_id": part,
            "study_id": study_ids[r.study_uid],
            "series_uid": uid,
            **_series_values(r),
            "num_instances": 0,
            "metadata_stale": True,
            "created_at": now,
            "updated_at": now,
        }
        for uid, r in first.items()
    ]
    return _insert_and_map_ids(conn, series, "series_uid", part, new)


def _insert_and_map_ids(
    conn: Connection, table: Any, uid_column: str, part: int, new: list[dict[str, Any]]
) -> dict[str, int]:
    """Insert the rows that are not there yet (a concurrent writer may have been first)
    and return the id of every one of them, by UID, as stored."""
    _insert_ignoring_conflicts(conn, table, new)
    uid = table.c[uid_column]
    return dict(
        conn.execute(
            select(uid, table.c.id).where(
                table.c.partition_id == part, uid.in_([row[uid_column] for row in new])
            )
        ).all()
    )


def _study_values(r: InstanceRow) -> dict[str, Any]:
    return {
        **{c: r.values.get(c) for c in STUDY_COLUMNS},
        "patient_name_search": person_name_search(r.values.get("patient_name")),
        "referring_physician_name_search": person_name_search(
            r.values.get("referring_physician_name")
        ),
        "extra": orjson.dumps(r.study_extra).decode(),
    }


def _series_values(r: InstanceRow) -> dict[str, Any]:
    return {
        **{c: r.values.get(c) for c in SERIES_COLUMNS},
        "extra": orjson.dumps(r.series_extra).decode(),
    }


def _take_attributes_of(
    conn: Connection,
    rows: Sequence[InstanceRow],
    study_ids: dict[str, int],
    series_ids: dict[str, int],
    now: dt.datetime,
) -> None:
    """Upsert: a replacing instance's study and series attributes overwrite the stored ones,
    so QIDO answers with what was stored last (as WADO metadata does)."""
    for r in rows:
        conn.execute(
            update(studies)
            .where(studies.c.id == study_ids[r.study_uid])
            .values(**_study_values(r), updated_at=now)
        )
        conn.execute(
            update(series)
            .where(series.c.id == series_ids[r.series_uid])
            .values(**_series_values(r), updated_at=now)
        )


def _record_changes(
    conn: Connection,
    partition_name: str,
    rows: Sequence[InstanceRow],
    replaced: dict[str, int],
    now: dt.datetime,
) -> None:
    if replaced:
        mark_feed_state(conn, partition_name, list(replaced), "replaced")
    conn.execute(
        insert(change_feed),
        [
            {
                "timestamp": now,
                "action": "update" if r.sop_uid in replaced else "create",
                "state": "current",
                "partition": partition_name,
                "study_uid": r.study_uid,
                "series_uid": r.series_uid,
                "sop_uid": r.sop_uid,
            }
            for r in rows
        ],
    )


def mark_feed_state(conn: Connection, partition_name: str, sop_uids: list[str], state: str) -> None:
    """Set the state of the current change-feed entries of ``sop_uids``."""
    for start in range(0, len(sop_uids), 500):
        conn.execute(
            update(change_feed)
            .where(
                change_feed.c.partition == partition_name,
                change_feed.c.sop_uid.in_(sop_uids[start : start + 500]),
                change_feed.c.state == "current",
            )
            .values(state=state)
        )


def refresh_counts(
    conn: Connection, study_ids: set[int], series_ids: set[int], now: dt.datetime
) -> None:
    """Recompute instance/series counts and ModalitiesInStudy; mark series metadata stale.

    Empty series and studies (after deletes) are removed.
    """
    if series_ids:
        count = select(func.count()).where(instances.c.series_id == series.c.id).scalar_subquery()
        conn.execute(
            update(series)
            .where(series.c.id.in_(list(series_ids)))
            .values(num_instances=count, metadata_stale=True, updated_at=now)
        )
        conn.execute(
            delete(series).where(series.c.id.in_(list(series_ids)), series.c.num_instances == 0)
        )
    for study in study_ids:
        stats = conn.execute(
            select(func.count(), func.coalesce(func.sum(series.c.num_instances), 0)).where(
                series.c.study_id == study
            )
        ).one()
        if stats[0] == 0:
            conn.execute(delete(studies).where(studies.c.id == study))
            continue
        modalities = sorted(
            m
            for m in conn.execute(
                select(series.c.modality)
                .where(and_(series.c.study_id == study, series.c.modality.is_not(None)))
                .distinct()
            ).scalars()
        )
        conn.execute(
            update(studies)
            .where(studies.c.id == study)
            .values(
                num_series=stats[0],
                num_instances=stats[1],
                modalities_in_study="\\".join(modalities) or None,
                updated_at=now,
            )
        )


@dataclass(frozen=True)
class DeletedInstance:
    """An instance removed from the index, whose blob the caller removes next."""

    study_uid: str
    series_uid: str
    sop_uid: str
    blob_key: str


def delete_instances(
    conn: Connection,
    partition_name: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[DeletedInstance]:
    """Remove a study, series or instance from the index (in the caller's transaction),
    record ``delete`` change-feed entries and return what was removed."""
    part = partition_id(conn, partition_name, create=False)
    if part is None:
        return []
    query = (
        select(
            instances.c.id, instances.c.study_id, instances.c.series_id, instances.c.sop_uid,
            instances.c.blob_key, series.c.series_uid,
        )
        .join(series, series.c.id == instances.c.series_id)
        .join(studies, studies.c.id == instances.c.study_id)
        .where(
            instances.c.partition_id == part,
            studies.c.partition_id == part,
            studies.c.study_uid == study_uid,
        )
    )  # fmt: skip
    if series_uid is not None:
        query = query.where(series.c.series_uid == series_uid, series.c.partition_id == part)
    if sop_uid is not None:
        query = query.where(instances.c.sop_uid == sop_uid)
    found = conn.execute(query).all()
    if not found:
        return []
    now = utcnow()
    ids = [row.id for row in found]
    for start in range(0, len(ids), 500):
        conn.execute(delete(instances).where(instances.c.id.in_(ids[start : start + 500])))
    removed = [DeletedInstance(study_uid, r.series_uid, r.sop_uid, r.blob_key) for r in found]
    mark_feed_state(conn, partition_name, [d.sop_uid for d in removed], "deleted")
    conn.execute(
        insert(change_feed),
        [
            {
                "timestamp": now,
                "action": "delete",
                "state": "deleted",
                "partition": partition_name,
                "study_uid": d.study_uid,
                "series_uid": d.series_uid,
                "sop_uid": d.sop_uid,
            }
            for d in removed
        ],
    )
    refresh_counts(conn, {r.study_id for r in found}, {r.series_id for r in found}, now)
    return removed
