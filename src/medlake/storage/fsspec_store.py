"""fsspec lake backend: s3://, abfs://, gs://, memory:// and any other fsspec URL.

Tiers use the store's own mechanism where medlake knows it: an S3 storage class
(changed by copying the object onto itself) or an Azure access tier (Set Blob
Tier). Every mapped tier stays readable without a restore step, which is why
COLD maps to S3 Glacier Instant Retrieval and Azure "Cold", never to Glacier
Flexible Retrieval or Azure "Archive".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import fsspec
from fsspec.asyn import sync

from medlake.errors import MedlakeError, NotFound, StorageError
from medlake.storage.base import BlobStore, Tier

#: The store's own tier names, per protocol. S3 storage classes; Azure access tiers.
_NATIVE_TIERS: dict[str, dict[Tier, str]] = {
    "s3": {Tier.HOT: "STANDARD", Tier.COOL: "STANDARD_IA", Tier.COLD: "GLACIER_IR"},
    "abfs": {Tier.HOT: "Hot", Tier.COOL: "Cool", Tier.COLD: "Cold"},
}

#: fsspec protocol aliases that behave like the canonical protocol above.
_PROTOCOL_ALIASES = {"s3a": "s3", "az": "abfs", "abfss": "abfs"}


class FsspecBlobStore(BlobStore):
    """Blobs on any fsspec filesystem, under the prefix of ``url``."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        options = dict(storage_options or {})
        # Other processes (ingest workers, Spark, azcopy) write the lake too. fsspec's
        # listings cache would hide their blobs: once a folder is listed, a key missing
        # from that listing is reported as absent without asking the server. Callers
        # that own the lake alone may still opt in by passing use_listings_cache=True.
        options.setdefault("use_listings_cache", False)
        fs, path = fsspec.core.url_to_fs(url, **options)
        self._fs = fs
        self._prefix = path.rstrip("/")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
        self.root = url

    def _full(self, key: str) -> str:
        if ".." in key.split("/"):
            raise StorageError(f"key {key!r} escapes the lake root")
        return f"{self._prefix}/{key}" if self._prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """Map backend exceptions to medlake's: missing -> NotFound, others -> StorageError."""
        try:
            yield
        except MedlakeError:
            raise
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        except Exception as exc:
            raise StorageError(f"cannot {action} {key} in {self.root}: {exc}") from exc

    def _require_file(self, key: str, path: str) -> dict[str, Any]:
        """fsspec ``info`` of ``path``; a folder (common prefix) is not a blob."""
        info = cast(dict[str, Any], self._fs.info(path))
        if info.get("type") != "file":
            raise NotFound(f"blob {key} is not in the lake")
        return info

    def put_file(self, key: str, source: Path) -> None:
        """Upload ``source`` to ``key`` in one atomic PUT; ``source`` is removed after."""
        # Object stores make a PUT (and a completed multipart upload) atomic;
        # memory:// stores whole values.
        with self._errors(key, "write"):
            self._fs.put_file(str(source), self._full(key))
        source.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Upload ``data`` to ``key`` in one atomic PUT."""
        with self._errors(key, "write"):
            self._fs.pipe_file(self._full(key), data)

    def open(self, key: str) -> BinaryIO:
        """A seekable reader that fetches ranges of ``key`` on demand."""
        with self._errors(key, "read"):
            return cast(BinaryIO, self._fs.open(self._full(key), "rb"))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """One ranged GET; a range past the end is clipped like a file read."""
        if length <= 0:
            # An empty range would be sent as an invalid Range header, which S3
            # answers with the whole object and Azure rejects.
            return b""
        path = self._full(key)
        with self._errors(key, "read"):
            try:
                return cast(bytes, self._fs.cat_file(path, start=offset, end=offset + length))
            except FileNotFoundError:
                raise
            except Exception:
                # A range starting at or past the end is an error on S3 and Azure but an
                # empty read on a file; look at the size only now, on the failure path.
                if offset >= int(self._require_file(key, path)["size"]):
                    return b""
                raise

    def exists(self, key: str) -> bool:
        """Whether a blob (not a folder/common prefix) is at ``key``."""
        with self._errors(key, "check"):
            return bool(self._fs.isfile(self._full(key)))

    def size(self, key: str) -> int:
        """Size in bytes of the blob at ``key``."""
        with self._errors(key, "stat"):
            return int(self._require_file(key, self._full(key))["size"])

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing blob is not an error."""
        try:
            with self._errors(key, "delete"):
                self._fs.rm_file(self._full(key))
        except NotFound:
            pass  # deleting a missing blob is not an error (S3 says so itself, Azure does not)

    def list(self, prefix: str) -> Iterator[str]:
        """Every key below the folder ``prefix``, relative to the lake root."""
        prefix = prefix.strip("/")
        base = self._full(prefix) if prefix else self._prefix
        with self._errors(prefix, "list"):
            try:
                found = self._fs.find(base)
            except FileNotFoundError:
                return
        for path in found:
            key = _relative(str(path), self._prefix)
            # find() on a key that is itself a blob returns that blob; a prefix is a
            # folder, as in LocalBlobStore, so only keys below it count.
            if not prefix or key.startswith(prefix + "/"):
                yield key

    def set_tier(self, key: str, tier: Tier) -> None:
        """Move ``key`` to ``tier``: S3 storage class, Azure access tier, else bookkeeping."""
        native = _NATIVE_TIERS.get(self._protocol, {}).get(tier)
        path = self._full(key)
        with self._errors(key, f"move to tier {tier} (native {native})"):
            if self._protocol == "s3" and native is not None:
                self._set_s3_storage_class(key, path, native)
            elif self._protocol == "abfs" and native is not None:
                container, blob, _version = self._fs.split_path(path)
                sync(
                    self._fs.loop, _set_azure_tier, self._fs.service_client, container, blob, native
                )
            else:
                # No tiers on this backend: the index's record is the whole move.
                self._require_file(key, path)

    def _set_s3_storage_class(self, key: str, path: str, storage_class: str) -> None:
        info = self._require_file(key, path)
        # S3 rejects a copy onto itself that changes nothing; head_object omits the
        # class for STANDARD objects (s3fs fills in "STANDARD").
        if info.get("StorageClass", "STANDARD") == storage_class:
            return
        # Copying the object onto itself is S3's way to change its class; s3fs switches
        # to a multipart copy above 5 GB, which a single CopyObject cannot do. medlake
        # writes no user metadata, so the multipart path loses nothing.
        self._fs.cp_file(path, path, StorageClass=storage_class)

    def native_tier(self, key: str) -> str | None:
        """The store's own tier name of ``key`` (S3 storage class, Azure access tier).

        ``None`` on backends without tiers. Raises :class:`NotFound` for a missing key.
        """
        path = self._full(key)
        with self._errors(key, "read the tier of"):
            if self._protocol == "abfs":
                container, blob, _version = self._fs.split_path(path)
                tier = sync(
                    self._fs.loop, _get_azure_tier, self._fs.service_client, container, blob
                )
                return cast(str | None, tier)
            info = self._require_file(key, path)
            if self._protocol == "s3":
                return str(info.get("StorageClass") or "STANDARD")
            return None


def _relative(path: str, prefix: str) -> str:
    """``path`` as returned by fsspec, relative to the lake prefix."""
    path = path.lstrip("/")
    prefix = prefix.strip("/")
    if not prefix:
        return path
    if not path.startswith(prefix + "/"):
        # Would otherwise surface as a key that names the wrong blob.
        raise StorageError(f"listed path {path!r} is outside the lake prefix {prefix!r}")
    return path[len(prefix) + 1 :]


async def _set_azure_tier(service_client: Any, container: str, blob: str, tier: str) -> None:
    """Set Blob Tier through adlfs's own async BlobServiceClient (and event loop)."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        async with service_client.get_blob_client(container, blob) as client:
            await client.set_standard_blob_tier(tier)
    except ResourceNotFoundError as exc:
        raise FileNotFoundError(f"{container}/{blob}") from exc


async def _get_azure_tier(service_client: Any, container: str, blob: str) -> str | None:
    """The access tier of a blob; adlfs's ``info`` does not forward it."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        async with service_client.get_blob_client(container, blob) as client:
            props = await client.get_blob_properties()
    except ResourceNotFoundError as exc:
        raise FileNotFoundError(f"{container}/{blob}") from exc
    tier = props.blob_tier
    # A page blob or an account without tiers has none.
    return str(getattr(tier, "value", tier)) if tier else None
