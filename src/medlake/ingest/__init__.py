"""Ingestion: taking files into the lake and the index (STOW-RS, C-STORE, bulk import).

The public API, one module per stage of the pipeline::

    archive      Archive: settings + index + lake, opened once per process
    validation   RULES, RuleConfig, validate_instance, rejection: the named rules
    store        store_instances: the one path every DICOM file takes into the lake
    batches      batch records and the ingest_errors table (BatchLedger, create_batch, …)
    discover     PATH_OR_URL -> files (folder, glob, zip/tar, fsspec URL)
    queue        the durable work queue (claim with FOR UPDATE SKIP LOCKED)
    inspect      copy + hash + header parse, in worker processes
    clinical_staging   CSV / NDJSON files into clinical_rows
    aggregate    the hierarchy and the flat table agree
    reconcile    reconcile_batch, reconcile_partition: nothing lost
    cleanup      staging and queue rows of finished batches
    events       EventHub and the events between the stages
    pipeline     ingest(): the stages in order; run_batch, finish
    watch        DropZoneWatcher: event-driven ingest of a drop zone

The names of ``__all__`` are imported on first use, not with the package: worker
processes import :mod:`medlake.ingest.inspect` alone and should not pay for the
index and the lake (about 0.6 s of imports each).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medlake.ingest.archive import Archive
    from medlake.ingest.batches import Batch, BatchKind, BatchLedger, BatchStatus, FileOutcome
    from medlake.ingest.pipeline import finish, ingest, run_batch
    from medlake.ingest.reconcile import reconcile_batch, reconcile_partition
    from medlake.ingest.store import ReceivedFile, StoreResult, store_instances
    from medlake.ingest.validation import (
        RULES,
        Finding,
        RuleConfig,
        Severity,
        rejection,
        validate_instance,
    )
    from medlake.ingest.watch import DropZoneWatcher

_HOME = {
    "Archive": "archive",
    "Batch": "batches",
    "BatchKind": "batches",
    "BatchLedger": "batches",
    "BatchStatus": "batches",
    "FileOutcome": "batches",
    "finish": "pipeline",
    "ingest": "pipeline",
    "run_batch": "pipeline",
    "reconcile_batch": "reconcile",
    "reconcile_partition": "reconcile",
    "ReceivedFile": "store",
    "StoreResult": "store",
    "store_instances": "store",
    "RULES": "validation",
    "Finding": "validation",
    "RuleConfig": "validation",
    "Severity": "validation",
    "rejection": "validation",
    "validate_instance": "validation",
    "DropZoneWatcher": "watch",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "RULES",
    "Archive",
    "Batch",
    "BatchKind",
    "BatchLedger",
    "BatchStatus",
    "DropZoneWatcher",
    "FileOutcome",
    "Finding",
    "ReceivedFile",
    "RuleConfig",
    "Severity",
    "StoreResult",
    "finish",
    "ingest",
    "reconcile_batch",
    "reconcile_partition",
    "rejection",
    "run_batch",
    "store_instances",
    "validate_instance",
]
