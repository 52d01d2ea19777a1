"""The lake: blob stores and the layout that names every file in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlake.storage.base import BlobStore, Tier
from medlake.storage.encrypted import BlobCipher, EncryptedBlobStore
from medlake.storage.layout import LakeLayout


def open_blob_store(
    url: str, *, storage_options: dict[str, Any] | None = None, fsync: bool = True
) -> BlobStore:
    """The blob store for ``url``: a local folder, or any fsspec URL (``s3://…``).

    Encryption at rest wraps the result (:class:`EncryptedBlobStore`); ``Archive.open``
    does that when ``encrypt_at_rest`` is on, with the key file's cipher.
    """
    if "://" not in url or url.startswith("file://"):
        from medlake.storage.local import LocalBlobStore

        return LocalBlobStore(Path(url.removeprefix("file://")), fsync=fsync)
    from medlake.storage.fsspec_store import FsspecBlobStore

    return FsspecBlobStore(url, storage_options)


__all__ = [
    "BlobCipher",
    "BlobStore",
    "EncryptedBlobStore",
    "LakeLayout",
    "Tier",
    "open_blob_store",
]
