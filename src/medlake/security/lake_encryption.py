"""Encryption at rest of the lake, built on :mod:`medlake.security.envelope`.

- :class:`EnvelopeCipher` is the cipher of :class:`medlake.storage.encrypted.EncryptedBlobStore`:
  AES-256-GCM envelope encryption, range reads of single frames.
- :class:`KeyFile` holds the key-encryption keys of a key file and reads the file again
  when it changes, so a running server follows ``medlake keys rotate`` without a restart.
- :func:`open_encrypted_lake` wraps a blob store and checks, at start-up, that the key file
  holds the key the lake was encrypted with (a small encrypted *key check* blob,
  ``medlake/{workspace}/key-check``, written at the first start); a lake opened without
  encryption while that blob exists is refused (:func:`refuse_encrypted_lake`), so
  ciphertext is never served as DICOM.
- :func:`rotate_lake` / :func:`retire_old_keys` re-wrap data keys with a new KEK, then drop
  the old KEKs; :func:`decrypt_file` / :func:`decrypt_blob` read lake files outside medlake.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import fsspec

from medlake.errors import MedlakeError, NotFound
from medlake.security.envelope import (
    HEADER_SIZE,
    KeyProvider,
    LocalKeyFileProvider,
    decrypt_range,
    decrypt_stream,
    encrypt_stream,
    is_encrypted,
    parse_header,
    plaintext_size,
    rotate_blob,
)
from medlake.security.errors import DecryptionFailed, KeyUnavailable
from medlake.storage import BlobStore
from medlake.storage.encrypted import EncryptedBlobStore, RangeReader

log = logging.getLogger(__name__)

#: Plaintext of the key check blob (no patient data: it only proves the key is right).
KEY_CHECK_TEXT = b"medlake key check 1\n"
#: Unwrapped data keys kept in memory, so reading a file frame by frame unwraps once.
_UNWRAPPED_CACHE = 4096
_CHUNK = 1024 * 1024


def key_check_key(workspace: str) -> str:
    """Key of the blob that proves, at start-up, that the key file fits the lake."""
    return f"medlake/{workspace}/key-check"


def workspace_prefix(workspace: str) -> str:
    """Folder of every blob of a workspace (what rotation walks)."""
    return f"medlake/{workspace}"


# --- the cipher ---------------------------------------------------------------------------------


class EnvelopeCipher:
    """The :class:`~medlake.storage.encrypted.BlobCipher` of envelope encryption."""

    header_size = HEADER_SIZE

    def __init__(self, keys: KeyProvider) -> None:
        self.keys = keys

    def is_encrypted(self, head: bytes) -> bool:
        """Whether ``head`` starts an envelope-encrypted blob."""
        return len(head) >= HEADER_SIZE and is_encrypted(head)

    def encrypt(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Header, then sealed 64 KiB segments, under a new data key."""
        return encrypt_stream(chunks, self.keys)

    def decrypt(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The plaintext, segment by segment (each authenticated before it is returned)."""
        return decrypt_stream(chunks, self.keys)

    def plaintext_size(self, head: bytes, blob_size: int) -> int:
        """Plaintext size, from the stored size and the header's segment size."""
        return plaintext_size(blob_size, parse_header(head).segment_size)

    def decrypt_range(
        self, head: bytes, blob_size: int, offset: int, length: int, read: RangeReader
    ) -> bytes:
        """Only the segments holding ``[offset, offset + length)`` are read and opened."""

        def read_known_head(start: int, size: int) -> bytes:
            # The header was read already to know the blob is encrypted: no second read.
            return head[:size] if start == 0 and size <= len(head) else read(start, size)

        return decrypt_range(read_known_head, blob_size, offset, length, self.keys)


# --- the key file -------------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def missing_key_file(path: Path) -> KeyUnavailable:
    """The error for an absent key file, saying how to make one."""
    return KeyUnavailable(
        f"encrypt_at_rest is on but the key file {path} does not exist: create it with "
        "`medlake keys create` (and keep a copy elsewhere: without it the lake cannot be read)"
    )


class KeyFile:
    """The KEKs of a local key file (:class:`LocalKeyFileProvider`), read again whenever
    the file changes: after ``medlake keys rotate`` new data keys are wrapped with the new
    KEK at once, and blobs re-wrapped by it stay readable, without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._unwrapped: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()
        try:
            self._stamp = _stamp(path)
        except FileNotFoundError:
            raise missing_key_file(path) from None
        except OSError as exc:
            raise KeyUnavailable(f"key file {path} is unreadable: {exc.strerror}") from None
        self._keys = LocalKeyFileProvider(path)

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r})"

    def _fresh(self) -> LocalKeyFileProvider:
        """The keys as the file holds them now (one stat; read again only if it changed)."""
        try:
            stamp = _stamp(self.path)
        except OSError:
            return self._keys  # moved away or unmounted: the keys held keep the lake readable
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._keys = LocalKeyFileProvider(self.path)
                except KeyUnavailable as exc:
                    log.warning(
                        "key file changed but cannot be read; keeping the keys held: %s", exc
                    )
                self._stamp = stamp
            return self._keys

    @property
    def current_key_id(self) -> str:
        """Id of the KEK new data keys are wrapped with."""
        return self._fresh().current_key_id

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """Wrap ``data_key`` with the current KEK of the file as it is now."""
        return self._fresh().wrap(data_key)

    def unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        """Unwrap a data key (from memory when unwrapped before); a KEK that is not held
        sends the file to be read again first (it may have been added by a rotation)."""
        with self._lock:
            known = self._unwrapped.get((kek_id, wrapped))
            if known is not None:
                self._unwrapped.move_to_end((kek_id, wrapped))
                return known
        try:
            data_key = self._keys.unwrap(kek_id, wrapped)
        except KeyUnavailable:
            data_key = self._fresh().unwrap(kek_id, wrapped)
        with self._lock:
            self._unwrapped[(kek_id, wrapped)] = data_key
            if len(self._unwrapped) > _UNWRAPPED_CACHE:
                self._unwrapped.popitem(last=False)
        return data_key


def create_key_file(path: Path) -> str:
    """Write a new key file (mode 0600) with one KEK; its id. Refused if it exists."""
    return LocalKeyFileProvider.create(path).current_key_id


def key_ids(path: Path) -> tuple[str, list[str]]:
    """The current KEK id and every KEK id of a key file (never the keys themselves)."""
    if not path.exists():
        raise missing_key_file(path)
    provider = LocalKeyFileProvider(path)  # validates the file
    document = json.loads(path.read_text(encoding="utf-8"))
    return provider.current_key_id, sorted(document["keys"])


# --- opening the lake ---------------------------------------------------------------------------


def open_encrypted_lake(inner: BlobStore, key_file: Path, workspace: str) -> EncryptedBlobStore:
    """``inner`` with every blob encrypted under the KEKs of ``key_file``, after checking
    that those KEKs are the ones the lake was encrypted with (KeyUnavailable, naming the
    key and the file, when not). The first start writes the key check blob."""
    keys = KeyFile(key_file)
    store = EncryptedBlobStore(inner, EnvelopeCipher(keys))
    check = key_check_key(workspace)
    try:
        stored = inner.read_bytes(check)
    except NotFound:
        store.put_bytes(check, KEY_CHECK_TEXT)
        return store
    if not is_encrypted(stored[:HEADER_SIZE]):
        raise DecryptionFailed(f"{check} in the lake {inner.root} is not an encrypted blob")
    kek_id = parse_header(stored[:HEADER_SIZE]).kek_id
    try:
        plain = b"".join(decrypt_stream([stored], keys))
    except KeyUnavailable:
        raise KeyUnavailable(
            f"the lake {inner.root} is encrypted with key {kek_id!r}, which the key file "
            f"{key_file} does not hold: is encryption_key_file the right file?"
        ) from None
    except DecryptionFailed:
        raise KeyUnavailable(
            f"key {kek_id!r} of the key file {key_file} is not the key the lake {inner.root} "
            "was encrypted with: is encryption_key_file the right file?"
        ) from None
    if plain != KEY_CHECK_TEXT:
        raise DecryptionFailed(f"{check} in the lake {inner.root} does not hold the key check")
    return store


def refuse_encrypted_lake(inner: BlobStore, workspace: str) -> None:
    """KeyUnavailable when the lake was encrypted but is opened without encryption (its
    blobs would be served as ciphertext)."""
    check = key_check_key(workspace)
    if inner.exists(check):
        raise KeyUnavailable(
            f"the lake {inner.root} is encrypted ({check} exists) but encrypt_at_rest is off: "
            "set encrypt_at_rest = true and encryption_key_file to open it"
        )


# --- rotation -----------------------------------------------------------------------------------


@dataclass
class LakeRotation:
    """What a rotation (or retirement check) did, blob by blob."""

    key_id: str
    rewrapped: int = 0
    current: int = 0
    not_encrypted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    removed_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every encrypted blob is wrapped by the current KEK now."""
        return not self.failed


def _rewrap_all(
    raw: BlobStore, workspace: str, keys: LocalKeyFileProvider, progress: Callable[[str], None]
) -> LakeRotation:
    report = LakeRotation(keys.current_key_id)
    for key in raw.list(workspace_prefix(workspace)):
        try:
            outcome = rotate_blob(raw, key, keys)
        except NotFound:
            continue  # deleted while the rotation ran
        except (MedlakeError, OSError) as exc:
            report.failed.append((key, str(exc)))
            continue
        if outcome is None:
            report.not_encrypted += 1
        elif outcome:
            report.rewrapped += 1
        else:
            report.current += 1
        progress(key)
    return report


def _raw(store: BlobStore) -> BlobStore:
    return store.inner if isinstance(store, EncryptedBlobStore) else store


def rotate_lake(
    store: BlobStore,
    key_file: Path,
    workspace: str,
    progress: Callable[[str], None] = lambda _key: None,
) -> LakeRotation:
    """Add a new KEK to ``key_file``, make it current, and re-wrap the data key of every
    encrypted blob of the workspace with it (headers only: the data is not re-encrypted).
    The old KEKs stay in the file until :func:`retire_old_keys`."""
    keys = LocalKeyFileProvider(key_file)
    keys.add_key()
    return _rewrap_all(_raw(store), workspace, keys, progress)


def retire_old_keys(
    store: BlobStore,
    key_file: Path,
    workspace: str,
    progress: Callable[[str], None] = lambda _key: None,
) -> LakeRotation:
    """Re-wrap whatever is still wrapped by an old KEK (blobs written while a rotation
    ran), then remove every KEK but the current one from ``key_file`` - only if every
    encrypted blob could be checked, so no blob is left without its key."""
    keys = LocalKeyFileProvider(key_file)
    report = _rewrap_all(_raw(store), workspace, keys, progress)
    if report.ok:
        _current, ids = key_ids(key_file)
        for old in ids:
            if old != keys.current_key_id:
                keys.remove_key(old)
                report.removed_keys.append(old)
    return report


# --- reading lake files outside medlake ---------------------------------------------------------


def _provider(keys: KeyProvider | Path) -> KeyProvider:
    return KeyFile(keys) if isinstance(keys, Path) else keys


def decrypt_blob(data: bytes, keys: KeyProvider | Path) -> bytes:
    """The plaintext of a lake file's bytes (bytes that are not encrypted come back as
    they are). ``keys``: a key file or a KeyProvider."""
    if not is_encrypted(data[:HEADER_SIZE]):
        return data
    return b"".join(decrypt_stream([data], _provider(keys)))


def decrypt_file(source: str | os.PathLike[str], target: Path, keys: KeyProvider | Path) -> bool:
    """Write the plaintext of the lake file ``source`` (a path, or an fsspec URL such as
    ``s3://bucket/lake/medlake/...``) to ``target``, streamed; True when it was
    encrypted, False when it was copied as it is. ``target`` appears only when whole."""
    provider = _provider(keys)
    partial = target.with_name(f".{target.name}.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fsspec.open(str(source), "rb") as fh, partial.open("wb") as out:
            head = fh.read(HEADER_SIZE)
            chunks = _chunks(head, fh)
            encrypted = is_encrypted(head) and len(head) == HEADER_SIZE
            for piece in decrypt_stream(chunks, provider) if encrypted else chunks:
                out.write(piece)
        partial.replace(target)
    except FileNotFoundError:
        raise NotFound(f"{source} does not exist") from None
    finally:
        partial.unlink(missing_ok=True)
    return encrypted


def _chunks(head: bytes, fh: IO[bytes]) -> Iterator[bytes]:
    yield head
    while chunk := fh.read(_CHUNK):
        yield chunk


__all__ = [
    "KEY_CHECK_TEXT",
    "EnvelopeCipher",
    "KeyFile",
    "LakeRotation",
    "create_key_file",
    "decrypt_blob",
    "decrypt_file",
    "key_check_key",
    "key_ids",
    "missing_key_file",
    "open_encrypted_lake",
    "refuse_encrypted_lake",
    "retire_old_keys",
    "rotate_lake",
    "workspace_prefix",
]
