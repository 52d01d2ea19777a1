"""Ingest batches over HTTP: list, show, errors, resume, reconcile; and the drop-zone
watcher of ``medlake serve`` (started with the app when ``dropzone`` is set).

    GET  /batches?kind=&status=&limit=&offset=     newest first
    GET  /batches/{id}                             counts, timings, verdict, detail
    GET  /batches/{id}/errors?limit=&offset=       its ingest_errors rows
    POST /batches/{id}/resume?retryFailed=true     202; processing goes on in the server
    POST /batches/{id}/reconcile                   reconcile it again (verdict not changed)
    GET  /reconciliation?partition=default         the partition against the lake
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from medlake.api.deps import ArchiveDep
from medlake.errors import InvalidInput
from medlake.ingest.archive import Archive
from medlake.ingest.batches import (
    BatchStatus,
    get_batch,
    list_batches,
    list_errors,
    resume_batch,
)
from medlake.ingest.pipeline import run_batch
from medlake.ingest.reconcile import reconcile_batch, reconcile_partition
from medlake.ingest.watch import DropZoneWatcher
from medlake.types import DEFAULT_PARTITION

log = logging.getLogger(__name__)


@asynccontextmanager
async def _dropzone(app: FastAPI) -> AsyncIterator[None]:
    """Watch the configured drop zone for as long as the app runs."""
    archive: Archive = app.state.archive
    watcher = None
    if archive.settings.dropzone:
        watcher = DropZoneWatcher(archive, archive.settings.dropzone)
        watcher.start()
    try:
        yield
    finally:
        if watcher is not None:
            await run_in_threadpool(watcher.stop)


router = APIRouter(lifespan=_dropzone)


def _int(request: Request, name: str, default: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= high:
        raise InvalidInput(f"{name} must be an integer from 0 to {high}, not {value!r}")
    return int(value)


@router.get("/batches")
async def read_batches(request: Request, archive: ArchiveDep) -> list[dict[str, Any]]:
    """Batches, newest first."""
    params = request.query_params

    def read() -> list[dict[str, Any]]:
        with archive.engine.connect() as conn:
            found = list_batches(
                conn, kind=params.get("kind"), status=params.get("status"),
                limit=_int(request, "limit", 50, 1000), offset=_int(request, "offset", 0, 10**9),
            )  # fmt: skip
        return [b.to_json() for b in found]

    return await run_in_threadpool(read)


@router.get("/batches/{batch_id}")
async def read_batch(batch_id: str, archive: ArchiveDep) -> dict[str, Any]:
    """One batch."""

    def read() -> dict[str, Any]:
        with archive.engine.connect() as conn:
            return get_batch(conn, batch_id).to_json()

    return await run_in_threadpool(read)


@router.get("/batches/{batch_id}/errors")
async def read_batch_errors(
    batch_id: str, request: Request, archive: ArchiveDep
) -> list[dict[str, Any]]:
    """The rejected and warned files of a batch, with rule and reason."""

    def read() -> list[dict[str, Any]]:
        with archive.engine.connect() as conn:
            get_batch(conn, batch_id)  # 404 for an unknown batch
            rows = list_errors(
                conn, batch_id, limit=_int(request, "limit", 100, 10000),
                offset=_int(request, "offset", 0, 10**9),
            )  # fmt: skip
        return [e.to_json() for e in rows]

    return await run_in_threadpool(read)


@router.post("/batches/{batch_id}/resume", status_code=202)
async def resume(batch_id: str, request: Request, archive: ArchiveDep) -> JSONResponse:
    """Resume a paused batch: 202 at once, the files are processed in the background."""
    retry = request.query_params.get("retryFailed", "false").lower() in ("1", "true", "yes")
    batch = await run_in_threadpool(resume_batch, archive.engine, batch_id, retry_failed=retry)

    def process() -> None:
        try:
            run_batch(archive, batch_id)
        except Exception:
            log.exception("resumed batch %s failed", batch_id)

    if batch.status == BatchStatus.RUNNING:
        threading.Thread(target=process, name=f"medlake-batch-{batch_id[:8]}", daemon=True).start()
    return JSONResponse(batch.to_json(), status_code=202)


@router.post("/batches/{batch_id}/reconcile")
async def reconcile_one(batch_id: str, archive: ArchiveDep) -> dict[str, Any]:
    """Reconcile a batch again now (its recorded verdict is left as it was)."""
    result = await run_in_threadpool(reconcile_batch, archive, batch_id)
    return result.to_json()


@router.get("/reconciliation")
async def reconcile_all(request: Request, archive: ArchiveDep) -> dict[str, Any]:
    """A partition against the lake: files with no row, rows with no file."""
    partition = request.query_params.get("partition", DEFAULT_PARTITION)
    result = await run_in_threadpool(reconcile_partition, archive, partition)
    return result.to_json()
