"""The ASGI application: DICOMweb at /dicomweb (and per partition), change feed, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from medlake import __version__
from medlake.api import (
    admin_routes,
    ae_routes,
    batches_routes,
    bulk_routes,
    cohort_routes,
    deid_routes,
    dicomweb_routes,
    extended_tags_routes,
    fhir_routes,
    hl7_routes,
    login_routes,
    metrics,
    patient_merge_routes,
    readiness,
)
from medlake.api.auth import AccessControl
from medlake.api.errors import install_error_handlers
from medlake.api.path_params import PARTITION_IN_PATH
from medlake.api.request_log import RequestLog
from medlake.clinical.imaging_study import ImagingStudySync
from medlake.dicomweb.extended_tags import resume_interrupted
from medlake.dicomweb.metadata_refresher import MetadataRefresher
from medlake.ingest.archive import Archive
from medlake.storage.health import LakeHealthCheck


def create_app(archive: Archive, *, background: bool = True) -> FastAPI:
    """Build the app around an opened archive.

    ``background`` starts the lake health check and the series-metadata refresher
    (tests turn it off to control timing; the health check then runs once).
    """
    health = LakeHealthCheck(archive.blobs, archive.layout, archive.settings.health_check_interval)
    refresher = MetadataRefresher(archive)
    # One ImagingStudy per DICOM study, written from the change feed (never in the store path).
    imaging = ImagingStudySync(archive)
    settings = archive.settings
    counters = metrics.Metrics(archive)
    ready = readiness.Readiness(
        archive.engine, health, interval=settings.health_check_interval,
        timeout=settings.readiness_timeout,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        counters.subscribe()
        if background:
            health.start()
            refresher.start()
            if archive.settings.imaging_study_sync:
                imaging.start()
            # Re-index operations cut short by a previous stop go on where they were.
            await run_in_threadpool(resume_interrupted, archive)
        else:
            health.check_once()
        yield
        imaging.stop()
        refresher.stop()
        health.stop()
        ready.close()
        counters.unsubscribe()

    app = FastAPI(title="medlake", version=__version__, lifespan=lifespan)
    app.state.archive = archive
    app.state.health = health
    app.state.metrics = counters
    app.state.readiness = ready
    install_error_handlers(app)
    # Every request passes one access check (authentication, the route's rule, audit).
    app.add_middleware(AccessControl, archive=archive)
    # Outermost: request id, access log and metrics also cover refused requests.
    app.add_middleware(
        RequestLog, metrics=counters, max_header_bytes=settings.http_max_header_bytes
    )
    app.include_router(admin_routes.router)
    app.include_router(login_routes.router)  # the browser's session cookie (/login, /logout)
    app.include_router(readiness.router)
    app.include_router(metrics.router)
    app.include_router(extended_tags_routes.router)
    app.include_router(batches_routes.router)
    app.include_router(ae_routes.router)
    app.include_router(hl7_routes.router)
    app.include_router(
        dicomweb_routes.router,
        prefix="/dicomweb/partitions/{partition}",
        dependencies=PARTITION_IN_PATH,  # documents {partition} in the OpenAPI schema
    )
    app.include_router(dicomweb_routes.router, prefix="/dicomweb")
    app.include_router(bulk_routes.router)  # before the FHIR router's /fhir/{type}/{id}
    app.include_router(patient_merge_routes.router)  # before the FHIR router, too
    app.include_router(cohort_routes.router)
    app.include_router(fhir_routes.router, prefix=fhir_routes.PREFIX)
    # De-identified views (researcher role); the partition mounts first, so that
    # /deid/fhir/partitions/... is not read as a resource type and id.
    for router, prefix in (
        (deid_routes.dicomweb_router, deid_routes.DICOMWEB_PREFIX),
        (deid_routes.fhir_router, deid_routes.FHIR_PREFIX),
    ):
        app.include_router(
            router, prefix=f"{prefix}/partitions/{{partition}}", dependencies=PARTITION_IN_PATH
        )
        app.include_router(router, prefix=prefix)
    return app
