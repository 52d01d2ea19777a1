"""Inspecting received files: header parse, frame offsets and SHA-256, off the server's GIL.

Parsing a DICOM header is pure-Python work (about a millisecond per instance).
Done in a worker process, it overlaps with the server receiving the next part
of the same upload instead of queueing behind it; hashing the file there
keeps that CPU off the server process too. With ``parse_workers = 0`` the same
function runs in the calling process.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medlake.dicom.parse import ParsedInstance, read_instance
from medlake.errors import MedlakeError

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Inspection:
    """What is known of one received file before it is stored."""

    sha256: str
    parsed: ParsedInstance | None
    error: MedlakeError | None = None


def inspect_file(
    path: Path, head: bytes | None, sha256: str | None, keep_dataset: bool
) -> Inspection:
    """Hash ``path`` (unless ``sha256`` is known) and parse its header.

    ``keep_dataset=False`` drops the pydicom Dataset (it is not sent back from a
    worker process; whoever needs it later re-reads the stored header).
    """
    if sha256 is None:
        digest = hashlib.sha256()
        with path.open("rb", buffering=0) as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
        sha256 = digest.hexdigest()
    try:
        parsed = read_instance(path, head)
    except MedlakeError as exc:
        return Inspection(sha256, None, exc)
    if not keep_dataset:
        parsed = dataclasses.replace(parsed, dataset=None)
    return Inspection(sha256, parsed)


def _inspect_in_worker(path: Path, head: bytes | None, sha256: str | None) -> Inspection:
    return inspect_file(path, head, sha256, keep_dataset=False)


_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ProcessPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            _pools[workers] = pool
        return pool


@atexit.register
def _shutdown_pools() -> None:
    for pool in _pools.values():
        pool.shutdown(cancel_futures=True)


def submit_inspection(
    path: Path, head: bytes | None, sha256: str | None, workers: int
) -> Future[Inspection]:
    """Inspect a file in one of ``workers`` processes (shared by every archive of this
    process), or right here when ``workers`` is 0."""
    if workers > 0:
        return _pool(workers).submit(_inspect_in_worker, path, head, sha256)
    done: Future[Inspection] = Future()
    done.set_result(inspect_file(path, head, sha256, keep_dataset=True))
    return done
