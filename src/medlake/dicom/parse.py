"""Read what medlake needs from a Part-10 file: headers only, never pixels."""

from __future__ import annotations

import functools
import hashlib
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from medlake.dicom.attributes import (
    ATTRIBUTES,
    BY_KEYWORD,
    BY_TAG,
    SERIES_EXTRA_TAGS,
    STUDY_EXTRA_TAGS,
    STUDY_MODULE_GROUPS,
    Level,
    extra_level,
)
from medlake.dicom.header_scan import scan_header
from medlake.dicom.pixel_index import FrameIndex, index_pixel_data, native_frame_size
from medlake.errors import InvalidDicom, MissingAttribute
from medlake.types import is_uid

_REQUIRED = (
    ("SOPInstanceUID", "sop_uid"),
    ("SOPClassUID", "sop_class_uid"),
    ("StudyInstanceUID", "study_uid"),
    ("SeriesInstanceUID", "series_uid"),
)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})
_ESC = b"\x1b"
#: (column, tag, VR) of every attribute read from the header into the index.
_READ = tuple(
    (a.column, a.tag, a.vr)
    for a in ATTRIBUTES
    if not a.computed and a.keyword != "AvailableTransferSyntaxUID"
)
_TRANSFER_SYNTAX_COLUMN = BY_KEYWORD["AvailableTransferSyntaxUID"].column
_SAMPLES_PER_PIXEL = 0x00280002
_SPECIFIC_CHARACTER_SET = 0x00080005
#: Every attribute :func:`_describe` reads (with the groups of STUDY_MODULE_GROUPS).
_DESCRIBED = frozenset(
    {tag for _, tag, _ in _READ} | STUDY_EXTRA_TAGS | SERIES_EXTRA_TAGS | {_SAMPLES_PER_PIXEL}
)
#: Elements larger than this go to BulkDataURI in metadata instead of inline.
BULK_DATA_THRESHOLD = 1024
#: What pydicom raises for bytes it cannot read (struct.error: cut inside an element header).
_READ_ERRORS = (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, struct.error)
#: Bytes read for the header scan when the caller has none in memory.
_SCAN_BYTES = 64 << 10


@dataclass
class ParsedInstance:
    """The header of one instance and everything the index stores about it.

    ``dataset`` is None when the header was parsed in another process (it is not
    pickled back); read the stored file's header again if it is needed.
    """

    dataset: Dataset | None
    transfer_syntax_uid: str
    frame_index: FrameIndex | None
    values: dict[str, Any] = field(default_factory=dict)
    study_extra: dict[str, Any] = field(default_factory=dict)
    series_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sop_uid(self) -> str:
        """SOPInstanceUID."""
        return str(self.values["sop_uid"])

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID."""
        return str(self.values["study_uid"])

    @property
    def series_uid(self) -> str:
        """SeriesInstanceUID."""
        return str(self.values["series_uid"])


def read_instance(path: Path, head: bytes | None = None, *, whole: bool = True) -> ParsedInstance:
    """Parse the header of the Part-10 file at ``path`` and locate its frames.

    ``head``, when given, holds the first bytes of the file (kept in memory as it
    was received): if the header ends inside it, the file is not opened again
    except to walk encapsulated fragments. With ``whole=False`` the caller drops
    ``dataset`` and needs only the index values: then only the attributes the index
    keeps are read (:func:`medlake.dicom.header_scan.scan_header`), which is several
    times faster for a large header.

    Raises :class:`InvalidDicom` for bytes that are not DICOM Part 10 or are
    truncated, and :class:`MissingAttribute` when a required UID is absent or malformed.
    """
    try:
        size = path.stat().st_size
        if not whole:
            scan_head = head
            if scan_head is None:
                with path.open("rb") as fh:
                    scan_head = fh.read(_SCAN_BYTES)
            scanned = scan_header(scan_head, _DESCRIBED, STUDY_MODULE_GROUPS)
            located = _located(path, scan_head, size, *scanned) if scanned is not None else None
            if located is not None:
                return located
        if head is not None:  # (a head read just for the scan is not tried again)
            parsed = _read_from_head(path, head, size)
            if parsed is not None:
                return parsed
        with path.open("rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            return _with_frames(_describe(ds, _transfer_syntax(ds)), fh, size)
    except InvalidDicomError as exc:
        raise InvalidDicom(f"not a DICOM Part 10 file: {exc}") from exc
    except _READ_ERRORS as exc:
        raise InvalidDicom(f"unreadable DICOM data: {exc}") from exc


def _read_from_head(path: Path, head: bytes, size: int) -> ParsedInstance | None:
    buffer = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(buffer, stop_before_pixels=True)
    except _READ_ERRORS:
        if len(head) >= size:
            raise
        return None  # the header runs past the head: parse the file instead
    return _located(path, head, size, ds, buffer.tell())


def _located(
    path: Path, head: bytes, size: int, ds: Dataset, position: int
) -> ParsedInstance | None:
    """The instance whose header, read from ``head``, ends at ``position``, with its
    frames located; ``None`` when the head ends too soon to tell where they are."""
    if len(head) < size and position + 12 > len(head):
        return None
    parsed = _describe(ds, _transfer_syntax(ds))
    undefined_length = b"\xff\xff\xff\xff" in head[position + 4 : position + 12]
    if len(head) < size and undefined_length:  # encapsulated: fragments lie beyond the head
        with path.open("rb") as fh:
            fh.seek(position)
            return _with_frames(parsed, fh, size)
    buffer = io.BytesIO(head)
    buffer.seek(position)
    return _with_frames(parsed, buffer, size)


def _with_frames(parsed: ParsedInstance, fh: BinaryIO, size: int) -> ParsedInstance:
    """``parsed`` with the frames of the Pixel Data at the position of ``fh`` located."""
    ts = UID(parsed.transfer_syntax_uid)
    if ts == DeflatedExplicitVRLittleEndian:
        return parsed
    parsed.frame_index = index_pixel_data(
        fh,
        implicit_vr=ts.is_implicit_VR,
        little_endian=ts.is_little_endian,
        number_of_frames=_int(parsed.values.get("number_of_frames")) or 1,
        frame_size=_frame_size(parsed, ts),
        file_size=size,
    )
    return parsed


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise InvalidDicom("file meta information has no TransferSyntaxUID (0002,0010)")
    return UID(str(ts))


def _frame_size(parsed: ParsedInstance, ts: UID) -> int | None:
    values = parsed.values
    rows, cols = _int(values.get("rows")), _int(values.get("columns"))
    bits = _int(values.get("bits_allocated"))
    if not (rows and cols and bits) or parsed.dataset is None:
        return None
    dataset = parsed.dataset
    samples = _attribute_value(
        dataset, _SAMPLES_PER_PIXEL, "US", ts.is_little_endian, _charset_key(dataset)
    )
    return native_frame_size(rows, cols, _int(samples) or 1, bits)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _describe(ds: Dataset, ts: UID) -> ParsedInstance:
    """The index values and extra attributes of ``ds`` (frames not located yet)."""
    little_endian = ts.is_little_endian
    charset = _charset_key(ds)
    values: dict[str, Any] = {
        column: _attribute_value(ds, tag, vr, little_endian, charset) for column, tag, vr in _READ
    }
    values[_TRANSFER_SYNTAX_COLUMN] = str(ts)
    for keyword, column in _REQUIRED:
        uid = values.get(column)
        if not uid:
            raise MissingAttribute(f"required attribute {keyword} is missing or empty")
        if not is_uid(uid):
            raise MissingAttribute(f"{keyword} {uid!r} is not a valid DICOM UID")
    parsed = ParsedInstance(ds, str(ts), None, values)
    # Only the wanted tags are converted from their raw form (iterating ``ds`` would
    # convert every element, nested sequences included: 4x the parse time).
    for tag in list(ds.keys()):
        level = extra_level(tag)
        if level is None or BY_TAG.get(tag) is not None:
            continue
        target = parsed.study_extra if level is Level.STUDY else parsed.series_extra
        json_of = functools.partial(_json_of, ds, tag)
        target[f"{tag:08X}"] = _converted("json", ds, tag, charset, json_of)
    return parsed


def _json_of(ds: Dataset, tag: BaseTag) -> dict[str, Any]:
    return ds[tag].to_json_dict(_drop_bulk, BULK_DATA_THRESHOLD)


#: Values already converted by pydicom, by their raw form (tag, VR, bytes, character
#: set): the instances of a series repeat most of their patient, study and series
#: attributes, and pydicom's conversion of one element costs about 20 µs.
_CONVERTED: dict[tuple[str, int, str | None, bool, bool, bytes, str | None], Any] = {}
_CONVERTED_MAX = 4096
#: Longer values are converted each time: the cache stays small (and keeps little of any
#: patient's data after the request), and long values rarely repeat.
_CONVERTED_MAX_BYTES = 256
_MISSING = object()


def _charset_key(ds: Dataset) -> str | None:
    element = ds._dict.get(BaseTag(_SPECIFIC_CHARACTER_SET))
    value = getattr(element, "value", None)
    return value.decode("latin-1") if isinstance(value, bytes) else repr(value)


def _converted(
    kind: str, ds: Dataset, tag: int, charset: str | None, convert: Callable[[], Any]
) -> Any:
    """``convert()``, or what it gave (for the same ``kind`` of use) for an element with
    the same raw form before.

    The result is shared between instances: callers only serialize it.
    """
    raw = ds._dict.get(BaseTag(tag))
    value = getattr(raw, "value", None)
    if (
        not isinstance(raw, RawDataElement)
        or not isinstance(value, bytes)
        or len(value) > _CONVERTED_MAX_BYTES
    ):
        return convert()
    key = (kind, tag, raw.VR, raw.is_little_endian, raw.is_implicit_VR, value, charset)
    found = _CONVERTED.get(key, _MISSING)
    if found is _MISSING:
        if len(_CONVERTED) >= _CONVERTED_MAX:
            _CONVERTED.clear()
        found = _CONVERTED[key] = convert()
    return found


def _attribute_value(
    ds: Dataset, tag: int, vr: str, little_endian: bool, charset: str | None
) -> Any:
    """The index value of one top-level attribute.

    Plain ASCII text and US values are decoded straight from the raw bytes pydicom
    read (converting each raw element to a DataElement costs more than parsing the
    header); anything else (PN, non-ASCII, other VRs) goes through pydicom so that
    character sets are honoured.
    """
    raw = ds._dict.get(BaseTag(tag))  # the raw element, before conversion
    if raw is None:
        return None
    value = getattr(raw, "value", None)
    if isinstance(value, bytes) and getattr(raw, "VR", vr) in (vr, None):
        # ESC starts an ISO 2022 code extension (7-bit Japanese, Korean…): such ASCII bytes
        # are not ASCII text, so pydicom decodes them with the character set.
        if vr in _TEXT_VRS and value.isascii() and _ESC not in value:
            text = value.decode("ascii").strip(" \x00")
            return _column_value(text.split("\\") if "\\" in text else text, vr)
        if vr == "PN" and value.isascii() and _ESC not in value:
            # As pydicom reads a PN: trailing padding and empty trailing groups dropped.
            names = [n.rstrip("=") for n in value.decode("ascii").rstrip(" \x00").split("\\")]
            return _column_value(names if len(names) > 1 else names[0], vr)
        if vr == "US" and len(value) >= 2:
            return int.from_bytes(value[:2], "little" if little_endian else "big")

    def convert() -> Any:
        element = ds.get(tag)
        return _column_value(element.value if element is not None else None, vr)

    return _converted("column", ds, tag, charset, convert)


def _drop_bulk(_element: Any) -> str:
    return ""


def _column_value(value: Any, vr: str) -> Any:
    if value is None or value == "":
        return None
    if vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            return int(value[0] if isinstance(value, list | pydicom.multival.MultiValue) else value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, list | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


_LONG_META_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"}


def data_set_digest(fh: BinaryIO) -> str:
    """SHA-256 of a Part-10 file's data set alone: the bytes after the preamble and the
    File Meta Information (group 0002, always Explicit VR Little Endian).

    Two copies of one instance that came by different routes (STOW-RS, C-STORE,
    another PACS) differ in their File Meta (Source AE, implementation UIDs) but not
    in their data set; comparing this digest tells a true duplicate from a conflict.
    """
    start = fh.read(132)
    if len(start) < 132 or start[128:132] != b"DICM":
        fh.seek(0)  # no preamble: the file starts with the meta group (or the data set)
    while True:
        position = fh.tell()
        header = fh.read(8)
        if len(header) < 8 or int.from_bytes(header[0:2], "little") != 0x0002:
            fh.seek(position)
            break
        vr = header[4:6]
        if vr in _LONG_META_VRS:
            length = int.from_bytes(fh.read(4), "little")
        else:
            length = int.from_bytes(header[6:8], "little")
        fh.seek(length, 1)
    digest = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()
