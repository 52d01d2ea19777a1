"""Writing instances into the index: the study/series/instance hierarchy, the flat
metadata table and the change feed, in one transaction per batch.

The statements of the store path are built once, at import: executing a prebuilt
statement skips building the SQL expression and its cache key (SQLAlchemy memoises
the key on the statement object), which costs more than running the statement on
SQLite. Storing one instance into a series the index knows takes eight statements:
the lock, one lookup (:func:`find_stored`), the instance, its flat metadata row,
the extended query tags to index, the change-feed entry and two count updates.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    String,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal_column,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import Label

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
#: UIDs per lookup statement (well below SQLite's and PostgreSQL's parameter limits).
_CHUNK = 500


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


@dataclass(frozen=True)
class ExistingSeries:
    """A series the index holds, and the study it belongs to."""

    id: int
    study_uid: str


@dataclass
class StoredRows:
    """What the index holds, in one partition, under the UIDs of a store request."""

    #: None when the partition does not exist yet.
    partition_id: int | None
    instances: dict[str, ExistingInstance] = field(default_factory=dict)
    #: Study ids by StudyInstanceUID.
    studies: dict[str, int] = field(default_factory=dict)
    series: dict[str, ExistingSeries] = field(default_factory=dict)


# --- prebuilt statements ------------------------------------------------------------------

_SQLITE_WRITE_LOCK = text("UPDATE partitions SET name = name WHERE 1 = 0")
# unnest() yields the keys in array order, so the locks are taken in the caller's order.
_ADVISORY_LOCKS = text(
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
    "FROM unnest(CAST(:keys AS text[])) AS t(k)"
)
_PARTITION_ID = select(partitions.c.id).where(partitions.c.name == bindparam("partition"))


def _none(name: str) -> Label[Any]:
    return cast(null(), String).label(name)


def _kind(number: int) -> Label[Any]:
    return literal_column(str(number)).label("kind")


_PARTITION_OF_REQUEST = _PARTITION_ID.scalar_subquery()
_FIND_STORED = union_all(
    select(
        _kind(0), partitions.c.id.label("id"), _none("uid"), _none("sha256"), _none("blob_key"),
        _none("study_uid"), _none("series_uid"),
    ).where(partitions.c.name == bindparam("partition")),
    select(
        _kind(1), instances.c.id, instances.c.sop_uid, instances.c.sha256, instances.c.blob_key,
        studies.c.study_uid, series.c.series_uid,
    )
    .join(series, series.c.id == instances.c.series_id)
    .join(studies, studies.c.id == instances.c.study_id)
    .where(
        instances.c.partition_id == _PARTITION_OF_REQUEST,
        instances.c.sop_uid.in_(bindparam("sop_uids", expanding=True)),
    ),
    select(
        _kind(2), studies.c.id, studies.c.study_uid, _none("sha256"), _none("blob_key"),
        _none("study_uid"), _none("series_uid"),
    ).where(
        studies.c.partition_id == _PARTITION_OF_REQUEST,
        studies.c.study_uid.in_(bindparam("study_uids", expanding=True)),
    ),
    select(
        _kind(3), series.c.id, series.c.series_uid, _none("sha256"), _none("blob_key"),
        studies.c.study_uid, _none("series_uid"),
    )
    .join(studies, studies.c.id == series.c.study_id)
    .where(
        series.c.partition_id == _PARTITION_OF_REQUEST,
        series.c.series_uid.in_(bindparam("series_uids", expanding=True)),
    ),
)  # fmt: skip


def _insert_new(dialect: Any, table: Any, uid_column: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING RETURNING (uid, id): only the rows it inserted."""
    return dialect.insert(table).on_conflict_do_nothing().returning(table.c[uid_column], table.c.id)


_INSERT_NEW = {
    (name, table.name): _insert_new(dialect, table, uid)
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
    for table, uid in ((studies, "study_uid"), (series, "series_uid"))
}
_SELECT_IDS = {
    table.name: select(table.c[uid], table.c.id).where(
        table.c.partition_id == bindparam("part"),
        table.c[uid].in_(bindparam("uids", expanding=True)),
    )
    for table, uid in ((studies, "study_uid"), (series, "series_uid"))
}
_INSERT_INSTANCES = insert(instances).returning(
    instances.c.sop_uid, instances.c.id, sort_by_parameter_order=True
)
_INSERT_FLAT = insert(instance_metadata)
_INSERT_CHANGES = insert(change_feed)
# Counts go up by what this transaction added, under the row lock of the UPDATE (a
# recount would read a snapshot that misses a concurrent writer's rows on PostgreSQL).
_ADD_TO_SERIES = (
    update(series)
    .where(series.c.id == bindparam("b_id"))
    .values(
        num_instances=series.c.num_instances + bindparam("b_instances"),
        metadata_stale=True,
        updated_at=bindparam("b_now"),
    )
)
_ADD_TO_STUDY = (
    update(studies)
    .where(studies.c.id == bindparam("b_id"))
    .values(
        num_instances=studies.c.num_instances + bindparam("b_instances"),
        num_series=studies.c.num_series + bindparam("b_series"),
        updated_at=bindparam("b_now"),
    )
)
_MODALITIES = (
    select(series.c.study_id, series.c.modality)
    .where(
        series.c.study_id.in_(bindparam("study_ids", expanding=True)),
        series.c.modality.is_not(None),
    )
    .distinct()
)
_SET_MODALITIES = (
    update(studies)
    .where(studies.c.id == bindparam("b_id"))
    .values(modalities_in_study=bindparam("b_modalities"))
)


def _insert_ignoring_conflicts(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)


def lock_instances(conn: Connection, partition_name: str, sop_uids: Sequence[str]) -> None:
    """Serialise writers of the same instances until the caller's transaction ends.

    PostgreSQL: transaction-level advisory locks on each (partition, SOP Instance
    UID), taken in sorted order (one statement) so two writers cannot deadlock.
    SQLite: a no-op write takes the database write lock now rather than at the first
    INSERT.
    """
    if conn.dialect.name == "postgresql":
        keys = sorted({f"{partition_name}/{uid}" for uid in sop_uids})
        if keys:
            conn.execute(_ADVISORY_LOCKS, {"keys": keys}).all()
    elif conn.dialect.name == "sqlite":
        conn.execute(_SQLITE_WRITE_LOCK)


def partition_id(conn: Connection, name: str, *, create: bool) -> int | None:
    """The id of partition ``name``; created on first use when ``create``."""
    found: int | None = conn.execute(_PARTITION_ID, {"partition": name}).scalar()
    if found is not None or not create:
        return found
    _insert_ignoring_conflicts(conn, partitions, [{"name": name, "created_at": utcnow()}])
    created: int = conn.execute(_PARTITION_ID, {"partition": name}).scalar_one()
    return created


def find_stored(
    conn: Connection,
    partition_name: str,
    sop_uids: Iterable[str],
    study_uids: Iterable[str] = (),
    series_uids: Iterable[str] = (),
) -> StoredRows:
    """The partition's id and what it already holds under these UIDs, in one statement
    (per 500 UIDs of each kind): stored instances, studies and series."""
    sops, study_list, series_list = (sorted(set(u)) for u in (sop_uids, study_uids, series_uids))
    found = StoredRows(None)
    longest = max(len(sops), len(study_list), len(series_list), 1)
    for start in range(0, longest, _CHUNK):
        rows = conn.execute(
            _FIND_STORED,
            {
                "partition": partition_name,
                "sop_uids": sops[start : start + _CHUNK],
                "study_uids": study_list[start : start + _CHUNK],
                "series_uids": series_list[start : start + _CHUNK],
            },
        )
        for row in rows:
            kind = int(row.kind)
            if kind == 0:
                found.partition_id = row.id
            elif kind == 1:
                found.instances[row.uid] = ExistingInstance(
                    row.id, row.sha256, row.blob_key, row.study_uid, row.series_uid
                )
            elif kind == 2:
                found.studies[row.uid] = row.id
            else:
                found.series[row.uid] = ExistingSeries(row.id, row.study_uid)
    return found


def write_instances(
    conn: Connection,
    partition_name: str,
    rows: Sequence[InstanceRow],
    replaced: dict[str, int],
    *,
    stored: StoredRows | None = None,
) -> None:
    """Insert ``rows`` (and replace the instances whose ids ``replaced`` maps by SOP UID)
    in the caller's transaction; update the counts of every touched series and study.

    ``stored`` is what :func:`find_stored` returned for these rows earlier in the same
    transaction (the caller held the write lock since); without it they are looked up.
    """
    if not rows:
        return
    now = utcnow()
    if stored is None:
        stored = find_stored(
            conn, partition_name, (), {r.study_uid for r in rows}, {r.series_uid for r in rows}
        )
    part = stored.partition_id
    if part is None:
        part = partition_id(conn, partition_name, create=True)
        assert part is not None
    if replaced:
        conn.execute(delete(instances).where(instances.c.id.in_(list(replaced.values()))))
    study_ids = _ensure_studies(conn, part, rows, stored, now)
    series_ids, new_series = _ensure_series(conn, part, rows, stored, study_ids, now)
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
    ids: dict[str, int] = dict(conn.execute(_INSERT_INSTANCES, instance_rows).all())
    conn.execute(
        _INSERT_FLAT,
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
    if replaced:
        refresh_counts(conn, set(study_ids.values()), set(series_ids.values()), now)
    else:
        _add_counts(conn, rows, study_ids, series_ids, new_series, now)


def _ensure_studies(
    conn: Connection, part: int, rows: Sequence[InstanceRow], stored: StoredRows, now: dt.datetime
) -> dict[str, int]:
    ids: dict[str, int] = {}
    first: dict[str, InstanceRow] = {}
    for r in rows:
        known = stored.studies.get(r.study_uid)
        if known is not None:
            ids[r.study_uid] = known
        else:
            first.setdefault(r.study_uid, r)
    if first:
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
        ids.update(_insert_and_map_ids(conn, studies, "study_uid", part, new)[0])
    return ids


def _ensure_series(
    conn: Connection,
    part: int,
    rows: Sequence[InstanceRow],
    stored: StoredRows,
    study_ids: dict[str, int],
    now: dt.datetime,
) -> tuple[dict[str, int], set[str]]:
    """Series ids by UID, and the UIDs of the series this call inserted."""
    ids: dict[str, int] = {}
    first: dict[str, InstanceRow] = {}
    for r in rows:
        known = stored.series.get(r.series_uid)
        if known is not None:
            ids[r.series_uid] = known.id
        else:
            first.setdefault(r.series_uid, r)
    if not first:
        return ids, set()
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
    mapped, inserted = _insert_and_map_ids(conn, series, "series_uid", part, new)
    ids.update(mapped)
    return ids, inserted


def _insert_and_map_ids(
    conn: Connection, table: Any, uid_column: str, part: int, new: list[dict[str, Any]]
) -> tuple[dict[str, int], set[str]]:
    """Insert the rows that are not there yet and return the id of every one of them, by
    UID, as stored, with the UIDs this call inserted (a concurrent writer may have been
    first with the others)."""
    ids: dict[str, int] = dict(
        conn.execute(_INSERT_NEW[(conn.dialect.name, table.name)], new).all()
    )
    inserted = set(ids)
    missing = [row[uid_column] for row in new if row[uid_column] not in ids]
    for start in range(0, len(missing), _CHUNK):
        ids.update(
            conn.execute(
                _SELECT_IDS[table.name], {"part": part, "uids": missing[start : start + _CHUNK]}
            ).all()
        )
    return ids, inserted


def _add_counts(
    conn: Connection,
    rows: Sequence[InstanceRow],
    study_ids: dict[str, int],
    series_ids: dict[str, int],
    new_series: set[str],
    now: dt.datetime,
) -> None:
    """Add the new instances (and series) to the counts; mark the series metadata stale.

    Rows are updated in id order, so two writers touching the same studies lock them in
    the same order. ModalitiesInStudy is read again only for a study that got a new
    series, after its row is locked, so it includes what a concurrent writer committed.
    """
    per_series = Counter(series_ids[r.series_uid] for r in rows)
    conn.execute(
        _ADD_TO_SERIES,
        [{"b_id": sid, "b_instances": n, "b_now": now} for sid, n in sorted(per_series.items())],
    )
    per_study = Counter(study_ids[r.study_uid] for r in rows)
    series_study = {r.series_uid: study_ids[r.study_uid] for r in rows}
    added_series = Counter(series_study[uid] for uid in new_series)
    conn.execute(
        _ADD_TO_STUDY,
        [
            {"b_id": sid, "b_instances": n, "b_series": added_series[sid], "b_now": now}
            for sid, n in sorted(per_study.items())
        ],
    )
    if added_series:
        _refresh_modalities(conn, sorted(added_series))


def _refresh_modalities(conn: Connection, study_ids: list[int]) -> None:
    found: dict[int, set[str]] = defaultdict(set)
    for start in range(0, len(study_ids), _CHUNK):
        chunk = study_ids[start : start + _CHUNK]
        for study, modality in conn.execute(_MODALITIES, {"study_ids": chunk}):
            found[study].add(modality)
    conn.execute(
        _SET_MODALITIES,
        [{"b_id": s, "b_modalities": "\\".join(sorted(found[s])) or None} for s in study_ids],
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
        _INSERT_CHANGES,
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
