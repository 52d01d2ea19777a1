"""Background rebuilding of stale series metadata, in a separate low-priority process.

Building DICOM JSON is pure-Python CPU work (~3 ms per instance). Done in a
thread of the server it would hold the GIL against every request right after a
large ingest; in a niced child process the operating system gives requests the
CPU first and the server's own threads never wait for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor

from medlake.config import Settings
from medlake.dicomweb.metadata import build_series_metadata, stale_series
from medlake.errors import MedlakeError
from medlake.index.statistics import refresh_statistics
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

_worker_archive: Archive | None = None


def _init_worker(settings: Settings) -> None:
    global _worker_archive
    os.nice(10)
    _worker_archive = Archive.open(settings)


def _build(partition: str, study_uid: str, series_uid: str) -> int:
    assert _worker_archive is not None
    try:
        return len(build_series_metadata(_worker_archive, partition, study_uid, series_uid))
    except MedlakeError:
        return 0  # the series went away meanwhile (deleted): nothing to build


class MetadataRefresher:
    """Every ``interval`` seconds, rebuilds series that are stale and have been quiet."""

    def __init__(self, archive: Archive, interval: float = 2.0) -> None:
        self._archive = archive
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the scheduling thread; the worker process starts on first use."""
        self._thread = threading.Thread(target=self._run, name="medlake-metadata", daemon=True)
        self._thread.start()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._archive.settings,),
            )
        return self._pool

    def _run(self) -> None:
        quiet = self._archive.settings.metadata_refresh_quiet_seconds
        passes = 0
        while not self._stop.wait(self._interval):
            passes += 1
            if passes % 30 == 0:  # about once a minute: planner statistics follow growth
                try:
                    refresh_statistics(self._archive.engine)
                except Exception:
                    log.exception("refreshing planner statistics failed")
            try:
                todo = stale_series(self._archive, quiet)
                futures: list[Future[int]] = [
                    self._executor().submit(_build, *item) for item in todo
                ]
                for future in futures:
                    future.result()
            except Exception:  # keep going: the read path rebuilds on demand anyway
                log.exception("series metadata refresh failed")

    def stop(self) -> None:
        """Stop scheduling and shut the worker process down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
