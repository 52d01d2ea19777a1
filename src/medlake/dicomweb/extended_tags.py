"""Extended query tags: attributes beyond the standard QIDO set, indexed on request.

Modelled on Microsoft's DICOM service. Adding tags creates them in status
*Adding* and a re-index *operation*; a worker re-reads the header of every
stored instance (never the pixels), writes the values and reports its progress;
when it is done the tags become *Ready* and QIDO-RS matches on them. Instances
stored while a tag is Adding or Ready get their values at ingest
(:mod:`medlake.index.extended_values`), so the two never miss one another.

Framework-free: the HTTP adapter is ``medlake.api.extended_tags_routes``.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from medlake.dicom.attributes import BY_TAG, Level, lookup
from medlake.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from medlake.index.extended_values import (
    SUPPORTED_VRS,
    IndexedTag,
    InstanceRef,
    TagValue,
    extract_values,
    indexing_tags,
    write_values,
)
from medlake.index.schema import (
    extended_query_tag_errors,
    extended_query_tag_values,
    extended_query_tags,
    instances,
    operations,
    partitions,
    series,
    studies,
)
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

#: Instances re-indexed per transaction (and per progress update).
REINDEX_BATCH = 200
#: Rows removed per transaction when a tag is deleted.
DELETE_BATCH = 5000
#: Header reads in flight at once (object stores answer each with a round trip).
_READERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="medlake-reindex-read")
#: Groups whose elements are not part of an instance's data set.
_NOT_INDEXABLE_GROUPS = frozenset({0x0000, 0x0002, 0x0004, 0x0006, 0x7FE0, 0xFFFA, 0xFFFC, 0xFFFE})
REINDEX = "reindex"


class TagStatus(enum.StrEnum):
    """Life of an extended query tag (stored lower-case; shown capitalised)."""

    ADDING = "adding"
    READY = "ready"
    DELETING = "deleting"


class OperationStatus(enum.StrEnum):
    """State of a long-running operation."""

    NOT_STARTED = "notStarted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class TagRequest:
    """One tag a caller asks to add: ``path`` is a keyword or an 8-digit hex tag."""

    path: str
    level: str
    vr: str | None = None
    private_creator: str | None = None


@dataclass(frozen=True)
class ExtendedQueryTag:
    """An extended query tag as listed by the API."""

    tag: int
    keyword: str
    vr: str
    private_creator: str | None
    level: Level
    status: TagStatus
    operation_id: str | None
    error_count: int
    created_at: dt.datetime

    @property
    def path(self) -> str:
        """The tag as 8 hex digits, e.g. ``00101010``."""
        return f"{self.tag:08X}"

    @property
    def name(self) -> str:
        """Keyword and tag, for messages."""
        return f"{self.keyword} ({self.path})" if self.keyword else self.path

    @property
    def queryable(self) -> bool:
        """Whether QIDO-RS matches on the tag now (only once re-indexing is done)."""
        return self.status is TagStatus.READY


@dataclass(frozen=True)
class Operation:
    """A long-running operation (re-indexing for new extended query tags)."""

    id: str
    kind: str
    status: OperationStatus
    percent_complete: int
    created_at: dt.datetime
    updated_at: dt.datetime
    tags: list[str] = field(default_factory=list)
    message: str | None = None


@dataclass(frozen=True)
class TagError:
    """A value of an instance that could not be indexed, and why."""

    partition: str
    study_uid: str
    series_uid: str
    sop_uid: str
    message: str
    created_at: dt.datetime


@dataclass(frozen=True)
class _NewTag:
    tag: int
    keyword: str
    vr: str
    private_creator: str | None
    level: Level

    @property
    def name(self) -> str:
        return f"{self.keyword} ({self.tag:08X})" if self.keyword else f"{self.tag:08X}"


# --- requests --------------------------------------------------------------------------


_REQUEST_KEYS = {"path": "path", "vr": "vr", "level": "level", "privatecreator": "private_creator"}


def parse_tag_requests(body: Any) -> list[TagRequest]:
    """The tags of a decoded JSON body: a list of ``{"path", "vr"?, "privateCreator"?,
    "level"}`` objects (keys case-insensitive, as in Microsoft's service)."""
    if not isinstance(body, list):
        raise InvalidInput("the body must be a JSON array of extended query tags")
    if not body:
        raise InvalidInput("the body names no extended query tags")
    out = []
    for number, item in enumerate(body, 1):
        if not isinstance(item, dict):
            raise InvalidInput(f"extended query tag #{number} must be a JSON object, not {item!r}")
        fields: dict[str, str | None] = {}
        for key, value in item.items():
            name = _REQUEST_KEYS.get(str(key).lower())
            if name is None:
                raise InvalidInput(f"extended query tag #{number} has unknown field {key!r}")
            if value is not None and not isinstance(value, str):
                raise InvalidInput(
                    f"field {key!r} of extended query tag #{number} must be a string"
                )
            fields[name] = value or None
        path, level = fields.pop("path", None), fields.pop("level", None)
        if not path:
            raise InvalidInput(f"extended query tag #{number} has no path")
        if not level:
            raise InvalidInput(
                f"extended query tag {path!r} has no level (Study, Series or Instance)"
            )
        out.append(TagRequest(path, level, fields.get("vr"), fields.get("private_creator")))
    return out


def _parse_path(path: str) -> int:
    text = path.strip()
    if "." in text:
        raise InvalidInput(
            f"path {path!r} names an attribute inside a sequence; only top-level attributes "
            "can be extended query tags"
        )
    found = lookup(text)
    if found is None:
        raise InvalidInput(f"path {path!r} is neither a DICOM keyword nor an 8-digit hex tag")
    return found[0]


def _resolve(request: TagRequest) -> _NewTag:
    """Check one request against the dictionary and the rules; raise naming the tag."""
    tag = _parse_path(request.path)
    group, element = tag >> 16, tag & 0xFFFF
    keyword = keyword_for_tag(tag) or ""
    shown = f"{keyword} ({tag:08X})" if keyword else f"{tag:08X}"
    level = _parse_level(request.level, shown)
    if group in _NOT_INDEXABLE_GROUPS:
        raise InvalidInput(
            f"{shown} cannot be an extended query tag: group {group:04X} holds command, "
            "file meta, directory, pixel data or item elements"
        )
    if tag in BY_TAG:
        raise InvalidInput(f"{shown} is already searchable as a standard QIDO-RS attribute")
    vr = request.vr.upper() if request.vr else None
    creator = request.private_creator
    if group % 2 == 1:
        vr = _private_vr(tag, element, shown, vr, creator)
    else:
        if creator:
            raise InvalidInput(f"{shown} is not a private tag; it takes no privateCreator")
        vr = _standard_vr(tag, shown, vr)
    if vr == "SQ":
        raise InvalidInput(f"{shown} is a sequence (SQ); sequences cannot be extended query tags")
    if vr not in SUPPORTED_VRS:
        raise InvalidInput(
            f"VR {vr} of {shown} is not supported for extended query tags; supported VRs: "
            + ", ".join(sorted(SUPPORTED_VRS))
        )
    return _NewTag(tag, keyword, vr, creator, level)


def _parse_level(value: str, shown: str) -> Level:
    try:
        return Level(value.strip().lower())
    except ValueError:
        raise InvalidInput(f"level {value!r} of {shown} is not Study, Series or Instance") from None


def _private_vr(tag: int, element: int, shown: str, vr: str | None, creator: str | None) -> str:
    if tag >> 16 in (0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF) or 0x0001 <= element <= 0x000F:
        raise InvalidInput(f"{shown} is not a valid private tag")
    if 0x0010 <= element <= 0x00FF:  # a Private Creator element itself
        if vr not in (None, "LO"):
            raise InvalidInput(f"{shown} is a Private Creator element, whose VR is LO, not {vr}")
        return "LO"
    if not vr:
        raise InvalidInput(
            f"private tag {shown} needs a vr: private tags are not in the dictionary"
        )
    if not creator:
        raise InvalidInput(
            f"private tag {shown} needs a privateCreator: the meaning of a private element "
            "depends on the creator that reserved its block"
        )
    if len(creator) > 64:
        raise InvalidInput(f"privateCreator {creator!r} is longer than 64 characters")
    return vr


def _standard_vr(tag: int, shown: str, vr: str | None) -> str:
    try:
        known = dictionary_VR(tag)
    except KeyError:
        raise InvalidInput(
            f"{shown} is not in the DICOM dictionary (private tags have an odd group number)"
        ) from None
    choices = [v.strip() for v in known.split(" or ")]
    if vr is None:
        if len(choices) > 1:
            raise InvalidInput(f"{shown} may have VR {known}; give the vr to index it as")
        return choices[0]
    if vr not in choices:
        raise InvalidInput(f"vr {vr} does not match the dictionary VR {known} of {shown}")
    return vr


# --- add / list / get / delete -----------------------------------------------------------


def add_tags(archive: Archive, requests: Sequence[TagRequest]) -> Operation:
    """Create ``requests`` as tags in status Adding and a re-index operation (not yet
    started; see :func:`start_reindex`). All or nothing: any invalid tag adds none."""
    if not requests:
        raise InvalidInput("no extended query tags given")
    new = [_resolve(r) for r in requests]
    seen: dict[int, _NewTag] = {}
    for tag in new:
        if tag.tag in seen:
            raise InvalidInput(f"{tag.name} is given more than once")
        seen[tag.tag] = tag
    now = utcnow()
    operation_id = uuid.uuid4().hex
    try:
        with archive.engine.begin() as conn:
            _check_new_tags(conn, new, archive.settings.max_extended_query_tags)
            conn.execute(
                operations.insert().values(
                    id=operation_id, kind=REINDEX, status=OperationStatus.NOT_STARTED.value,
                    percent_complete=0, created_at=now, updated_at=now,
                )
            )  # fmt: skip
            conn.execute(
                extended_query_tags.insert(),
                [
                    {
                        "tag": f"{t.tag:08X}", "keyword": t.keyword or None, "vr": t.vr,
                        "private_creator": t.private_creator, "level": t.level.value,
                        "status": TagStatus.ADDING.value, "operation_id": operation_id,
                        "created_at": now,
                    }
                    for t in new
                ],
            )  # fmt: skip
    except IntegrityError as exc:  # another request added one of them meanwhile
        raise Conflict(
            f"one of {', '.join(t.name for t in new)} was added by another request: {exc.orig}"
        ) from exc
    return get_operation(archive, operation_id)


def _check_new_tags(conn: Connection, new: Sequence[_NewTag], limit: int) -> None:
    existing = {
        r.tag: r.status
        for r in conn.execute(select(extended_query_tags.c.tag, extended_query_tags.c.status))
    }
    for tag in new:
        status = existing.get(f"{tag.tag:08X}")
        if status is not None:
            raise Conflict(
                f"extended query tag {tag.name} already exists (status {status.capitalize()})"
            )
    if len(existing) + len(new) > limit:
        raise LimitExceeded(
            f"adding {len(new)} extended query tag(s) to the {len(existing)} defined would "
            f"exceed the limit of {limit} (setting max_extended_query_tags)"
        )


def list_tags(archive: Archive, *, limit: int = 100, offset: int = 0) -> list[ExtendedQueryTag]:
    """Every extended query tag, oldest first."""
    if not 1 <= limit <= 200:
        raise InvalidInput(f"limit must be between 1 and 200, not {limit}")
    if offset < 0:
        raise InvalidInput(f"offset must not be negative, not {offset}")
    with archive.engine.connect() as conn:
        rows = conn.execute(
            select(extended_query_tags)
            .order_by(extended_query_tags.c.id)
            .limit(limit)
            .offset(offset)
        ).all()
        counts = _error_counts(conn, [r.id for r in rows])
    return [_tag(r, counts.get(r.id, 0)) for r in rows]


def get_tag(archive: Archive, path: str) -> ExtendedQueryTag:
    """The extended query tag named by keyword or hex ``path``; NotFound when absent."""
    with archive.engine.connect() as conn:
        row = _tag_row(conn, path)
        return _tag(row, _error_counts(conn, [row.id]).get(row.id, 0))


def delete_tag(archive: Archive, path: str) -> None:
    """Remove an extended query tag and its values (status Deleting until done; a
    failed delete is finished by deleting again). Stops a re-index still adding it."""
    with archive.engine.begin() as conn:
        row = _tag_row(conn, path)
        conn.execute(
            update(extended_query_tags)
            .where(extended_query_tags.c.id == row.id)
            .values(status=TagStatus.DELETING.value)
        )
    # In slices: one transaction over millions of values would hold the writer lock.
    for table in (extended_query_tag_values, extended_query_tag_errors):
        while True:
            with archive.engine.begin() as conn:
                ids = list(
                    conn.execute(
                        select(table.c.instance_id)
                        .where(table.c.tag_id == row.id)
                        .limit(DELETE_BATCH)
                    ).scalars()
                )
                if not ids:
                    break
                conn.execute(
                    delete(table).where(table.c.tag_id == row.id, table.c.instance_id.in_(ids))
                )
    with archive.engine.begin() as conn:
        conn.execute(delete(extended_query_tags).where(extended_query_tags.c.id == row.id))


def tag_errors(archive: Archive, path: str, *, limit: int = 100, offset: int = 0) -> list[TagError]:
    """The instances whose value of the tag could not be indexed, with the reason."""
    if not 1 <= limit <= 200:
        raise InvalidInput(f"limit must be between 1 and 200, not {limit}")
    if offset < 0:
        raise InvalidInput(f"offset must not be negative, not {offset}")
    errors = extended_query_tag_errors
    with archive.engine.connect() as conn:
        row = _tag_row(conn, path)
        found = conn.execute(
            select(
                partitions.c.name, studies.c.study_uid, series.c.series_uid, instances.c.sop_uid,
                errors.c.message, errors.c.created_at,
            )
            .select_from(errors)
            .join(instances, instances.c.id == errors.c.instance_id)
            .join(series, series.c.id == instances.c.series_id)
            .join(studies, studies.c.id == instances.c.study_id)
            .join(partitions, partitions.c.id == instances.c.partition_id)
            .where(errors.c.tag_id == row.id)
            .order_by(errors.c.instance_id)
            .limit(limit)
            .offset(offset)
        ).all()  # fmt: skip
    return [TagError(r[0], r[1], r[2], r[3], r[4], _utc(r[5])) for r in found]


def _tag_row(conn: Connection, path: str) -> Any:
    tag = _parse_path(path)
    row = conn.execute(
        select(extended_query_tags).where(extended_query_tags.c.tag == f"{tag:08X}")
    ).first()
    if row is None:
        keyword = keyword_for_tag(tag)
        shown = f"{keyword} ({tag:08X})" if keyword else f"{tag:08X}"
        raise NotFound(f"extended query tag {shown} does not exist")
    return row


def _error_counts(conn: Connection, tag_ids: list[int]) -> dict[int, int]:
    if not tag_ids:
        return {}
    errors = extended_query_tag_errors
    return {
        tag_id: int(count)
        for tag_id, count in conn.execute(
            select(errors.c.tag_id, func.count())
            .where(errors.c.tag_id.in_(tag_ids))
            .group_by(errors.c.tag_id)
        ).all()
    }


def _tag(row: Any, error_count: int) -> ExtendedQueryTag:
    return ExtendedQueryTag(
        tag=int(row.tag, 16),
        keyword=row.keyword or "",
        vr=row.vr,
        private_creator=row.private_creator,
        level=Level(row.level),
        status=TagStatus(row.status),
        operation_id=row.operation_id,
        error_count=error_count,
        created_at=_utc(row.created_at),
    )


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)  # SQLite: naive UTC


# --- operations and the re-index worker --------------------------------------------------


def get_operation(archive: Archive, operation_id: str) -> Operation:
    """A long-running operation by id; NotFound when unknown."""
    with archive.engine.connect() as conn:
        row = conn.execute(select(operations).where(operations.c.id == operation_id)).first()
        if row is None:
            raise NotFound(f"operation {operation_id!r} does not exist")
        tags = list(
            conn.execute(
                select(extended_query_tags.c.tag)
                .where(extended_query_tags.c.operation_id == operation_id)
                .order_by(extended_query_tags.c.id)
            ).scalars()
        )
    detail = orjson.loads(row.detail) if row.detail else {}
    return Operation(
        id=row.id,
        kind=row.kind,
        status=OperationStatus(row.status),
        percent_complete=row.percent_complete,
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
        tags=tags or list(detail.get("tags", [])),
        message=detail.get("message"),
    )


def start_reindex(archive: Archive, operation_id: str) -> threading.Thread:
    """Run :func:`reindex` for ``operation_id`` in a background (daemon) thread."""
    thread = threading.Thread(
        target=reindex, args=(archive, operation_id), name=f"medlake-reindex-{operation_id[:8]}",
        daemon=True,
    )  # fmt: skip
    thread.start()
    return thread


def resume_interrupted(
    archive: Archive, *, stale_after: dt.timedelta = dt.timedelta(minutes=5)
) -> list[str]:
    """Restart re-index operations left unfinished by a stopped process (no progress for
    ``stale_after``); returns their ids. Re-indexing an instance twice is harmless."""
    cutoff = utcnow() - stale_after
    with archive.engine.connect() as conn:
        ids = list(
            conn.execute(
                select(operations.c.id).where(
                    operations.c.kind == REINDEX,
                    operations.c.status.in_(
                        (OperationStatus.NOT_STARTED.value, OperationStatus.RUNNING.value)
                    ),
                    operations.c.updated_at < cutoff,
                )
            ).scalars()
        )
    for operation_id in ids:
        start_reindex(archive, operation_id)
    return ids


def reindex(archive: Archive, operation_id: str, *, batch_size: int = REINDEX_BATCH) -> Operation:
    """Index the operation's tags in every stored instance, in batches of headers read
    from the lake; then mark the tags Ready. Never raises: a failure fails the operation."""
    try:
        _reindex(archive, operation_id, batch_size)
    except Exception as exc:
        log.exception("re-index operation %s failed", operation_id)
        _finish(archive, operation_id, OperationStatus.FAILED, f"{exc.__class__.__name__}: {exc}")
    return get_operation(archive, operation_id)


def _reindex(archive: Archive, operation_id: str, batch_size: int) -> None:
    with archive.engine.begin() as conn:
        status = conn.execute(
            select(operations.c.status).where(operations.c.id == operation_id)
        ).scalar()
        if status is None:
            raise NotFound(f"operation {operation_id!r} does not exist")
        if status in (OperationStatus.SUCCEEDED, OperationStatus.FAILED):
            return
        _progress(conn, operation_id, 0, OperationStatus.RUNNING)
        total = conn.execute(select(func.count()).select_from(instances)).scalar_one()
        tag_names = [f"{t.tag:08X}" for t in _tags_of(conn, operation_id)]
    done, last_id = 0, 0
    while True:
        with archive.engine.connect() as conn:
            tags = _tags_of(conn, operation_id)
            batch = conn.execute(
                select(instances.c.id, instances.c.study_id, instances.c.series_id,
                       instances.c.blob_key)
                .where(instances.c.id > last_id)
                .order_by(instances.c.id)
                .limit(batch_size)
            ).all()  # fmt: skip
        if not tags or not batch:
            break
        read = list(_READERS.map(partial(_read_values, archive, tags), batch))
        with archive.engine.begin() as conn:
            # Tags deleted meanwhile are left out; the lock keeps the rest until commit.
            still = {t.id for t in _tags_of(conn, operation_id, lock=True)}
            # Instances deleted meanwhile get no values (their rows would violate the FK).
            present = set(
                conn.execute(
                    select(instances.c.id)
                    .where(instances.c.id.in_([r.id for r in batch]))
                    .with_for_update(read=True)
                ).scalars()
            )
            write_values(
                conn,
                [(ref, [v for v in values if v.tag_id in still])
                 for ref, values in read if ref.instance_id in present],
                utcnow(),
                replace_tag_ids=sorted(still),
            )  # fmt: skip
            done += len(batch)
            _progress(conn, operation_id, min(99, done * 100 // max(total, 1)))
        last_id = batch[-1].id
    with archive.engine.begin() as conn:
        ready = conn.execute(
            update(extended_query_tags)
            .where(
                extended_query_tags.c.operation_id == operation_id,
                extended_query_tags.c.status == TagStatus.ADDING.value,
            )
            .values(status=TagStatus.READY.value)
        ).rowcount
    if ready:
        _finish(archive, operation_id, OperationStatus.SUCCEEDED, None, tag_names)
    else:
        _finish(
            archive, operation_id, OperationStatus.FAILED,
            "canceled: every tag of the operation was deleted before re-indexing finished",
            tag_names,
        )  # fmt: skip


def _tags_of(conn: Connection, operation_id: str, *, lock: bool = False) -> list[IndexedTag]:
    ids = conn.execute(
        select(extended_query_tags.c.id).where(
            extended_query_tags.c.operation_id == operation_id,
            extended_query_tags.c.status == TagStatus.ADDING.value,
        )
    ).scalars()
    return indexing_tags(conn, tag_ids=list(ids), lock=lock)


def _read_values(
    archive: Archive, tags: Sequence[IndexedTag], row: Any
) -> tuple[InstanceRef, list[TagValue]]:
    ref = InstanceRef(row.id, row.study_id, row.series_id)
    try:
        with archive.blobs.open(row.blob_key) as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        return ref, extract_values(ds, tags)
    except Exception as exc:  # recorded per instance: one unreadable file must not stop the rest
        message = f"cannot read the header of {row.blob_key}: {exc}"[:512]
        return ref, [TagValue(t.id, error=message) for t in tags]


def _progress(
    conn: Connection, operation_id: str, percent: int, status: OperationStatus | None = None
) -> None:
    values: dict[str, Any] = {"percent_complete": percent, "updated_at": utcnow()}
    if status is not None:
        values["status"] = status.value
    conn.execute(update(operations).where(operations.c.id == operation_id).values(**values))


def _finish(
    archive: Archive,
    operation_id: str,
    status: OperationStatus,
    message: str | None,
    tags: Sequence[str] = (),
) -> None:
    detail: dict[str, Any] = {"tags": list(tags)}
    if message:
        detail["message"] = message
    values: dict[str, Any] = {
        "status": status.value,
        "detail": orjson.dumps(detail).decode(),
        "updated_at": utcnow(),
    }
    if status is OperationStatus.SUCCEEDED:
        values["percent_complete"] = 100
    with archive.engine.begin() as conn:
        conn.execute(update(operations).where(operations.c.id == operation_id).values(**values))


__all__ = [
    "REINDEX_BATCH",
    "ExtendedQueryTag",
    "Operation",
    "OperationStatus",
    "TagError",
    "TagRequest",
    "TagStatus",
    "add_tags",
    "delete_tag",
    "get_operation",
    "get_tag",
    "list_tags",
    "parse_tag_requests",
    "reindex",
    "resume_interrupted",
    "start_reindex",
    "tag_errors",
]
