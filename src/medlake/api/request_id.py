"""The id of the HTTP request being handled, for log records (no web framework needed).

:class:`medlake.api.request_log.RequestLog` sets it for each request; the command
line's log handlers read it through :class:`RequestIdFilter`, so commands that never
serve HTTP (``medlake ingest``) need not import the app to configure logging.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("medlake_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being handled in this context (``None`` outside one)."""
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the id of the request being handled (``None``
    outside requests). Attach it to the handlers that format ``request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


__all__ = ["RequestIdFilter", "current_request_id", "request_id_var"]
