"""Where log lines go: the one place that configures logging (the CLI's commands call it).

``log_format = "text"`` writes one readable line per record, for a terminal;
``"json"`` one JSON object per line (python-json-logger) with ``timestamp`` (UTC, ISO
8601), ``level``, ``logger``, ``message``, ``request_id`` and any extra fields of the
record (the access log's ``http_method``, ``route``, ``status``, ``duration_ms``,
``principal``), plus ``exc_info`` with the traceback. Records emitted while an HTTP
request is handled carry its id (:class:`medlake.api.request_id.RequestIdFilter`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

from medlake.api.request_id import RequestIdFilter
from medlake.config import Settings

LogFormat = Literal["text", "json"]


class _TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message``; the id only inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line (plus its traceback, if any)."""
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


def log_formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter(
            "{levelname}{name}{message}{request_id}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
    return _TextFormatter()


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when logging
    was configured: a caller that swaps stderr for a while (a test runner capturing a
    command's output) must not leave logging writing into its closed stream."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers sys.stderr


def log_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to ``stream`` (default: the current stderr) in ``log_format``,
    with request ids."""
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(log_formatter(log_format))
    return handler


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Send every log record at ``log_level`` or above to stderr in ``log_format``
    (replacing handlers configured before)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        handlers=[log_handler(settings.log_format, stream)],
        force=True,
    )


__all__ = ["LogFormat", "configure_logging", "log_formatter", "log_handler"]
