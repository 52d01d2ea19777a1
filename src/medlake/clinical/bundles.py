"""FHIR ``transaction`` and ``batch`` Bundles (R4 http.html#transaction).

A *transaction* is all or nothing: every entry is checked first, then one database
transaction resolves the targets of the entries, rewrites the references between
them and writes every version with one multi-row INSERT per table. Entries are
processed in the order FHIR prescribes (DELETE, POST, PUT, then GET/HEAD), and the
response lists them in the order of the request.

- ``fullUrl`` values (``urn:uuid:...``, ``urn:oid:...`` or absolute URLs) of entries
  that create or update a resource are replaced by ``Type/id`` wherever a resource
  of the bundle uses them: ``Reference.reference``, ``uri``/``url``/``canonical``
  elements, and inside narrative XHTML. An ``Identifier``'s or ``Coding``'s
  ``value`` (an object with a ``system``) is data, never rewritten.
- Conditional references (``Patient?identifier=http://x|1``) resolve to the one
  resource they match: first among the conditional creates / updates of the same
  bundle with the same criteria, then in the store; none or several is 412.
- Conditional create (``ifNoneExist``), conditional update (``PUT Type?criteria``)
  and conditional delete work as they do alone.

A *batch* runs each entry on its own (its own transaction) and reports each
entry's status, with an ``OperationOutcome`` for the failed ones.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Connection

from medlake.clinical.compartments import compartment_patients
from medlake.clinical.outcome import information, operation_outcome
from medlake.clinical.resources import check_envelope, check_id, issue, validate_resource
from medlake.clinical.search import search_bundle
from medlake.clinical.store import (
    CurrentRow,
    Method,
    StoredResource,
    WriteOp,
    WriteSession,
    check_version,
    conditional_delete,
    conditional_update,
    create_resource,
    criteria,
    delete_resource,
    fhir_instant,
    new_logical_id,
    now_ms,
    parse_version_etag,
    read_current,
    read_version,
    run_write,
    update_resource,
    write_transaction,
)
from medlake.errors import (
    FhirError,
    InvalidResource,
    MedlakeError,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
)
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

#: The order in which a transaction's entries are processed.
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_CONDITIONAL_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)\?(.+)$")
_STATUS_TEXT = {200: "OK", 201: "Created", 204: "No Content"}


@dataclass
class Entry:
    """One ``Bundle.entry`` as understood from its ``request``."""

    index: int
    method: str
    url: str
    resource_type: str | None = None
    id: str | None = None
    version: int | None = None
    #: Criteria of a conditional update/delete, or the query of a search.
    query: list[tuple[str, str]] | None = None
    if_match: int | None = None
    if_none_exist: list[tuple[str, str]] | None = None
    full_url: str | None = None
    resource: dict[str, Any] | None = None
    #: Filled while processing.
    target: str | None = None
    result: StoredResource | None = None
    response: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """FHIRPath of the entry."""
        return f"Bundle.entry[{self.index}]"


def process_bundle(
    archive: Archive,
    bundle: dict[str, Any],
    *,
    partition: str = DEFAULT_PARTITION,
    base_url: str,
    prefer: str = "minimal",
    compartments: frozenset[str] | None = None,
    then: Callable[[Connection, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Process a ``transaction`` or ``batch`` Bundle and return its response Bundle.

    ``then`` is called with the connection and the response Bundle inside the
    transaction's own database transaction: what it writes (the caller's bookkeeping)
    commits with the entries, or not at all. (A ``batch`` has no one transaction:
    there ``then`` runs in one of its own after the entries.)

    ``compartments`` (``Patient/123``; ``None``: no limit) limit every entry as they
    limit the single interactions: an entry that would write outside them fails (403),
    and with it the whole transaction.

    ``base_url`` is the FHIR base (``http://host/fhir``) for ``location`` and search
    links; ``prefer`` is the ``Prefer: return=`` wish for written entries: ``minimal``
    (status, location, etag, lastModified), ``representation`` (also the resource) or
    ``OperationOutcome``. A transaction that fails raises the error of the first entry
    that failed (its message and issues name the entry); nothing is written then.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        message = "the body must be a Bundle of type transaction or batch"
        raise InvalidResource(message, issues=[issue("structure", message)])
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        message = f"Bundle.type must be transaction or batch to be processed, not {kind!r}"
        raise InvalidResource(message, issues=[issue("value", message, "Bundle.type")])
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        message = "Bundle.entry must be an array"
        raise InvalidResource(message, issues=[issue("structure", message, "Bundle.entry")])
    base = base_url.rstrip("/")
    if kind == "transaction":
        entries = [_parse_entry(i, raw, base) for i, raw in enumerate(raw_entries)]
        _check_transaction(entries)

        def work(session: WriteSession) -> dict[str, Any]:
            _transaction(session, entries, base, prefer)
            response = _response(kind, base, entries)
            if then is not None:
                then(session.conn, response)
            return response

        return run_write(archive, partition, work, compartments=compartments)
    else:
        entries = []
        for i, raw in enumerate(raw_entries):
            try:
                entries.append(_parse_entry(i, raw, base))
            except MedlakeError as exc:
                failed = Entry(i, "?", "")
                failed.response = _error_response(exc)
                entries.append(failed)
        for entry in sorted(entries, key=lambda e: _ORDER.get(e.method, 4)):
            if entry.response is None:
                entry.response = _batch_entry(archive, partition, entry, base, prefer, compartments)
    response = _response(kind, base, entries)
    if then is not None:
        with write_transaction(archive) as conn:
            then(conn, response)
    return response


def _response(kind: str, base: str, entries: Sequence[Entry]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": fhir_instant(now_ms())},
        "type": f"{kind}-response",
        "link": [{"relation": "self", "url": base}],
        "entry": [entry.response for entry in entries],
    }


# --- reading the request -------------------------------------------------------------------


def _parse_entry(index: int, raw: Any, base: str) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise _invalid(f"{where} must be an object", where)
    request = raw.get("request")
    if not isinstance(request, dict):
        raise _invalid(f"{where}.request is required in a transaction or batch", where)
    method = request.get("method")
    url = request.get("url")
    if method not in _ORDER:
        raise _invalid(
            f"{where}.request.method {method!r} is not GET, HEAD, POST, PUT, DELETE or PATCH",
            f"{where}.request.method",
        )
    if not isinstance(url, str) or not url:
        raise _invalid(f"{where}.request.url is required", f"{where}.request.url")
    entry = Entry(index, method, url, full_url=raw.get("fullUrl"))
    if method == "PATCH":
        raise MethodNotAllowed(
            f"{where}: PATCH is not supported",
            issues=[issue("not-supported", "PATCH is not supported", f"{where}.request")],
        )
    relative = url[len(base) + 1 :] if url.startswith(base + "/") else url.lstrip("/")
    path, _, query = relative.partition("?")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise _invalid(f"{where}.request.url {url!r} names no resource type", where)
    entry.resource_type = parts[0]
    if query:
        entry.query = parse_qsl(query, keep_blank_values=True)
    try:
        if len(parts) >= 2:
            entry.id = check_id(parts[1])
        if len(parts) == 4 and parts[2] == "_history" and parts[3].isdigit():
            entry.version = int(parts[3])
        elif len(parts) > 2 or (len(parts) > 1 and method == "POST"):
            raise _invalid(f"{where}.request.url {url!r} is not a supported {method} URL", where)
        if request.get("ifMatch"):
            entry.if_match = parse_version_etag(request["ifMatch"])
        if request.get("ifNoneExist"):
            entry.if_none_exist = criteria(str(request["ifNoneExist"]))
        if method in ("POST", "PUT"):
            resource = raw.get("resource")
            check_envelope(
                resource,
                resource_type=entry.resource_type,
                resource_id=entry.id if method == "PUT" else None,
                expression=f"{where}.resource",
            )
            entry.resource = resource
            if method == "PUT" and entry.id is None and not entry.query:
                raise _invalid(f"{where}: PUT needs Type/id or Type?criteria", where)
        elif method == "DELETE" and entry.id is None and not entry.query:
            raise _invalid(f"{where}: DELETE needs Type/id or Type?criteria", where)
    except FhirError as exc:
        raise _at_entry(exc, entry) from exc
    return entry


def _check_transaction(entries: list[Entry]) -> None:
    """Everything that can be judged before touching the database: every resource
    valid, no fullUrl twice, no resource written twice."""
    full_urls: set[str] = set()
    for entry in entries:
        if entry.full_url:
            if entry.full_url in full_urls and entry.method in ("POST", "PUT"):
                raise _invalid(
                    f"{entry.where}.fullUrl {entry.full_url!r} appears twice",
                    f"{entry.where}.fullUrl",
                )
            full_urls.add(entry.full_url)
        if entry.resource is not None:
            try:
                validate_resource(entry.resource, expression=f"{entry.where}.resource")
            except FhirError as exc:
                raise _at_entry(exc, entry) from exc
    touched: set[str] = set()
    for entry in entries:
        if entry.method in ("PUT", "DELETE") and entry.id is not None:
            key = f"{entry.resource_type}/{entry.id}"
            if key in touched:
                raise _invalid(
                    f"{entry.where}: {key} is the target of more than one entry",
                    entry.where,
                )
            touched.add(key)


def _invalid(message: str, where: str) -> InvalidResource:
    return InvalidResource(message, issues=[issue("invalid", message, where)])


def _at_entry(exc: MedlakeError, entry: Entry) -> MedlakeError:
    """``exc`` with a message naming the entry it came from."""
    prefix = f"{entry.where} ({entry.method} {entry.url}): "
    if exc.message.startswith("Bundle.entry["):
        return exc
    if isinstance(exc, FhirError):
        issues = [dict(i, diagnostics=prefix + str(i.get("diagnostics", ""))) for i in exc.issues]
        return type(exc)(prefix + exc.message, issues=issues)
    try:
        return type(exc)(prefix + exc.message)
    except TypeError:
        return exc


# --- transaction ---------------------------------------------------------------------------


def _transaction(session: WriteSession, entries: list[Entry], base: str, prefer: str) -> None:
    for entry in entries:  # a rerun after a lost race starts from the request again
        entry.target = entry.result = entry.response = None
    ordered = sorted(entries, key=lambda e: _ORDER[e.method])
    mapping: dict[str, str] = {}
    conditions: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    ops: list[tuple[Entry, WriteOp]] = []
    # 1. what each write targets (ids assigned, conditions resolved)
    for entry in ordered:
        try:
            _resolve_target(session, entry, mapping, conditions)
        except MedlakeError as exc:
            raise _at_entry(exc, entry) from exc
    targets: set[str] = set()
    for entry in ordered:
        if (
            entry.target is not None
            and entry.result is None
            and entry.method not in ("GET", "HEAD")
        ):
            if entry.target in targets:
                raise _invalid(
                    f"{entry.where}: {entry.target} is the target of more than one entry",
                    entry.where,
                )
            targets.add(entry.target)
    # 2. the current rows of the targets, and the version checks
    current = _current_rows(session, ordered)
    resolved_refs: dict[str, str] = {}
    for entry in ordered:
        if entry.target is None or entry.method in ("GET", "HEAD") or entry.result is not None:
            continue
        resource_type, logical_id = entry.target.split("/", 1)
        row = current.get(entry.target)
        try:
            if entry.if_match is not None:
                check_version(resource_type, logical_id, row, entry.if_match)
            resource = None
            if entry.resource is not None:
                resource = _rewrite(
                    entry.resource,
                    mapping,
                    lambda ref: _conditional_reference(session, ref, conditions, resolved_refs),
                )
        except MedlakeError as exc:
            raise _at_entry(exc, entry) from exc
        method: Method = "DELETE" if entry.method == "DELETE" else "POST"
        if entry.method == "PUT":
            method = "PUT"
        op = WriteOp(resource_type, logical_id, resource, method, row)
        try:
            session.check_compartments([op])  # here, so the refusal names its entry
        except MedlakeError as exc:
            raise _at_entry(exc, entry) from exc
        ops.append((entry, op))
    # 3. every write at once
    results = session.apply([op for _, op in ops])
    for (entry, _), result in zip(ops, results, strict=True):
        entry.result = result
    for entry in entries:
        if entry.method in ("GET", "HEAD"):
            try:
                entry.response = _read_entry(
                    session.conn, session.partition_pk, entry, base, session.patients
                )
            except MedlakeError as exc:
                raise _at_entry(exc, entry) from exc
        else:
            entry.response = _write_response(entry, base, prefer)


def _resolve_target(
    session: WriteSession,
    entry: Entry,
    mapping: dict[str, str],
    conditions: dict[tuple[str, tuple[tuple[str, str], ...]], str],
) -> None:
    """Set ``entry.target`` (``Type/id``), or ``entry.result`` when a conditional
    create found its match or a delete found nothing."""
    resource_type = entry.resource_type
    assert resource_type is not None
    if entry.method in ("GET", "HEAD"):
        return
    found: CurrentRow | None = None
    condition = entry.if_none_exist if entry.method == "POST" else entry.query
    if entry.method in ("PUT", "DELETE") and entry.id is not None:
        entry.target = f"{resource_type}/{entry.id}"
    elif condition is not None:
        found = session.find_one(resource_type, condition)
        if entry.method == "POST" and found is not None:
            entry.result = session.stored(found)
            entry.target = entry.result.reference
        elif found is not None:
            body_id = entry.resource.get("id") if entry.resource else None
            if body_id is not None and body_id != found.logical_id:
                raise _invalid(
                    f"the resource id {body_id!r} differs from {found.logical_id!r}, the "
                    f"{resource_type} matching the criteria",
                    entry.where,
                )
            entry.target = f"{resource_type}/{found.logical_id}"
        elif entry.method == "DELETE":
            entry.result = _nothing(resource_type)
        else:
            body_id = entry.resource.get("id") if entry.resource else None
            entry.target = f"{resource_type}/{body_id or new_logical_id()}"
        if entry.method in ("POST", "PUT") and entry.target is not None:
            conditions[(resource_type, _normalized(condition))] = entry.target
    else:  # plain POST
        entry.target = f"{resource_type}/{new_logical_id()}"
    if entry.full_url and entry.target is not None and entry.method != "DELETE":
        mapping[entry.full_url] = entry.target


def _nothing(resource_type: str) -> StoredResource:
    return StoredResource(0, resource_type, "", 0, now_ms(), True, None, "DELETE", "unchanged")


def _normalized(query: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(query))


def _current_rows(session: WriteSession, entries: list[Entry]) -> dict[str, CurrentRow]:
    """The rows of every write target, one query per resource type."""
    by_type: dict[str, list[str]] = {}
    for entry in entries:
        if entry.target is not None and entry.result is None and entry.method != "POST":
            resource_type, logical_id = entry.target.split("/", 1)
            by_type.setdefault(resource_type, []).append(logical_id)
    out: dict[str, CurrentRow] = {}
    for resource_type, ids in by_type.items():
        for logical_id, row in session.current(resource_type, ids).items():
            out[f"{resource_type}/{logical_id}"] = row
    return out


def _conditional_reference(
    session: WriteSession,
    reference: str,
    conditions: dict[tuple[str, tuple[tuple[str, str], ...]], str],
    resolved: dict[str, str],
) -> str | None:
    """``Type/id`` for a conditional reference, None when ``reference`` is not one."""
    match = _CONDITIONAL_REFERENCE.match(reference)
    if match is None:
        return None
    if reference in resolved:
        return resolved[reference]
    resource_type, query_text = match.groups()
    query = parse_qsl(query_text, keep_blank_values=True)
    target = conditions.get((resource_type, _normalized(query)))
    if target is None:
        rows = session.matches(resource_type, query)
        if len(rows) != 1:
            what = "no resource matches" if not rows else f"{len(rows)} resources match"
            message = f"conditional reference {reference!r}: {what}; it must match exactly one"
            code = "not-found" if not rows else "multiple-matches"
            raise PreconditionFailed(message, issues=[issue(code, message)])
        target = f"{resource_type}/{rows[0].logical_id}"
    resolved[reference] = target
    return target


def _rewrite(value: Any, mapping: dict[str, str], conditional: Callable[[str], str | None]) -> Any:
    """A copy of ``value`` with the bundle's fullUrls (and conditional references)
    replaced by ``Type/id``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        identifier_like = "system" in value
        for key, item in value.items():
            if isinstance(item, str):
                if key == "reference":
                    out[key] = mapping.get(item) or conditional(item) or item
                elif key == "div":
                    out[key] = _rewrite_narrative(item, mapping)
                elif item in mapping and not (identifier_like and key == "value"):
                    out[key] = mapping[item]
                else:
                    out[key] = item
            elif isinstance(item, dict | list):
                out[key] = _rewrite(item, mapping, conditional)
            else:
                out[key] = item
        return out
    if isinstance(value, list):
        return [_rewrite(item, mapping, conditional) for item in value]
    return value


def _rewrite_narrative(div: str, mapping: dict[str, str]) -> str:
    for full_url, target in mapping.items():
        if full_url in div:
            div = div.replace(f'"{full_url}"', f'"{target}"')
    return div


def _read_entry(
    conn: Connection,
    partition_pk: int,
    entry: Entry,
    base: str,
    patients: Sequence[str] | None,
) -> dict[str, Any]:
    """A GET entry (of a transaction: read inside its transaction), limited to the
    compartments of ``patients`` when given."""
    resource_type = entry.resource_type
    assert resource_type is not None
    if entry.id is None:
        found = search_bundle(
            conn,
            partition_pk,
            resource_type,
            entry.query or [],
            base_url=base,
            strict=False,
            compartments=None if patients is None else _compartments(patients),
        )
        return {"resource": found, "response": {"status": "200 OK"}}
    if entry.version is not None:
        stored = read_version(
            conn, partition_pk, resource_type, entry.id, entry.version, patients=patients
        )
    else:
        stored = read_current(conn, partition_pk, resource_type, entry.id, patients=patients)
    return _read_response(stored, base, include=entry.method == "GET")


def _read_response(stored: StoredResource, base: str, *, include: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"fullUrl": f"{base}/{stored.reference}"}
    if include:
        out["resource"] = stored.resource()
    out["response"] = {
        "status": "200 OK",
        "etag": stored.etag,
        "lastModified": stored.instant,
    }
    return out


def _status(code: int) -> str:
    return f"{code} {_STATUS_TEXT.get(code, '')}".strip()


def _write_response(entry: Entry, base: str, prefer: str) -> dict[str, Any]:
    """The response entry of a write: status, location, etag, lastModified."""
    stored = entry.result
    assert stored is not None
    if stored.outcome == "unchanged" and entry.method == "DELETE":
        return {"response": {"status": _status(204)}}
    out: dict[str, Any] = {}
    if not stored.deleted:
        out["fullUrl"] = f"{base}/{stored.reference}"
        if prefer == "representation":
            out["resource"] = stored.resource()
    if entry.method == "DELETE":
        status = 204
    elif stored.outcome == "created":
        status = 201
    else:
        status = 200
    response: dict[str, Any] = {"status": _status(status)}
    if not stored.deleted:
        response["location"] = stored.location(base)
    response["etag"] = stored.etag
    response["lastModified"] = stored.instant
    if prefer == "OperationOutcome":
        response["outcome"] = information(f"{entry.method} {stored.reference}: {stored.outcome}")
    out["response"] = response
    return out


# --- batch ---------------------------------------------------------------------------------


def _compartments(patients: Sequence[str]) -> frozenset[str]:
    return frozenset(f"Patient/{p}" for p in patients)


def _batch_entry(
    archive: Archive,
    partition: str,
    entry: Entry,
    base: str,
    prefer: str,
    compartments: frozenset[str] | None,
) -> dict[str, Any]:
    """One batch entry, on its own: its response entry, or an error response."""
    resource_type = entry.resource_type
    assert resource_type is not None
    try:
        if entry.resource is not None:
            validate_resource(entry.resource, expression=f"{entry.where}.resource")
        if entry.method in ("GET", "HEAD"):
            return _batch_read(archive, partition, entry, base, compartments)
        if entry.method == "POST":
            assert entry.resource is not None
            entry.result = create_resource(
                archive,
                entry.resource,
                partition=partition,
                if_none_exist=entry.if_none_exist,
                compartments=compartments,
            )
        elif entry.method == "PUT":
            assert entry.resource is not None
            if entry.id is not None:
                entry.result = update_resource(
                    archive,
                    resource_type,
                    entry.id,
                    entry.resource,
                    partition=partition,
                    if_match=entry.if_match,
                    compartments=compartments,
                )
            else:
                entry.result = conditional_update(
                    archive,
                    resource_type,
                    entry.query or [],
                    entry.resource,
                    partition=partition,
                    if_match=entry.if_match,
                    compartments=compartments,
                )
        elif entry.id is not None:
            entry.result = delete_resource(
                archive,
                resource_type,
                entry.id,
                partition=partition,
                if_match=entry.if_match,
                compartments=compartments,
            )
        else:
            entry.result = conditional_delete(
                archive,
                resource_type,
                entry.query or [],
                partition=partition,
                compartments=compartments,
            ) or _nothing(resource_type)
        return _write_response(entry, base, prefer)
    except MedlakeError as exc:
        return _error_response(_at_entry(exc, entry))


def _batch_read(
    archive: Archive,
    partition: str,
    entry: Entry,
    base: str,
    compartments: frozenset[str] | None,
) -> dict[str, Any]:
    patients = compartment_patients(compartments)
    with archive.engine.connect() as conn:
        found = partition_id(conn, partition, create=False)
        if found is None:
            raise NotFound(f"partition {partition!r} does not exist")
        return _read_entry(conn, found, entry, base, patients)


def _error_response(exc: MedlakeError) -> dict[str, Any]:
    return {"response": {"status": str(exc.http_status), "outcome": operation_outcome(exc)}}


__all__ = ["Entry", "process_bundle"]
