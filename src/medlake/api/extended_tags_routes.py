"""Extended query tags and long-running operations over HTTP (the shape of Microsoft's
DICOM service): thin adapters around :mod:`medlake.dicomweb.extended_tags`."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import ArchiveDep, json_body
from medlake.dicomweb import extended_tags as service
from medlake.errors import InvalidInput

router = APIRouter()


def _root(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def _paging(request: Request) -> tuple[int, int]:
    values = []
    for name, default in (("limit", 100), ("offset", 0)):
        raw = request.query_params.get(name)
        if raw is not None and not (raw.isascii() and raw.isdigit()):
            raise InvalidInput(f"{name} must be a non-negative integer, not {raw!r}")
        values.append(int(raw) if raw is not None else default)
    return values[0], values[1]


def tag_json(tag: service.ExtendedQueryTag, root: str) -> dict[str, Any]:
    """One extended query tag as the API shows it."""
    href = f"{root}/extendedquerytags/{tag.path}"
    out: dict[str, Any] = {"path": tag.path, "vr": tag.vr}
    if tag.keyword:
        out["keyword"] = tag.keyword
    if tag.private_creator:
        out["privateCreator"] = tag.private_creator
    out.update(
        level=tag.level.value.capitalize(),
        status=tag.status.value.capitalize(),
        queryStatus="Enabled" if tag.queryable else "Disabled",
        errors={"count": tag.error_count, "href": f"{href}/errors"},
    )
    if tag.status is service.TagStatus.ADDING and tag.operation_id:
        out["operation"] = {
            "id": tag.operation_id,
            "href": f"{root}/operations/{tag.operation_id}",
        }
    return out


def operation_json(operation: service.Operation, root: str) -> dict[str, Any]:
    """One long-running operation as the API shows it."""
    out: dict[str, Any] = {
        "operationId": operation.id,
        "type": operation.kind,
        "createdTime": operation.created_at.isoformat(),
        "lastUpdatedTime": operation.updated_at.isoformat(),
        "status": operation.status.value,
        "percentComplete": operation.percent_complete,
        "resources": [f"{root}/extendedquerytags/{path}" for path in operation.tags],
    }
    if operation.message:
        out["message"] = operation.message
    return out


@router.post("/extendedquerytags")
async def add_extended_query_tags(request: Request, archive: ArchiveDep) -> Response:
    """Add tags (status Adding) and start re-indexing the stored instances: 202 with
    the operation to poll."""
    requests = service.parse_tag_requests(await json_body(request))
    operation = await run_in_threadpool(service.add_tags, archive, requests)
    service.start_reindex(archive, operation.id)
    href = f"{_root(request)}/operations/{operation.id}"
    return _json({"id": operation.id, "href": href}, 202, {"Location": href})


@router.get("/extendedquerytags")
async def list_extended_query_tags(request: Request, archive: ArchiveDep) -> Response:
    """Every extended query tag with its status (``limit`` ≤ 200, ``offset``)."""
    limit, offset = _paging(request)
    tags = await run_in_threadpool(service.list_tags, archive, limit=limit, offset=offset)
    return _json([tag_json(t, _root(request)) for t in tags])


@router.get("/extendedquerytags/{path}")
async def get_extended_query_tag(request: Request, path: str, archive: ArchiveDep) -> Response:
    """One extended query tag, by keyword or 8-digit hex tag."""
    tag = await run_in_threadpool(service.get_tag, archive, path)
    return _json(tag_json(tag, _root(request)))


@router.delete("/extendedquerytags/{path}", status_code=204)
async def delete_extended_query_tag(path: str, archive: ArchiveDep) -> Response:
    """Remove the tag and its indexed values; QIDO no longer accepts it."""
    await run_in_threadpool(service.delete_tag, archive, path)
    return Response(status_code=204)


@router.get("/extendedquerytags/{path}/errors")
async def list_extended_query_tag_errors(
    request: Request, path: str, archive: ArchiveDep
) -> Response:
    """Instances whose value of the tag could not be indexed, and why."""
    limit, offset = _paging(request)
    errors = await run_in_threadpool(service.tag_errors, archive, path, limit=limit, offset=offset)
    return _json(
        [
            {
                "partitionName": e.partition,
                "studyInstanceUid": e.study_uid,
                "seriesInstanceUid": e.series_uid,
                "sopInstanceUid": e.sop_uid,
                "createdTime": e.created_at.isoformat(),
                "errorMessage": e.message,
            }
            for e in errors
        ]
    )


@router.get("/operations/{operation_id}")
async def get_operation(request: Request, operation_id: str, archive: ArchiveDep) -> Response:
    """State and progress of a long-running operation."""
    operation = await run_in_threadpool(service.get_operation, archive, operation_id)
    return _json(operation_json(operation, _root(request)))
