"""A fast path for reading a few attributes out of a large header.

pydicom's reader turns every element of a header into a ``RawDataElement``: about
1.5 µs each in pure Python. An acquisition header of 250 elements then costs 0.4 ms
to read, although the index needs about 40 of them. :func:`scan_header` walks the
elements of the common encoding (a Part-10 file with its preamble, explicit VR little
endian, as nearly every modality writes) with one ``struct`` call each, keeps the
wanted ones as pydicom raw elements and skips the rest, undefined-length sequences
included; pydicom still decodes every value that is kept. Anything else (implicit
VR, big endian, deflate, no preamble, a wanted element of undefined length other
than a sequence, a malformed element) returns ``None``, and the caller reads the file with pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

_PREAMBLE = 128
_MAGIC = b"DICM"
_EXPLICIT_LE_DATASET_EXCLUDED = frozenset(
    {
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
        "1.2.840.10008.1.2.1.99",  # deflated: the data set is compressed
    }
)
#: VRs whose explicit-VR header has two reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_VR_TEXT = {vr: vr.decode("ascii") for vr in _LONG_VRS | _SHORT_VRS}
#: pydicom's ``stop_before_pixels`` stops at any of these (Float/Double Float Pixel Data too).
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_TAG_VR = struct.Struct("<HH2s")
#: Tag, VR and (for the VRs of _SHORT_VRS) the value length of an explicit-VR element.
_SHORT_HEADER = struct.Struct("<HH2sH")
_SHORT_LENGTH = struct.Struct("<H")
_LONG_LENGTH = struct.Struct("<L")
_TAG_LENGTH = struct.Struct("<HHL")
_CHARACTER_SET = 0x00080005
_TRANSFER_SYNTAX = 0x00020010


class _Unsupported(Exception):
    """This header needs pydicom's reader."""


def scan_header(
    data: bytes, wanted: Collection[int], wanted_groups: Collection[int] = ()
) -> tuple[Dataset, int] | None:
    """The wanted top-level attributes of the Part-10 file whose first bytes are
    ``data``, and the offset where its Pixel Data element starts (or where the data
    ends, when the file has none).

    ``wanted`` holds tags, ``wanted_groups`` whole groups; the dataset also gets the
    Specific Character Set and a ``file_meta``. ``None`` when the file is not in the
    encoding this reads, or its header does not end within ``data``: read it with
    pydicom then, which also says what is wrong with a malformed file.
    """
    try:
        return _scan(data, wanted, wanted_groups)
    except (_Unsupported, struct.error, UnicodeDecodeError):
        return None


def _scan(
    data: bytes, wanted: Collection[int], wanted_groups: Collection[int]
) -> tuple[Dataset, int] | None:
    if data[_PREAMBLE : _PREAMBLE + 4] != _MAGIC:
        return None
    meta: dict[BaseTag, RawDataElement | DataElement] = {}
    position = _PREAMBLE + 4
    end = len(data)
    while position + 8 <= end:
        group, element, vr = _TAG_VR.unpack_from(data, position)
        if group != 0x0002:
            break
        position = _keep_meta(data, position, (group << 16) | element, vr, meta)
    if _TRANSFER_SYNTAX not in meta:
        return None
    file_meta = FileMetaDataset(Dataset(meta))
    if str(file_meta.TransferSyntaxUID) in _EXPLICIT_LE_DATASET_EXCLUDED:
        return None
    kept: dict[BaseTag, RawDataElement | DataElement] = {}
    unpack = _SHORT_HEADER.unpack_from
    unpack_long = _LONG_LENGTH.unpack_from
    while position < end:
        if position + 8 > end:
            return None  # the header runs past ``data``
        group, element, vr, length = unpack(data, position)
        tag = (group << 16) | element
        if tag in _PIXEL_TAGS:
            break
        if vr in _SHORT_VRS:
            start = position + 8
        elif vr in _LONG_VRS:
            length = unpack_long(data, position + 8)[0]
            start = position + 12
        else:
            return None  # not a VR: a malformed file, or not explicit VR after all
        if tag == _CHARACTER_SET or tag in wanted or group in wanted_groups:
            key = BaseTag(tag)
            if length == _UNDEFINED:
                if vr != b"SQ":
                    return None  # undefined-length UN (implicit VR inside): pydicom reads it
                # A sequence of undefined length: its items up to (and with) the Sequence
                # Delimitation Item, given to pydicom as a sequence of that length.
                position = _skip_items(data, start)
                value = data[start:position]
                length = len(value)
            else:
                value = data[start : start + length]
                if len(value) < length:
                    return None
                position = start + length
            kept[key] = RawDataElement(key, _VR_TEXT[vr], length, value, start, False, True)
        elif length != _UNDEFINED:
            position = start + length
        elif vr in (b"SQ", b"UN"):
            position = _skip_items(data, start)
        else:
            return None
        if position > end:
            return None
    dataset = Dataset(kept)
    encoding = "iso8859"
    if _CHARACTER_SET in kept:
        raw = kept[BaseTag(_CHARACTER_SET)]
        assert isinstance(raw, RawDataElement)
        charset = convert_raw_data_element(raw).value
        encoding = convert_encodings(charset)  # type: ignore[assignment]
    dataset.set_original_encoding(False, True, encoding)
    dataset.file_meta = file_meta
    return dataset, position


def _header(data: bytes, position: int, vr: bytes) -> tuple[int, int]:
    """(length, header size) of the explicit-VR element at ``position``."""
    if vr in _SHORT_VRS:
        return _SHORT_LENGTH.unpack_from(data, position + 6)[0], 8
    if vr in _LONG_VRS:
        return _LONG_LENGTH.unpack_from(data, position + 8)[0], 12
    raise _Unsupported  # not a VR: a malformed file, or not explicit VR after all


def _keep_meta(
    data: bytes,
    position: int,
    tag: int,
    vr: bytes,
    into: dict[BaseTag, RawDataElement | DataElement],
) -> int:
    """Add the File Meta element at ``position`` to ``into``; the offset after it."""
    length, size = _header(data, position, vr)
    if length == _UNDEFINED:
        raise _Unsupported  # no File Meta element has an undefined length
    start = position + size
    value = data[start : start + length]
    if len(value) < length:
        raise _Unsupported
    key = BaseTag(tag)
    into[key] = RawDataElement(key, _VR_TEXT[vr], length, value, start, False, True)
    return start + length


def _skip(data: bytes, position: int, vr: bytes) -> int:
    length, size = _header(data, position, vr)
    if length != _UNDEFINED:
        return position + size + length
    if vr not in (b"SQ", b"UN"):
        raise _Unsupported
    return _skip_items(data, position + size)


def _skip_items(data: bytes, position: int) -> int:
    """The offset after the Sequence Delimitation Item of the items at ``position``."""
    end = len(data)
    while position + 8 <= end:
        group, element, length = _TAG_LENGTH.unpack_from(data, position)
        tag = (group << 16) | element
        position += 8
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            raise _Unsupported
        if length != _UNDEFINED:
            position += length
            continue
        position = _skip_item_elements(data, position)
    raise _Unsupported


def _skip_item_elements(data: bytes, position: int) -> int:
    """The offset after the Item Delimitation Item ending the item at ``position``."""
    end = len(data)
    while position + 8 <= end:
        group, element, vr = _TAG_VR.unpack_from(data, position)
        if (group << 16) | element == _ITEM_END:
            return position + 8
        position = _skip(data, position, vr)
    raise _Unsupported


__all__ = ["scan_header"]
