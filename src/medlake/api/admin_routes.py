"""Routes around the archive: change feed, partitions, health."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import ArchiveDep
from medlake.dicomweb import changefeed, partitions
from medlake.errors import InvalidInput
from medlake.types import check_partition

router = APIRouter()


def _int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.lstrip("-").isdigit()):
        raise InvalidInput(f"{name} must be an integer, not {value!r}")
    return int(value)


@router.get("/changefeed")
async def read_changefeed(request: Request, archive: ArchiveDep) -> list[dict[str, Any]]:
    """Change-feed entries after sequence ``offset`` within [startTime, endTime)."""
    params = request.query_params
    return await run_in_threadpool(
        changefeed.read_feed,
        archive,
        start_time=changefeed.parse_time(params.get("startTime"), "startTime"),
        end_time=changefeed.parse_time(params.get("endTime"), "endTime"),
        offset=_int_param(request, "offset", 0),
        limit=_int_param(request, "limit", 100),
        partition=check_partition(params["partition"]) if "partition" in params else None,
    )


@router.get("/changefeed/latest")
async def latest_change(archive: ArchiveDep) -> Response:
    """The newest change-feed entry (204 when the feed is empty)."""
    entry = await run_in_threadpool(changefeed.latest, archive)
    if entry is None:
        return Response(status_code=204)

    return Response(orjson.dumps(entry), media_type="application/json")


@router.get("/partitions")
@router.get("/dicomweb/partitions")
async def list_partitions(archive: ArchiveDep) -> list[dict[str, Any]]:
    """Every partition of the archive."""
    return await run_in_threadpool(partitions.list_partitions, archive)


@router.post("/partitions/{name}", status_code=201)
async def create_partition(name: str, archive: ArchiveDep) -> dict[str, Any]:
    """Create an empty partition (STOW-RS also creates one on first use)."""
    return await run_in_threadpool(partitions.create_partition, archive, name)


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    """Liveness of the lake: the last health-check write and its reason when it failed."""

    status = request.app.state.health.status
    body = {
        "status": "ok" if status.ok else "failing",
        "lake": status.detail,
        "checkedAt": status.checked_at.isoformat() if status.checked_at else None,
    }
    return Response(orjson.dumps(body), 200 if status.ok else 503, media_type="application/json")
