"""Local-folder lake backend (the default)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from medlake.errors import NotFound, StorageError
from medlake.storage.base import BlobStore, Tier


class LocalBlobStore(BlobStore):
    """Blobs are plain files under ``root``; keys map 1:1 to relative paths.

    Tiers are bookkeeping in the index: a local disk has one speed, and moving
    cold files elsewhere would break the layout contract that outside tools read.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self._root = root.resolve()
        self._fsync = fsync
        self.root = str(self._root)

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if self._root not in path.parents:
            raise StorageError(f"key {key!r} escapes the lake root")
        return path

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if self._fsync:
                # The rename is atomic but not durable until the data itself is on disk.
                _fsync_path(source)
            try:
                os.replace(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Different filesystem: copy beside the target, then rename atomically.
                tmp = _part_path(target)
                try:
                    shutil.copyfile(source, tmp)
                    if self._fsync:
                        _fsync_path(tmp)
                    os.replace(tmp, target)
                finally:
                    _discard(tmp)
                source.unlink(missing_ok=True)
            if self._fsync:
                _fsync_path(target.parent)  # makes the new directory entry durable
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        tmp = _part_path(target)
        try:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("wb") as fh:
                    fh.write(data)
                    if self._fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                _discard(tmp)  # a no-op after the rename
            if self._fsync:
                _fsync_path(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        except OSError as exc:
            raise StorageError(f"cannot stat {key}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"blob {key} is not in the lake")  # a folder is not a blob
        return st.st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key}: {exc.strerror or exc}") from exc
        # Remove folders left empty, up to the lake root.
        parent = path.parent
        while parent != self._root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix else self._root
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(".part"):
                    continue
                yield str(Path(dirpath, name).relative_to(self._root)).replace(os.sep, "/")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def set_tier(self, key: str, tier: Tier) -> None:
        if not self.exists(key):
            raise NotFound(f"blob {key} is not in the lake")


def _part_path(target: Path) -> Path:
    """A unique hidden temporary beside ``target``; ``list`` skips ``*.part``."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")


def _discard(tmp: Path) -> None:
    """Remove a temporary file if it is there.

    Errors are swallowed: this runs while a write is failing (e.g. a parent of the
    key is a regular file, so unlinking raises ENOTDIR), and that write's own error
    is the one to report.
    """
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open a directory to fsync it; NTFS journals the rename
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
