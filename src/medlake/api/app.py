"""The ASGI application: DICOMweb at /dicomweb (and per partition), change feed, health."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from medlake import __version__
from medlake.api import admin_routes, dicomweb_routes
from medlake.api.errors import install_error_handlers
from medlake.dicomweb.metadata import refresh_stale_series
from medlake.ingest.archive import Archive
from medlake.storage.health import LakeHealthCheck

log = logging.getLogger(__name__)

#: Seconds between passes of the series-metadata refresher.
METADATA_REFRESH_INTERVAL = 2.0


def _refresh_loop(archive: Archive, stop: threading.Event) -> None:
    while not stop.wait(METADATA_REFRESH_INTERVAL):
        try:
            refresh_stale_series(archive)
        except Exception:  # keep refreshing; the read path rebuilds on demand anyway
            log.exception("series metadata refresh failed")


def create_app(archive: Archive, *, background: bool = True) -> FastAPI:
    """Build the app around an opened archive.

    ``background`` starts the lake health check and the series-metadata refresher
    (tests turn it off to control timing; the health check then runs once).
    """
    health = LakeHealthCheck(archive.blobs, archive.layout, archive.settings.health_check_interval)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if background:
            health.start()
            threading.Thread(
                target=_refresh_loop, args=(archive, stop), name="medlake-metadata", daemon=True
            ).start()
        else:
            health.check_once()
        yield
        stop.set()
        health.stop()

    app = FastAPI(title="medlake", version=__version__, lifespan=lifespan)
    app.state.archive = archive
    app.state.health = health
    install_error_handlers(app)
    app.include_router(admin_routes.router)
    app.include_router(dicomweb_routes.router, prefix="/dicomweb/partitions/{partition}")
    app.include_router(dicomweb_routes.router, prefix="/dicomweb")
    return app
