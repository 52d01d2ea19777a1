"""FHIR bulk data routes: ``$export`` (Bulk Data Access IG v2) and ``$import``, with the
asynchronous request pattern's status and file URLs. Thin adapters over
``medlake.clinical.bulk_export`` / ``bulk_import`` / ``bulk_jobs``.

Mounted at ``/fhir`` and ``/fhir/partitions/{partition}``; include this router
**before** the FHIR REST router, whose ``/fhir/{type}/{id}`` and catch-all routes would
otherwise take these paths. Its lifespan runs the archive's :class:`BulkJobRunner`.

::

    GET|POST /fhir/$export                  system level
    GET|POST /fhir/Patient/$export          all patients
    GET|POST /fhir/Group/{id}/$export       the Group's members
    POST     /fhir/$import                  Parameters: inputFormat, input (type, url)
    GET      /fhir/$bulk-status/{job}       202 + X-Progress, 200 + manifest, 500 failed
    DELETE   /fhir/$bulk-status/{job}       cancel (202); the status URL is then 404
    GET      /fhir/$bulk-file/{job}/{name}  an output or error file (application/fhir+ndjson)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from medlake.api.fhir_routes import FhirRoute, _base_url, _body, _prefer, compartments_of
from medlake.api.media import parse_accept
from medlake.api.path_params import PARTITION_IN_PATH
from medlake.clinical.bulk_export import (
    NDJSON,
    job_within_compartments,
    manifest,
    parameters_from_resource,
    parse_export_request,
    start_export,
)
from medlake.clinical.bulk_import import (
    BULK_FILE_SEGMENT,
    import_manifest,
    parse_import_parameters,
    start_import,
)
from medlake.clinical.bulk_jobs import (
    BulkJob,
    BulkJobRunner,
    JobKind,
    JobStatus,
    cancel_job,
    get_job,
    job_file_key,
)
from medlake.clinical.outcome import information, operation_outcome
from medlake.clinical.resources import FHIR_JSON, dump_resource
from medlake.errors import InvalidInput, MedlakeError, NotFound
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION, check_partition

STATUS_SEGMENT = "$bulk-status"
#: Seconds a client is asked to wait between status polls.
_RETRY_AFTER = "2"
_CHUNK = 1024 * 1024


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runner = BulkJobRunner(app.state.archive)
    app.state.bulk_jobs = runner
    # Jobs an earlier run left unfinished are taken up first.
    runner.start()
    try:
        yield
    finally:
        await run_in_threadpool(runner.stop)


router = APIRouter(lifespan=_lifespan)
_routes = APIRouter(route_class=FhirRoute)


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _partition(request: Request) -> str:
    return check_partition(request.path_params.get("partition", DEFAULT_PARTITION))


def _check_kickoff(request: Request) -> None:
    """The headers the asynchronous pattern requires of a kick-off (400 otherwise)."""
    if _prefer(request, "respond-async") is None:
        raise InvalidInput("a bulk data kick-off needs the header Prefer: respond-async")
    accept = request.headers.get("accept")
    if accept and not any(
        m.matches(FHIR_JSON) or m.name == "application/json" for m in parse_accept(accept)
    ):
        raise InvalidInput(f"Accept {accept!r}: a bulk data kick-off answers {FHIR_JSON}")


def _accepted(request: Request, job: BulkJob) -> Response:
    runner: BulkJobRunner | None = getattr(request.app.state, "bulk_jobs", None)
    if runner is not None:
        runner.wake()
    status_url = f"{_base_url(request)}/{STATUS_SEGMENT}/{job.id}"
    body = information(f"bulk data {job.kind.value} job {job.id} accepted; poll {status_url}")
    return Response(
        dump_resource(body), 202, media_type=FHIR_JSON, headers={"Content-Location": status_url}
    )


async def _export(request: Request, level: str, group_id: str | None = None) -> Response:
    _check_kickoff(request)
    post = request.method == "POST"
    if post:
        parameters = parameters_from_resource(await _body(request))
    else:
        parameters = list(request.query_params.multi_items())
    export = parse_export_request(
        level,
        parameters,
        group_id=group_id,
        lenient=_prefer(request, "handling") == "lenient",
        post=post,
    )
    kickoff_url = str(request.url)
    job = await run_in_threadpool(
        start_export, _archive(request), export, partition=_partition(request),
        kickoff_url=kickoff_url, compartments=compartments_of(request),
    )  # fmt: skip
    return _accepted(request, job)


@_routes.get("/$export")
@_routes.post("/$export")  # one route per method: one OpenAPI operation each
async def export_system(request: Request) -> Response:
    """System-level export kick-off."""
    return await _export(request, "system")


@_routes.get("/Patient/$export")
@_routes.post("/Patient/$export")
async def export_patients(request: Request) -> Response:
    """Patient-level export kick-off (every patient's compartment)."""
    return await _export(request, "patient")


@_routes.get("/Group/{group_id}/$export")
@_routes.post("/Group/{group_id}/$export")
async def export_group(request: Request, group_id: str) -> Response:
    """Group-level export kick-off (the compartments of the Group's members)."""
    return await _export(request, "group", group_id)


@_routes.post("/$import")
async def import_kickoff(request: Request) -> Response:
    """Bulk import kick-off: a Parameters resource naming the NDJSON inputs."""
    _check_kickoff(request)
    body = await _body(request)
    archive = _archive(request)
    parsed = await run_in_threadpool(
        parse_import_parameters,
        archive,
        body,
        base_url=_base_url(request),
        partition=_partition(request),
    )
    job = await run_in_threadpool(
        start_import, archive, parsed, partition=_partition(request), kickoff_url=str(request.url)
    )
    return _accepted(request, job)


def _job(request: Request, job_id: str) -> BulkJob:
    job = get_job(_archive(request), job_id)
    # A caller limited to compartments sees only exports limited to them (no one else's).
    if job.partition != _partition(request) or not job_within_compartments(
        job, compartments_of(request)
    ):
        raise NotFound(f"bulk data job {job_id} does not exist in this partition")
    return job


@_routes.get("/" + STATUS_SEGMENT + "/{job_id}")
async def job_status(request: Request, job_id: str) -> Response:
    """Status of a job: 202 + X-Progress while it runs, 200 + manifest when done, the
    failure as an OperationOutcome (500) when it failed."""
    job = await run_in_threadpool(_job, request, job_id)
    if job.status in (JobStatus.ACCEPTED, JobStatus.RUNNING):
        return Response(
            status_code=202,
            headers={"X-Progress": (job.progress or job.status.value)[:99],
                     "Retry-After": _RETRY_AFTER},
        )  # fmt: skip
    if job.status == JobStatus.FAILED:
        failed = MedlakeError(f"the bulk data job failed: {job.error_message}")
        failed.http_status = 500
        return Response(dump_resource(operation_outcome(failed)), 500, media_type=FHIR_JSON)
    files = f"{_base_url(request)}/{BULK_FILE_SEGMENT}/{job.id}"

    def file_url(name: str | None) -> str:
        return f"{files}/{name}"

    requires_token = _archive(request).settings.auth_enabled
    body: dict[str, Any] = (
        manifest(job, file_url=file_url, requires_access_token=requires_token)
        if job.kind == JobKind.EXPORT
        else import_manifest(job, file_url=file_url, requires_access_token=requires_token)
    )
    return Response(dump_resource(body), 200, media_type="application/json")


@_routes.delete("/" + STATUS_SEGMENT + "/{job_id}")
async def job_cancel(request: Request, job_id: str) -> Response:
    """Cancel a job (or, once done, delete its files): 202; the status URL is then 404."""
    job = await run_in_threadpool(_job, request, job_id)
    await run_in_threadpool(cancel_job, _archive(request), job.id)
    body = information(f"bulk data job {job.id} cancelled; its files are deleted")
    return Response(dump_resource(body), 202, media_type=FHIR_JSON)


@_routes.get("/" + BULK_FILE_SEGMENT + "/{job_id}/{name}")
async def job_file(request: Request, job_id: str, name: str) -> Response:
    """One file of a job's manifest, as NDJSON."""
    job = await run_in_threadpool(_job, request, job_id)
    archive = _archive(request)
    key = job_file_key(archive, job, name)
    local = archive.blobs.local_path(key)
    if local is not None:
        if not local.is_file():
            raise NotFound(f"bulk data file {name} of job {job_id} is gone")
        return FileResponse(local, media_type=NDJSON)

    def chunks() -> Iterator[bytes]:
        with archive.blobs.open(key) as handle:
            while block := handle.read(_CHUNK):
                yield block

    return StreamingResponse(chunks(), media_type=NDJSON)


router.include_router(
    _routes, prefix="/fhir/partitions/{partition}", dependencies=PARTITION_IN_PATH
)
router.include_router(_routes, prefix="/fhir")

__all__ = ["STATUS_SEGMENT", "router"]
