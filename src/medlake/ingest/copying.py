"""Copying one source file into staging and hashing it on the way: the bytes of bulk ingest.

A local source is copied the cheapest way its filesystems allow, each way falling back
to the next where they cannot:

1. **hard link** (only with ``ingest_link_files``): no copy at all;
2. **clone** (``FICLONE``: XFS, btrfs, bcachefs…): the copy shares the source's blocks
   until either is written;
3. **direct I/O**, for files of :data:`DIRECT_MIN_BYTES` or more: the source is read into
   one aligned buffer, hashed there and written with ``O_DIRECT``, around the page cache.
   A buffered copy makes the kernel find a fresh page-cache page for every 4 KiB of the
   copy, fill it, write it back later and keep it until memory is short: for a bulk
   ingest that is a second copy of every byte that nobody reads again soon. On a virtual
   machine whose unused memory goes back to the host, filling those pages took most of
   the copy's kernel time. A smaller file is copied through the page cache: a direct
   write returns only when the device has the data, and for small files that wait
   outweighs the copy saved (100,000 files of 64 KB were 5 % slower);
4. **copy_file_range** (in the kernel, through the page cache), and last a plain read and
   write loop.

In every case the SHA-256 is of the bytes that were stored (the buffer written, or the
copy read back), not of what the source holds by then. No library offers this choice
of copy with the hash of what was written, so it is written here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

from medlake.errors import StorageError, Unreadable

_HASH_CHUNK = 1 << 20
#: Bytes of a file kept in memory for the header parse (as the STOW receiver keeps).
HEAD_BYTES = 64 << 10
#: Direct I/O wants the buffer, the file offset and the length aligned to the device's
#: logical block; 4 KiB satisfies every device in use (512 B or 4 KiB blocks).
_ALIGN = 4096
_DIRECT_CHUNK = 1 << 20
#: Files smaller than this are copied through the page cache even when direct I/O is on.
DIRECT_MIN_BYTES = 256 << 10
#: Linux ``ioctl`` that makes a file share another's blocks (``_IOW(0x94, 9, int)``).
_FICLONE = 0x40049409
#: Errors that mean "this filesystem (or pair of them) cannot", not "this file failed".
_CANNOT = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY, errno.EBADF}
)
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

Copied = tuple[int, str, bytes]
"""Size in bytes, SHA-256 (hex) and the first :data:`HEAD_BYTES` bytes of a copy."""


def copy_local(path: str, target: Path, *, link: bool, direct: bool) -> Copied:
    """Copy (or, with ``link``, hard-link) the local file ``path`` to ``target``.

    ``direct`` allows direct I/O for files of :data:`DIRECT_MIN_BYTES` or more (way 3
    above). A source that cannot be read (no permission, not a regular file, gone)
    raises :class:`Unreadable`; a write into staging that fails raises
    :class:`StorageError`; the caller removes ``target``.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not hang the worker (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise Unreadable(f"cannot read {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb", buffering=0) as src:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"cannot read {path}: not a regular file ({_file_kind(st.st_mode)})")
        shared = (link and _try_link(path, target)) or _try_clone(fd, target)
        if not shared:
            if direct and st.st_size >= DIRECT_MIN_BYTES:
                copied = _copy_direct(fd, target, path)
                if copied is not None:
                    return copied
            if not _copy_in_kernel(fd, st.st_size, target, path):
                return copy_stream(src, target, path)
    # Hash what was stored (the copy, from the page cache), not what the source became.
    try:
        with target.open("rb", buffering=0) as stored:
            return _hash_file(stored, str(target))
    except OSError as exc:
        raise StorageError(
            f"cannot read back staging file {target}: {exc.strerror or exc}"
        ) from exc


def copy_stream(src: BinaryIO, target: Path, name: str) -> Copied:
    """Copy the open stream ``src`` to ``target`` by reading and writing, hashing it."""
    digest = hashlib.sha256()
    head = b""
    size = 0
    try:
        dst = target.open("wb")
    except OSError as exc:
        raise StorageError(f"cannot write staging file {target}: {exc.strerror or exc}") from exc
    with dst:
        while True:
            try:
                chunk = src.read(_HASH_CHUNK)
            except OSError as exc:
                raise Unreadable(f"cannot read {name}: {exc.strerror or exc}") from exc
            if not chunk:
                break
            if not head:
                head = chunk[:HEAD_BYTES]
            digest.update(chunk)
            size += len(chunk)
            try:
                dst.write(chunk)
            except OSError as exc:
                raise StorageError(
                    f"cannot write staging file {target}: {exc.strerror or exc}"
                ) from exc
    return size, digest.hexdigest(), head


def _try_link(path: str, target: Path) -> bool:
    try:
        os.link(path, target)
        return True
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False  # another filesystem (or no links there): copy instead
        raise StorageError(f"cannot link {path} into staging: {exc.strerror or exc}") from exc


def _try_clone(fd: int, target: Path) -> bool:
    """Make ``target`` a clone of the open file ``fd``; False where the filesystem cannot
    (ext4, tmpfs, two filesystems), leaving ``target`` empty for the next way."""
    out = _open_target(target, 0)
    try:
        fcntl.ioctl(out, _FICLONE, fd)
        return True
    except OSError as exc:
        if exc.errno in _CANNOT:
            return False
        raise _write_error(target, exc) from exc
    finally:
        os.close(out)


def _copy_direct(fd: int, target: Path, name: str) -> Copied | None:
    """Copy the open file ``fd`` to ``target`` with direct I/O, hashing the buffer written.

    None when the filesystem takes no direct I/O (then nothing is written yet). The
    last block is written padded to the alignment, and the file cut back to its size.
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno in _CANNOT:
            return None
        raise _write_error(target, exc) from exc
    buffer = _direct_buffer()
    digest = hashlib.sha256()
    head = b""
    size = 0
    try:
        while True:
            filled = _fill(fd, buffer, name)
            if not filled:
                break
            data = buffer[:filled]
            digest.update(data)
            if not head:
                head = bytes(buffer[: min(filled, HEAD_BYTES)])
            padded = -(-filled // _ALIGN) * _ALIGN
            buffer[filled:padded] = _ZEROS[: padded - filled]
            try:
                os.pwrite(out, buffer[:padded], size)
            except OSError as exc:
                if size == 0 and exc.errno in _CANNOT:
                    return None  # the filesystem opened it but takes no direct writes
                raise _write_error(target, exc) from exc
            size += filled
            if filled < _DIRECT_CHUNK:
                break
        if size % _ALIGN:
            os.ftruncate(out, size)
    finally:
        os.close(out)
    return size, digest.hexdigest(), head


_ZEROS = bytes(_ALIGN)
_buffers = threading.local()


def _direct_buffer() -> memoryview:
    """This thread's page-aligned buffer for direct I/O (an anonymous mapping)."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = memoryview(mmap.mmap(-1, _DIRECT_CHUNK))
        _buffers.view = view
    return view


def _fill(fd: int, buffer: memoryview, name: str) -> int:
    """Read from ``fd`` until ``buffer`` is full or the file ends: a short read in the
    middle would leave the next direct write unaligned."""
    filled = 0
    while filled < len(buffer):
        try:
            n = os.readv(fd, [buffer[filled:]])
        except OSError as exc:
            raise Unreadable(f"cannot read {name}: {exc.strerror or exc}") from exc
        if n == 0:
            break
        filled += n
    return filled


def _copy_in_kernel(fd: int, size: int, target: Path, name: str) -> bool:
    """Copy with ``copy_file_range`` (no trip through user space); False when the kernel
    or filesystem cannot, so the caller copies by reading and writing."""
    if not hasattr(os, "copy_file_range"):
        return False
    out = _open_target(target, 0)
    try:
        copied = 0
        while copied < size:
            try:
                n = os.copy_file_range(fd, out, size - copied, copied, copied)
            except OSError as exc:
                if copied == 0 and exc.errno in _CANNOT:
                    return False
                if exc.errno in _FULL:
                    raise _write_error(target, exc) from exc
                raise Unreadable(f"cannot read {name}: {exc.strerror or exc}") from exc
            if n == 0:
                break  # the source shrank meanwhile: store what it holds now
            copied += n
        os.ftruncate(out, copied)
        _start_writeback(out)
    finally:
        os.close(out)
    return True


def _open_target(target: Path, flags: int) -> int:
    try:
        return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    except OSError as exc:
        raise _write_error(target, exc) from exc


def _write_error(target: Path, exc: OSError) -> StorageError:
    return StorageError(f"cannot write staging file {target}: {exc.strerror or exc}")


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Have the kernel start writing the file to disk now, without waiting (Linux
    ``sync_file_range``): the chunk's ``syncfs`` then finds most of it written,
    instead of the disk idling while the files are copied and working while the
    index waits."""
    call = linux_libc("sync_file_range")
    if call is not None:
        call(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)  # advisory


def _hash_file(src: BinaryIO, name: str) -> Copied:
    digest = hashlib.sha256()
    head = b""
    size = 0
    try:
        while chunk := src.read(_HASH_CHUNK):
            if not head:
                head = chunk[:HEAD_BYTES]
            digest.update(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Unreadable(f"cannot read {name}: {exc.strerror or exc}") from exc
    return size, digest.hexdigest(), head


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"


@functools.cache
def linux_libc(name: str) -> Any:
    """The C library's function ``name`` (``syncfs``, ``sync_file_range``): Linux calls
    Python's ``os`` does not offer; None elsewhere, or where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


__all__ = ["DIRECT_MIN_BYTES", "HEAD_BYTES", "Copied", "copy_local", "copy_stream", "linux_libc"]
