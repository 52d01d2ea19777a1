"""Building STOW-RS bodies and reading WADO-RS multipart responses in tests.

Plain functions (no fixtures), shared by the DICOMweb test modules. The parser is
written here rather than borrowed from the server so that a bug in medlake's own
multipart code cannot hide itself.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

__all__ = [
    "STOW_CONTENT_TYPE",
    "as_dataset",
    "copy_with_uids",
    "iter_multipart",
    "multipart_body",
    "new_boundary",
    "read_multipart",
    "stow_headers",
]

STOW_CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary={boundary}'


def new_boundary() -> str:
    """A boundary that cannot occur inside DICOM bytes by chance."""
    return f"test-{uuid.uuid4().hex}"


def stow_headers(boundary: str, accept: str = "application/dicom+json") -> dict[str, str]:
    """Request headers of a STOW-RS multipart/related request."""
    return {"Content-Type": STOW_CONTENT_TYPE.format(boundary=boundary), "Accept": accept}


def iter_multipart(parts: Iterable[bytes], boundary: str) -> Iterator[bytes]:
    """The chunks of a multipart/related body with one application/dicom part per item."""
    for data in parts:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def multipart_body(parts: Iterable[bytes | Path], boundary: str) -> bytes:
    """A whole multipart/related body (files are read)."""
    raw = [p.read_bytes() if isinstance(p, Path) else p for p in parts]
    return b"".join(iter_multipart(raw, boundary))


def read_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """(headers, payload) of every part of a multipart response body."""
    boundary = _param(content_type, "boundary")
    assert boundary, f"no boundary in {content_type!r}"
    delimiter = b"\r\n--" + boundary.encode()
    pieces = (b"\r\n" + body).split(delimiter)
    assert pieces[0] == b"", "unexpected preamble before the first boundary"
    assert pieces[-1].startswith(b"--"), "the closing boundary is missing"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n"), "a boundary line is not followed by CRLF"
        head, sep, payload = piece[2:].partition(b"\r\n\r\n")
        assert sep, "a part has no blank line after its headers"
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
    return parts


def _param(content_type: str, name: str) -> str | None:
    for item in content_type.split(";")[1:]:
        key, _, value = item.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def as_dataset(data: bytes) -> Dataset:
    """Parse Part-10 bytes."""
    return pydicom.dcmread(io.BytesIO(data))


def copy_with_uids(
    source: Path,
    target: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    **attributes: object,
) -> Path:
    """Write ``source`` to ``target`` with new (or given) UIDs and other attributes."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target
