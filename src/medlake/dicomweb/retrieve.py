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


def _frames_by_parsing(archive: Archive, stored: StoredInstance, numbers: Sequence[int]) -> list[bytes]:
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


def bulkdata(archive: Archive, stored: StoredInstance, tag: int) -> bytes:
    """The value of one bulk-data element (Pixel Data: every frame, concatenated)."""
    if tag == _PIXEL_DATA:
        count = stored.number_of_frames or 1
        return b"".join(frames(archive, stored, range(1, count + 1)))
    with archive.blobs.open(stored.blob_key) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
    element = ds.get(tag)
    if element is None or element.value is None:
        raise NotFound(f"instance {stored.sop_uid} has no element ({tag:08X})")
    value = element.value
    return value if isinstance(value, bytes) else str(value).encode()


def rendered(archive: Archive, stored: StoredInstance, frame: int, options: RenderOptions) -> bytes:
    """A frame rendered to JPEG/PNG with the requested window and viewport."""
    with archive.blobs.open(stored.blob_key) as fh:
        return render_frame(fh, frame, options)
