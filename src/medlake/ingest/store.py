"""Storing received DICOM files: validate, move into the lake, index, in batches.

STOW-RS, C-STORE and bulk ingest all end here, so the same rules apply to each:
a file that fails leaves nothing behind (no blob, no row); the same SOP Instance
stored twice with the same bytes is a no-op; with different bytes it is a
conflict unless the caller asked to replace it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from medlake.dicom.parse import ParsedInstance
from medlake.errors import (
    Conflict,
    DatabaseUnavailable,
    MedlakeError,
    StorageError,
    StudyMismatch,
)
from medlake.index.writes import (
    ExistingInstance,
    InstanceRow,
    find_existing,
    lock_instances,
    partition_id,
    write_instances,
)
from medlake.ingest.archive import Archive
from medlake.ingest.inspect import Inspection, submit_inspection
from medlake.types import check_partition


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

    @property
    def ok(self) -> bool:
        """Whether the instance is in the archive after this call."""
        return self.outcome is not Outcome.FAILED


def store_instances(
    archive: Archive,
    files: Sequence[ReceivedFile],
    partition: str,
    *,
    expected_study: str | None = None,
    replace: bool = False,
    inspections: Sequence[Future[Inspection]] | None = None,
) -> list[StoreResult]:
    """Store ``files`` into ``partition``; one result per file, in order.

    ``inspections`` are the files' header parses started earlier with :func:`inspect`
    (a receiver starts each as soon as its part is complete); by default they start now.
    Staging files are always consumed (moved into the lake or deleted).
    """
    check_partition(partition)
    results: list[StoreResult | None] = [None] * len(files)
    parsed: dict[int, ParsedInstance] = {}
    hashes: list[str] = [""] * len(files)
    try:
        if inspections is None:
            inspections = [inspect(archive, received) for received in files]
        for i, future in enumerate(inspections):
            try:
                inspection = future.result()
            except Exception as exc:  # a worker process died: this file is not stored
                results[i] = StoreResult(
                    Outcome.FAILED, error=MedlakeError(f"cannot inspect the file: {exc!r}")
                )
                continue
            hashes[i] = inspection.sha256
            if inspection.parsed is None:
                results[i] = StoreResult(Outcome.FAILED, error=inspection.error)
                continue
            item = inspection.parsed
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
        _store_parsed(archive, files, hashes, parsed, results, partition, replace)
    finally:
        for received in files:
            received.path.unlink(missing_ok=True)
    return [r if r is not None else StoreResult(Outcome.FAILED) for r in results]


def inspect(archive: Archive, received: ReceivedFile) -> Future[Inspection]:
    """Start parsing and hashing ``received`` (in a worker process when configured)."""
    return submit_inspection(
        received.path, received.head, received.sha256, archive.settings.parse_workers
    )


def _result(
    item: ParsedInstance, outcome: Outcome, error: MedlakeError | None = None
) -> StoreResult:
    return StoreResult(
        outcome,
        sop_class_uid=item.values.get("sop_class_uid"),
        sop_uid=item.sop_uid,
        study_uid=item.study_uid,
        series_uid=item.series_uid,
        error=error,
    )


def _store_parsed(
    archive: Archive,
    files: Sequence[ReceivedFile],
    hashes: Sequence[str],
    parsed: dict[int, ParsedInstance],
    results: list[StoreResult | None],
    partition: str,
    replace: bool,
) -> None:
    """Decide, move and index under the archive's write lock, in one transaction.

    The lock (in-process) plus the database's own write lock (SQLite) or advisory
    locks on the SOP Instance UIDs (PostgreSQL) make "is it stored already?" and
    "store it" one step: two requests carrying the same new instance cannot both
    move a file onto the same key.
    """
    if not parsed:
        return
    moved: list[tuple[int, InstanceRow]] = []
    replaced: dict[str, int] = {}
    try:
        with archive.write_lock, archive.engine.begin() as conn:
            lock_instances(conn, partition, [p.sop_uid for p in parsed.values()])
            part = partition_id(conn, partition, create=False)
            existing = (
                find_existing(conn, part, (p.sop_uid for p in parsed.values()))
                if part is not None
                else {}
            )
            to_write = _plan(
                archive, files, hashes, parsed, results, partition, replace, existing, replaced
            )
            pending = list(to_write.values())
            errors = archive.blobs.put_files([(row.blob_key, files[i].path) for i, row in pending])
            for (i, row), error in zip(pending, errors, strict=True):
                if error is None:
                    moved.append((i, row))
                else:
                    failure = error if isinstance(error, MedlakeError) else StorageError(str(error))
                    results[i] = _result(parsed[i], Outcome.FAILED, failure)
            moved_uids = {row.sop_uid for _, row in moved}
            write_instances(
                conn,
                partition,
                [row for _, row in moved],
                {uid: rid for uid, rid in replaced.items() if uid in moved_uids},
            )
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
        return
    for i, row in moved:
        results[i] = _result(
            parsed[i], Outcome.REPLACED if row.sop_uid in replaced else Outcome.STORED
        )


def _plan(
    archive: Archive,
    files: Sequence[ReceivedFile],
    hashes: Sequence[str],
    parsed: dict[int, ParsedInstance],
    results: list[StoreResult | None],
    partition: str,
    replace: bool,
    existing: dict[str, ExistingInstance],
    replaced: dict[str, int],
) -> dict[str, tuple[int, InstanceRow]]:
    """What to write: duplicates and conflicts get their result here; the rest are rows."""
    to_write: dict[str, tuple[int, InstanceRow]] = {}
    for i, item in parsed.items():
        old = existing.get(item.sop_uid)
        earlier = to_write.get(item.sop_uid)
        same_as = old.sha256 if old else (hashes[earlier[0]] if earlier else None)
        if same_as == hashes[i]:
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
            ),
        )
    return to_write


def _header_loader(archive: Archive, key: str) -> Callable[[], Dataset]:
    """Reads the stored header again, for the rare caller that needs the Dataset."""

    def load() -> Dataset:
        with archive.blobs.open(key) as fh:
            return pydicom.dcmread(fh, stop_before_pixels=True)

    return load


def _discard(archive: Archive, key: str) -> None:
    with contextlib.suppress(StorageError):
        archive.blobs.delete(key)
