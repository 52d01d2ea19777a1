"""Storing a folder of DICOM files through the same path as STOW-RS."""

from __future__ import annotations

import hashlib
import os
import shutil
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
    """Link (or copy) ``source`` into staging, hashing it; the source stays untouched."""
    target = archive.staging_dir / f"{uuid.uuid4().hex}.part"
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    digest = hashlib.sha256()
    with source.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return ReceivedFile(target, source.stat().st_size, digest.hexdigest())


def ingest_batch(archive: Archive, sources: list[Path], partition: str) -> list[StoreResult]:
    """Store one batch of files into ``partition``."""
    staged = [stage(archive, s) for s in sources]
    return store_instances(archive, staged, partition)
