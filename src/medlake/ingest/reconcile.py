"""Reconcile: prove that nothing was lost.

- :func:`reconcile_batch` (the end of every queued batch): files seen = stored +
  duplicates + rejected; every queued file has an outcome; the index rows carrying
  the batch (instances, clinical files and their rows) number what was stored; each
  of them has its file in the lake; every stored or duplicate file's SOP Instance is
  in the index; and the hierarchy is consistent (:mod:`medlake.ingest.aggregate`).
  Any difference makes the batch ``failed`` with the difference listed.
- :func:`reconcile_partition` (``medlake reconcile``): the whole partition against the
  lake: files with no index row, rows with no file.

A batch is reconciled when it ends; instances replaced or deleted later no longer
carry it, so reconciling an old batch again can report them as differences.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, exists, func, select

from medlake.errors import NotFound
from medlake.index.schema import instance_metadata, instances, partitions, work_queue
from medlake.index.writes import partition_id
from medlake.ingest.aggregate import check_hierarchy
from medlake.ingest.archive import Archive
from medlake.ingest.batches import get_batch
from medlake.ingest.clinical_staging import count_staged
from medlake.ingest.queue import status_counts
from medlake.storage import BlobStore
from medlake.storage.layout import SERIES_METADATA_NAME
from medlake.types import check_partition

#: Differences listed by name; the counts are always exact.
MAX_LISTED = 20


@dataclass(frozen=True)
class Reconciliation:
    """The verdict on one batch: the figures compared and every difference found."""

    batch_id: str
    figures: dict[str, int]
    differences: list[str]

    @property
    def balanced(self) -> bool:
        """Whether every check agreed."""
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        """As JSON."""
        return {
            "batchId": self.batch_id,
            "verdict": "balanced" if self.balanced else "mismatch",
            "figures": self.figures,
            "differences": self.differences,
        }


def reconcile_batch(archive: Archive, batch_id: str) -> Reconciliation:
    """Check a batch's counts against its queue, the index and the lake."""
    with archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
        queue = status_counts(conn, batch_id)
        # Keys stream in folder order, so memory stays flat however large the batch.
        keys = (
            conn.execution_options(yield_per=2000)
            .execute(
                select(instances.c.blob_key)
                .where(instances.c.batch_id == batch_id)
                .order_by(instances.c.blob_key)
            )
            .scalars()
        )
        rows, absent = missing_blobs(archive.blobs, keys)
        clinical_files, declared, staged, clinical_keys = count_staged(conn, batch_id)
        more_rows, more_absent = missing_blobs(archive.blobs, sorted(clinical_keys))
        missing_sops = _outcomes_without_rows(conn, batch_id, batch.partition)
        hierarchy = check_hierarchy(conn, batch_id)
    figures = {
        "seen": batch.seen,
        "stored": batch.stored,
        "duplicates": batch.duplicates,
        "rejected": batch.rejected,
        "queued": sum(queue.values()),
        "without_outcome": queue.get("pending", 0) + queue.get("claimed", 0),
        "instance_rows": rows,
        "clinical_files": clinical_files,
        "clinical_rows": staged,
    }
    differences: list[str] = []
    if not batch.balanced:
        differences.append(
            f"seen {batch.seen} != stored {batch.stored} + duplicates {batch.duplicates} "
            f"+ rejected {batch.rejected}"
        )
    if figures["without_outcome"]:
        differences.append(f"{figures['without_outcome']} queued files have no outcome")
    if queue and queue.get("done", 0) != batch.seen:
        differences.append(f"{queue.get('done', 0)} queued files done but {batch.seen} counted")
    if rows + clinical_files != batch.stored:
        differences.append(
            f"{batch.stored} files counted as stored, but {rows} instance rows and "
            f"{clinical_files} clinical files carry the batch"
        )
    if declared != staged:
        differences.append(f"clinical files declare {declared} records, {staged} are staged")
    absent_count = len(absent) + len(more_absent)
    figures["lake_files"] = rows + more_rows - absent_count
    if absent_count:
        differences.append(
            f"{absent_count} stored files are not in the lake: {_listed(absent + more_absent)}"
        )
    if missing_sops:
        differences.append(
            f"{len(missing_sops)} files counted stored or duplicate have no instance row: "
            f"{_listed(missing_sops)}"
        )
    differences += hierarchy
    return Reconciliation(batch_id, figures, differences)


def _outcomes_without_rows(conn: Connection, batch_id: str, partition: str) -> list[str]:
    part = partition_id(conn, partition, create=False)
    stored_row = exists().where(
        and_(instances.c.partition_id == part, instances.c.sop_uid == work_queue.c.sop_uid)
    )
    return list(
        conn.execute(
            select(work_queue.c.source).where(
                work_queue.c.batch_id == batch_id,
                work_queue.c.outcome.in_(["stored", "duplicate"]),
                work_queue.c.sop_uid.is_not(None),
                ~stored_row,
            )
        ).scalars()
    )


def missing_blobs(blobs: BlobStore, keys: Iterable[str]) -> tuple[int, list[str]]:
    """(how many of ``keys`` were checked, the ones that are not in the lake).

    ``keys`` must come grouped by folder (sorted keys are): each folder is listed once
    (object stores answer a folder listing in one or a few requests, not one per
    file), and only one folder's names are held at a time.
    """
    checked = 0
    absent: list[str] = []
    for folder, group in itertools.groupby(keys, key=lambda key: key.rsplit("/", 1)[0]):
        present = set(blobs.list(folder))
        for key in group:
            checked += 1
            if key not in present:
                absent.append(key)
    return checked, absent


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


@dataclass
class PartitionReconciliation:
    """The partition against the lake: what is in one and not the other."""

    partition: str
    instance_rows: int = 0
    flat_rows: int = 0
    lake_files: int = 0
    files_without_row: list[str] = field(default_factory=list)
    rows_without_file: list[str] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """Whether the lake and the index agree."""
        return (
            not self.files_without_row
            and not self.rows_without_file
            and self.instance_rows == self.flat_rows
        )

    def to_json(self) -> dict[str, Any]:
        """As JSON."""
        return {
            "partition": self.partition,
            "verdict": "balanced" if self.balanced else "mismatch",
            "instanceRows": self.instance_rows,
            "flatRows": self.flat_rows,
            "lakeFiles": self.lake_files,
            "filesWithoutRow": self.files_without_row,
            "rowsWithoutFile": self.rows_without_file,
        }


def reconcile_partition(archive: Archive, partition: str) -> PartitionReconciliation:
    """Compare every instance row of ``partition`` with the ``.dcm`` files in its folder.

    Holds the partition's blob keys in memory (about 150 bytes each).
    """
    check_partition(partition)
    result = PartitionReconciliation(partition)
    with archive.engine.connect() as conn:
        part = conn.execute(select(partitions.c.id).where(partitions.c.name == partition)).scalar()
        if part is None:
            raise NotFound(f"partition {partition} does not exist")
        keys = set(
            conn.execute(select(instances.c.blob_key).where(instances.c.partition_id == part))
            .scalars()
        )  # fmt: skip
        result.instance_rows = len(keys)
        result.flat_rows = conn.execute(
            select(func.count())
            .select_from(instance_metadata)
            .join(instances, instances.c.id == instance_metadata.c.instance_id)
            .where(instances.c.partition_id == part)
        ).scalar_one()
    for key in archive.blobs.list(archive.layout.partition_prefix(partition)):
        if key.endswith("/" + SERIES_METADATA_NAME):
            continue
        result.lake_files += 1
        if key in keys:
            keys.discard(key)
        else:
            result.files_without_row.append(key)
    result.rows_without_file = sorted(keys)
    result.files_without_row.sort()
    return result


__all__ = [
    "MAX_LISTED",
    "PartitionReconciliation",
    "Reconciliation",
    "missing_blobs",
    "reconcile_batch",
    "reconcile_partition",
]
