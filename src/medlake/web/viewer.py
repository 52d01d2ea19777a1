"""The OHIF viewer, served same-origin with DICOMweb at ``/ohif/``.

The viewer is npm ``@ohif/app``: its package ships a finished webpack build (``dist/``),
which ``scripts/install-ohif.sh`` unpacks into ``.cache/ohif/dist``. Nothing is built here;
the files are served as they are, with four things done at request time:

* ``app-config.js`` is generated: one DICOMweb data source whose roots are this server's
  ``/dicomweb`` (same origin, so no CORS is needed), and ``routerBasename`` ``/ohif``.
* The dist is built for the site root (``window.PUBLIC_URL="/"``, ``/app.bundle….js``,
  webpack's ``__webpack_require__.p = "/"``, ``url(/….woff2)``); those absolute paths are
  rewritten to ``/ohif/…`` in the few files that hold them (kept in memory once patched).
  Serving under a sub-path keeps ``/`` free for a future console and leaves every medlake
  route where it is.
* Paths that are not files (``/ohif/viewer?StudyInstanceUIDs=…``, ``/ohif/``) get
  ``index.html``: OHIF routes in the browser (SPA fallback). Missing assets stay 404.
* Bundles whose names carry a content hash are cached for a year (``immutable``);
  everything else is revalidated (``no-cache`` + ETag).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from medlake.config import Settings

log = logging.getLogger(__name__)

#: Where the viewer is served: the study list at ``/ohif/``, a study at
#: ``/ohif/viewer?StudyInstanceUIDs=…``.
VIEWER_PATH = "/ohif"

#: ``.cache/ohif/dist`` relative to the repository (or the working directory).
DEFAULT_DIST = Path(".cache", "ohif", "dist")

#: Hashed file names: ``app.bundle.0f6159c501addfe9.js``, ``0ddf166f7a343eda.wasm``.
_HASHED = re.compile(r"(?:^|[./])[0-9a-f]{16}\.(?:js|wasm|woff2|css)$")

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}

#: Files larger than this are never read into memory for patching.
_MAX_PATCHED = 64 << 20

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


def find_ohif_dist(settings: Settings) -> Path | None:
    """The OHIF dist to serve: ``settings.ohif_dist``, else ``.cache/ohif/dist`` of the
    source checkout medlake runs from, else of the working directory; ``None`` when absent."""
    if settings.ohif_dist is not None:
        candidates = [settings.ohif_dist]
    else:
        repo = Path(__file__).resolve().parents[3]  # src/medlake/web/viewer.py -> repo
        candidates = [repo / DEFAULT_DIST] if (repo / "pyproject.toml").is_file() else []
        candidates.append(Path.cwd() / DEFAULT_DIST)
    for dist in candidates:
        if (dist / "index.html").is_file():
            return dist.resolve()
    return None


def ohif_version(dist: Path) -> str:
    """The @ohif/app version of ``dist`` (recorded by install-ohif.sh), or ``unknown``."""
    stamp = dist / ".ohif-version"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def app_config(dicomweb_root: str, router_basename: str) -> dict[str, object]:
    """OHIF's ``window.config``: one DICOMweb data source, medlake's ``/dicomweb``."""
    return {
        "name": "medlake",
        "routerBasename": router_basename,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "medlake",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "medlake",
                "configuration": {
                    "friendlyName": "medlake",
                    "name": "medlake",
                    "qidoRoot": dicomweb_root,
                    "wadoRoot": dicomweb_root,
                    # WADO-URI (PS3.18 ch. 9), used when imageRendering is "wadouri"
                    "wadoUriRoot": f"{dicomweb_root}/wado",
                    "qidoSupportsIncludeField": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "staticWado": False,
                    # frames via .../frames/N (multipart/related octet-stream, stored syntax)
                    "imageRendering": "wadors",
                    # series thumbnails from .../instances/{uid}/thumbnail (JPEG, made by medlake)
                    "thumbnailRendering": "thumbnail",
                    "thumbnailRequestStrategy": "fetch",
                    "enableStudyLazyLoad": True,
                    "singlepart": "bulkdata",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }


@dataclass(frozen=True)
class _Patched:
    body: bytes
    etag: str
    media_type: str


class OhifViewer:
    """Serves one OHIF dist under ``path`` (see the module docstring)."""

    def __init__(self, dist: Path, path: str = VIEWER_PATH) -> None:
        self.dist = dist.resolve()
        self.path = path.rstrip("/")
        self.version = ohif_version(self.dist)
        self._patched: dict[Path, _Patched | None] = {}
        self._lock = threading.Lock()
        prefix = self.path.encode()
        # (old, new) pairs per file type; each only where the dist has it
        self._rewrites: dict[str, list[tuple[bytes, bytes]]] = {
            ".html": [
                (b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="' + prefix + b'/"'),
                (b'href="/', b'href="' + prefix + b"/"),
                (b'src="/', b'src="' + prefix + b"/"),
            ],
            ".js": [
                (b'__webpack_require__.p = "/"', b'__webpack_require__.p = "' + prefix + b'/"'),
                (b"'/dicom-microscopy-viewer/", b"'" + prefix + b"/dicom-microscopy-viewer/"),
            ],
            ".css": [(b"url(/", b"url(" + prefix + b"/")],
            ".json": [(b'"src": "/assets/', b'"src": "' + prefix + b"/assets/")],
        }

    # -- routes -------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        """Add the viewer's routes to ``app``, after the app's own routes (which win on a clash)."""
        app.add_api_route(
            self.path, self._redirect, methods=["GET", "HEAD"], include_in_schema=False
        )
        app.add_api_route(
            self.path + "/{rest:path}", self.serve, methods=["GET", "HEAD"], include_in_schema=False
        )
        app.state.viewer_path = self.path + "/"
        app.state.ohif_version = self.version

    async def _redirect(self, request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(self.path + "/" + query, status_code=308)

    async def serve(self, request: Request, rest: str) -> Response:
        """One file of the dist, the generated config, or index.html (SPA fallback)."""
        if rest == "app-config.js":
            return self._config_response(request)
        target = self._file(rest)
        if target is None:
            if Path(rest).suffix.lower() in _MEDIA_TYPES and not rest.endswith(".html"):
                return Response(
                    f"{rest} is not part of OHIF {self.version}\n", 404, media_type="text/plain"
                )
            target = self.dist / "index.html"
        return await self._file_response(request, target)

    # -- pieces -------------------------------------------------------------------------

    def _file(self, rest: str) -> Path | None:
        if not rest or rest.endswith("/"):
            return None
        candidate = (self.dist / rest).resolve()
        if not candidate.is_relative_to(self.dist) or not candidate.is_file():
            return None
        return candidate

    def _config_response(self, request: Request) -> Response:
        root = str(request.base_url).rstrip("/") + "/dicomweb"
        config = json.dumps(app_config(root, self.path), indent=2)
        body = f"/* generated by medlake for OHIF {self.version} */\nwindow.config = {config};\n"
        return Response(
            body,
            media_type="text/javascript; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def _file_response(self, request: Request, target: Path) -> Response:
        media_type = _MEDIA_TYPES.get(target.suffix.lower(), "application/octet-stream")
        cache = IMMUTABLE if _HASHED.search(target.name) else REVALIDATE
        patched = None
        if target.suffix.lower() in self._rewrites:
            patched = await run_in_threadpool(self._patched_file, target, media_type)
        if patched is not None:
            headers = {"Cache-Control": cache, "ETag": patched.etag}
            if _etag_matches(request, patched.etag):
                return Response(status_code=304, headers=headers)
            return Response(patched.body, media_type=patched.media_type, headers=headers)
        stat = target.stat()
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        headers = {"Cache-Control": cache, "ETag": etag}
        if _etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        return FileResponse(target, media_type=media_type, headers=headers, stat_result=stat)

    def _patched_file(self, target: Path, media_type: str) -> _Patched | None:
        """The file with root-absolute paths moved under the viewer path; ``None`` when
        it holds none (then it is streamed from disk)."""
        with self._lock:
            if target in self._patched:
                return self._patched[target]
        result = None
        if target.stat().st_size <= _MAX_PATCHED:
            data = original = target.read_bytes()
            for old, new in self._rewrites.get(target.suffix.lower(), []):
                data = data.replace(old, new)
            if data != original:
                etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
                result = _Patched(data, etag, media_type)
        with self._lock:
            self._patched[target] = result
        return result


def _etag_matches(request: Request, etag: str) -> bool:
    given = request.headers.get("if-none-match")
    if not given:
        return False
    return given.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in given.split(",")]


def mount_viewer(app: FastAPI, dist: Path, path: str = VIEWER_PATH) -> OhifViewer:
    """Serve the OHIF dist in ``dist`` at ``path`` of ``app``; returns the viewer."""
    viewer = OhifViewer(dist, path)
    viewer.mount(app)
    log.info("OHIF %s from %s served at %s/", viewer.version, viewer.dist, viewer.path)
    return viewer


__all__ = [
    "VIEWER_PATH",
    "OhifViewer",
    "app_config",
    "find_ohif_dist",
    "mount_viewer",
    "ohif_version",
]
