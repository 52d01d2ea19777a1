"""Clean up: what a batch leaves behind once it is finished.

- the batch's staging folder (``{data}/staging/batches/{id}/``: staged copies of files
  and unpacked archives);
- its work-queue rows, once the batch is completed (a failed batch keeps them, so
  the per-file outcomes can still be looked at);
- staging files of workers that died (``kill -9``), when their claims are released.

Rejected files in ``{data}/rejected/`` and ``ingest_errors`` rows are never removed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from medlake.ingest.archive import Archive
from medlake.ingest.batches import Batch, BatchStatus
from medlake.ingest.queue import Worker, drop_queue


def batch_staging(archive: Archive, batch_id: str) -> Path:
    """The staging folder of one batch."""
    return archive.staging_dir / "batches" / batch_id


def worker_staging(archive: Archive, batch_id: str, worker: Worker) -> Path:
    """The staging folder of one worker of a batch."""
    return batch_staging(archive, batch_id) / worker.nonce


@dataclass(frozen=True)
class Cleanup:
    """What :func:`clean_finished_batch` removed."""

    queue_rows: int
    staging_removed: bool


def clean_finished_batch(archive: Archive, batch: Batch) -> Cleanup:
    """Remove the staging folder of a finished batch, and its queue rows when it completed."""
    folder = batch_staging(archive, batch.id)
    existed = folder.exists()
    shutil.rmtree(folder, ignore_errors=True)
    rows = 0
    if batch.status == BatchStatus.COMPLETED:
        with archive.engine.begin() as conn:
            rows = drop_queue(conn, batch.id)
    return Cleanup(rows, existed)


def clean_worker(archive: Archive, batch_id: str, worker: Worker) -> None:
    """Remove the staging folder of a worker (after it stopped or was found dead)."""
    shutil.rmtree(worker_staging(archive, batch_id, worker), ignore_errors=True)


__all__ = ["Cleanup", "batch_staging", "clean_finished_batch", "clean_worker", "worker_staging"]
