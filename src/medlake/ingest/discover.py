"""Discover: turn a PATH_OR_URL into the files of a batch, and say where each is read from.

A source is one of

- a local **file** or **folder** (walked recursively, in name order);
- a **glob** (``/share/2024-*/**/*.dcm``; ``**`` crosses folders);
- a **zip or tar** archive (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
  ``.tar.xz``), unpacked into the batch's staging folder first; its files are named
  ``archive.zip!member/path`` in the queue and in error rows;
- an **fsspec URL** (``s3://bucket/prefix``, ``abfs://…``, ``memory://…``; a glob is
  allowed in the path), read with ``ingest_source_options``.

Everything in a folder that is not a folder counts, also what cannot be read (a
dangling link, a FIFO, a file without read permission): such a file gets an
``unreadable`` error row instead of disappearing from the counts.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlake.errors import InvalidInput, NotFound, StorageError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
#: Files read as clinical data (one table or resource type per file), not as DICOM.
CLINICAL_SUFFIXES = (".csv", ".ndjson", ".jsonl")
_GLOB_CHARS = frozenset("*?[")
_MARKER = ".medlake-unpacked"


def is_url(text: str) -> bool:
    """Whether ``text`` is an fsspec URL rather than a local path."""
    return "://" in text and not text.startswith("file://")


def is_clinical(source: str) -> bool:
    """Whether the file named ``source`` is a clinical (CSV / NDJSON) file."""
    return source.lower().endswith(CLINICAL_SUFFIXES)


def normalize_source(text: str) -> str:
    """The canonical form of a PATH_OR_URL, as recorded in ``batches.source``: URLs as
    given, local paths absolute. A local path that does not exist (and is no glob) is
    :class:`NotFound`."""
    if is_url(text):
        return text.rstrip("/") if not _is_glob(text) else text
    path = text.removeprefix("file://")
    absolute = os.path.abspath(os.path.expanduser(path))
    if not _is_glob(absolute) and not os.path.lexists(absolute):
        raise NotFound(f"{text} does not exist")
    return absolute


def _is_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def is_archive(source: str) -> bool:
    """Whether ``source`` names a zip or tar archive to unpack."""
    return not _is_glob(source) and source.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class Discovery:
    """Where a batch's files come from, and where each is read."""

    source: str
    #: The batch's own staging folder (archives are unpacked under it).
    staging: Path
    storage_options: dict[str, Any]

    @property
    def unpack_root(self) -> Path:
        """Folder the archive of this batch is unpacked into."""
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()[:12]
        return self.staging / "unpacked" / digest

    def files(self) -> Iterator[tuple[str, int | None]]:
        """Every file of the source as ``(name, size or None)``, in a stable order."""
        if is_archive(self.source):
            yield from self._archive_files()
        elif is_url(self.source):
            yield from _url_files(self.source, self.storage_options)
        elif _is_glob(self.source):
            for match in sorted(glob.glob(self.source, recursive=True)):
                yield from _local_files(match)
        else:
            yield from _local_files(self.source)

    def locate(self, name: str) -> str:
        """Where a worker reads the file called ``name`` (a local path or a URL)."""
        if is_archive(self.source) and name.startswith(self.source + "!"):
            return str(self.unpack_root / name[len(self.source) + 1 :])
        return name

    def _archive_files(self) -> Iterator[tuple[str, int | None]]:
        root = self.unpack_root
        if not (root / _MARKER).exists():
            _unpack(self.source, root, self.storage_options)
        for path, size in _local_files(str(root)):
            relative = os.path.relpath(path, root)
            if relative != _MARKER:
                yield f"{self.source}!{relative.replace(os.sep, '/')}", size


def _local_files(path: str) -> Iterator[tuple[str, int | None]]:
    if not os.path.isdir(path):
        yield path, _size(path)
        return
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            yield full, _size(full)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None  # dangling link, no permission on a folder: read errors tell why


def _url_files(url: str, options: dict[str, Any]) -> Iterator[tuple[str, int | None]]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found = fs.glob(path, detail=True) if _is_glob(path) else fs.find(path, detail=True)
        if not found and not _is_glob(path) and fs.isfile(path):
            found = {path: fs.info(path)}
    except FileNotFoundError as exc:
        raise NotFound(f"{url} does not exist") from exc
    except Exception as exc:  # fsspec backends raise their own error types
        raise StorageError(f"cannot list {url}: {exc}") from exc
    for name in sorted(found):
        info = found[name]
        if info.get("type") == "directory":
            continue
        size = info.get("size")
        yield _unstrip(protocol, name), int(size) if size is not None else None


def _unstrip(protocol: str, path: str) -> str:
    """fsspec lists paths without their protocol; put it back."""
    return path if "://" in path else f"{protocol}://{path}"


def _unpack(source: str, root: Path, options: dict[str, Any]) -> None:
    """Unpack the archive ``source`` into ``root`` (safe member names only)."""
    root.mkdir(parents=True, exist_ok=True)
    local = source
    if is_url(source):
        import fsspec

        local = str(root.parent / (root.name + "-archive"))
        try:
            with fsspec.open(source, "rb", **options) as src, open(local, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except Exception as exc:
            raise StorageError(f"cannot download {source}: {exc}") from exc
    try:
        if local.lower().endswith(".zip") or zipfile.is_zipfile(local):
            with zipfile.ZipFile(local) as archive:
                archive.extractall(root)  # zipfile drops '..' and absolute member paths
        else:
            with tarfile.open(local) as archive:
                archive.extractall(root, filter="data")  # refuses links out, devices, '..'
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise InvalidInput(f"cannot unpack {source}: {exc}") from exc
    finally:
        if local != source:
            Path(local).unlink(missing_ok=True)
    (root / _MARKER).touch()


__all__ = [
    "ARCHIVE_SUFFIXES",
    "CLINICAL_SUFFIXES",
    "Discovery",
    "is_archive",
    "is_clinical",
    "is_url",
    "normalize_source",
]
