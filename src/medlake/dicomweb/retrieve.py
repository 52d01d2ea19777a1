"""WADO-RS / WADO-URI retrieval: instances as stored, frames, bulk data, rendered images."""

from __future__ import annotations

import io
from collections.abc import Sequence

import orjson
import pydicom
from pydicom.encaps import generate_frames

from medlake.dicom.pixel_index import FrameIndex
from medlake.dicom.render import RenderOptions, render_frame
from medlake.dicomweb.locate import StoredInstance, find_instances, touch
from medlake.errors import InvalidInput, NotFound
from medlake.ingest.archive import Archive

_PIXEL_DATA = 0x7FE00010


def retrieve(
    archive: Archive,
    partition: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[StoredInstance]:
    """The instances to send for a study / series / instance retrieve (records the access)."""
    with archive.engine.begin() as conn:
        found = find_instances(conn, partition, study_uid, series_uid, sop_uid)
        touch(conn, found, archive.blobs)
    return found


def parse_frame_list(value: str) -> list[int]:
    """``1,3,5`` as frame numbers (1-based); anything else is a 400."""
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError as exc:
        raise InvalidInput(f"frame list {value!r} must be comma-separated integers") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidInput(f"frame numbers start at 1; got {value!r}")
    return numbers


def frames(archive: Archive, stored: StoredInstance, numbers: Sequence[int]) -> list[bytes]:
    """The bytes of the requested frames, as stored (native or one compressed frame each).

    Uses the offsets recorded at ingest: one range read per frame (fragment).
    """
    if stored.frames is None:
        return _frames_by_parsing(archive, stored, numbers)
    index = FrameIndex.from_json(orjson.loads(stored.frames), stored.encapsulated)
    count = len(index.frames)
    out = []
    for number in numbers:
        if number > count:
            raise NotFound(f"frame {number} does not exist: instance {stored.sop_uid} has {count}")
        out.append(
            b"".join(
                archive.blobs.read_range(stored.blob_key, offset, length)
                for offset, length in index.frames[number - 1]
            )
        )
    return out


def _frames_by_parsing(
    archive: Archive, stored: StoredInstance, numbers: Sequence[int]
) -> list[bytes]:
    ds = pydicom.dcmread(io.BytesIO(archive.blobs.read_bytes(stored.blob_key)))
    if "PixelData" not in ds:
        raise NotFound(f"instance {stored.sop_uid} has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    if any(n > count for n in numbers):
        raise NotFound(f"instance {stored.sop_uid} has {count} frames; asked for {list(numbers)}")
    if stored.encapsulated or ds.file_meta.TransferSyntaxUID.is_compressed:
        all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [all_frames[n - 1] for n in numbers]
    size = len(ds.PixelData) // count
    return [ds.PixelData[(n - 1) * size : n * size] for n in numbers]


def parse_bulkdata_path(value: str) -> tuple[int, ...]:
    """A BulkDataURI's element path: ``7fe00010``, or inside sequences
    ``54000100/0/54001010`` (sequence tag / item index / ... / tag); anything else is a 400."""
    parts = value.split("/")
    tags, indexes = parts[::2], parts[1::2]
    valid = (
        len(parts) % 2 == 1
        and all(len(t) == 8 and all(c in "0123456789abcdefABCDEF" for c in t) for t in tags)
        and all(i.isascii() and i.isdigit() for i in indexes)
    )
    if not valid:
        raise InvalidInput(
            f"bulk data path {value!r} must be a tag of 8 hex digits, "
            "or sequence tag/item index/.../tag"
        )
    return tuple(int(p, 16) if n % 2 == 0 else int(p) for n, p in enumerate(parts))


def bulkdata(archive: Archive, stored: StoredInstance, path: Sequence[int]) -> bytes:
    """The value of one bulk-data element, by :func:`parse_bulkdata_path` path
    (Pixel Data: every frame, concatenated)."""
    if tuple(path) == (_PIXEL_DATA,):
        count = stored.number_of_frames or 1
        return b"".join(frames(archive, stored, range(1, count + 1)))
    with archive.blobs.open(stored.blob_key) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
    named = "/".join(f"{p:08X}" if n % 2 == 0 else str(p) for n, p in enumerate(path))
    for sequence_tag, index in zip(path[:-1:2], path[1::2], strict=True):
        sequence = ds.get(sequence_tag)
        if sequence is None or sequence.VR != "SQ" or index >= len(sequence.value or []):
            raise NotFound(f"instance {stored.sop_uid} has no element {named}")
        ds = sequence.value[index]
    element = ds.get(path[-1])
    if element is None or element.value is None:
        raise NotFound(f"instance {stored.sop_uid} has no element {named}")
    value = element.value
    return value if isinstance(value, bytes) else str(value).encode()


def rendered(archive: Archive, stored: StoredInstance, frame: int, options: RenderOptions) -> bytes:
    """A frame rendered to JPEG/PNG with the requested window and viewport."""
    with archive.blobs.open(stored.blob_key) as fh:
        return render_frame(fh, frame, options)
