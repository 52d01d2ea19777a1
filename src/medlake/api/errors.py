"""Turning medlake errors into HTTP responses with a readable reason."""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from medlake.errors import MedlakeError


def warning_header(message: str) -> str:
    """An RFC 7234 Warning header value: one line of printable ASCII, double quotes
    escaped (the full message is in the body)."""
    # Control characters (a NUL from a path parameter) are not allowed in a header value,
    # and clients disagree on how to decode bytes above 0x7F (RFC 7230 section 3.2.4).
    text = " ".join(message.split())[:200].replace('"', "'")
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    return f'299 medlake "{printable}"'


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
