"""A blob store that encrypts every blob it writes and decrypts what it reads.

:class:`EncryptedBlobStore` wraps any other store (local folder, fsspec), so each
backend stays simple and keys (paths) stay the same: only the bytes under a key
change. The encryption itself is a :class:`BlobCipher`, handed in by whoever opens
the lake (``Archive.open`` gives it :class:`medlake.security.lake_encryption.EnvelopeCipher`,
AES-256-GCM envelope encryption); this layer knows nothing of keys.

What callers see is the plaintext: ``open`` is a seekable reader that decrypts the
segments it is asked for, ``read_range`` reads and decrypts only the segments that
hold the range (frame offsets recorded at ingest are plaintext offsets), ``size`` is
the plaintext size. ``local_path`` is ``None``: the file on disk is ciphertext, so
zero-copy responses fall back to streaming through ``open``. Blobs that are not
encrypted (written before encryption was switched on) are read as they are.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from medlake.errors import MedlakeError
from medlake.storage.base import BlobStore, Tier

#: Reads ``length`` bytes of the stored (encrypted) blob from ``offset``.
RangeReader = Callable[[int, int], bytes]

_CHUNK = 1024 * 1024
#: Plaintext bytes a reader decrypts and keeps at a time (a multiple of 64 KiB segments).
_READ_BLOCK = 256 * 1024


class BlobCipher(Protocol):
    """Encrypts and decrypts whole blobs, streamed, and ranges of them."""

    #: Bytes at the start of a blob that say whether (and how) it is encrypted.
    header_size: int

    def is_encrypted(self, head: bytes) -> bool:
        """Whether a blob starting with ``head`` was written by this cipher."""
        ...

    def encrypt(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The stored form of the plaintext in ``chunks``, streamed."""
        ...

    def decrypt(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The plaintext of a stored blob read as ``chunks``, streamed."""
        ...

    def plaintext_size(self, head: bytes, blob_size: int) -> int:
        """The plaintext size of a stored blob of ``blob_size`` bytes starting with ``head``."""
        ...

    def decrypt_range(
        self, head: bytes, blob_size: int, offset: int, length: int, read: RangeReader
    ) -> bytes:
        """``length`` plaintext bytes from ``offset`` (fewer at the end), reading only
        the parts of the stored blob that hold them."""
        ...


class EncryptedBlobStore(BlobStore):
    """Every blob of ``inner``, encrypted with ``cipher``; same keys, plaintext API."""

    def __init__(self, inner: BlobStore, cipher: BlobCipher) -> None:
        self.inner = inner
        self.cipher = cipher
        self.root = inner.root

    # --- writes -------------------------------------------------------------------------------

    def _encrypt_file(self, source: Path) -> Path:
        """The encrypted copy of ``source``, beside it (same filesystem as the staging)."""
        target = source.with_name(f".{source.name}.{uuid.uuid4().hex}.enc.part")
        try:
            with source.open("rb") as fh, target.open("wb") as out:
                for sealed in self.cipher.encrypt(iter(lambda: fh.read(_CHUNK), b"")):
                    out.write(sealed)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return target

    def put_file(self, key: str, source: Path) -> None:
        """Encrypt ``source`` into a temporary beside it and store that at ``key``;
        ``source`` is removed on success (as every backend consumes it)."""
        sealed = self._encrypt_file(source)
        try:
            self.inner.put_file(key, sealed)
        finally:
            sealed.unlink(missing_ok=True)  # a no-op once the backend consumed it
        source.unlink(missing_ok=True)

    def put_files(
        self, items: Sequence[tuple[str, Path]], *, synced: bool = False
    ) -> list[Exception | None]:
        """Encrypt each source, then store the encrypted copies in one backend batch.

        ``synced`` says nothing about the encrypted copies, which were just written, so
        the backend flushes them itself.
        """
        errors: list[Exception | None] = [None] * len(items)
        sealed: list[tuple[int, str, Path]] = []
        for i, (key, source) in enumerate(items):
            try:
                sealed.append((i, key, self._encrypt_file(source)))
            except (OSError, MedlakeError) as exc:  # per item, as every backend reports
                errors[i] = exc
        outcomes = self.inner.put_files([(key, path) for _, key, path in sealed], synced=False)
        for (i, _key, path), error in zip(sealed, outcomes, strict=True):
            path.unlink(missing_ok=True)
            errors[i] = error
            if error is None:
                items[i][1].unlink(missing_ok=True)
        return errors

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` encrypted at ``key``."""
        self.inner.put_bytes(key, b"".join(self.cipher.encrypt([data])))

    # --- reads --------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        """A seekable reader of the plaintext of ``key`` that decrypts block by block."""
        handle = self.inner.open(key)
        try:
            head = handle.read(self.cipher.header_size)
            if not self.cipher.is_encrypted(head):
                handle.seek(0)
                return handle
            blob_size = handle.seek(0, io.SEEK_END)
            reader = _PlaintextReader(handle, head, blob_size, self.cipher)
        except BaseException:
            handle.close()
            raise
        return cast(BinaryIO, reader)

    def read_bytes(self, key: str) -> bytes:
        """The whole plaintext of ``key``."""
        data = self.inner.read_bytes(key)
        if not self.cipher.is_encrypted(data[: self.cipher.header_size]):
            return data
        return b"".join(self.cipher.decrypt([data]))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` plaintext bytes of ``key`` from ``offset``: the header, then only
        the encrypted segments that hold the range."""
        with self._ranged(key) as (head, blob_size, read):
            if not self.cipher.is_encrypted(head):
                return read(offset, length)
            return self.cipher.decrypt_range(head, blob_size, offset, length, read)

    @contextlib.contextmanager
    def _ranged(self, key: str) -> Iterator[tuple[bytes, int, RangeReader]]:
        """The head, stored size and a range reader of ``key``: one open file on a local
        disk, range requests elsewhere (an fsspec file would read ahead megabytes)."""
        if self.inner.local_path(key) is not None:
            with self.inner.open(key) as fh:

                def read_file(offset: int, length: int) -> bytes:
                    fh.seek(offset)
                    return fh.read(length)

                head = fh.read(self.cipher.header_size)
                yield head, os.fstat(fh.fileno()).st_size, read_file
            return

        def read_remote(offset: int, length: int) -> bytes:
            return self.inner.read_range(key, offset, length)

        head = read_remote(0, self.cipher.header_size)
        size = self.inner.size(key) if self.cipher.is_encrypted(head) else len(head)
        yield head, size, read_remote

    def size(self, key: str) -> int:
        """The plaintext size of ``key``."""
        with self._ranged(key) as (head, blob_size, _read):
            if not self.cipher.is_encrypted(head):
                return self.inner.size(key)
            return self.cipher.plaintext_size(head, blob_size)

    # --- the rest is the backend's ------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether a blob is stored at ``key``."""
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing blob is not an error."""
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (recursive)."""
        return self.inner.list(prefix)

    def local_path(self, key: str) -> Path | None:
        """None: the file on disk is ciphertext, so it cannot be sent as it is."""
        return None

    def set_tier(self, key: str, tier: Tier) -> None:
        """Move ``key`` to ``tier`` in the backend (ciphertext moves like any blob)."""
        self.inner.set_tier(key, tier)


class _PlaintextReader(io.RawIOBase):
    """Seekable reads of an encrypted blob's plaintext, decrypted one aligned block at a
    time (the last block is kept, so the many small reads of a header parse are cheap).

    Not an ``io.BufferedReader``: pydicom takes one of those for a file it may open again
    by name, which a lake key is not. Reads return all the bytes asked for (short only
    at the end), as a file's do.
    """

    def __init__(self, handle: BinaryIO, head: bytes, blob_size: int, cipher: BlobCipher) -> None:
        super().__init__()
        self._handle = handle
        self._head = head
        self._blob_size = blob_size
        self._cipher = cipher
        self._size = cipher.plaintext_size(head, blob_size)
        self._position = 0
        self._block_start = -1
        self._block = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def _read_stored(self, offset: int, length: int) -> bytes:
        self._handle.seek(offset)
        return self._handle.read(length)

    def _block_at(self, position: int) -> tuple[int, bytes]:
        start = position - position % _READ_BLOCK
        if start != self._block_start:
            self._block = self._cipher.decrypt_range(
                self._head, self._blob_size, start, _READ_BLOCK, self._read_stored
            )
            self._block_start = start
        return start, self._block

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        if end <= self._position:
            return b""
        if end - self._position > _READ_BLOCK:
            # A large read (a whole file, a frame) is decrypted in one go, not via blocks.
            data = self._cipher.decrypt_range(
                self._head, self._blob_size, self._position, end - self._position,
                self._read_stored,
            )  # fmt: skip
            self._position += len(data)
            return data
        pieces = []
        while self._position < end:
            start, block = self._block_at(self._position)
            piece = block[self._position - start : end - start]
            if not piece:
                break  # the blob is shorter than its header says: DecryptionFailed came first
            pieces.append(piece)
            self._position += len(piece)
        return b"".join(pieces)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


__all__ = ["BlobCipher", "EncryptedBlobStore", "RangeReader"]
