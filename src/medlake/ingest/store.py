"""Storing received DICOM files: validate, move into the lake, index, in batches.

STOW-RS, C-STORE and bulk ingest all end here, so the same rules apply to each:
every file is judged by the validation rules (:mod:`medlake.ingest.validation`);
a file that fails leaves nothing behind in the lake or the index (it is set aside
in ``{data}/rejected/`` and gets an ``ingest_errors`` row); the same SOP Instance
stored twice with the same bytes is a no-op; with different bytes it is a
conflict unless the caller asked to replace it.

With a :class:`~medlake.ingest.batches.BatchLedger`, the batch counts, error rows
and work-queue outcomes are written in the same transaction as the instances: no
extra round trip per instance, and no count that a crash could make wrong.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from medlake.dicom.parse import ParsedInstance, data_set_digest
from medlake.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidDicom,
    MedlakeError,
    StorageError,
    StudyMismatch,
)
from medlake.index.writes import (
    InstanceRow,
    StoredRows,
    find_stored,
    lock_instances,
    write_instances,
)
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchLedger, FileOutcome, FileRecord, record_files
from medlake.ingest.events import InstancesStored
from medlake.ingest.inspect import Inspection, submit_inspection
from medlake.ingest.validation import (
    Finding,
    Severity,
    failure_finding,
    findings_for_error,
    rejection,
    validate_instance,
)
from medlake.types import check_partition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedFile:
    """A file received into the staging folder."""

    path: Path
    size: int
    #: SHA-256 when the receiver computed it on the fly; None = computed at inspection.
    sha256: str | None = None
    #: The first bytes of the file when the receiver kept them (saves re-reading the header).
    head: bytes | None = None


class Outcome(enum.StrEnum):
    """What happened to one received file."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance, same bytes: nothing to do
    REPLACED = "replaced"
    FAILED = "failed"


@dataclass
class StoreResult:
    """The outcome for one file, with the UIDs read from it (when it could be read)."""

    outcome: Outcome
    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    error: MedlakeError | None = None
    #: Findings of the validation rules: warnings of a stored file, the rejection of another.
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the instance is in the archive after this call."""
        return self.outcome is not Outcome.FAILED

    @property
    def file_outcome(self) -> FileOutcome:
        """The outcome as batches count it: a data problem is ``rejected`` (kept aside),
        a failure of the source, lake or index is ``failed`` (a retry may succeed)."""
        if self.outcome is Outcome.DUPLICATE:
            return FileOutcome.DUPLICATE
        if self.ok:
            return FileOutcome.STORED
        if isinstance(self.error, InvalidDicom | Conflict):
            return FileOutcome.REJECTED
        return FileOutcome.FAILED


def store_instances(
    archive: Archive,
    files: Sequence[ReceivedFile],
    partition: str,
    *,
    expected_study: str | None = None,
    replace: bool = False,
    inspections: Sequence[Future[Inspection] | Inspection] | None = None,
    ledger: BatchLedger | None = None,
) -> list[StoreResult]:
    """Store ``files`` into ``partition``; one result per file, in order.

    ``inspections`` are the files' header parses, started earlier with :func:`inspect`
    (a receiver starts each as soon as its part is complete) or done already (bulk
    ingest); by default they start now.
    Each parsed file is judged by ``archive.rules``. With ``ledger``, the outcomes are
    recorded in the batch (counts, ``ingest_errors`` rows, work-queue items) in the
    transaction that stores the instances, and rejected files are kept aside.
    Staging files are always consumed (moved into the lake, kept aside or deleted).
    """
    check_partition(partition)
    results: list[StoreResult | None] = [None] * len(files)
    parsed: dict[int, ParsedInstance] = {}
    warnings: dict[int, list[Finding]] = {}
    hashes: list[str] = [""] * len(files)
    synced = True  # every file's data already fsynced by its inspection
    try:
        if inspections is None:
            inspections = [inspect(archive, received) for received in files]
        for i, pending in enumerate(inspections):
            try:
                inspection = pending if isinstance(pending, Inspection) else pending.result()
            except Exception as exc:  # a worker process died: this file is not stored
                results[i] = StoreResult(
                    Outcome.FAILED, error=MedlakeError(f"cannot inspect the file: {exc!r}")
                )
                continue
            hashes[i] = inspection.sha256
            synced = synced and inspection.synced
            if inspection.parsed is None:
                results[i] = _unparsed(archive, inspection, files[i].size)
                continue
            item = inspection.parsed
            findings = validate_instance(item, archive.rules)
            refused = rejection(findings)
            if refused is not None:
                results[i] = _result(item, Outcome.FAILED, refused, findings)
                continue
            if expected_study is not None and item.study_uid != expected_study:
                results[i] = _result(
                    item,
                    Outcome.FAILED,
                    StudyMismatch(
                        f"StudyInstanceUID {item.study_uid} of the instance does not match "
                        f"{expected_study} in the request URL"
                    ),
                )
                continue
            parsed[i] = item
            warnings[i] = findings
        _store_parsed(
            archive, files, hashes, parsed, warnings, results, partition, replace, ledger, synced
        )
    finally:
        for received in files:
            received.path.unlink(missing_ok=True)
    final = [r if r is not None else StoreResult(Outcome.FAILED) for r in results]
    if archive.events.listening:
        stored = [r.sop_uid for r in final if r.outcome in (Outcome.STORED, Outcome.REPLACED)]
        if stored:
            batch_id = ledger.batch_id if ledger else None
            archive.events.emit(InstancesStored(partition, batch_id, [u for u in stored if u]))
    return final


def _unparsed(archive: Archive, inspection: Inspection, size: int) -> StoreResult:
    """The result of a file whose header could not be read (or that could not be read)."""
    error = inspection.error or MedlakeError("the file could not be inspected")
    findings = findings_for_error(error, size, archive.rules)
    refused = rejection(findings)
    if refused is not None and refused.rule == "file_size":
        error = refused
    return StoreResult(Outcome.FAILED, error=error, findings=findings)


def inspect(archive: Archive, received: ReceivedFile) -> Future[Inspection]:
    """Start parsing and hashing ``received`` (in a worker process when configured)."""
    return submit_inspection(
        received.path,
        received.head,
        received.sha256,
        archive.settings.parse_workers,
        durable=archive.settings.fsync,
    )


def _result(
    item: ParsedInstance,
    outcome: Outcome,
    error: MedlakeError | None = None,
    findings: list[Finding] | None = None,
) -> StoreResult:
    return StoreResult(
        outcome,
        sop_class_uid=item.values.get("sop_class_uid"),
        sop_uid=item.sop_uid,
        study_uid=item.study_uid,
        series_uid=item.series_uid,
        error=error,
        findings=findings or [],
    )


def _store_parsed(
    archive: Archive,
    files: Sequence[ReceivedFile],
    hashes: Sequence[str],
    parsed: dict[int, ParsedInstance],
    warnings: dict[int, list[Finding]],
    results: list[StoreResult | None],
    partition: str,
    replace: bool,
    ledger: BatchLedger | None,
    synced: bool = False,
) -> None:
    """Decide, move and index under the archive's write lock, in one transaction.

    The lock (in-process) plus the database's own write lock (SQLite) or advisory
    locks on the SOP Instance UIDs (PostgreSQL) make "is it stored already?" and
    "store it" one step: two requests carrying the same new instance cannot both
    move a file onto the same key.
    """
    if not parsed and ledger is None:
        return
    moved: list[tuple[int, InstanceRow]] = []
    replaced: dict[str, int] = {}
    try:
        with archive.write_lock, archive.engine.begin() as conn:
            if parsed:
                items = parsed.values()
                lock_instances(conn, partition, [p.sop_uid for p in items])
                # One lookup for the partition, the instances, their studies and series.
                stored = find_stored(
                    conn, partition, (p.sop_uid for p in items), (p.study_uid for p in items),
                    (p.series_uid for p in items),
                )  # fmt: skip
                to_write = _plan(
                    archive, files, hashes, parsed, results, partition, replace, stored,
                    replaced, ledger.batch_id if ledger else None,
                )  # fmt: skip
                pending = list(to_write.values())
                errors = archive.blobs.put_files(
                    [(row.blob_key, files[i].path) for i, row in pending], synced=synced
                )
                for (i, row), error in zip(pending, errors, strict=True):
                    if error is None:
                        moved.append((i, row))
                    else:
                        failure = (
                            error if isinstance(error, MedlakeError) else StorageError(str(error))
                        )
                        results[i] = _result(parsed[i], Outcome.FAILED, failure)
                moved_uids = {row.sop_uid for _, row in moved}
                write_instances(
                    conn,
                    partition,
                    [row for _, row in moved],
                    {uid: rid for uid, rid in replaced.items() if uid in moved_uids},
                    stored=stored,
                )
                for i, row in moved:
                    outcome = Outcome.REPLACED if row.sop_uid in replaced else Outcome.STORED
                    results[i] = _result(parsed[i], outcome, None, warnings.get(i))
            if ledger is not None:
                _record(archive, conn, ledger, files, results)
    except SQLAlchemyError as exc:
        # The transaction rolled back: files moved for new instances go again (no orphans).
        cause = getattr(exc, "orig", None) or exc
        error = DatabaseUnavailable(f"index write failed: {exc.__class__.__name__}: {cause}")
        for _i, row in moved:
            if row.sop_uid not in replaced:
                _discard(archive, row.blob_key)
        for i in parsed:
            current = results[i]
            if current is None or current.ok:
                results[i] = _result(parsed[i], Outcome.FAILED, error)
        if ledger is not None:
            _record_after_failure(archive, ledger, files, results)
        return
    for i, item in parsed.items():
        if results[i] is None:  # cannot happen: every parsed file got an outcome above
            results[i] = _result(item, Outcome.FAILED, MedlakeError("no outcome"))


def _record(
    archive: Archive,
    conn: Connection,
    ledger: BatchLedger,
    files: Sequence[ReceivedFile],
    results: Sequence[StoreResult | None],
) -> None:
    """Write every file's outcome into the ledger's batch (caller's transaction)."""
    records = []
    for i, result in enumerate(results):
        if result is None:
            result = StoreResult(Outcome.FAILED, error=MedlakeError("no outcome"))
        outcome = result.file_outcome
        findings = [f for f in result.findings if f.severity is Severity.WARN]
        kept_at = None
        if result.error is not None:
            findings.append(failure_finding(result.error, rejected=outcome is FileOutcome.REJECTED))
            if outcome is FileOutcome.REJECTED:
                kept_at = _keep_aside(archive, ledger, i, files[i])
        records.append(
            FileRecord(
                source=ledger.sources[i],
                outcome=outcome,
                size=files[i].size,
                sop_uid=result.sop_uid,
                findings=findings,
                kept_at=kept_at,
                queue_id=ledger.queue_ids[i] if ledger.queue_ids is not None else None,
            )
        )
    record_files(conn, ledger, records)


def _record_after_failure(
    archive: Archive,
    ledger: BatchLedger,
    files: Sequence[ReceivedFile],
    results: Sequence[StoreResult | None],
) -> None:
    """After the store transaction failed, record the failures in a new one (the index
    may be back); when that fails too, the outcomes stay unrecorded (``ledger.counts``
    None) and queued files stay claimed, so a later run takes them again."""
    try:
        with archive.write_lock, archive.engine.begin() as conn:
            _record(archive, conn, ledger, files, results)
    except SQLAlchemyError as exc:
        ledger.counts = None
        log.error("could not record the outcomes of batch %s: %s", ledger.batch_id, exc)


def _keep_aside(
    archive: Archive, ledger: BatchLedger, i: int, received: ReceivedFile
) -> str | None:
    queue_id = ledger.queue_ids[i] if ledger.queue_ids is not None else None
    label = f"{queue_id}" if queue_id is not None else f"{i + 1}"
    return keep_aside(archive, ledger.batch_id, label, ledger.sources[i], received.path)


def keep_aside(
    archive: Archive, batch_id: str, label: str, source: str, staged: Path
) -> str | None:
    """Move a rejected staged file to ``{data}/rejected/{batch}/{label}-{name}``.

    Returns its new path, or None when it is not kept (``ingest_keep_rejected`` off, or
    the staged file is gone). The name is stable, so doing it again after a crash
    overwrites the same file instead of keeping a second copy.
    """
    if not archive.settings.ingest_keep_rejected or not staged.exists():
        return None
    name = os.path.basename(source.rstrip("/").split("!")[-1]) or "file"
    folder = archive.rejected_dir / batch_id
    target = folder / f"{label}-{name}"[:200]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, target)
        except OSError:
            shutil.copyfile(staged, target)  # staging on another filesystem
    except OSError as exc:
        log.warning("could not keep rejected file %s aside: %s", source, exc)
        return None
    return str(target)


def _plan(
    archive: Archive,
    files: Sequence[ReceivedFile],
    hashes: Sequence[str],
    parsed: dict[int, ParsedInstance],
    results: list[StoreResult | None],
    partition: str,
    replace: bool,
    stored: StoredRows,
    replaced: dict[str, int],
    batch_id: str | None,
) -> dict[str, tuple[int, InstanceRow]]:
    """What to write: duplicates and conflicts get their result here; the rest are rows."""
    to_write: dict[str, tuple[int, InstanceRow]] = {}
    # A series belongs to one study: the one stored, else the first instance's of the request.
    series_studies = {uid: found.study_uid for uid, found in stored.series.items()}
    for i, item in parsed.items():
        old = stored.instances.get(item.sop_uid)
        earlier = to_write.get(item.sop_uid)
        same_as = old.sha256 if old else (hashes[earlier[0]] if earlier else None)
        if same_as == hashes[i] or (
            old is not None and _same_data_set(archive, old.blob_key, files[i].path)
        ):
            results[i] = _result(item, Outcome.DUPLICATE)
            continue
        if same_as is not None and not replace:
            results[i] = _result(
                item,
                Outcome.FAILED,
                Conflict(
                    f"SOP Instance {item.sop_uid} is already stored with different content; "
                    "use PUT to replace it"
                ),
            )
            continue
        if old is not None and (old.study_uid, old.series_uid) != (item.study_uid, item.series_uid):
            results[i] = _result(
                item,
                Outcome.FAILED,
                Conflict(
                    f"SOP Instance {item.sop_uid} is stored in study {old.study_uid} series "
                    f"{old.series_uid}; it cannot move to another study or series"
                ),
            )
            continue
        series_study = series_studies.setdefault(item.series_uid, item.study_uid)
        if series_study != item.study_uid:
            results[i] = _result(
                item,
                Outcome.FAILED,
                Conflict(
                    f"the series belongs to another study: SeriesInstanceUID {item.series_uid}"
                    f" is in study {series_study} of partition {partition}, the instance "
                    f"names study {item.study_uid}"
                ),
            )
            continue
        if old is not None:
            replaced[item.sop_uid] = old.id
        frame_index = item.frame_index
        key = archive.layout.instance_key(partition, item.study_uid, item.series_uid, item.sop_uid)
        to_write[item.sop_uid] = (
            i,
            InstanceRow(
                study_uid=item.study_uid,
                series_uid=item.series_uid,
                sop_uid=item.sop_uid,
                values=item.values,
                blob_key=key,
                size=files[i].size,
                sha256=hashes[i],
                encapsulated=bool(frame_index and frame_index.encapsulated),
                frames=frame_index.to_json() if frame_index else None,
                study_extra=item.study_extra,
                series_extra=item.series_extra,
                dataset=item.dataset if item.dataset is not None else _header_loader(archive, key),
                batch_id=batch_id,
            ),
        )
    return to_write


def _same_data_set(archive: Archive, stored_key: str, received: Path) -> bool:
    """Whether a received file differs from the stored one only in its File Meta (the
    same instance sent again by another route). Only reached when the whole-file
    hashes differ, so the common paths never read the stored file."""
    try:
        with archive.blobs.open(stored_key) as stored, received.open("rb") as new:
            return data_set_digest(stored) == data_set_digest(new)
    except (MedlakeError, OSError):
        return False


def _header_loader(archive: Archive, key: str) -> Callable[[], Dataset]:
    """Reads the stored header again, for the rare caller that needs the Dataset."""

    def load() -> Dataset:
        with archive.blobs.open(key) as fh:
            return pydicom.dcmread(fh, stop_before_pixels=True)

    return load


def _discard(archive: Archive, key: str) -> None:
    with contextlib.suppress(StorageError):
        archive.blobs.delete(key)
