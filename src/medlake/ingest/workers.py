"""The worker processes that copy, hash and parse files (bulk ingest, STOW-RS).

One pool per worker count, shared by every archive of the process, started with
``spawn``. This module imports nothing heavy, so that a command can start its workers
before it imports the pipeline: the workers then start Python and pydicom while the
command's own process imports the rest.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medlake.config import Settings

_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def default_workers(settings: Settings) -> int:
    """Worker processes when none are asked for: ``ingest_workers``, else one per core."""
    return settings.ingest_workers or os.cpu_count() or 1


def pool(workers: int) -> ProcessPoolExecutor:
    """The pool of ``workers`` processes (made on first use)."""
    with _pools_lock:
        found = _pools.get(workers)
        if found is None:
            found = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_up_worker,
                initargs=(os.getpid(),),
            )
            _pools[workers] = found
        return found


def start_workers(workers: int) -> None:
    """Start the ``workers`` processes now, in the background, rather than at the first
    file: each one starts Python and imports pydicom (about half a second), which the
    first request or the first files of a batch would otherwise wait for."""
    if workers <= 0 or workers in _pools:
        return  # none wanted, or started already
    started = pool(workers)
    for _ in range(workers):  # one task per process: the pool starts one per task
        started.submit(_ready)


def _ready() -> None:
    """A worker's first task: import the inspection code (pydicom, the header parser)."""
    importlib.import_module("medlake.ingest.inspect")


def _set_up_worker(parent: int) -> None:
    """A worker's start: exit as soon as the process that started it is gone (``kill -9`` of
    the server or of ``medlake ingest``), instead of lingering as an orphan.

    And when the pool shuts down, leave without tearing down the interpreter: a worker
    holds no buffered output and no open file, and unloading pydicom and the rest took
    a quarter of a second, which ``medlake ingest`` waited for before it could exit.

    Runs before the worker imports anything else: numpy (which pydicom imports) would
    start one OpenBLAS thread per core, which spin while the worker starts and which
    no header parse uses.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="medlake-parent-watch", daemon=True).start()
    atexit.register(_leave)


def _leave() -> None:
    """A worker's last exit handler: flush logs and standard streams, then leave."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


@atexit.register
def _shutdown_pools() -> None:
    for running in _pools.values():
        running.shutdown(cancel_futures=True)


__all__ = ["default_workers", "pool", "start_workers"]
