"""The ``BlobStore`` interface: what every lake backend offers.

Keys are ``/``-separated paths relative to the lake root, always built by
:mod:`medlake.storage.layout`. Writes are atomic: a reader sees the old blob or
the whole new one, never a partial file.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO


class Tier(enum.StrEnum):
    """Access tier of a blob. Every tier stays readable; colder tiers are cheaper."""

    HOT = "hot"
    COOL = "cool"
    COLD = "cold"


class BlobStore(ABC):
    """A place that holds the lake's files."""

    #: Human-readable root (folder or URL), for messages and the README contract.
    root: str

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store the local file ``source`` at ``key``, atomically, replacing any blob
        there. ``source`` is consumed (moved or deleted) on success."""

    def put_files(
        self, items: Sequence[tuple[str, Path]], *, synced: bool = False
    ) -> list[Exception | None]:
        """Store many ``(key, source)`` files; one entry per item: None or the error.

        ``synced`` says the sources' data is already on disk (fsynced by whoever wrote
        them), so only the new names need flushing. Backends override this to make a
        batch cheaper than one ``put_file`` each (one flush per folder, not per file).
        """
        errors: list[Exception | None] = []
        for key, source in items:
            try:
                self.put_file(key, source)
                errors.append(None)
            except Exception as exc:  # reported per item: one bad blob must not sink the batch
                errors.append(exc)
        return errors

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` atomically."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open ``key`` for binary reading (seekable)."""

    def read_bytes(self, key: str) -> bytes:
        """The whole blob at ``key``."""
        with self.open(key) as fh:
            return fh.read()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``key`` starting at ``offset`` (one range request)."""
        with self.open(key) as fh:
            fh.seek(offset)
            return fh.read(length)

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob is stored at ``key``."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of the blob at ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing blob is not an error."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (recursive)."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for zero-copy reads, when the backend has one (an
        encrypting store has none: its files are ciphertext, read through ``open``)."""
        return None

    def set_tier(self, key: str, tier: Tier) -> None:  # noqa: B027 - optional capability
        """Move ``key`` to ``tier`` using the store's own mechanism where it has one.

        The index records every blob's tier; backends without tiers keep the bytes
        where they are (the tier is then bookkeeping only).
        """
