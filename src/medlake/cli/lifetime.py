"""How long what a command uses lives: the archive it opens (closed when it is done),
and, for a command that serves until stopped, the wait for Ctrl-C or SIGTERM.

A :class:`~medlake.errors.MedlakeError` from opening the archive (an index database
that cannot be reached, a wrong key file) or from the command itself reaches the
root command, which prints it as ``error: <message>`` and exits with status 1 (the
ingest and lifecycle commands catch it first, to exit with status 2).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medlake.config import Settings, load_settings
from medlake.ingest.archive import Archive


@contextlib.contextmanager
def opened_archive(
    data: Path | None = None, *, settings: Settings | None = None, **overrides: Any
) -> Iterator[Archive]:
    """The archive of ``settings``, or of ``--data`` with ``overrides`` of the settings."""
    archive = Archive.open(settings or load_settings(data=data, **overrides))
    try:
        yield archive
    finally:
        archive.close()


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
