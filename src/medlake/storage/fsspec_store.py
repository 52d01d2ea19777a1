"""fsspec lake backend: s3://, abfs://, gs://, memory:// and any other fsspec URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import fsspec

from medlake.errors import NotFound, StorageError
from medlake.storage.base import BlobStore, Tier

#: The store's own tier names, per protocol. S3 storage classes; Azure access tiers.
_NATIVE_TIERS: dict[str, dict[Tier, str]] = {
    "s3": {Tier.HOT: "STANDARD", Tier.COOL: "STANDARD_IA", Tier.COLD: "GLACIER_IR"},
    "abfs": {Tier.HOT: "Hot", Tier.COOL: "Cool", Tier.COLD: "Cold"},
}


class FsspecBlobStore(BlobStore):
    """Blobs on any fsspec filesystem, under the prefix of ``url``."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self._fs = fs
        self._prefix = path.rstrip("/")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._protocol = {"s3a": "s3", "az": "abfs", "abfss": "abfs"}.get(protocol, protocol)
        self.root = url

    def _full(self, key: str) -> str:
        if ".." in key.split("/"):
            raise StorageError(f"key {key!r} escapes the lake root")
        return f"{self._prefix}/{key}" if self._prefix else key

    def put_file(self, key: str, source: Path) -> None:
        # Object stores make a PUT atomic; filesystems such as memory:// write whole values.
        try:
            self._fs.put_file(str(source), self._full(key))
        except Exception as exc:
            raise StorageError(f"cannot write {key} to {self.root}: {exc}") from exc
        source.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._fs.pipe_file(self._full(key), data)
        except Exception as exc:
            raise StorageError(f"cannot write {key} to {self.root}: {exc}") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return cast(BinaryIO, self._fs.open(self._full(key), "rb"))
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        except Exception as exc:
            raise StorageError(f"cannot read {key} from {self.root}: {exc}") from exc

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            data = self._fs.cat_file(self._full(key), start=offset, end=offset + length)
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        return cast(bytes, data)

    def exists(self, key: str) -> bool:
        return bool(self._fs.exists(self._full(key)))

    def size(self, key: str) -> int:
        try:
            return int(self._fs.size(self._full(key)))
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc

    def delete(self, key: str) -> None:
        try:
            self._fs.rm_file(self._full(key))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise StorageError(f"cannot delete {key} from {self.root}: {exc}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        base = self._full(prefix).rstrip("/")
        try:
            found = self._fs.find(base)
        except FileNotFoundError:
            return
        for path in found:
            yield _relative(str(path), self._prefix)

    def set_tier(self, key: str, tier: Tier) -> None:
        native = _NATIVE_TIERS.get(self._protocol, {}).get(tier)
        if native is None:
            if not self.exists(key):
                raise NotFound(f"blob {key} is not in the lake")
            return
        path = self._full(key)
        try:
            if self._protocol == "s3":
                bucket, _, obj = path.partition("/")
                self._fs.call_s3(
                    "copy_object",
                    Bucket=bucket,
                    Key=obj,
                    CopySource={"Bucket": bucket, "Key": obj},
                    StorageClass=native,
                    MetadataDirective="COPY",
                )
            else:
                container, _, blob = path.partition("/")
                client = self._fs.service_client.get_blob_client(container, blob)
                _run_sync(client.set_standard_blob_tier(native))
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        except Exception as exc:
            raise StorageError(f"cannot move {key} to tier {tier}: {exc}") from exc

    def native_tier(self, key: str) -> str | None:
        """The store's own tier/storage-class name of ``key``, where it has one."""
        info = self._fs.info(self._full(key))
        for field in ("StorageClass", "blob_tier", "tier"):
            if info.get(field):
                return str(info[field])
        return None


def _relative(path: str, prefix: str) -> str:
    path = path.lstrip("/")
    prefix = prefix.strip("/")
    return path[len(prefix) + 1 :] if prefix and path.startswith(prefix + "/") else path


def _run_sync(awaitable: Any) -> Any:
    """Run an azure.storage.blob.aio coroutine on fsspec's own event loop."""
    from fsspec.asyn import get_loop, sync

    return sync(get_loop(), lambda: awaitable)

