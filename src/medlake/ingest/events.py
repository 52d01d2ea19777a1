"""Events between the ingest stages, and for whoever listens (progress bars, the lake,
ML, sharing): a small synchronous publish/subscribe hub.

Handlers run in the thread that emits, after the change they describe is committed;
a handler that raises is logged and does not disturb the ingest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOpened:
    """A batch started or resumed; ``queued`` files wait in its work queue."""

    batch_id: str
    source: str
    queued: int
    queued_bytes: int


@dataclass(frozen=True)
class FilesDiscovered:
    """Discovery added ``count`` files (``size`` bytes) to the batch's work queue."""

    batch_id: str
    count: int
    size: int


@dataclass(frozen=True)
class FilesProcessed:
    """One chunk of files got its outcomes (committed with the files)."""

    batch_id: str
    seen: int
    stored: int
    duplicates: int
    rejected: int
    size: int
    #: (source, rule, message) of each rejected file of the chunk.
    rejections: Sequence[tuple[str, str, str]]


@dataclass(frozen=True)
class InstancesStored:
    """Instances were committed to the index and the lake (any receiver)."""

    partition: str
    batch_id: str | None
    sop_uids: Sequence[str]


@dataclass(frozen=True)
class BatchPaused:
    """The batch paused because too many files were rejected."""

    batch_id: str
    reason: str


@dataclass(frozen=True)
class BatchFinished:
    """The batch was reconciled and closed (``verdict`` balanced or mismatch)."""

    batch_id: str
    status: str
    verdict: str
    differences: Sequence[str]


IngestEvent = (
    BatchOpened | FilesDiscovered | FilesProcessed | InstancesStored | BatchPaused | BatchFinished
)
Handler = Callable[[IngestEvent], None]


class EventHub:
    """Subscribers of ingest events."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []
        self._lock = threading.Lock()

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for every event from now on; returns the unsubscribe function."""
        with self._lock:
            self._handlers.append(handler)

        def unsubscribe() -> None:
            with self._lock:
                if handler in self._handlers:
                    self._handlers.remove(handler)

        return unsubscribe

    @property
    def listening(self) -> bool:
        """Whether anyone subscribed (emitters skip building events otherwise)."""
        return bool(self._handlers)

    def emit(self, event: IngestEvent) -> None:
        """Deliver ``event`` to every subscriber."""
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:  # a listener must not break the ingest
                log.exception("ingest event handler %r failed on %r", handler, event)


__all__ = [
    "BatchFinished",
    "BatchOpened",
    "BatchPaused",
    "EventHub",
    "FilesDiscovered",
    "FilesProcessed",
    "Handler",
    "IngestEvent",
    "InstancesStored",
]
