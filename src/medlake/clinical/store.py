"""The FHIR resource store: create, read, vread, update, delete and history.

Every resource lives in one ``fhir_resources`` row per (partition, type, id) holding
its current version, and one ``fhir_resource_versions`` row per version. A write is
one database transaction that changes both tables and the resource's search values
(``search_index``), so a search never sees a version the store does not have.

Concurrency: on SQLite a write transaction starts with ``BEGIN IMMEDIATE`` (writers
queue for the database lock, and what a write read is still true when it commits);
on PostgreSQL the current rows are read ``FOR UPDATE`` and conditional interactions
take a transaction-scoped advisory lock on their criteria. Two concurrent updates
of one resource therefore get consecutive version numbers, or one of them 412 when
it named the version it expected with ``If-Match``. A transaction that loses a race
PostgreSQL can only detect at commit (two creates of one new id, a deadlock) is run
again from the start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import format_datetime
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

from sqlalchemy import Connection, and_, bindparam, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from medlake.clinical.compartments import (
    compartment_condition,
    compartment_patients,
    outside_compartment,
    resource_in_compartment,
)
from medlake.clinical.json_patch import apply_json_patch, parse_json_patch
from medlake.clinical.resources import (
    check_envelope,
    check_id,
    check_resource_type,
    dump_resource,
    issue,
    parse_json,
    validate_resource,
)
from medlake.clinical.search import matching_resources
from medlake.clinical.search_index import index_resources, unindex_resource
from medlake.errors import (
    Conflict,
    DatabaseUnavailable,
    Gone,
    InvalidInput,
    InvalidResource,
    NotFound,
    PreconditionFailed,
)
from medlake.index.bulk_rows import append_rows
from medlake.index.schema import fhir_resource_versions, fhir_resources
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

T = TypeVar("T")
Query = Sequence[tuple[str, str]]
Method = Literal["POST", "PUT", "PATCH", "DELETE"]

#: Attempts of a write transaction that lost a race PostgreSQL reports at commit.
_ATTEMPTS = 5
#: SQLSTATEs of such races: unique violation, serialization failure, deadlock.
_RETRYABLE = frozenset({"23505", "40001", "40P01"})
#: Parameters of a conditional URL that are not search criteria.
_NOT_CRITERIA = frozenset({"_format", "_pretty", "_summary", "_elements"})
#: The ``fhir_resource_versions`` columns a write fills, in the order of its rows.
_VERSION_COLUMNS = ("resource_id", "version_id", "last_updated", "method", "content")
_ETAG = re.compile(r'^\s*(?:W/)?"?([0-9]+)"?\s*$')


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResource:
    """One version of a resource as stored (the current one, unless from history)."""

    pk: int
    resource_type: str
    id: str
    version_id: int
    last_updated: dt.datetime
    deleted: bool
    #: The JSON as served (``meta.versionId``/``lastUpdated`` set); None when deleted.
    content: bytes | None
    #: The interaction that made this version: POST, PUT or DELETE.
    method: str = "PUT"
    #: What a write did: ``created`` (201), ``updated`` (200), ``deleted``, or
    #: ``unchanged`` (a conditional create that found its match, a delete of nothing).
    outcome: str = "updated"

    @property
    def etag(self) -> str:
        """The weak ETag of the version, ``W/"3"``."""
        return f'W/"{self.version_id}"'

    @property
    def last_modified(self) -> str:
        """``last_updated`` as an HTTP date (``Last-Modified``)."""
        return format_datetime(self.last_updated, usegmt=True)

    @property
    def instant(self) -> str:
        """``last_updated`` as a FHIR instant."""
        return fhir_instant(self.last_updated)

    @property
    def reference(self) -> str:
        """``Type/id``."""
        return f"{self.resource_type}/{self.id}"

    def location(self, base_url: str) -> str:
        """The version's URL, ``{base}/Type/id/_history/3``."""
        return f"{base_url}/{self.resource_type}/{self.id}/_history/{self.version_id}"

    def resource(self) -> dict[str, Any] | None:
        """The version's resource as JSON (None when deleted)."""
        if self.content is None:
            return None
        parsed: dict[str, Any] = parse_json(self.content, "stored resource")
        return parsed


@dataclass(frozen=True)
class HistoryPage:
    """One page of a ``_history`` listing, newest version first."""

    entries: list[StoredResource]
    total: int
    #: Cursor of the next page (the ``_cursor`` parameter), None on the last page.
    next_cursor: int | None


def fhir_instant(value: dt.datetime) -> str:
    """A timezone-aware time as a FHIR instant with milliseconds."""
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def now_ms() -> dt.datetime:
    """The current UTC time truncated to milliseconds (the precision of ``lastUpdated``,
    so ``meta.lastUpdated`` and the stored time are equal)."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def parse_version_etag(value: str) -> int:
    """The version number of an ``If-Match`` value: ``W/"3"`` (or ``"3"``, ``3``) → 3."""
    match = _ETAG.match(value)
    if match is None:
        message = f'If-Match {value!r} is not a version ETag such as W/"3"'
        raise InvalidResource(message, issues=[issue("value", message)])
    return int(match.group(1))


def criteria(query: str | Query) -> list[tuple[str, str]]:
    """Search criteria of a conditional interaction, from a query string
    (``identifier=x|1&active=true``) or pairs; ``_format`` and the like are dropped."""
    if isinstance(query, str):
        # ``Patient?identifier=…`` is accepted as well as the bare ``identifier=…``
        head, mark, tail = query.partition("?")
        pairs = parse_qsl(tail if mark and "=" not in head else query, keep_blank_values=True)
    else:
        pairs = list(query)
    out = [(k, v) for k, v in pairs if k not in _NOT_CRITERIA]
    if not out:
        message = "a conditional interaction needs search criteria"
        raise InvalidResource(message, issues=[issue("required", message)])
    return out


# --- transactions -------------------------------------------------------------------------


@contextmanager
def write_transaction(archive: Archive) -> Iterator[Connection]:
    """One write transaction on the index (see the module docstring for the locking)."""
    if archive.engine.dialect.name == "sqlite":
        # The in-process lock keeps this process's writers off SQLite's busy-wait loop;
        # BEGIN IMMEDIATE queues behind writers of other processes.
        with archive.write_lock, archive.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
    else:
        with archive.engine.begin() as conn:
            yield conn


def _retryable(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _RETRYABLE


def run_write(
    archive: Archive,
    partition: str,
    work: Callable[[WriteSession], T],
    *,
    compartments: frozenset[str] | None = None,
) -> T:
    """Run ``work`` in a write transaction of ``partition`` (created on first use),
    again from the start when PostgreSQL reports a lost race. ``compartments``
    (``Patient/123``) limit what the session may match and write (see
    :class:`WriteSession`)."""
    patients = compartment_patients(compartments)
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            with write_transaction(archive) as conn:
                found = partition_id(conn, partition, create=True)
                assert found is not None
                return work(WriteSession(conn, found, patients))
        except DBAPIError as exc:
            if not _retryable(exc):
                raise DatabaseUnavailable(f"the index refused the FHIR write: {exc.orig}") from exc
            if attempt == _ATTEMPTS:
                raise Conflict(
                    f"the FHIR write collided with concurrent writes {_ATTEMPTS} times; retry"
                ) from exc
    raise AssertionError("unreachable")


def _partition_for_read(conn: Connection, partition: str) -> int:
    found = partition_id(conn, partition, create=False)
    if found is None:
        raise NotFound(f"partition {partition!r} does not exist")
    return found


# --- the write session ----------------------------------------------------------------------


@dataclass(frozen=True)
class CurrentRow:
    """The ``fhir_resources`` row of a resource, as read for a write."""

    pk: int
    resource_type: str
    logical_id: str
    version_id: int
    deleted: bool


@dataclass
class WriteOp:
    """One change to make: a new version of ``resource`` (None: a delete)."""

    resource_type: str
    logical_id: str
    resource: dict[str, Any] | None
    method: Method
    current: CurrentRow | None
    #: Set by :meth:`WriteSession.apply`.
    result: StoredResource | None = field(default=None, repr=False)


class WriteSession:
    """The writes of one transaction in one partition; shared by the single
    interactions and transaction bundles.

    With ``patients`` (the ids of the compartments the caller is limited to), searches
    only match resources in those compartments, and :meth:`apply` refuses (403) to
    change a resource outside them or to write one that would lie outside them.
    """

    def __init__(
        self, conn: Connection, partition_pk: int, patients: Sequence[str] | None = None
    ) -> None:
        self.conn = conn
        self.partition_pk = partition_pk
        self.patients = patients
        self.now = now_ms()
        self._postgres = conn.dialect.name == "postgresql"

    # reading what is there

    def current(self, resource_type: str, ids: Sequence[str]) -> dict[str, CurrentRow]:
        """The rows of ``ids`` that exist (deleted ones included), locked for the write."""
        out: dict[str, CurrentRow] = {}
        unique = sorted(set(ids))
        for start in range(0, len(unique), 500):
            query = (
                select(
                    fhir_resources.c.id,
                    fhir_resources.c.logical_id,
                    fhir_resources.c.version_id,
                    fhir_resources.c.deleted,
                )
                .where(
                    fhir_resources.c.partition_id == self.partition_pk,
                    fhir_resources.c.resource_type == resource_type,
                    fhir_resources.c.logical_id.in_(unique[start : start + 500]),
                )
                .order_by(fhir_resources.c.id)  # one locking order: no deadlock between writers
            )
            if self._postgres:
                query = query.with_for_update()
            for row in self.conn.execute(query):
                out[row.logical_id] = CurrentRow(
                    row.id, resource_type, row.logical_id, row.version_id, row.deleted
                )
        return out

    def current_by_pk(self, pks: Sequence[int]) -> list[CurrentRow]:
        """The rows of ``pks`` (from a search), locked for the write."""
        if not pks:
            return []
        query = (
            select(fhir_resources)
            .where(fhir_resources.c.id.in_(list(pks)))
            .order_by(fhir_resources.c.id)
        )
        if self._postgres:
            query = query.with_for_update()
        return [
            CurrentRow(r.id, r.resource_type, r.logical_id, r.version_id, r.deleted)
            for r in self.conn.execute(query)
        ]

    def lock_criteria(self, resource_type: str, query: Query) -> None:
        """Serialize conditional interactions on the same criteria (PostgreSQL; SQLite
        writers are serialized already), so two conditional creates cannot both miss."""
        if not self._postgres:
            return
        key_text = f"{self.partition_pk}|{resource_type}|{sorted(query)!r}"
        digest = hashlib.blake2b(key_text.encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "big", signed=True)
        self.conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def matches(self, resource_type: str, query: Query) -> list[CurrentRow]:
        """Current, not deleted resources matching search criteria, locked."""
        pks = matching_resources(
            self.conn, self.partition_pk, resource_type, query, patients=self.patients
        )
        return [row for row in self.current_by_pk(pks) if not row.deleted]

    # writing

    def apply(self, ops: Sequence[WriteOp]) -> list[StoredResource]:
        """Write a new version for each op (each resource at most once), index them,
        and return the stored versions in the order of ``ops``."""
        self.check_compartments(ops)
        creates: list[WriteOp] = []
        changes: list[WriteOp] = []
        for op in ops:
            if op.resource is None and (op.current is None or op.current.deleted):
                op.result = self._nothing_to_delete(op)
            elif op.current is None:
                creates.append(op)
            else:
                changes.append(op)
        versions: list[tuple[Any, ...]] = []
        served: list[tuple[WriteOp, dict[str, Any] | None]] = []
        if creates:
            rows = []
            for op in creates:
                body, resource = self._serve(op, 1)
                rows.append(self._row(op, 1, body))
                served.append((op, resource))
            pks = self.conn.execute(
                insert(fhir_resources).returning(fhir_resources.c.id, sort_by_parameter_order=True),
                rows,
            ).scalars()
            for op, pk, row in zip(creates, pks, rows, strict=True):
                op.result = self._result(op, pk, 1, row["content"], "created")
        if changes:
            params = []
            for op in changes:
                assert op.current is not None
                version = op.current.version_id + 1
                body, resource = self._serve(op, version)
                served.append((op, resource))
                params.append(
                    {
                        "b_pk": op.current.pk,
                        "b_old": op.current.version_id,
                        "b_version": version,
                        "b_time": self.now,
                        "b_deleted": resource is None,
                        "b_content": body,
                    }
                )
                outcome = "deleted" if resource is None else "updated"
                if resource is not None and op.current.deleted:
                    outcome = "created"
                op.result = self._result(op, op.current.pk, version, body, outcome)
            changed = self.conn.execute(
                update(fhir_resources)
                .where(
                    fhir_resources.c.id == bindparam("b_pk"),
                    fhir_resources.c.version_id == bindparam("b_old"),
                )
                .values(
                    version_id=bindparam("b_version"),
                    last_updated=bindparam("b_time"),
                    deleted=bindparam("b_deleted"),
                    content=bindparam("b_content"),
                ),
                params,
            )
            if changed.rowcount not in (-1, len(params)):
                # Only a writer that ignored the locking above can get here.
                raise Conflict("a resource changed while it was being written; retry")
        indexed: list[tuple[int, dict[str, Any]]] = []
        for op, resource in served:
            assert op.result is not None
            content = None if op.result.content is None else op.result.content.decode()
            versions.append((op.result.pk, op.result.version_id, self.now, op.method, content))
            if resource is None:
                unindex_resource(self.conn, op.result.pk)
            else:
                indexed.append((op.result.pk, resource))
        append_rows(self.conn, fhir_resource_versions, _VERSION_COLUMNS, versions)
        if indexed:
            index_resources(self.conn, indexed)
        return [op.result for op in ops if op.result is not None]

    def check_compartments(self, ops: Sequence[WriteOp]) -> None:
        """403 when the session is limited to compartments and an op changes a resource
        outside them, or writes a version that would lie outside them."""
        patients = self.patients
        if patients is None:
            return
        existing = [op.current.pk for op in ops if op.current and not op.current.deleted]
        inside: set[int] = set()
        if existing:
            inside = set(
                self.conn.execute(
                    select(fhir_resources.c.id).where(
                        fhir_resources.c.id.in_(existing),
                        compartment_condition(fhir_resources, patients),
                    )
                ).scalars()
            )
        for op in ops:
            reference = f"{op.resource_type}/{op.logical_id}"
            if op.current and not op.current.deleted and op.current.pk not in inside:
                raise outside_compartment(reference, patients)
            if op.resource is not None:
                served = {**op.resource, "resourceType": op.resource_type, "id": op.logical_id}
                if not resource_in_compartment(served, patients):
                    what = f"the new {op.resource_type}" if op.method == "POST" else reference
                    raise outside_compartment(what, patients)

    def _serve(self, op: WriteOp, version: int) -> tuple[str | None, dict[str, Any] | None]:
        """The JSON text and dict of the new version (None, None for a delete)."""
        if op.resource is None:
            return None, None
        meta = dict(op.resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = fhir_instant(self.now)
        resource = {"resourceType": op.resource_type, "id": op.logical_id, "meta": meta}
        for key, value in op.resource.items():
            if key not in resource:
                resource[key] = value
        return dump_resource(resource).decode(), resource

    def _row(self, op: WriteOp, version: int, body: str | None) -> dict[str, Any]:
        return {
            "partition_id": self.partition_pk,
            "resource_type": op.resource_type,
            "logical_id": op.logical_id,
            "version_id": version,
            "last_updated": self.now,
            "deleted": body is None,
            "content": body,
        }

    def _result(
        self, op: WriteOp, pk: int, version: int, body: str | None, outcome: str
    ) -> StoredResource:
        return StoredResource(
            pk=pk,
            resource_type=op.resource_type,
            id=op.logical_id,
            version_id=version,
            last_updated=self.now,
            deleted=body is None,
            content=None if body is None else body.encode(),
            method=op.method,
            outcome=outcome,
        )

    def _nothing_to_delete(self, op: WriteOp) -> StoredResource:
        current = op.current
        return StoredResource(
            pk=current.pk if current else 0,
            resource_type=op.resource_type,
            id=op.logical_id,
            version_id=current.version_id if current else 0,
            last_updated=self.now,
            deleted=True,
            content=None,
            method="DELETE",
            outcome="unchanged",
        )

    # the interactions, inside this session

    def create(
        self,
        resource: dict[str, Any],
        *,
        if_none_exist: Query | None = None,
        logical_id: str | None = None,
    ) -> StoredResource:
        """Create (or, with ``if_none_exist``, find) a resource; ``logical_id`` is the
        id to give it (a bundle assigns them up front), else a new UUID."""
        resource_type: str = resource["resourceType"]
        if if_none_exist is not None:
            found = self.find_one(resource_type, if_none_exist)
            if found is not None:
                return self.stored(found)
        new_id = logical_id or new_logical_id()
        op = WriteOp(resource_type, new_id, resource, "POST", None)
        return self.apply([op])[0]

    def find_one(self, resource_type: str, query: Query) -> CurrentRow | None:
        """The one resource matching the criteria, None for none, 412 for several."""
        self.lock_criteria(resource_type, query)
        found = self.matches(resource_type, query)
        if len(found) > 1:
            message = (
                f"{len(found)} {resource_type} resources match {_query_text(query)}; "
                "the criteria must select at most one"
            )
            raise PreconditionFailed(message, issues=[issue("multiple-matches", message)])
        return found[0] if found else None

    def update(
        self,
        resource_type: str,
        logical_id: str,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
    ) -> StoredResource:
        """A new version of ``Type/id`` (created when it does not exist)."""
        current = self.current(resource_type, [logical_id]).get(logical_id)
        check_version(resource_type, logical_id, current, if_match)
        return self.apply([WriteOp(resource_type, logical_id, resource, "PUT", current)])[0]

    def delete(
        self, resource_type: str, logical_id: str, *, if_match: int | None = None
    ) -> StoredResource:
        """Mark ``Type/id`` deleted (a new version without content)."""
        current = self.current(resource_type, [logical_id]).get(logical_id)
        if current is not None or if_match is not None:
            check_version(resource_type, logical_id, current, if_match)
        return self.apply([WriteOp(resource_type, logical_id, None, "DELETE", current)])[0]

    def stored(self, row: CurrentRow) -> StoredResource:
        """The current version of a row found for a write, as stored."""
        return _read_pk(self.conn, row.pk, outcome="unchanged")


def new_logical_id() -> str:
    """A server-assigned resource id."""
    return str(uuid.uuid4())


def check_version(
    resource_type: str, logical_id: str, current: CurrentRow | None, if_match: int | None
) -> None:
    """412 when ``If-Match`` names a version other than the current one."""
    if if_match is None:
        return
    if current is None:
        message = f"{resource_type}/{logical_id} does not exist; If-Match names version {if_match}"
        raise PreconditionFailed(message, issues=[issue("conflict", message)])
    if current.version_id != if_match:
        message = (
            f"{resource_type}/{logical_id} is at version {current.version_id}, "
            f"If-Match names version {if_match}"
        )
        raise PreconditionFailed(message, issues=[issue("conflict", message)])


def _query_text(query: Query) -> str:
    return "&".join(f"{k}={v}" for k, v in query)


# --- the interactions ----------------------------------------------------------------------


def _checked(resource: dict[str, Any], resource_type: str | None = None) -> dict[str, Any]:
    check_envelope(resource, resource_type=resource_type)
    validate_resource(resource)
    return resource


def create_resource(
    archive: Archive,
    resource: dict[str, Any],
    *,
    partition: str = DEFAULT_PARTITION,
    if_none_exist: str | Query | None = None,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """Create a resource with a server-assigned id (``create``; any id in the body is
    ignored, as FHIR says). With ``if_none_exist`` (criteria, e.g.
    ``identifier=http://x|1``) it is a conditional create: one match is returned
    unchanged (``outcome == "unchanged"``), several are 412.

    ``compartments`` (here and in the other interactions: the ``Patient/123`` a caller
    is limited to, ``None`` for no limit) restrict what criteria match; a resource that
    would lie outside them is refused (403)."""
    _checked(resource)
    condition = criteria(if_none_exist) if if_none_exist is not None else None
    return run_write(
        archive,
        partition,
        lambda s: s.create(resource, if_none_exist=condition),
        compartments=compartments,
    )


def update_resource(
    archive: Archive,
    resource_type: str,
    resource_id: str,
    resource: dict[str, Any],
    *,
    partition: str = DEFAULT_PARTITION,
    if_match: int | None = None,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """Store a new version of ``Type/id`` (``update``); a resource that does not exist
    (or was deleted) is created with that id. ``if_match`` is the version the client
    expects to replace (412 when it is not the current one)."""
    check_resource_type(resource_type)
    check_id(resource_id)
    check_envelope(resource, resource_type=resource_type, resource_id=resource_id)
    validate_resource(resource)
    return run_write(
        archive,
        partition,
        lambda s: s.update(resource_type, resource_id, resource, if_match=if_match),
        compartments=compartments,
    )


def patch_resource(
    archive: Archive,
    resource_type: str,
    resource_id: str,
    patch: Any,
    *,
    partition: str = DEFAULT_PARTITION,
    if_match: int | None = None,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """``patch``: a new version of ``Type/id`` made by applying the JSON Patch document
    ``patch`` (the parsed body) to the current one, read and written in one transaction
    (the row is locked on PostgreSQL: no update in between is lost).

    404 when unknown (or outside ``compartments``), 410 when deleted, 412 when
    ``if_match`` is not the current version, 400 for a document that is no JSON Patch,
    422 when it cannot be applied or the result is no valid resource (it may not
    change ``resourceType`` or ``id``: 400)."""
    check_resource_type(resource_type)
    check_id(resource_id)
    operations = parse_json_patch(patch)
    reference = f"{resource_type}/{resource_id}"

    def work(session: WriteSession) -> StoredResource:
        current = session.current(resource_type, [resource_id]).get(resource_id)
        stored = read_current(
            session.conn, session.partition_pk, resource_type, resource_id,
            patients=session.patients,
        )  # fmt: skip
        assert current is not None  # read_current found it
        check_version(resource_type, resource_id, current, if_match)
        resource = stored.resource()
        assert resource is not None  # not deleted: read_current said 410 otherwise
        patched = apply_json_patch(operations, resource, reference)
        check_envelope(patched, resource_type=resource_type, resource_id=resource_id)
        validate_resource(patched)
        op = WriteOp(resource_type, resource_id, patched, "PATCH", current)
        return session.apply([op])[0]

    return run_write(archive, partition, work, compartments=compartments)


def conditional_update(
    archive: Archive,
    resource_type: str,
    query: str | Query,
    resource: dict[str, Any],
    *,
    partition: str = DEFAULT_PARTITION,
    if_match: int | None = None,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """``PUT /Type?criteria``: update the one match; with none, create the resource
    (with the id of the body, if it has one); 412 for several matches, 400 when the
    body's id is not the match's."""
    check_resource_type(resource_type)
    check_envelope(resource, resource_type=resource_type)
    validate_resource(resource)
    condition = criteria(query)

    def work(session: WriteSession) -> StoredResource:
        found = session.find_one(resource_type, condition)
        body_id = resource.get("id")
        if found is None:
            target = body_id if isinstance(body_id, str) else new_logical_id()
            return session.update(resource_type, target, resource, if_match=if_match)
        if body_id is not None and body_id != found.logical_id:
            message = (
                f"the resource id {body_id!r} differs from the id {found.logical_id!r} of the "
                f"{resource_type} matching {_query_text(condition)}"
            )
            raise InvalidResource(message, issues=[issue("invalid", message)])
        return session.update(resource_type, found.logical_id, resource, if_match=if_match)

    return run_write(archive, partition, work, compartments=compartments)


def delete_resource(
    archive: Archive,
    resource_type: str,
    resource_id: str,
    *,
    partition: str = DEFAULT_PARTITION,
    if_match: int | None = None,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """Delete ``Type/id``: a new version marked deleted (history keeps the others).
    Deleting what does not exist, or is deleted, changes nothing
    (``outcome == "unchanged"``)."""
    check_resource_type(resource_type)
    check_id(resource_id)
    return run_write(
        archive,
        partition,
        lambda s: s.delete(resource_type, resource_id, if_match=if_match),
        compartments=compartments,
    )


def conditional_delete(
    archive: Archive,
    resource_type: str,
    query: str | Query,
    *,
    partition: str = DEFAULT_PARTITION,
    compartments: frozenset[str] | None = None,
) -> StoredResource | None:
    """``DELETE /Type?criteria``: delete the one match (None when nothing matches);
    412 for several matches."""
    check_resource_type(resource_type)
    condition = criteria(query)

    def work(session: WriteSession) -> StoredResource | None:
        found = session.find_one(resource_type, condition)
        if found is None:
            return None
        return session.delete(resource_type, found.logical_id)

    return run_write(archive, partition, work, compartments=compartments)


# --- reads ---------------------------------------------------------------------------------


def _read_pk(conn: Connection, pk: int, *, outcome: str = "updated") -> StoredResource:
    row = conn.execute(select(fhir_resources).where(fhir_resources.c.id == pk)).one()
    return _from_row(row, outcome=outcome)


def _from_row(row: Any, *, outcome: str = "updated") -> StoredResource:
    return StoredResource(
        pk=row.id,
        resource_type=row.resource_type,
        id=row.logical_id,
        version_id=row.version_id,
        last_updated=_utc(row.last_updated),
        deleted=row.deleted,
        content=None if row.content is None else row.content.encode(),
        method="DELETE" if row.deleted else "PUT",
        outcome=outcome,
    )


def _last_content(conn: Connection, pk: int, before: int | None = None) -> str | None:
    """The JSON of the newest version of a resource that has content (before version
    ``before``): what a deleted resource was."""
    v = fhir_resource_versions.c
    query = select(v.content).where(v.resource_id == pk, v.content.is_not(None))
    if before is not None:
        query = query.where(v.version_id < before)
    content: str | None = conn.execute(
        query.order_by(v.version_id.desc()).limit(1)
    ).scalar_one_or_none()
    return content


def _visible(conn: Connection, stored: StoredResource, patients: Sequence[str] | None) -> bool:
    """Whether a caller limited to ``patients``' compartments (``None``: no limit) may
    see this version; a deletion is judged by the version it deleted."""
    if patients is None:
        return True
    content: str | bytes | None = stored.content
    if content is None:
        content = _last_content(conn, stored.pk, stored.version_id)
    if content is None:
        return False
    return resource_in_compartment(parse_json(content, "stored resource"), patients)


def read_current(
    conn: Connection,
    partition_pk: int,
    resource_type: str,
    resource_id: str,
    *,
    patients: Sequence[str] | None = None,
) -> StoredResource:
    """``read`` inside an open transaction: 404 when unknown, 410 when deleted. With
    ``patients``, a resource outside their compartments is 404 too (its existence is
    not revealed)."""
    check_resource_type(resource_type)
    check_id(resource_id)
    row = conn.execute(
        select(fhir_resources).where(
            fhir_resources.c.partition_id == partition_pk,
            fhir_resources.c.resource_type == resource_type,
            fhir_resources.c.logical_id == resource_id,
        )
    ).one_or_none()
    stored = _from_row(row) if row is not None else None
    if stored is None or not _visible(conn, stored, patients):
        raise NotFound(f"{resource_type}/{resource_id} does not exist")
    if stored.deleted:
        raise Gone(
            f"{resource_type}/{resource_id} was deleted (version {stored.version_id})",
            issues=[issue("deleted", f"{resource_type}/{resource_id} was deleted")],
        )
    return stored


def read_version(
    conn: Connection,
    partition_pk: int,
    resource_type: str,
    resource_id: str,
    version: int,
    *,
    patients: Sequence[str] | None = None,
) -> StoredResource:
    """``vread`` inside an open transaction: 404 for an unknown version (or, with
    ``patients``, one outside their compartments), 410 for the version that deleted
    the resource."""
    check_resource_type(resource_type)
    check_id(resource_id)
    v = fhir_resource_versions.c
    r = fhir_resources.c
    row = conn.execute(
        select(
            r.id, r.resource_type, r.logical_id, v.version_id, v.last_updated, v.method, v.content
        )
        .join(fhir_resources, r.id == v.resource_id)
        .where(
            r.partition_id == partition_pk,
            r.resource_type == resource_type,
            r.logical_id == resource_id,
            v.version_id == version,
        )
    ).one_or_none()
    stored = _version_from_row(row) if row is not None else None
    if stored is None or not _visible(conn, stored, patients):
        raise NotFound(f"{resource_type}/{resource_id} has no version {version}")
    if stored.deleted:
        raise Gone(
            f"version {version} of {resource_type}/{resource_id} is its deletion",
            issues=[issue("deleted", f"{resource_type}/{resource_id} was deleted")],
        )
    return stored


def _version_from_row(row: Any) -> StoredResource:
    return StoredResource(
        pk=row.id,
        resource_type=row.resource_type,
        id=row.logical_id,
        version_id=row.version_id,
        last_updated=_utc(row.last_updated),
        deleted=row.content is None,
        content=None if row.content is None else row.content.encode(),
        method=row.method,
        outcome="deleted" if row.method == "DELETE" else "updated",
    )


def read_resource(
    archive: Archive,
    resource_type: str,
    resource_id: str,
    *,
    partition: str = DEFAULT_PARTITION,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """The current version of ``Type/id`` (``read``): 404 unknown (or outside
    ``compartments``), 410 deleted."""
    patients = compartment_patients(compartments)
    with archive.engine.connect() as conn:
        partition_pk = _partition_for_read(conn, partition)
        return read_current(conn, partition_pk, resource_type, resource_id, patients=patients)


def vread_resource(
    archive: Archive,
    resource_type: str,
    resource_id: str,
    version: int,
    *,
    partition: str = DEFAULT_PARTITION,
    compartments: frozenset[str] | None = None,
) -> StoredResource:
    """Version ``version`` of ``Type/id`` (``vread``); 404 outside ``compartments``."""
    patients = compartment_patients(compartments)
    with archive.engine.connect() as conn:
        partition_pk = _partition_for_read(conn, partition)
        return read_version(
            conn, partition_pk, resource_type, resource_id, version, patients=patients
        )


def history(
    archive: Archive,
    *,
    partition: str = DEFAULT_PARTITION,
    resource_type: str | None = None,
    resource_id: str | None = None,
    since: dt.datetime | None = None,
    count: int = 100,
    cursor: int | None = None,
    compartments: frozenset[str] | None = None,
) -> HistoryPage:
    """Versions newest first (``_history``) of the whole partition, one type, or one
    resource; ``since`` keeps versions made at or after it; ``count`` is the page size
    and ``cursor`` the ``next_cursor`` of the previous page. Unknown resource: 404.

    With ``compartments`` only resources now in them are listed (a resource outside,
    or deleted, is 404 / left out), and a version whose content was outside them (the
    resource moved between patients) is left out of its page and of the total (which
    then reads every listed version: a compartment holds one patient's data)."""
    patients = compartment_patients(compartments)
    if count < 0:
        raise InvalidInput(f"_count must not be negative, not {count}")
    if resource_type is not None:
        check_resource_type(resource_type)
    if resource_id is not None:
        check_id(resource_id)
    v = fhir_resource_versions.c
    r = fhir_resources.c
    with archive.engine.connect() as conn:
        partition_pk = _partition_for_read(conn, partition)
        conditions = [r.partition_id == partition_pk]
        if resource_type is not None:
            conditions.append(r.resource_type == resource_type)
        if patients is not None:
            conditions.append(compartment_condition(fhir_resources, patients, resource_type))
        if resource_id is not None:
            conditions.append(r.logical_id == resource_id)
            exists = conn.execute(select(r.id).where(and_(*conditions))).first()
            if exists is None:
                raise NotFound(f"{resource_type}/{resource_id} does not exist")
        if since is not None:
            conditions.append(v.last_updated >= since.astimezone(dt.UTC))
        joined = fhir_resource_versions.join(fhir_resources, r.id == v.resource_id)
        if patients is None:
            total = conn.execute(
                select(func.count()).select_from(joined).where(and_(*conditions))
            ).scalar_one()
        else:  # only the versions the caller may see: each one's content is judged
            contents = conn.execute(select(v.content).select_from(joined).where(and_(*conditions)))
            total = sum(
                1
                for (content,) in contents
                if content is None
                or resource_in_compartment(parse_json(content, "stored resource"), patients)
            )
        if cursor is not None:
            conditions.append(v.id < cursor)
        rows = conn.execute(
            select(
                v.id.label("row_id"), r.id, r.resource_type, r.logical_id, v.version_id,
                v.last_updated, v.method, v.content,
            )
            .select_from(joined)
            .where(and_(*conditions))
            .order_by(v.id.desc())
            .limit(count + 1)
        ).all()  # fmt: skip
    page = rows[:count]
    next_cursor = page[-1].row_id if len(rows) > count and page else None
    versions = [_version_from_row(row) for row in page]
    if patients is not None:
        versions = [
            version
            for version in versions
            if version.content is None
            or resource_in_compartment(version.resource() or {}, patients)
        ]
    return HistoryPage(versions, total, next_cursor)


__all__ = [
    "CurrentRow",
    "HistoryPage",
    "Method",
    "StoredResource",
    "WriteOp",
    "WriteSession",
    "check_version",
    "conditional_delete",
    "conditional_update",
    "create_resource",
    "criteria",
    "delete_resource",
    "fhir_instant",
    "history",
    "new_logical_id",
    "now_ms",
    "parse_version_etag",
    "patch_resource",
    "read_current",
    "read_resource",
    "read_version",
    "run_write",
    "update_resource",
    "vread_resource",
    "write_transaction",
]
