"""Storing a folder of DICOM files through the same path as STOW-RS."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from medlake.ingest.archive import Archive
from medlake.ingest.store import ReceivedFile, StoreResult, store_instances

BATCH = 100


def find_files(path: Path) -> Iterator[Path]:
    """Every regular file under ``path`` (or ``path`` itself), sorted."""
    if path.is_file():
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield Path(root, name)


def stage(archive: Archive, source: Path) -> ReceivedFile:
    """Copy ``source`` into staging, hashing it in the same pass.

    A copy, never a hard link: a linked lake file would change whenever someone
    rewrote the source file in place.
    """
    target = archive.staging_dir / f"{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    head = b""
    size = 0
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(1 << 20):
            if not head:
                head = chunk[: 64 << 10]
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return ReceivedFile(target, size, digest.hexdigest(), head)


def ingest_batch(archive: Archive, sources: list[Path], partition: str) -> list[StoreResult]:
    """Store one batch of files into ``partition``."""
    staged = [stage(archive, s) for s in sources]
    return store_instances(archive, staged, partition)
