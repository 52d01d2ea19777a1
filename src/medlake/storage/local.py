"""Local-folder lake backend (the default)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
        return Path(self._file(key))

    def _file(self, key: str) -> str:
        """The file name of ``key`` as a string (a ``Path`` costs more than the rename of
        the file it names, on the bulk-ingest path)."""
        # normpath, not resolve(): no syscall per path component on the hot path. Keys come
        # from the layout (validated UIDs), so ".." is the only escape to guard against.
        path = os.path.normpath(os.path.join(self.root, key))
        if not path.startswith(self.root + os.sep):
            raise StorageError(f"key {key!r} escapes the lake root")
        return path

    def put_file(self, key: str, source: Path) -> None:
        """Move ``source`` to ``key`` by an atomic rename (copy + rename across filesystems)."""
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

    def put_files(
        self, items: Sequence[tuple[str, Path]], *, synced: bool = False
    ) -> list[Exception | None]:
        """Move many files into place: their data is flushed in parallel (unless already
        ``synced``), then each is renamed, then each distinct folder is flushed once."""
        if self._fsync and not synced:
            # fsync releases the GIL: a few threads overlap the waits on the disk.
            list(_FLUSH_POOL.map(_try_fsync, (source for _, source in items)))
        errors: list[Exception | None] = []
        folders: set[str] = set()
        for key, source in items:
            try:
                target = self._file(key)
                folder = os.path.dirname(target)
                if folder not in folders:  # a series' instances share one folder
                    os.makedirs(folder, exist_ok=True)
                os.replace(source, target)
                folders.add(folder)
                errors.append(None)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    try:
                        self.put_file(key, source)
                        errors.append(None)
                        continue
                    except StorageError as again:
                        errors.append(again)
                        continue
                errors.append(StorageError(f"cannot write {key}: {exc.strerror or exc}"))
            except StorageError as exc:
                errors.append(exc)
        if self._fsync:
            list(_FLUSH_POOL.map(_try_fsync, folders))
        return errors

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to a temporary beside ``key``, then rename it into place."""
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
        """Open the file of ``key`` for binary reading."""
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"blob {key} is not in the lake") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        """Whether a regular file is at ``key``."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Size in bytes of the file at ``key``."""
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
        """Remove ``key`` and the folders it leaves empty; a missing file is no error."""
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
        """Every key below the folder ``prefix``; temporaries of writes in flight are skipped."""
        base = self._path(prefix) if prefix else self._root
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(".part"):
                    continue
                yield os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")

    def local_path(self, key: str) -> Path | None:
        """The file of ``key``, for zero-copy reads."""
        return self._path(key)

    def set_tier(self, key: str, tier: Tier) -> None:
        """Bookkeeping only (see the class docstring); a missing key is NotFound."""
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


_FLUSH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medlake-fsync")


def _try_fsync(path: str | Path) -> None:
    """fsync, ignoring a path that vanished (its put then reports the error)."""
    with contextlib.suppress(FileNotFoundError):
        _fsync_path(path)


def _fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path."""
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a directory to fsync it; NTFS journals the rename
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
