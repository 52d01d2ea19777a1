"""Watch: a drop zone (a folder or an fsspec URL) whose new files are ingested as they land.

Every ``dropzone_interval`` seconds the drop zone is listed. A file is taken once its
size and modification time are the same in two listings in a row (so a file still
being copied in is left alone), queued into the open ``watch`` batch and ingested
through the same pipeline as ``medlake ingest``. Then, by ``dropzone_after``:

- ``move`` (default): to ``processed/`` (stored or duplicate) or ``rejected/``
  (rejected or failed) inside the drop zone, keeping its relative path;
- ``keep``: left where it is (remembered, so it is not taken again while this
  watcher runs; a restarted watcher takes it again and counts it as a duplicate);
- ``delete``: removed once stored or found duplicate; rejected files are moved to
  ``rejected/`` instead (a copy is in ``{data}/rejected/`` as well).

A batch stays open while files keep landing and is closed (reconciled, cleaned up)
after ``dropzone_batch_quiet_seconds`` without a new file; the next file opens a new
one. Polling rather than inotify, because it works the same on NFS/SMB shares and
object stores. Hidden files (``.name``) and ``*.part`` / ``*.tmp`` names are ignored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from medlake.errors import MedlakeError
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchKind, BatchStatus, create_batch, find_open_batch, get_batch
from medlake.ingest.discover import is_url, normalize_source
from medlake.ingest.events import EventHub
from medlake.ingest.pipeline import finish, run_batch
from medlake.ingest.queue import enqueue, outcomes
from medlake.types import check_partition

log = logging.getLogger(__name__)

PROCESSED = "processed"
REJECTED = "rejected"
_IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")


@dataclass(frozen=True)
class Landed:
    """A file in the drop zone: its name (path or URL), size and modification time."""

    name: str
    relative: str
    size: int
    mtime: float


class DropZone:
    """Listing, moving and deleting files of a drop zone (local folder or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not is_url(url):
            os.makedirs(os.path.expanduser(url.removeprefix("file://")), exist_ok=True)
        self.url = normalize_source(url)
        self._fs: Any = None
        self._root = self.url
        if is_url(self.url):
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
            self._root = self._root.rstrip("/")
            protocol = self._fs.protocol
            self._protocol = protocol if isinstance(protocol, str) else protocol[0]

    def scan(self) -> Iterator[Landed]:
        """Every candidate file (outside processed/ and rejected/, not hidden)."""
        for relative, size, mtime in self._list():
            first = relative.split("/", 1)[0]
            base = relative.rsplit("/", 1)[-1]
            if first in (PROCESSED, REJECTED) or base.startswith("."):
                continue
            if base.lower().endswith(_IGNORED_SUFFIXES):
                continue
            yield Landed(self._name(relative), relative, size, mtime)

    def _name(self, relative: str) -> str:
        if self._fs is None:
            return os.path.join(self.url, *relative.split("/"))
        return f"{self._protocol}://{self._root}/{relative}"

    def _list(self) -> Iterator[tuple[str, int, float]]:
        if self._fs is None:
            for root, dirs, names in os.walk(self.url):
                dirs.sort()
                for name in sorted(names):
                    full = os.path.join(root, name)
                    try:
                        st = os.lstat(full)
                    except OSError:
                        continue
                    relative = os.path.relpath(full, self.url).replace(os.sep, "/")
                    yield relative, st.st_size, st.st_mtime
            return
        for path, info in sorted(self._fs.find(self._root, detail=True).items()):
            if info.get("type") == "directory":
                continue
            relative = path.lstrip("/")[len(self._root.lstrip("/")) :].lstrip("/")
            yield relative, int(info.get("size") or 0), _mtime(info)

    def move(self, landed: Landed, folder: str, tag: str) -> None:
        """Move a file to ``folder``/its relative path (``.tag`` added if taken)."""
        if self._fs is None:
            target = os.path.join(self.url, folder, *landed.relative.split("/"))
            if os.path.lexists(target):
                target = f"{target}.{tag}"
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(landed.name, target)
            return
        target = f"{self._root}/{folder}/{landed.relative}"
        if self._fs.exists(target):
            target = f"{target}.{tag}"
        self._fs.mv(f"{self._root}/{landed.relative}", target)

    def delete(self, landed: Landed) -> None:
        """Remove a file."""
        if self._fs is None:
            os.unlink(landed.name)
        else:
            self._fs.rm_file(f"{self._root}/{landed.relative}")


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


class DropZoneWatcher:
    """Ingests the files that land in a drop zone (see the module docstring)."""

    def __init__(
        self,
        archive: Archive,
        url: str,
        *,
        partition: str | None = None,
        after: str | None = None,
        interval: float | None = None,
        quiet_seconds: float | None = None,
        workers: int | None = None,
        events: EventHub | None = None,
    ) -> None:
        settings = archive.settings
        self.archive = archive
        self.zone = DropZone(url, settings.ingest_source_options)
        self.partition = check_partition(partition or settings.dropzone_partition)
        self.after = after or settings.dropzone_after
        if self.after not in ("keep", "move", "delete"):
            raise ValueError(f"dropzone_after must be keep, move or delete, not {self.after!r}")
        self.interval = settings.dropzone_interval if interval is None else interval
        self.quiet = (
            settings.dropzone_batch_quiet_seconds if quiet_seconds is None else quiet_seconds
        )
        self.workers = workers
        self.events = events
        self._previous: dict[str, tuple[int, float]] = {}
        self._kept: set[tuple[str, int, float]] = set()
        self._last_landed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- running -----------------------------------------------------------------------

    def start(self) -> None:
        """Watch in a background thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="medlake-dropzone", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread (after the chunk in hand is stored)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Scan and ingest every ``interval`` seconds until stopped."""
        log.info("watching %s (partition %s, after: %s)", self.zone.url, self.partition, self.after)
        while not self._stop.is_set():
            try:
                self.scan_once()
            except MedlakeError as exc:
                log.error("drop zone %s: %s", self.zone.url, exc.message)
            except Exception:
                log.exception("drop zone %s: scan failed", self.zone.url)
            self._stop.wait(self.interval)

    # --- one cycle ---------------------------------------------------------------------

    def scan_once(self) -> int:
        """One cycle: queue the files that stopped changing, ingest them, move them, and
        close the batch once the drop zone was quiet long enough. Returns files taken."""
        ready = self._ready()
        batch_id = self._open_batch_id(create=bool(ready))
        if ready and batch_id is not None:
            self._last_landed = time.monotonic()
            with self.archive.engine.begin() as conn:
                enqueue(conn, batch_id, [(f.name, f.size) for f in ready])
        if batch_id is None:
            return 0
        batch = run_batch(
            self.archive, batch_id, workers=self.workers, events=self.events, finalize=False,
            stop=self._stop,
        )  # fmt: skip
        if ready:
            self._after(batch_id, ready)
        if batch.status == BatchStatus.PAUSED:
            log.warning("drop-zone batch %s is paused: %s", batch_id,
                        batch.detail.get("pause_reason"))  # fmt: skip
        elif not ready and time.monotonic() - self._last_landed >= self.quiet:
            finished = finish(self.archive, batch_id, self.events)
            log.info("drop-zone batch %s closed: %s", batch_id, finished.verdict)
        return len(ready)

    def _ready(self) -> list[Landed]:
        current = {f.name: f for f in self.zone.scan()}
        ready = [
            f
            for name, f in current.items()
            if self._previous.get(name) == (f.size, f.mtime)
            and (name, f.size, f.mtime) not in self._kept
        ]
        self._previous = {name: (f.size, f.mtime) for name, f in current.items()}
        return ready

    def _open_batch_id(self, *, create: bool) -> str | None:
        with self.archive.engine.begin() as conn:
            batch = find_open_batch(conn, BatchKind.WATCH, self.partition, self.zone.url)
            if batch is None and create:
                batch = create_batch(conn, BatchKind.WATCH, self.partition, self.zone.url,
                                     {"discovered": True})  # fmt: skip
            return batch.id if batch is not None else None

    def _after(self, batch_id: str, ready: list[Landed]) -> None:
        with self.archive.engine.connect() as conn:
            done = outcomes(conn, batch_id, [f.name for f in ready])
            status = get_batch(conn, batch_id).status
        tag = batch_id[:8]
        for landed in ready:
            outcome = done.get(landed.name)
            if outcome is None:
                continue  # not processed yet (batch paused or stopping): next cycle
            good = outcome in ("stored", "duplicate")
            try:
                if self.after == "keep":
                    self._kept.add((landed.name, landed.size, landed.mtime))
                elif self.after == "delete" and good:
                    self.zone.delete(landed)
                else:
                    self.zone.move(landed, PROCESSED if good else REJECTED, tag)
            except OSError as exc:
                self._kept.add((landed.name, landed.size, landed.mtime))
                log.error("drop zone: cannot %s %s: %s", self.after, landed.name, exc)
        if status != BatchStatus.RUNNING:
            log.info("drop-zone batch %s is %s", batch_id, status)


__all__ = ["PROCESSED", "REJECTED", "DropZone", "DropZoneWatcher", "Landed"]
