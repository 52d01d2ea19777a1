"""The lake: blob stores and the layout that names every file in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlake.storage.base import BlobStore, Tier
from medlake.storage.layout import LakeLayout


def open_blob_store(
    url: str, *, storage_options: dict[str, Any] | None = None, fsync: bool = True
) -> BlobStore:
    """The blob store for ``url``: a local folder, or any fsspec URL (``s3://…``)."""
    if "://" not in url or url.startswith("file://"):
        from medlake.storage.local import LocalBlobStore

        return LocalBlobStore(Path(url.removeprefix("file://")), fsync=fsync)
    from medlake.storage.fsspec_store import FsspecBlobStore

    return FsspecBlobStore(url, storage_options)


__all__ = [
    "BlobStore",
    "LakeLayout",
    "Tier",
    "open_blob_store",
]
