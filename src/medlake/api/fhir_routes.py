"""FHIR R4 REST routes (http.html): thin adapters from HTTP to ``medlake.clinical``.

Mounted at ``/fhir``. Every answer is ``application/fhir+json``; every error an
``OperationOutcome`` with the status FHIR gives it (this router's own route class
catches them, so the rest of the app keeps its JSON errors).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from medlake import __version__
from medlake.api.auth import decision_of
from medlake.api.conditional_get import not_modified
from medlake.api.errors import warning_header
from medlake.api.media import parse_accept, parse_media_type
from medlake.clinical import store
from medlake.clinical.bundles import process_bundle
from medlake.clinical.capability import capability_statement
from medlake.clinical.outcome import information, operation_outcome
from medlake.clinical.resources import (
    FHIR_JSON,
    RESOURCE_TYPES,
    check_envelope,
    dump_resource,
    parse_json,
)
from medlake.clinical.search import search_bundle
from medlake.errors import (
    InvalidInput,
    MedlakeError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    UnsupportedMediaType,
)
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION, check_partition

PREFIX = "/fhir"
#: Media types of a JSON request body or response.
_JSON_TYPES = (FHIR_JSON, "application/json", "application/json+fhir")
#: The media type of a JSON Patch document (RFC 6902), the body of ``patch``.
JSON_PATCH = "application/json-patch+json"
#: ``_format`` values meaning JSON (R4 http.html#mime-type).
_JSON_FORMATS = frozenset({"json", "application/json", FHIR_JSON, "application/json+fhir"})
#: Parameters of the HTTP interaction itself, never search criteria.
_RESULT_PARAMS = frozenset({"_format", "_pretty"})

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def outcome_response(exc: MedlakeError) -> Response:
    """An error as an ``OperationOutcome`` with the error's status."""
    headers = {"Warning": warning_header(exc.message)}
    if isinstance(exc, MethodNotAllowed) and exc.allow:
        headers["Allow"] = ", ".join(exc.allow)
    return Response(
        dump_resource(operation_outcome(exc)),
        exc.http_status,
        media_type=FHIR_JSON,
        headers=headers,
    )


class FhirRoute(APIRoute):
    """Route whose errors become ``OperationOutcome`` responses."""

    def get_route_handler(self) -> Handler:
        """The endpoint handler, wrapped to turn errors into OperationOutcomes."""
        handler = super().get_route_handler()

        async def fhir_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except MedlakeError as exc:
                return outcome_response(exc)
            except RequestValidationError as exc:
                details = "; ".join(str(e.get("msg", e)) for e in exc.errors())
                return outcome_response(InvalidInput(f"invalid request: {details}"))
            except HTTPException as exc:
                failed = MedlakeError(str(exc.detail))
                failed.http_status = exc.status_code
                return outcome_response(failed)

        return fhir_handler


router = APIRouter(route_class=FhirRoute)


# --- request helpers -----------------------------------------------------------------------


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _partition(request: Request) -> str:
    return check_partition(request.path_params.get("partition", DEFAULT_PARTITION))


def compartments_of(request: Request) -> frozenset[str] | None:
    """The FHIR compartments (``Patient/123``) the request's caller is limited to, from
    the access decision (``None``: no limit); every service call below passes them on."""
    decision = decision_of(request)
    return decision.compartments if decision is not None else None


def _base_url(request: Request) -> str:
    root = str(request.base_url).rstrip("/") + PREFIX
    if "partition" in request.path_params:
        root += f"/partitions/{request.path_params['partition']}"
    return root


def _resource_type(name: str) -> str:
    """The type named in the URL; 404 for a type medlake does not store."""
    if name not in RESOURCE_TYPES:
        raise NotFound(f"{name!r} is not a FHIR R4 resource type medlake supports")
    return name


def _response_type(request: Request) -> str:
    """The media type of the response, from ``_format`` or Accept (406 when neither
    allows JSON)."""
    wanted = request.query_params.get("_format")
    if wanted is not None:
        if wanted.split(";")[0].strip().lower() not in _JSON_FORMATS:
            raise NotAcceptable(f"_format {wanted!r} is not supported; use json")
        return FHIR_JSON
    accept = parse_accept(request.headers.get("accept"))
    for media in accept:
        if media.name == "application/json":
            return "application/json"
        if media.name in _JSON_TYPES or media.matches(FHIR_JSON):
            return FHIR_JSON
    raise NotAcceptable(
        f"cannot answer as {request.headers.get('accept')}; FHIR resources are served as "
        f"{FHIR_JSON}"
    )


async def _body(request: Request) -> Any:
    """The JSON body; 415 for a body that is not declared JSON."""
    content_type = request.headers.get("content-type")
    if content_type:
        media = parse_media_type(content_type).name
        if media not in _JSON_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {media!r} is not supported; send {FHIR_JSON} (or application/json)"
            )
    raw = await request.body()
    return await run_in_threadpool(parse_json, raw)


def _prefer(request: Request, name: str) -> str | None:
    """A preference of the ``Prefer`` header (``return``, ``handling``)."""
    for part in request.headers.get("prefer", "").split(","):
        for item in part.split(";"):
            key, _, value = item.strip().partition("=")
            if key.strip().lower() == name:
                return value.strip().strip('"')
    return None


def _query(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.query_params.multi_items() if k not in _RESULT_PARAMS]


def _if_match(request: Request) -> int | None:
    value = request.headers.get("if-match")
    return None if value is None else store.parse_version_etag(value)


def _json(
    body: Any, status: int, request: Request, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        body if isinstance(body, bytes) else dump_resource(body),
        status,
        media_type=_response_type(request),
        headers=headers,
    )


def _headers(stored: store.StoredResource, base: str, *, location: bool) -> dict[str, str]:
    out = {"ETag": stored.etag, "Last-Modified": stored.last_modified}
    if location:
        out["Location"] = stored.location(base)
    return out


def _written(request: Request, stored: store.StoredResource, *, location: bool = True) -> Response:
    """The response to a create or update, shaped by ``Prefer: return=``."""
    status = 201 if stored.outcome == "created" else 200
    headers = _headers(stored, _base_url(request), location=location or status == 201)
    wish = _prefer(request, "return") or "representation"
    if wish == "minimal":
        return Response(status_code=status, headers=headers)
    if wish == "OperationOutcome":
        text = f"{stored.reference} version {stored.version_id}: {stored.outcome}"
        return _json(information(text), status, request, headers)
    assert stored.content is not None
    return _json(stored.content, status, request, headers)


def _deleted(request: Request, stored: store.StoredResource | None) -> Response:
    if _prefer(request, "return") == "OperationOutcome":
        if stored is None or stored.outcome == "unchanged":
            text = "nothing to delete"
        else:
            text = f"{stored.reference} deleted (version {stored.version_id})"
        return _json(information(text), 200, request)
    headers = {}
    if stored is not None and stored.outcome == "deleted":
        headers["ETag"] = stored.etag
    return Response(status_code=204, headers=headers)


async def _resource_body(
    request: Request, resource_type: str, logical_id: str | None = None
) -> dict[str, Any]:
    """The resource of the body, checked against the URL (the service validates it)."""
    body = await _body(request)
    check_envelope(body, resource_type=resource_type, resource_id=logical_id)
    resource: dict[str, Any] = body
    return resource


def _instant(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"{name} {value!r} is not a FHIR instant") from exc
    if parsed.tzinfo is None:
        raise InvalidInput(f"{name} {value!r} needs a time zone (an instant)")
    return parsed


def _count(request: Request, default: int = 100, maximum: int = 1000) -> int:
    value = request.query_params.get("_count")
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput(f"_count must be a non-negative integer, not {value!r}")
    return min(int(value), maximum)


# --- system level --------------------------------------------------------------------------


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    """The CapabilityStatement."""
    statement = capability_statement(base_url=_base_url(request), software_version=__version__)
    return _json(statement, 200, request)


@router.post("")
async def transaction_or_batch(request: Request) -> Response:
    """A ``transaction`` or ``batch`` Bundle."""
    bundle = await _body(request)
    _response_type(request)
    response = await run_in_threadpool(
        process_bundle,
        _archive(request),
        bundle,
        partition=_partition(request),
        base_url=_base_url(request),
        prefer=_prefer(request, "return") or "minimal",
        compartments=compartments_of(request),
    )
    return _json(response, 200, request)


@router.get("/_history")
async def system_history(request: Request) -> Response:
    """Every version in the partition, newest first."""
    return await _history(request, None, None)


# --- type level ----------------------------------------------------------------------------


@router.get("/{resource_type}/_history")
async def type_history(request: Request, resource_type: str) -> Response:
    """Every version of every resource of a type."""
    return await _history(request, _resource_type(resource_type), None)


@router.get("/{resource_type}")
async def search(request: Request, resource_type: str) -> Response:
    """Search (``GET /Type?criteria``)."""
    return await _search(request, _resource_type(resource_type), _query(request))


@router.post("/{resource_type}/_search")
async def search_by_post(request: Request, resource_type: str) -> Response:
    """Search with the criteria in a form body (and the URL)."""
    resource_type = _resource_type(resource_type)
    content_type = request.headers.get("content-type")
    form: list[tuple[str, str]] = []
    if content_type:
        if parse_media_type(content_type).name != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                "POST _search takes application/x-www-form-urlencoded criteria"
            )
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
    query = _query(request) + [(k, v) for k, v in form if k not in _RESULT_PARAMS]
    return await _search(request, resource_type, query)


async def _search(request: Request, resource_type: str, query: list[tuple[str, str]]) -> Response:
    _response_type(request)
    archive = _archive(request)
    partition = _partition(request)
    base = _base_url(request)
    strict = (_prefer(request, "handling") or "").lower() == "strict"
    compartments = compartments_of(request)

    def run() -> dict[str, Any]:
        with archive.engine.connect() as conn:
            found = partition_id(conn, partition, create=False)
            if found is None:
                raise NotFound(f"partition {partition!r} does not exist")
            return search_bundle(
                conn,
                found,
                resource_type,
                query,
                base_url=base,
                strict=strict,
                compartments=compartments,
            )

    return _json(await run_in_threadpool(run), 200, request)


@router.post("/{resource_type}")
async def create(request: Request, resource_type: str) -> Response:
    """``create``; conditional with ``If-None-Exist``."""
    resource_type = _resource_type(resource_type)
    _response_type(request)
    resource = await _resource_body(request, resource_type)
    stored = await run_in_threadpool(
        store.create_resource,
        _archive(request),
        resource,
        partition=_partition(request),
        if_none_exist=request.headers.get("if-none-exist"),
        compartments=compartments_of(request),
    )
    return _written(request, stored)


@router.put("/{resource_type}")
async def conditional_update(request: Request, resource_type: str) -> Response:
    """``PUT /Type?criteria``."""
    resource_type = _resource_type(resource_type)
    _response_type(request)
    resource = await _resource_body(request, resource_type)
    stored = await run_in_threadpool(
        store.conditional_update,
        _archive(request),
        resource_type,
        _query(request),
        resource,
        partition=_partition(request),
        if_match=_if_match(request),
        compartments=compartments_of(request),
    )
    return _written(request, stored, location=False)


@router.delete("/{resource_type}")
async def conditional_delete(request: Request, resource_type: str) -> Response:
    """``DELETE /Type?criteria`` (one match at most)."""
    stored = await run_in_threadpool(
        store.conditional_delete,
        _archive(request),
        _resource_type(resource_type),
        _query(request),
        partition=_partition(request),
        compartments=compartments_of(request),
    )
    return _deleted(request, stored)


# --- instance level ------------------------------------------------------------------------


@router.get("/{resource_type}/{logical_id}/_history")
async def instance_history(request: Request, resource_type: str, logical_id: str) -> Response:
    """Every version of one resource."""
    return await _history(request, _resource_type(resource_type), logical_id)


@router.get("/{resource_type}/{logical_id}/_history/{version_id}")
async def vread(request: Request, resource_type: str, logical_id: str, version_id: str) -> Response:
    """One version (``vread``)."""
    resource_type = _resource_type(resource_type)
    if not (version_id.isascii() and version_id.isdigit()):
        raise NotFound(f"{resource_type}/{logical_id} has no version {version_id!r}")
    _response_type(request)
    stored = await run_in_threadpool(
        store.vread_resource,
        _archive(request),
        resource_type,
        logical_id,
        int(version_id),
        partition=_partition(request),
        compartments=compartments_of(request),
    )
    assert stored.content is not None
    return _json(stored.content, 200, request, _headers(stored, "", location=False))


@router.get("/{resource_type}/{logical_id}")
async def read(request: Request, resource_type: str, logical_id: str) -> Response:
    """The current version (``read``); 410 when deleted. A conditional read
    (``If-None-Match``, ``If-Modified-Since``) of the current version is 304."""
    resource_type = _resource_type(resource_type)
    _response_type(request)
    stored = await run_in_threadpool(
        store.read_resource,
        _archive(request),
        resource_type,
        logical_id,
        partition=_partition(request),
        compartments=compartments_of(request),
    )
    assert stored.content is not None
    headers = _headers(stored, "", location=False)
    if not_modified(request.headers, stored.etag, stored.last_updated):
        return Response(status_code=304, headers=headers)
    return _json(stored.content, 200, request, headers)


@router.put("/{resource_type}/{logical_id}")
async def update(request: Request, resource_type: str, logical_id: str) -> Response:
    """``update`` (``If-Match`` for a version check); creates when absent."""
    resource_type = _resource_type(resource_type)
    _response_type(request)
    resource = await _resource_body(request, resource_type, logical_id)
    return await _write_version(request, store.update_resource, resource_type, logical_id, resource)


@router.patch("/{resource_type}/{logical_id}")
async def patch(request: Request, resource_type: str, logical_id: str) -> Response:
    """``patch`` with a JSON Patch document (``application/json-patch+json``);
    ``If-Match`` for a version check. A resource is patched, never created."""
    resource_type = _resource_type(resource_type)
    _response_type(request)
    media = parse_media_type(request.headers.get("content-type") or "").name
    if media != JSON_PATCH:
        raise UnsupportedMediaType(
            f"Content-Type {media or '(none)'!r} is not supported for PATCH; send a JSON "
            f"Patch document as {JSON_PATCH} (FHIRPath and XML patches are not supported)"
        )
    document = await run_in_threadpool(parse_json, await request.body())
    return await _write_version(request, store.patch_resource, resource_type, logical_id, document)


async def _write_version(
    request: Request,
    write: Callable[..., store.StoredResource],
    resource_type: str,
    logical_id: str,
    body: Any,
) -> Response:
    """A new version of ``Type/id`` by ``write`` (update, patch) from ``body``, with the
    request's partition, ``If-Match`` and compartments; answered as ``Prefer`` asks."""
    stored = await run_in_threadpool(
        write,
        _archive(request),
        resource_type,
        logical_id,
        body,
        partition=_partition(request),
        if_match=_if_match(request),
        compartments=compartments_of(request),
    )
    return _written(request, stored, location=False)


@router.delete("/{resource_type}/{logical_id}")
async def delete(request: Request, resource_type: str, logical_id: str) -> Response:
    """``delete``: the resource reads 410 afterwards; history keeps its versions."""
    stored = await run_in_threadpool(
        store.delete_resource,
        _archive(request),
        _resource_type(resource_type),
        logical_id,
        partition=_partition(request),
        if_match=_if_match(request),
        compartments=compartments_of(request),
    )
    return _deleted(request, stored)


# --- history -------------------------------------------------------------------------------


async def _history(request: Request, resource_type: str | None, logical_id: str | None) -> Response:
    _response_type(request)
    params = request.query_params
    for unsupported in ("_at", "_list"):
        if unsupported in params:
            raise InvalidInput(f"{unsupported} is not supported on _history; use _since")
    cursor = params.get("_cursor")
    if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
        raise InvalidInput(f"_cursor {cursor!r} is not a cursor of this server")
    since_text = params.get("_since")
    count = _count(request)
    page = await run_in_threadpool(
        store.history,
        _archive(request),
        partition=_partition(request),
        resource_type=resource_type,
        resource_id=logical_id,
        since=_instant(since_text, "_since"),
        count=count,
        cursor=int(cursor) if cursor else None,
        compartments=compartments_of(request),
    )
    base = _base_url(request)
    path = base + "".join(f"/{p}" for p in (resource_type, logical_id) if p) + "/_history"
    links = [{"relation": "self", "url": str(request.url)}]
    if page.next_cursor is not None:
        query = f"_count={count}&_cursor={page.next_cursor}"
        if since_text:
            query += f"&_since={since_text}"
        links.append({"relation": "next", "url": f"{path}?{query}"})
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "total": page.total,
        "link": links,
        "entry": [_history_entry(version, base) for version in page.entries],
    }
    return _json(bundle, 200, request)


def _history_entry(version: store.StoredResource, base: str) -> dict[str, Any]:
    url = f"{base}/{version.reference}"
    entry: dict[str, Any] = {"fullUrl": url}
    if version.content is not None:
        entry["resource"] = version.resource()
    if version.method == "POST":
        request = {"method": "POST", "url": version.resource_type}
        status = "201 Created"
    elif version.method == "DELETE":
        request = {"method": "DELETE", "url": version.reference}
        status = "204 No Content"
    else:  # PUT, or PATCH (never a first version)
        request = {"method": version.method, "url": version.reference}
        status = "201 Created" if version.version_id == 1 else "200 OK"
    entry["request"] = request
    entry["response"] = {
        "status": status,
        "etag": version.etag,
        "lastModified": version.instant,
    }
    return entry


# --- everything else under /fhir -----------------------------------------------------------


@router.api_route(
    "/{rest:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,  # the answer to what no operation serves, not an operation
)
async def unknown(request: Request, rest: str) -> Response:
    """404 for a URL that is no FHIR interaction, 405 for a method the URL does not take."""
    allowed: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if isinstance(route.original_route, FhirRoute) and route.endpoint is not unknown:
            match, _ = route.matches(request.scope)
            if match in (Match.PARTIAL, Match.FULL):
                allowed |= route.methods or set()
    if allowed:
        raise MethodNotAllowed(
            f"{request.method} is not supported on {request.url.path}",
            allow=sorted(allowed),
        )
    raise NotFound(f"{request.url.path} is not a FHIR interaction of this server")


__all__ = ["PREFIX", "FhirRoute", "compartments_of", "outcome_response", "router"]
