"""How long what a command uses lives: the archive it opens (closed when it is done),
and, for a command that serves until stopped, the wait for Ctrl-C or SIGTERM.

A :class:`~medlake.errors.MedlakeError` from opening the archive (an index database
that cannot be reached, a wrong key file) or from the command itself reaches the
root command, which prints it as ``error: <message>`` and exits with status 1. The
ingest and lifecycle commands exit with status 2 instead (``error_status``, :func:`fail`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from medlake.config import Settings, load_settings
from medlake.errors import MedlakeError
from medlake.ingest.archive import Archive


def fail(exc: MedlakeError, status: int) -> typer.Exit:
    """Print ``error: <message>`` and give the exit that ends the command with ``status``."""
    Console().print(f"[red]error:[/] {escape(exc.message)}")
    return typer.Exit(status)


@contextlib.contextmanager
def opened_archive(
    data: Path | None = None,
    *,
    settings: Settings | None = None,
    error_status: int | None = None,
    **overrides: Any,
) -> Iterator[Archive]:
    """The archive of ``settings``, or of ``--data`` with ``overrides`` of the settings.
    With ``error_status``, an error opening it or while it is open ends the command
    with that status (:func:`fail`) instead of reaching the root command."""
    try:
        archive = Archive.open(settings or load_settings(data=data, **overrides))
        try:
            yield archive
        finally:
            archive.close()
    except MedlakeError as exc:
        if error_status is None:
            raise
        raise fail(exc, error_status) from exc


class StopSignal:
    """Ctrl-C or SIGTERM, for a command that serves until stopped (``medlake dimse``,
    ``mllp``, ``watch``).

    SIGTERM is caught from the moment this is made: make it before starting what it
    stops, so that a SIGTERM that arrives while the service starts stops it too, instead
    of killing the process before it has closed anything.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())

    def wait(self) -> None:
        """Return on Ctrl-C or SIGTERM (at once if SIGTERM came already)."""
        try:
            # Timed waits: an untimed Event.wait() sometimes never returned after SIGTERM
            # (seen in CI), leaving the process running.
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


__all__ = ["StopSignal", "opened_archive"]
