"""Envelope encryption of lake blobs: AES-256-GCM per blob, data keys wrapped by a KEK.

Each blob gets its own random 256-bit data key. The blob is a fixed-size header
followed by the data in 64 KiB segments, each sealed with AES-256-GCM (the STREAM
construction: the nonce is a per-blob random prefix, the segment number and a flag on
the last segment, so segments cannot be reordered, dropped or the blob cut short).
Segments make streaming writes and range reads (one frame = the segments that hold
it) possible without holding a whole blob in memory.

The header holds the data key wrapped (AES key wrap, RFC 3394) by a key-encryption key
(KEK) of a :class:`KeyProvider`, and that KEK's id. Rotating the KEK re-wraps the data
key in the header (same size, rewritten in place on a local disk) and leaves the
encrypted data as it is. The header's authenticated part (magic, version, segment
size, nonce prefix) is bound to every segment; the wrapped key protects itself (key
wrap fails on any change).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from medlake.security.errors import DecryptionFailed, KeyUnavailable
from medlake.storage import BlobStore

MAGIC = b"MLENV1"
VERSION = 1
SEGMENT_SIZE = 64 * 1024
TAG_SIZE = 16
HEADER_SIZE = 128
_KEY_ID_SIZE = 32
_WRAPPED_SIZE = 40  # AES key wrap of a 32-byte key
_NONCE_PREFIX_SIZE = 7
# magic, version, reserved, segment size, nonce prefix | key id length, key id, wrapped key
_FIXED = struct.Struct(f">6sBBI{_NONCE_PREFIX_SIZE}s")
_KEYS = struct.Struct(f">B{_KEY_ID_SIZE}s{_WRAPPED_SIZE}s")


class KeyProvider(Protocol):
    """Holds key-encryption keys: wraps data keys with the current KEK and unwraps them
    with whichever KEK wrapped them. Implementations: a local key file (default) or a
    cloud KMS."""

    @property
    def current_key_id(self) -> str:
        """Id of the KEK new data keys are wrapped with."""
        ...

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """``(kek_id, wrapped)`` of ``data_key`` under the current KEK."""
        ...

    def unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        """The data key wrapped by KEK ``kek_id``; KeyUnavailable when it is not held."""
        ...


class LocalKeyFileProvider:
    """KEKs kept in a local JSON file (mode 0600): ``{"current": id, "keys": {id: base64}}``.

    :meth:`create` writes a new file; :meth:`add_key` adds a KEK and makes it current
    (old ones stay, to unwrap what they wrapped until :func:`rotate_blobs` has run).
    The keys are never part of ``repr`` or any message.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            self._keys = {k: base64.b64decode(v) for k, v in document["keys"].items()}
            self._current = str(document["current"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyUnavailable(
                f"key file {path} is unreadable: {exc.__class__.__name__}"
            ) from None
        if self._current not in self._keys or any(len(k) != 32 for k in self._keys.values()):
            raise KeyUnavailable(f"key file {path} must hold 256-bit keys and name a current one")

    def __repr__(self) -> str:
        return f"LocalKeyFileProvider({str(self.path)!r}, current={self._current!r})"

    @staticmethod
    def _write(path: Path, keys: dict[str, bytes], current: str) -> None:
        document = {
            "current": current,
            "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def create(cls, path: Path) -> LocalKeyFileProvider:
        """Write a key file with one new KEK (refused when the file exists)."""
        if path.exists():
            raise KeyUnavailable(f"key file {path} exists already")
        key_id = f"kek-{secrets.token_hex(4)}"
        cls._write(path, {key_id: AESGCM.generate_key(bit_length=256)}, key_id)
        return cls(path)

    def add_key(self) -> str:
        """Add a new KEK to the file and make it current; returns its id."""
        key_id = f"kek-{secrets.token_hex(4)}"
        self._keys[key_id] = AESGCM.generate_key(bit_length=256)
        self._current = key_id
        self._write(self.path, self._keys, key_id)
        return key_id

    def remove_key(self, key_id: str) -> None:
        """Drop a retired KEK from the file (never the current one)."""
        if key_id == self._current:
            raise KeyUnavailable(f"{key_id} is the current key; add a new one first")
        self._keys.pop(key_id, None)
        self._write(self.path, self._keys, self._current)

    @property
    def current_key_id(self) -> str:
        """Id of the KEK new data keys are wrapped with."""
        return self._current

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """Wrap ``data_key`` with the current KEK."""
        return self._current, aes_key_wrap(self._keys[self._current], data_key)

    def unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        """Unwrap a data key with KEK ``kek_id``."""
        kek = self._keys.get(kek_id)
        if kek is None:
            raise KeyUnavailable(f"key {kek_id!r} is not in {self.path}")
        try:
            return aes_key_unwrap(kek, wrapped)
        except InvalidUnwrap:
            raise DecryptionFailed(f"the data key wrapped by {kek_id!r} does not unwrap") from None


@dataclass(frozen=True)
class Header:
    """The parsed header of an encrypted blob."""

    segment_size: int
    nonce_prefix: bytes
    kek_id: str
    wrapped_key: bytes
    authenticated: bytes  # the immutable part, bound to every segment

    def pack(self) -> bytes:
        """The header's bytes (always HEADER_SIZE long)."""
        key_id = self.kek_id.encode()
        if len(key_id) > _KEY_ID_SIZE or len(self.wrapped_key) != _WRAPPED_SIZE:
            raise KeyUnavailable(f"key id {self.kek_id!r} is longer than {_KEY_ID_SIZE} bytes")
        packed = self.authenticated + _KEYS.pack(len(key_id), key_id, self.wrapped_key)
        return packed.ljust(HEADER_SIZE, b"\0")


def is_encrypted(head: bytes) -> bool:
    """Whether bytes starting a blob are an encrypted blob's header."""
    return head.startswith(MAGIC)


def parse_header(head: bytes) -> Header:
    """The header at the start of ``head``; DecryptionFailed when it is not one."""
    if len(head) < HEADER_SIZE or not is_encrypted(head):
        raise DecryptionFailed("not an encrypted medlake blob (bad header)")
    _magic, version, _reserved, segment_size, prefix = _FIXED.unpack_from(head)
    if version != VERSION or not 0 < segment_size <= 16 * 1024 * 1024:
        raise DecryptionFailed(f"unsupported encrypted blob (version {version})")
    length, key_id, wrapped = _KEYS.unpack_from(head, _FIXED.size)
    return Header(segment_size, prefix, key_id[:length].decode(), wrapped, head[: _FIXED.size])


def _new_header(provider: KeyProvider, segment_size: int) -> tuple[Header, bytes]:
    data_key = AESGCM.generate_key(bit_length=256)
    kek_id, wrapped = provider.wrap(data_key)
    prefix = secrets.token_bytes(_NONCE_PREFIX_SIZE)
    authenticated = _FIXED.pack(MAGIC, VERSION, 0, segment_size, prefix)
    return Header(segment_size, prefix, kek_id, wrapped, authenticated), data_key


def _nonce(header: Header, index: int, last: bool) -> bytes:
    return header.nonce_prefix + struct.pack(">IB", index, 1 if last else 0)


def encrypt_stream(
    chunks: Iterable[bytes], provider: KeyProvider, *, segment_size: int = SEGMENT_SIZE
) -> Iterator[bytes]:
    """The encrypted blob of the bytes in ``chunks``: the header, then sealed segments
    (memory holds at most two segments, whatever the size)."""
    header, data_key = _new_header(provider, segment_size)
    aead = AESGCM(data_key)
    yield header.pack()
    buffer = bytearray()
    index = 0
    for chunk in chunks:
        buffer += chunk
        # Keep at least one byte back: only at the end is it known which segment is last.
        while len(buffer) > segment_size:
            segment = bytes(buffer[:segment_size])
            del buffer[:segment_size]
            yield aead.encrypt(_nonce(header, index, False), segment, header.authenticated)
            index += 1
    yield aead.encrypt(_nonce(header, index, True), bytes(buffer), header.authenticated)


def encrypt_bytes(data: bytes, provider: KeyProvider) -> bytes:
    """``data`` as one encrypted blob."""
    return b"".join(encrypt_stream([data], provider))


def _data_key(header: Header, provider: KeyProvider) -> AESGCM:
    return AESGCM(provider.unwrap(header.kek_id, header.wrapped_key))


def _open_segment(aead: AESGCM, header: Header, index: int, last: bool, sealed: bytes) -> bytes:
    try:
        return aead.decrypt(_nonce(header, index, last), sealed, header.authenticated)
    except InvalidTag:
        raise DecryptionFailed(
            f"segment {index} of an encrypted blob failed authentication"
        ) from None


def decrypt_stream(chunks: Iterable[bytes], provider: KeyProvider) -> Iterator[bytes]:
    """The plaintext of an encrypted blob read as ``chunks``, segment by segment."""
    buffer = bytearray()
    header: Header | None = None
    aead: AESGCM | None = None
    index = 0
    for chunk in chunks:
        buffer += chunk
        if header is None:
            if len(buffer) < HEADER_SIZE:
                continue
            header = parse_header(bytes(buffer[:HEADER_SIZE]))
            aead = _data_key(header, provider)
            del buffer[:HEADER_SIZE]
        assert aead is not None
        sealed_size = header.segment_size + TAG_SIZE
        while len(buffer) > sealed_size:
            yield _open_segment(aead, header, index, False, bytes(buffer[:sealed_size]))
            del buffer[:sealed_size]
            index += 1
    if header is None or aead is None:
        raise DecryptionFailed("encrypted blob is shorter than its header")
    yield _open_segment(aead, header, index, True, bytes(buffer))


def decrypt_bytes(blob: bytes, provider: KeyProvider) -> bytes:
    """The plaintext of a whole encrypted blob."""
    return b"".join(decrypt_stream([blob], provider))


def plaintext_size(blob_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The plaintext size of an encrypted blob of ``blob_size`` bytes."""
    body = blob_size - HEADER_SIZE
    segments = max(1, -(-body // (segment_size + TAG_SIZE)))
    return body - segments * TAG_SIZE


def decrypt_range(
    read_range: Callable[[int, int], bytes],
    blob_size: int,
    offset: int,
    length: int,
    provider: KeyProvider,
) -> bytes:
    """``length`` plaintext bytes from ``offset``, reading only the segments that hold
    them (``read_range(offset, length)`` reads the encrypted blob)."""
    header = parse_header(read_range(0, HEADER_SIZE))
    aead = _data_key(header, provider)
    sealed_size = header.segment_size + TAG_SIZE
    size = plaintext_size(blob_size, header.segment_size)
    end = min(offset + length, size)
    if offset >= end:
        return b""
    last_index = max(0, -(-(blob_size - HEADER_SIZE) // sealed_size) - 1)
    first, final = offset // header.segment_size, (end - 1) // header.segment_size
    start = HEADER_SIZE + first * sealed_size
    sealed = read_range(start, min(blob_size, HEADER_SIZE + (final + 1) * sealed_size) - start)
    plain = bytearray()
    for i, index in enumerate(range(first, final + 1)):
        piece = sealed[i * sealed_size : (i + 1) * sealed_size]
        plain += _open_segment(aead, header, index, index == last_index, piece)
    skip = offset - first * header.segment_size
    return bytes(plain[skip : skip + end - offset])


# --- rotation ---------------------------------------------------------------------------------


def rewrap_header(head: bytes, provider: KeyProvider) -> bytes | None:
    """The header with its data key wrapped by the current KEK (same size), or ``None``
    when the current KEK wrapped it already."""
    header = parse_header(head)
    if header.kek_id == provider.current_key_id:
        return None
    data_key = provider.unwrap(header.kek_id, header.wrapped_key)
    kek_id, wrapped = provider.wrap(data_key)
    return Header(
        header.segment_size, header.nonce_prefix, kek_id, wrapped, header.authenticated
    ).pack()


@dataclass
class RotationReport:
    """What :func:`rotate_blobs` did."""

    rewrapped: int = 0
    current: int = 0  # already wrapped by the current KEK
    not_encrypted: int = 0


def rotate_blob(store: BlobStore, key: str, provider: KeyProvider) -> bool | None:
    """Re-wrap one blob's data key with the current KEK: the header is rewritten in place
    on a local disk, elsewhere the blob is rewritten with the encrypted data copied as is
    (never decrypted). True when re-wrapped, False when already current, None when the
    blob is not encrypted."""
    head = store.read_range(key, 0, HEADER_SIZE)
    if not is_encrypted(head):
        return None
    new_header = rewrap_header(head, provider)
    if new_header is None:
        return False
    local = store.local_path(key)
    if local is not None:
        with local.open("r+b") as fh:
            fh.write(new_header)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    # Object stores cannot patch bytes: the blob is written again through a local
    # file, streamed, so memory does not grow with its size.
    with tempfile.TemporaryDirectory(prefix="medlake-rotate-") as folder:
        copy = Path(folder) / "blob"
        with store.open(key) as source, copy.open("wb") as target:
            target.write(new_header)
            source.seek(HEADER_SIZE)
            shutil.copyfileobj(source, target, 1024 * 1024)
        store.put_file(key, copy)
    return True


def rotate_blobs(store: BlobStore, prefix: str, provider: KeyProvider) -> RotationReport:
    """Re-wrap the data keys of every encrypted blob under ``prefix`` with the current KEK."""
    report = RotationReport()
    for key in store.list(prefix):
        if store.size(key) < HEADER_SIZE:
            report.not_encrypted += 1
            continue
        outcome = rotate_blob(store, key, provider)
        if outcome is None:
            report.not_encrypted += 1
        elif outcome:
            report.rewrapped += 1
        else:
            report.current += 1
    return report


__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "SEGMENT_SIZE",
    "Header",
    "KeyProvider",
    "LocalKeyFileProvider",
    "RotationReport",
    "decrypt_bytes",
    "decrypt_range",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_stream",
    "is_encrypted",
    "parse_header",
    "plaintext_size",
    "rewrap_header",
    "rotate_blob",
    "rotate_blobs",
]
