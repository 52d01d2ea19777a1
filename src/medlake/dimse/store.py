"""C-STORE as an SCP (and as the storage side of a C-GET medlake sends): the received
data set becomes a Part-10 file in staging and takes the path of every stored file,
:func:`medlake.ingest.store.store_instances` (same validation rules, duplicates,
conflicts, batch records and error rows as STOW-RS).

The data set is written as received (no decoding, no re-encoding), behind File Meta
Information made from the request: Media Storage SOP Class/Instance UID from the
C-STORE request, Transfer Syntax UID of the presentation context.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from medlake.dicom.file_meta import PREAMBLE, encode_file_meta
from medlake.dimse.ae_registry import CallingAeRules
from medlake.dimse.association_batch import AssociationBatch
from medlake.errors import MedlakeError, StorageError
from medlake.ingest.archive import Archive
from medlake.ingest.copying import HEAD_BYTES
from medlake.ingest.inspect import submit_inspection
from medlake.ingest.store import ReceivedFile, store_instances
from medlake.ingest.validation import rule_of

log = logging.getLogger(__name__)

SUCCESS = 0x0000
_UID = re.compile(r"\b[0-9]+(\.[0-9]+){3,}\b")
NOT_AUTHORISED = 0x0124


@dataclass(frozen=True)
class StoreContext:
    """Who is storing, into which partition, and the batch that records it."""

    rules: CallingAeRules
    batch: AssociationBatch


def status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE / C-FIND / C-MOVE / C-GET status, with an Error Comment.

    The comment is an LO (64 characters), so UIDs are left out of it: the peer knows
    which instance or identifier it sent, and the reason is what has to fit.
    """
    ds = Dataset()
    ds.Status = code
    if comment:
        text = " ".join(_UID.sub("", comment).replace("\\", "/").split())
        ds.ErrorComment = text[:64]
    return ds


def handle_store(archive: Archive, context: StoreContext, event: Any) -> Dataset:
    """The EVT_C_STORE handler: store the received instance, answer its status."""
    request = event.request
    sop_uid = str(request.AffectedSOPInstanceUID or "") or None
    message_id = int(request.MessageID or 0)
    if not context.rules.allow_store:
        return status(
            NOT_AUTHORISED, f"AE {context.rules.calling_ae} may not store (allow_store off)"
        )
    try:
        received = stage(archive, event)
    except (OSError, MedlakeError) as exc:
        error = exc if isinstance(exc, MedlakeError) else StorageError(f"staging failed: {exc}")
        context.batch.record_failure(message_id, sop_uid, 0, rule_of(error), error.message)
        log.error("C-STORE of %s from %s: %s", sop_uid, context.rules.calling_ae, error.message)
        return status(error.dicom_reason, error.message)
    ledger = context.batch.ledger(sop_uid, message_id)
    # Parsed right here, not in a worker process: the SCU waits for this response before
    # it sends anything else, so a worker would add its round trip and overlap nothing.
    inspection = submit_inspection(
        received.path, received.head, received.sha256, 0, durable=archive.settings.fsync
    )
    try:
        result = store_instances(
            archive, [received], context.rules.partition, inspections=[inspection], ledger=ledger
        )[0]
    finally:
        context.batch.after_store(ledger)
    if result.ok:
        return status(SUCCESS)
    error = result.error or MedlakeError("the instance was not stored")
    log.info("C-STORE of %s from %s refused: %s", sop_uid, context.rules.calling_ae, error.message)
    return status(error.dicom_reason, error.message)


def stage(archive: Archive, event: Any) -> ReceivedFile:
    """Write the received data set as a Part-10 file into staging, and hash it (from
    memory: reading the file back for the inspection to hash cost more)."""
    target = archive.staging_dir / f"{uuid.uuid4().hex}.part"
    dataset_path = _dataset_path(event)
    if dataset_path is not None:
        return _adopt(dataset_path, target)
    request = event.request
    # The File Meta is the same whoever sends the instance (no Source AE title: the batch
    # records the calling AE), so the same data set sent again is a duplicate, not a conflict.
    # Made from the request as pynetdicom's Event.file_meta makes it, byte for byte.
    header = PREAMBLE + encode_file_meta(
        request.AffectedSOPClassUID,
        request.AffectedSOPInstanceUID,
        event.context.transfer_syntax,
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    data = request.DataSet
    body = data.getbuffer() if isinstance(data, BytesIO) else memoryview(bytes(data or b""))
    try:
        with target.open("wb") as fh:
            fh.write(header)
            fh.write(body)
    except OSError:
        target.unlink(missing_ok=True)
        raise
    digest = hashlib.sha256(header)
    digest.update(body)
    head = header + bytes(body[: max(HEAD_BYTES - len(header), 0)])
    return ReceivedFile(target, len(header) + len(body), digest.hexdigest(), head)


def _dataset_path(event: Any) -> Path | None:
    """The file pynetdicom wrote the data set to, when it receives to disk
    (``_config.STORE_RECV_CHUNKED_DATASET``); None when the data set is in memory."""
    try:
        return Path(event.dataset_path)
    except (AttributeError, TypeError, ValueError):
        return None


def _adopt(source: Path, target: Path) -> ReceivedFile:
    """Move a file pynetdicom received to disk into staging, hashing it."""
    digest = hashlib.sha256()
    head = b""
    size = 0
    with source.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            if not head:
                head = chunk[:HEAD_BYTES]
            digest.update(chunk)
            size += len(chunk)
    try:
        os.replace(source, target)
    except OSError:
        shutil.move(source, target)  # another filesystem
    return ReceivedFile(target, size, digest.hexdigest(), head)


__all__ = ["NOT_AUTHORISED", "SUCCESS", "StoreContext", "handle_store", "stage", "status"]
