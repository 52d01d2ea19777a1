"""The uvicorn server configuration medlake serves its app with.

:func:`server_config` is what ``medlake serve`` runs (and what the tests start, so they
exercise the same limits). Its HTTP protocol is uvicorn's httptools protocol with a
limit on the request head, :class:`HeadLimitedHttpToolsProtocol`: httptools (llhttp)
accepts request lines and headers of any size, buffering them all, and uvicorn's
``h11_max_incomplete_event_size`` only applies to its h11 protocol (where it is set to
the same value). A request line longer than ``http_max_header_bytes`` is answered
``414 URI Too Long``, header lines adding up to more ``431 Request Header Fields Too
Large`` (RFC 6585), and the connection is closed.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from medlake.config import Settings


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a request head that is too large."""


class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads larger than the config's
    ``h11_max_incomplete_event_size`` (one limit for both of uvicorn's protocols)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limit = int(self.config.h11_max_incomplete_event_size or 0)
        self._url_bytes = 0
        self._header_bytes = 0
        self._refusal: HTTPStatus | None = None

    def on_message_begin(self) -> None:
        """A new request on the connection: its head is counted from zero."""
        super().on_message_begin()
        self._url_bytes = self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        """A piece of the request target (llhttp may hand it over in several)."""
        self._url_bytes += len(url)
        if self._limit and self._url_bytes > self._limit:
            self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header line, counted as on the wire (``name: value`` and CRLF)."""
        self._header_bytes += len(name) + len(value) + 4
        if self._limit and self._header_bytes > self._limit:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        super().on_header(name, value)

    def _refuse(self, status: HTTPStatus) -> None:
        self._refusal = status
        # httptools turns an exception of a callback into a parser error, which uvicorn
        # answers through send_400_response (below) before closing the connection.
        raise _HeadTooLarge(status.phrase)

    def send_400_response(self, msg: str) -> None:
        """The answer to a request the parser gave up on: 414 / 431 when the head was
        too large, uvicorn's 400 otherwise."""
        status, self._refusal = self._refusal, None
        if status is None:
            super().send_400_response(msg)
            return
        body = f"{status.phrase}: the limit is {self._limit} bytes".encode()
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            "content-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def server_config(
    app: Any, settings: Settings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Config:
    """The uvicorn configuration of ``medlake serve`` for ``app`` (host and port from the
    settings unless given). uvicorn's own loggers propagate to the root logger (configured
    by the CLI) and its access log is off: :mod:`medlake.api.request_log` writes one."""
    return uvicorn.Config(
        app,
        host=host or settings.host,
        port=settings.http_port if port is None else port,
        http=HeadLimitedHttpToolsProtocol,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        log_config=None,
        log_level="warning",
        access_log=False,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )


__all__ = ["HeadLimitedHttpToolsProtocol", "server_config"]
