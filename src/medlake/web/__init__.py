"""The browser-facing layer: the ASGI app of :mod:`medlake.api` plus the OHIF viewer.

``medlake.web`` may import ``medlake.api``, never the reverse.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI

from medlake.api import create_app
from medlake.ingest.archive import Archive
from medlake.web.viewer import VIEWER_PATH, find_ohif_dist, mount_viewer

log = logging.getLogger(__name__)


def create_web_app(
    archive: Archive, ohif_dist: Path | None = None, *, background: bool = True
) -> FastAPI:
    """:func:`medlake.api.create_app` with the OHIF viewer at ``/ohif/`` when its dist exists.

    ``ohif_dist`` defaults to :func:`find_ohif_dist` of the archive's settings. Without a
    dist the app is the plain API (``app.state.viewer_path`` is ``None``).
    """
    app = create_app(archive, background=background)
    app.state.viewer_path = None
    dist = ohif_dist if ohif_dist is not None else find_ohif_dist(archive.settings)
    if dist is None or not (dist / "index.html").is_file():
        log.info("OHIF viewer not served: no dist found (run scripts/install-ohif.sh)")
        return app
    mount_viewer(app, dist)
    return app


def viewer_path(app: FastAPI) -> str | None:
    """Path of the viewer's study list in ``app`` (``/ohif/``), or ``None`` when not served."""
    path: str | None = getattr(app.state, "viewer_path", None)
    return path


__all__ = ["VIEWER_PATH", "create_web_app", "find_ohif_dist", "viewer_path"]
