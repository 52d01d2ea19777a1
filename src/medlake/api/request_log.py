"""Request ids, the access log and the HTTP metrics of every request, in one middleware.

:class:`RequestLog` is the outermost middleware of the app. For each HTTP request it

- takes the client's ``X-Request-ID`` when it is a sane token (letters, digits and
  ``._:-``, at most 128 characters) or makes one, sends it back in the response's
  ``X-Request-ID`` header, and puts it on every log record emitted while the request is
  handled (a context variable, read by :class:`RequestIdFilter`; the thread pool runs
  blocking work in a copy of the request's context, so records from there carry it too);
- answers 431 when the request's header lines add up to more than
  ``http_max_header_bytes`` (the HTTP server enforces the limit before the app sees
  the request; this covers servers that do not), and 400 when the decoded path holds a
  control character or the query a NUL (``%00``): no UID, id or name has one, and
  PostgreSQL cannot store a NUL, so such a value would otherwise fail deep inside a
  service (or in the audit record) as a server error;
- writes one access-log line (logger ``medlake.access``, INFO): method, route template,
  status, duration, principal subject and request id. Never the concrete path or the
  query string: they hold UIDs, patient names and identifiers;
- counts the request in :class:`medlake.api.metrics.Metrics`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medlake.api.auth import app_routes, match_route, principal_of
from medlake.api.metrics import UNMATCHED, Metrics
from medlake.api.request_id import RequestIdFilter, current_request_id, request_id_var

#: Response (and request) header carrying the request id.
REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()
#: An incoming id is kept only when it matches this (else a new one is made): it ends up
#: in log lines and headers, so nothing that could break either (or carry data) is taken.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

access_log = logging.getLogger("medlake.access")


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == _HEADER_KEY:
            return value.decode("ascii") if _SANE_ID.fullmatch(value) else None
    return None


def _bad_url(scope: Scope) -> bool:
    return bool(_CONTROL.search(scope["path"]) or b"%00" in scope.get("query_string", b""))


def _header_bytes(scope: Scope) -> int:
    # As on the wire: "name: value\r\n" per header line.
    return sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))


class RequestLog:
    """ASGI middleware: request id, access log line and metrics of each HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_header_bytes: int | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_header_bytes = max_header_bytes
        self._flat: tuple[int, list[Any]] = (-1, [])

    def _route(self, scope: Scope) -> str:
        app = scope.get("app")
        count = len(getattr(app, "routes", []))
        if self._flat[0] != count:  # flattened again only when routes were added
            self._flat = (count, app_routes(app))
        return match_route(self._flat[1], scope) or UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI call (only HTTP requests are logged and counted)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        # Matched before the app runs: routing and mounts rewrite parts of the scope.
        route = self._route(scope)
        state = {"status": 500}
        id_header = (_HEADER_KEY, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = state["started"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            if self.max_header_bytes and _header_bytes(scope) > self.max_header_bytes:
                message = f"the request's header lines exceed {self.max_header_bytes} bytes"
                await _answer(send_with_id, 431, message)
            elif _bad_url(scope):
                message = "the request URL holds a control character (%00-%1F, %7F)"
                await _answer(send_with_id, 400, message)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            if "started" not in state:
                # Answered here rather than by the server's error page, so the client
                # gets the request id to quote. The id stays set: the server logs the
                # traceback in this context, and that record then carries it too.
                await _answer(send_with_id, 500, "internal server error")
            self._log(scope, route, state["status"], started)
            raise
        self._log(scope, route, state["status"], started)
        request_id_var.reset(token)

    def _log(self, scope: Scope, route: str, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.observe_request(scope["method"], route, status, seconds)
        principal = principal_of(Request(scope))
        subject = principal.subject if principal else None
        access_log.info(
            "%s %s %d %.1f ms %s",
            scope["method"], route, status, seconds * 1000, subject or "-",
            extra={
                "http_method": scope["method"],
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "principal": subject,
            },
        )  # fmt: skip


async def _answer(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"status": status, "message": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = [
    "REQUEST_ID_HEADER",
    "RequestIdFilter",
    "RequestLog",
    "access_log",
    "current_request_id",
]
