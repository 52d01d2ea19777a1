"""Where the pixel data of a Part-10 file lies, so that a frame is one range read.

pydicom stops *before* the Pixel Data element when asked (``stop_before_pixels``)
and leaves the file positioned on its tag; from there we read the element header
and, for encapsulated transfer syntaxes, walk the fragment items without reading
their values. No library records these offsets, hence this module.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from medlake.errors import InvalidDicom

_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
_LONG_VRS = {
    b"OB",
    b"OW",
    b"OF",
    b"OD",
    b"OL",
    b"OV",
    b"SQ",
    b"UC",
    b"UR",
    b"UT",
    b"UN",
    b"SV",
    b"UV",
}


@dataclass(frozen=True)
class FrameIndex:
    """Byte ranges of each frame inside the stored file.

    ``frames[i]`` is the list of ``(offset, length)`` fragments making frame ``i``
    (one range for native pixel data, one or more fragments when encapsulated).
    """

    encapsulated: bool
    frames: list[list[tuple[int, int]]]

    def to_json(self) -> list[list[list[int]]]:
        """A JSON-able form for the index."""
        return [[[o, n] for o, n in frame] for frame in self.frames]

    @classmethod
    def from_json(cls, data: list[list[list[int]]], encapsulated: bool) -> FrameIndex:
        """Inverse of :meth:`to_json`."""
        return cls(encapsulated, [[(o, n) for o, n in frame] for frame in data])


def index_pixel_data(
    fh: BinaryIO,
    *,
    implicit_vr: bool,
    little_endian: bool,
    number_of_frames: int,
    frame_size: int | None,
    file_size: int,
) -> FrameIndex | None:
    """Index the Pixel Data element at the current position of ``fh``.

    ``frame_size`` is the byte length of one native frame (None when unknown).
    Returns None when there is no Pixel Data here or the frames cannot be located
    without decoding (the caller then falls back to reading the whole file).
    Raises :class:`InvalidDicom` when the pixel data is cut short by the end of the file.
    """
    end = "<" if little_endian else ">"
    header = fh.read(8)
    if len(header) < 8:
        return None
    group, element = struct.unpack(end + "HH", header[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return None
    if implicit_vr:
        (length,) = struct.unpack(end + "I", header[4:8])
    elif header[4:6] in _LONG_VRS:
        (length,) = struct.unpack(end + "I", fh.read(4))
    else:
        (length,) = struct.unpack(end + "H", header[6:8])
    start = fh.tell()
    if length != 0xFFFFFFFF and start + length > file_size:
        raise InvalidDicom(
            f"truncated file: Pixel Data declares {length} bytes but only "
            f"{max(file_size - start, 0)} follow"
        )
    if length != 0xFFFFFFFF:
        if not frame_size or frame_size * number_of_frames > length:
            return FrameIndex(False, [[(start, length)]]) if number_of_frames == 1 else None
        return FrameIndex(
            False, [[(start + i * frame_size, frame_size)] for i in range(number_of_frames)]
        )
    return _index_fragments(fh, end, number_of_frames, file_size)


def _index_fragments(
    fh: BinaryIO, end: str, number_of_frames: int, file_size: int
) -> FrameIndex | None:
    items: list[tuple[int, int]] = []  # (value offset, length), BOT first
    while True:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InvalidDicom("truncated file: encapsulated Pixel Data has no sequence delimiter")
        tag_group, tag_elem, length = struct.unpack(end + "HHI", raw)
        tag = tag_group << 16 | tag_elem
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            return None
        if fh.tell() + length > file_size:
            raise InvalidDicom(
                f"truncated file: a Pixel Data fragment of {length} bytes runs past the end"
            )
        items.append((fh.tell(), length))
        fh.seek(length, 1)
    if not items:
        return None
    bot_offset, bot_length = items[0]
    fragments = items[1:]
    if not fragments:
        return None
    if number_of_frames == 1:
        return FrameIndex(True, [fragments])
    if bot_length:
        fh.seek(bot_offset)
        count = bot_length // 4
        starts = struct.unpack(f"{end}{count}I", fh.read(4 * count))
        first_item = fragments[0][0] - 8
        frames: list[list[tuple[int, int]]] = [[] for _ in starts]
        for offset, length in fragments:
            relative = offset - 8 - first_item
            slot = max(i for i, s in enumerate(starts) if s <= relative)
            frames[slot].append((offset, length))
        if len(frames) == number_of_frames and all(frames):
            return FrameIndex(True, frames)
        return None
    if len(fragments) == number_of_frames:
        return FrameIndex(True, [[f] for f in fragments])
    return None


def native_frame_size(rows: int, columns: int, samples: int, bits_allocated: int) -> int | None:
    """Bytes of one native frame, or None for bit-packed (1-bit) data."""
    if bits_allocated % 8:
        return None
    return rows * columns * samples * (bits_allocated // 8)
