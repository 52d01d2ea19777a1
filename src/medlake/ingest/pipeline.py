"""The ingest pipeline: discover → queue → validate → parse and store → aggregate →
reconcile → clean up, for ``medlake ingest``, ``medlake watch`` and the drop zone.

::

    open_batch(source)            find the unfinished batch of this source, or start one
    discover(batch)               list the files into the durable work queue (once)
    run_batch(batch)              claim chunks, copy+hash+parse them in worker processes,
                                  store each chunk in one transaction with its outcomes
    finish_batch(batch)           reconcile, close (completed / failed), clean up

Resumable by construction: a file's outcome is committed with the file, so a run
stopped anywhere (``kill -9`` included) is continued by running it again. The files
that were claimed but not committed are claimed again; one already in the lake
without its row is simply stored again (same key, same bytes); nothing is counted
twice and nothing is stored twice.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from medlake.errors import DatabaseUnavailable, MedlakeError
from medlake.ingest.archive import Archive
from medlake.ingest.batches import (
    Batch,
    BatchCounts,
    BatchKind,
    BatchLedger,
    BatchStatus,
    FileOutcome,
    create_batch,
    find_open_batch,
    finish_batch,
    get_batch,
    pause_if_rejecting,
    update_detail,
)
from medlake.ingest.cleanup import batch_staging, clean_finished_batch, clean_worker, worker_staging
from medlake.ingest.clinical_staging import store_clinical_file
from medlake.ingest.discover import Discovery, is_clinical, normalize_source
from medlake.ingest.events import (
    BatchFinished,
    BatchOpened,
    BatchPaused,
    EventHub,
    FilesDiscovered,
    FilesProcessed,
)
from medlake.ingest.inspect import (
    Inspection,
    StagingJob,
    StagingOptions,
    flush_filesystem,
    submit_staging,
)
from medlake.ingest.queue import (
    Worker,
    WorkItem,
    claim,
    enqueue,
    queued_size,
    release,
    release_abandoned,
    status_counts,
    still_mine,
)
from medlake.ingest.reconcile import reconcile_batch
from medlake.ingest.store import ReceivedFile, store_instances
from medlake.ingest.validation import rule_of
from medlake.ingest.workers import default_workers
from medlake.types import check_partition

_DISCOVER_CHUNK = 1000
#: Chunks claimed ahead of the one being stored, so workers copy while the index writes.
_CHUNKS_AHEAD = 2


def open_batch(
    archive: Archive, source: str, partition: str, kind: BatchKind = BatchKind.INGEST
) -> tuple[Batch, bool]:
    """The unfinished (running or paused) batch reading ``source`` into ``partition``,
    or a new one; the flag says whether it is resumed."""
    check_partition(partition)
    normalized = normalize_source(source)
    with archive.engine.begin() as conn:
        found = find_open_batch(conn, kind, partition, normalized)
        if found is not None:
            return found, True
        return create_batch(conn, kind, partition, normalized, {"discovered": False}), False


def discover(archive: Archive, batch: Batch, events: EventHub | None = None) -> int:
    """List the batch's source into its work queue, unless that was done before.

    Returns the number of queued files. Safe to repeat after a crash: sources already
    queued are skipped.
    """
    hub = events or archive.events
    if batch.detail.get("discovered"):
        with archive.engine.connect() as conn:
            return sum(status_counts(conn, batch.id).values())
    discovery = _discovery(archive, batch)
    total = 0
    pending: list[tuple[str, int | None]] = []

    def flush() -> None:
        nonlocal total, pending
        with archive.engine.begin() as conn:
            enqueue(conn, batch.id, pending)
        total += len(pending)
        hub.emit(FilesDiscovered(batch.id, len(pending), sum(s or 0 for _, s in pending)))
        pending = []

    for item in discovery.files():
        pending.append(item)
        if len(pending) >= _DISCOVER_CHUNK:
            flush()
    if pending:
        flush()
    with archive.engine.begin() as conn:
        update_detail(conn, batch.id, discovered=True, files=total)
    return total


def _discovery(archive: Archive, batch: Batch) -> Discovery:
    return Discovery(
        batch.source, batch_staging(archive, batch.id), archive.settings.ingest_source_options
    )


@dataclass
class _Chunk:
    items: list[WorkItem]
    futures: list[Future[Inspection]]
    targets: list[Path]
    #: The tasks in the worker processes that produce ``futures``.
    groups: list[Future[list[Inspection]]]


def run_batch(
    archive: Archive,
    batch_id: str,
    *,
    workers: int | None = None,
    events: EventHub | None = None,
    finalize: bool = True,
    stop: threading.Event | None = None,
) -> Batch:
    """Process the batch's queued files until none is left, the batch pauses, or
    ``stop`` is set; then, with ``finalize`` and nothing left, reconcile and close it.

    ``workers`` processes copy, hash and parse files (default :func:`default_workers`;
    0 = in this process). Returns the batch as it is afterwards.
    """
    hub = events or archive.events
    settings = archive.settings
    count = default_workers(settings) if workers is None else workers
    worker = Worker.here()
    for gone in release_abandoned(archive.engine, batch_id, settings.ingest_claim_timeout):
        clean_worker(archive, batch_id, gone)
    with archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
        queued, queued_bytes = queued_size(conn, batch_id)
    if batch.status != BatchStatus.RUNNING:
        return batch
    if not batch.detail.get("discovered", True):  # stopped while listing its source
        discover(archive, batch, hub)
        with archive.engine.connect() as conn:
            queued, queued_bytes = queued_size(conn, batch_id)
    hub.emit(BatchOpened(batch.id, batch.source, queued, queued_bytes))
    discovery = _discovery(archive, batch)
    folder = worker_staging(archive, batch_id, worker)
    folder.mkdir(parents=True, exist_ok=True)
    # Durable staging: one syncfs per chunk where the OS has it, else fsync in the workers.
    flush_chunks = settings.fsync and flush_filesystem(folder)
    options = StagingOptions(
        link=settings.ingest_link_files, direct=settings.ingest_direct_io,
        durable=settings.fsync and not flush_chunks,
        storage_options=settings.ingest_source_options,
    )  # fmt: skip
    ahead: collections.deque[_Chunk] = collections.deque()
    stopping = False

    def submit(items: list[WorkItem]) -> _Chunk:
        targets = [folder / f"{item.id}.part" for item in items]
        jobs = [
            StagingJob(discovery.locate(item.source), target, not is_clinical(item.source))
            for item, target in zip(items, targets, strict=True)
        ]
        futures, groups = submit_staging(
            jobs, options, workers=count, per_task=max(1, min(25, len(jobs) // max(count * 2, 1)))
        )
        return _Chunk(items, futures, targets, groups)

    try:
        while True:
            while not stopping and len(ahead) < _CHUNKS_AHEAD:
                items = claim(archive.engine, batch_id, worker, settings.ingest_chunk_files)
                if not items:
                    break
                ahead.append(submit(items))
            if not ahead:
                break
            chunk = ahead.popleft()
            counts = _store_chunk(archive, batch, chunk, worker, hub, flush_chunks)
            if counts is None:
                continue
            if counts.status != BatchStatus.RUNNING:
                stopping = True  # paused (or closed) by someone else
            elif not stopping:
                with archive.engine.begin() as conn:
                    reason = pause_if_rejecting(
                        conn, batch, counts, settings.ingest_pause_rejection_rate,
                        settings.ingest_pause_min_files,
                    )  # fmt: skip
                if reason is not None:
                    hub.emit(BatchPaused(batch_id, reason))
                    stopping = True
            if stop is not None and stop.is_set():
                stopping = True
            if stopping:
                _give_back(archive, worker, ahead)  # claimed ahead, not stored: not ours now
    except BaseException:
        _give_back(archive, worker, ahead)
        raise
    finally:
        clean_worker(archive, batch_id, worker)
    with archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
        left = status_counts(conn, batch_id)
    unfinished = left.get("pending", 0) + left.get("claimed", 0)
    if finalize and batch.status == BatchStatus.RUNNING and not unfinished:
        batch = finish(archive, batch_id, hub)
    return batch


def _give_back(archive: Archive, worker: Worker, ahead: collections.deque[_Chunk]) -> None:
    """Release the chunks claimed ahead; their staging copies are waited for (a worker
    still writing one must not outlive the cleanup of the folder) and dropped."""
    for chunk in ahead:
        for group in chunk.groups:
            group.cancel()
    for chunk in ahead:
        for group in chunk.groups:
            if not group.cancelled():
                with contextlib.suppress(Exception):
                    group.result()
        for target in chunk.targets:
            target.unlink(missing_ok=True)
    release(archive.engine, worker, [i.id for c in ahead for i in c.items])
    ahead.clear()


def _store_chunk(
    archive: Archive, batch: Batch, chunk: _Chunk, worker: Worker, hub: EventHub, flush: bool
) -> BatchCounts | None:
    """Store one claimed chunk: DICOM files in one transaction, clinical files one each.

    With ``flush``, the chunk's staged files are made durable by one filesystem flush.
    """
    inspections = [_wait(f) for f in chunk.futures]
    if flush and chunk.targets:
        flush_filesystem(chunk.targets[0].parent)
        inspections = [
            dataclasses.replace(i, synced=True) if i.error is None else i for i in inspections
        ]
    with archive.engine.connect() as conn:
        mine = still_mine(conn, worker, [item.id for item in chunk.items])
    dicom: list[int] = []
    clinical: list[int] = []
    for i, item in enumerate(chunk.items):
        if item.id not in mine:  # re-claimed by another worker meanwhile: theirs now
            chunk.targets[i].unlink(missing_ok=True)
        elif is_clinical(item.source):
            clinical.append(i)
        else:
            dicom.append(i)
    counts: BatchCounts | None = None
    outcomes: list[FileOutcome] = []
    rejections: list[tuple[str, str, str]] = []
    if dicom:
        ledger = BatchLedger(
            batch.id,
            sources=[chunk.items[i].source for i in dicom],
            queue_ids=[chunk.items[i].id for i in dicom],
        )
        files = [
            ReceivedFile(chunk.targets[i], inspections[i].size or 0, inspections[i].sha256)
            for i in dicom
        ]
        results = store_instances(
            archive, files, batch.partition, inspections=[inspections[i] for i in dicom],
            ledger=ledger,
        )  # fmt: skip
        if ledger.counts is None:
            raise _unrecorded(batch.id)
        counts = ledger.counts
        outcomes += [r.file_outcome for r in results]
        rejections += [
            (source, rule_of(r.error), r.error.message)
            for source, r in zip(ledger.sources, results, strict=True)
            if r.error is not None
        ]
    for i in clinical:
        ledger = BatchLedger(batch.id, [chunk.items[i].source], [chunk.items[i].id])
        outcome = store_clinical_file(
            archive, ledger, batch.partition, chunk.targets[i], inspections[i]
        )
        if outcome is None or ledger.counts is None:
            raise _unrecorded(batch.id)
        counts = ledger.counts
        outcomes.append(outcome)
        if outcome in (FileOutcome.REJECTED, FileOutcome.FAILED):
            rejections.append((chunk.items[i].source, "clinical_schema", outcome.value))
    if outcomes:
        stored = outcomes.count(FileOutcome.STORED)
        duplicates = outcomes.count(FileOutcome.DUPLICATE)
        hub.emit(
            FilesProcessed(
                batch.id, seen=len(outcomes), stored=stored, duplicates=duplicates,
                rejected=len(outcomes) - stored - duplicates,
                size=sum(inspections[i].size or 0 for i in dicom + clinical),
                rejections=rejections,
            )
        )  # fmt: skip
    return counts


def _unrecorded(batch_id: str) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"the index database is unavailable: outcomes of batch {batch_id} could not be "
        "recorded; run the same command again to resume"
    )


def _wait(future: Future[Inspection]) -> Inspection:
    try:
        return future.result()
    except Exception as exc:  # the worker process died
        return Inspection("", None, MedlakeError(f"cannot stage the file: {exc!r}"))


def finish(archive: Archive, batch_id: str, events: EventHub | None = None) -> Batch:
    """Reconcile the batch, close it (completed when balanced, else failed with the
    differences listed) and clean up after it."""
    hub = events or archive.events
    result = reconcile_batch(archive, batch_id)
    with archive.engine.begin() as conn:
        batch = finish_batch(
            conn, batch_id, differences=result.differences,
            extra={"reconciliation": result.figures},
        )  # fmt: skip
    clean_finished_batch(archive, batch)
    hub.emit(BatchFinished(batch.id, batch.status, batch.verdict or "", result.differences))
    return batch


def ingest(
    archive: Archive,
    source: str,
    partition: str,
    *,
    workers: int | None = None,
    events: EventHub | None = None,
) -> Batch:
    """The whole pipeline for one PATH_OR_URL: open (or resume) its batch, discover,
    process, reconcile and clean up. Returns the batch (``paused`` if it paused)."""
    batch, _resumed = open_batch(archive, source, partition)
    if batch.status == BatchStatus.PAUSED:
        return batch
    discover(archive, batch, events)
    return run_batch(archive, batch.id, workers=workers, events=events)


__all__ = [
    "default_workers",
    "discover",
    "finish",
    "ingest",
    "open_batch",
    "run_batch",
]
