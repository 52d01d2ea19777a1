"""Turning medlake errors into HTTP responses with a readable reason."""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from medlake.errors import MedlakeError


def warning_header(message: str) -> str:
    """An RFC 7234 Warning header value: one line, latin-1 safe, double quotes escaped."""
    # Control characters (a NUL from a path parameter) are not allowed in a header value.
    printable = "".join(c if c.isprintable() else "?" for c in " ".join(message.split()))
    text = printable[:200].replace('"', "'")
    return f'299 medlake "{text.encode("latin-1", "replace").decode("latin-1")}"'


def _error(status: int, message: str) -> Response:
    body = orjson.dumps({"status": status, "message": message})
    return Response(
        body,
        status,
        media_type="application/json",
        headers={"Warning": warning_header(message)},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map MedlakeError (and client disconnects, bad paths) to responses."""

    @app.exception_handler(MedlakeError)
    async def medlake_error(_request: Request, exc: MedlakeError) -> Response:
        return _error(exc.http_status, exc.message)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(_request: Request, _exc: ClientDisconnect) -> Response:
        # Nobody reads this response; the staging files are already gone.
        return _error(400, "client disconnected before the request body was complete")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, f"invalid request: {details}")
