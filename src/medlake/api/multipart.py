"""multipart/related bodies: streaming uploads to staging files, streaming downloads.

Parsing uses python-multipart's low-level ``MultipartParser`` (any multipart
subtype, boundary given), fed chunk by chunk, so memory does not grow with the
upload; each part goes straight to its own staging file while its SHA-256 is
computed.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.multipart import MultipartParser

from medlake.errors import InvalidInput, PayloadTooLarge
from medlake.ingest.store import ReceivedFile

#: The first bytes of each part are kept in memory: the DICOM header is parsed from them
#: without opening the staged file again.
HEAD_BYTES = 64 << 10


class StagedPart:
    """One part being written to a staging file.

    ``hashed`` computes the SHA-256 on the fly; by default the inspection step
    hashes the file (in a worker process), keeping that work off the receiver.
    """

    def __init__(self, folder: Path, *, hashed: bool = False) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self.file: BinaryIO = self.path.open("wb")
        self.size = 0
        self.headers: dict[str, str] = {}
        self.head = bytearray()
        self.hash: hashlib._Hash | None = hashlib.sha256() if hashed else None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the file, the hash and (while short) the in-memory head."""
        self.file.write(data)
        if self.hash is not None:
            self.hash.update(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.size += len(data)

    def close(self) -> ReceivedFile:
        """The complete part, as a received file."""
        self.file.close()
        digest = self.hash.hexdigest() if self.hash is not None else None
        return ReceivedFile(self.path, self.size, digest, bytes(self.head))

    def discard(self) -> None:
        """Drop the part and its staging file."""
        self.file.close()
        self.path.unlink(missing_ok=True)


class MultipartReceiver:
    """Feeds a multipart body to python-multipart, one staging file per part."""

    def __init__(
        self,
        boundary: str,
        folder: Path,
        max_bytes: int = 0,
        on_part: Callable[[ReceivedFile, dict[str, str]], None] | None = None,
    ) -> None:
        self._on_part = on_part
        self._folder = folder
        self._max = max_bytes
        self._received = 0
        self._current: StagedPart | None = None
        self._field = b""
        self._value = b""
        self.parts: list[tuple[ReceivedFile, dict[str, str]]] = []
        self._ended = False
        callbacks: Any = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_end": self._on_end,
        }
        self._parser = MultipartParser(boundary.encode("latin-1"), callbacks)

    def _begin(self) -> None:
        self._current = StagedPart(self._folder)

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.write(memoryview(data)[start:end])

    def _end(self) -> None:
        assert self._current is not None
        part = self._current
        received = part.close()
        self.parts.append((received, part.headers))
        self._current = None
        if self._on_part is not None:
            self._on_part(received, part.headers)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        assert self._current is not None
        self._current.headers[self._field.decode("latin-1").lower()] = self._value.decode(
            "latin-1"
        ).strip()
        self._field = self._value = b""

    def _on_end(self) -> None:
        self._ended = True

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body."""
        self._received += len(chunk)
        if self._max and self._received > self._max:
            raise PayloadTooLarge(f"request body exceeds the limit of {self._max} bytes")
        try:
            self._parser.write(chunk)
        except Exception as exc:  # python-multipart raises its own MultipartParseError
            raise InvalidInput(f"malformed multipart body: {exc}") from exc

    def finish(self) -> list[tuple[ReceivedFile, dict[str, str]]]:
        """End of body: every part, or InvalidInput when the body was cut short."""
        if not self._ended or self._current is not None:
            raise InvalidInput(
                "multipart body is incomplete: the closing boundary is missing "
                "(upload interrupted or truncated)"
            )
        return self.parts

    def discard(self) -> None:
        """Remove every staging file (the request failed)."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        for received, _ in self.parts:
            received.path.unlink(missing_ok=True)
        self.parts = []


def multipart_frame(boundary: str, content_type: str) -> bytes:
    """The delimiter and headers that open one part of a response."""
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()


def multipart_close(boundary: str) -> bytes:
    """The closing delimiter of a response."""
    return f"--{boundary}--\r\n".encode()


CHUNK = 1 << 20
WHOLE_PART = 8 << 20


def iter_file(path: Path) -> Iterator[bytes]:
    """A file's bytes in 1 MiB chunks."""
    with path.open("rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


async def aiter_parts(parts: list[tuple[str, Any]], boundary: str) -> AsyncIterator[bytes]:
    """Stream a multipart body of (content-type, bytes | Path | BinaryIO factory) parts.

    A file is read in one exact-size read and sent as is (no concatenation copies); the
    CRLF that ends a part travels with the next delimiter.
    """
    ending = b""
    for content_type, body in parts:
        yield ending + multipart_frame(boundary, content_type)
        ending = b"\r\n"
        if isinstance(body, bytes):
            yield body
            continue
        with body.open("rb", buffering=0) if isinstance(body, Path) else body() as fh:
            if isinstance(body, Path):
                size = os.fstat(fh.fileno()).st_size
                if size <= WHOLE_PART:
                    yield fh.read(size)
                    continue
            while chunk := fh.read(CHUNK):
                yield chunk
    yield ending + multipart_close(boundary)


def new_boundary() -> str:
    """A random boundary that cannot occur in DICOM bytes by chance."""
    return f"medlake-{uuid.uuid4().hex}"
