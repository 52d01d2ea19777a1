"""Values of extended query tags: taken from an instance's header, written to the index.

One function serves both paths that index a value: storing a new instance
(:func:`index_new_instances`, called by ``write_instances`` in the same
transaction) and re-indexing the instances already stored when a tag is added
(the worker in :mod:`medlake.dicomweb.extended_tags`).

Only single-valued attributes are indexed (as in Microsoft's DICOM service); a
value that is multi-valued, malformed for its VR or too long is recorded in
``extended_query_tag_errors`` with the reason instead of being dropped silently.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.values import convert_value
from sqlalchemy import Connection, delete, insert, select

from medlake.index.schema import (
    extended_query_tag_errors,
    extended_query_tag_values,
    extended_query_tags,
)
from medlake.types import is_uid

#: VRs an extended query tag may have (the matching rules of each live in index/qido.py).
SUPPORTED_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "PN", "SH", "SL", "SS",
     "TM", "UI", "UL", "US"}
)  # fmt: skip
#: VRs whose values go to ``value_number`` (QIDO compares them as numbers).
NUMERIC_VRS = frozenset({"DS", "FD", "FL", "IS", "SL", "SS", "UL", "US", "SV", "UV"})
_INTEGER_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
#: Longest text value the index column holds (PN: three 64-char groups and delimiters).
MAX_TEXT = 330
_SPECIFIC_CHARACTER_SET = 0x00080005
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DATETIME = re.compile(r"^\d{4,14}(\.\d{1,6})?([+-]\d{4})?$")


@dataclass(frozen=True)
class IndexedTag:
    """An extended query tag as the indexer needs it."""

    id: int
    tag: int
    vr: str
    keyword: str = ""
    private_creator: str | None = None

    @property
    def name(self) -> str:
        """Keyword, or the 8-digit hex tag of attributes without one."""
        return self.keyword or f"{self.tag:08X}"


@dataclass(frozen=True)
class TagValue:
    """One tag's value in one instance: text or number, or why it could not be indexed."""

    tag_id: int
    text: str | None = None
    number: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class InstanceRef:
    """The index ids a value row links to."""

    instance_id: int
    study_id: int
    series_id: int


# Built once: every store of an instance asks this (prebuilt, SQLAlchemy skips building
# the statement and its cache key).
_INDEXING_TAGS = select(extended_query_tags).where(
    extended_query_tags.c.status.in_(("adding", "ready"))
)
_INDEXING_TAGS_LOCKED = _INDEXING_TAGS.with_for_update(read=True)


def indexing_tags(
    conn: Connection, *, tag_ids: Iterable[int] | None = None, lock: bool = False
) -> list[IndexedTag]:
    """Tags new instances must get values for: every tag being added or ready (a tag
    being deleted gets none). ``tag_ids`` narrows them to those ids.

    ``lock`` (before writing values): PostgreSQL holds a share lock on the tags until
    the transaction ends, so a tag cannot be deleted between this read and the insert
    of its values. SQLite has a single writer and needs none.
    """
    if tag_ids is None:
        query = _INDEXING_TAGS_LOCKED if lock else _INDEXING_TAGS
    else:
        query = _INDEXING_TAGS.where(extended_query_tags.c.id.in_(list(tag_ids)))
        if lock:
            query = query.with_for_update(read=True)
    return [
        IndexedTag(r.id, int(r.tag, 16), r.vr, r.keyword or "", r.private_creator)
        for r in conn.execute(query)
    ]


def extract_values(ds: Dataset, tags: Sequence[IndexedTag]) -> list[TagValue]:
    """The value of each of ``tags`` in ``ds`` (tags absent or empty in ``ds`` give none)."""
    out = []
    for tag in tags:
        try:
            element = _find(ds, tag)
            value = None if element is None else _single_value(ds, element, tag)
            typed = None if value is None else _typed(tag, value)
            if typed is not None:
                out.append(typed)
        # Whatever the bytes are (pydicom decodes them lazily, here), a bad value must
        # become an error row, never fail the store of the instance.
        except Exception as exc:
            out.append(TagValue(tag.id, error=f"{_label(tag)}: {exc}"[:512]))
    return out


def _label(tag: IndexedTag) -> str:
    return f"{tag.keyword} ({tag.tag:08X})" if tag.keyword else f"({tag.tag:08X})"


def _find(ds: Dataset, tag: IndexedTag) -> DataElement | None:
    if not tag.private_creator:
        element: DataElement | None = ds.get(tag.tag)
        return element
    try:
        block = ds.private_block(tag.tag >> 16, tag.private_creator)
        found: DataElement = block[tag.tag & 0xFF]
        return found
    except KeyError:
        return None


def _single_value(ds: Dataset, element: DataElement, tag: IndexedTag) -> Any:
    """The one value of ``element`` read as ``tag.vr``; None when empty."""
    value = element.value
    if tag.vr != element.VR and isinstance(value, bytes):
        # Implicit VR files carry private elements as UN: decode them with the tag's VR.
        raw = RawDataElement(element.tag, tag.vr, len(value), value, 0, True, True)
        charset = ds.get(_SPECIFIC_CHARACTER_SET)
        value = convert_value(tag.vr, raw, charset.value if charset is not None else None)
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, list | tuple | MultiValue):
        values = list(value)
        if not values:
            return None
        if len(values) > 1:
            shown = "\\".join(str(v) for v in values)[:80]
            raise ValueError(
                f"has {len(values)} values ({shown}); only single-valued attributes are indexed"
            )
        value = values[0]
    return value


def _typed(tag: IndexedTag, value: Any) -> TagValue | None:
    """The value converted for its index column; None when it is only padding."""
    if tag.vr in NUMERIC_VRS:
        try:
            number = int(str(value).strip()) if tag.vr == "IS" else float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"value {str(value)!r} is not a valid {tag.vr} number") from exc
        if not math.isfinite(number):
            raise ValueError(f"value {value!r} is not a finite number")
        if tag.vr in _INTEGER_VRS and float(number) != int(number):
            raise ValueError(f"value {value!r} is not an integer")
        return TagValue(tag.id, number=float(number))
    text = str(value).strip(" \x00")
    if not text:
        return None
    _check_text(tag.vr, text)
    if tag.vr == "PN":
        text = text.upper()  # QIDO matches person names case-insensitively
    if len(text) > MAX_TEXT:
        raise ValueError(f"value of {len(text)} characters exceeds the {MAX_TEXT} indexed")
    return TagValue(tag.id, text=text)


def _check_text(vr: str, text: str) -> None:
    if vr == "DA":
        if not _DATE.match(text):
            raise ValueError(f"value {text!r} is not a DICOM date (YYYYMMDD)")
        try:
            dt.datetime.strptime(text, "%Y%m%d")
        except ValueError as exc:
            raise ValueError(f"value {text!r} is not a valid date") from exc
    elif vr == "TM" and not _TIME.match(text):
        raise ValueError(f"value {text!r} is not a DICOM time (HHMMSS.FFFFFF)")
    elif vr == "DT" and not _DATETIME.match(text):
        raise ValueError(f"value {text!r} is not a DICOM date-time")
    elif vr == "UI" and not is_uid(text):
        raise ValueError(f"value {text!r} is not a valid DICOM UID")


def write_values(
    conn: Connection,
    items: Sequence[tuple[InstanceRef, Sequence[TagValue]]],
    now: dt.datetime,
    *,
    replace_tag_ids: Sequence[int] = (),
) -> None:
    """Insert the values (and errors) of ``items`` in the caller's transaction.

    ``replace_tag_ids``: first remove what these tags already hold for the instances,
    so re-indexing an instance that ingest has just indexed is harmless.
    """
    if not items:
        return
    if replace_tag_ids:
        ids = [ref.instance_id for ref, _ in items]
        for table in (extended_query_tag_values, extended_query_tag_errors):
            conn.execute(
                delete(table).where(
                    table.c.tag_id.in_(list(replace_tag_ids)), table.c.instance_id.in_(ids)
                )
            )
    values = [
        {
            "tag_id": v.tag_id,
            "instance_id": ref.instance_id,
            "study_id": ref.study_id,
            "series_id": ref.series_id,
            "value_text": v.text,
            "value_number": v.number,
        }
        for ref, found in items
        for v in found
        if v.error is None
    ]
    errors = [
        {"tag_id": v.tag_id, "instance_id": ref.instance_id, "message": v.error, "created_at": now}
        for ref, found in items
        for v in found
        if v.error is not None
    ]
    if values:
        conn.execute(insert(extended_query_tag_values), values)
    if errors:
        conn.execute(insert(extended_query_tag_errors), errors)


HeaderSource = Dataset | Callable[[], Dataset] | None


def index_new_instances(
    conn: Connection, items: Sequence[tuple[InstanceRef, HeaderSource]], now: dt.datetime
) -> None:
    """Index the extended query tags of newly stored instances (one query when there
    are no tags, which is the common case). A header may be given as a loader, called
    only when some tag needs indexing."""
    tags = indexing_tags(conn, lock=True)
    if not tags:
        return
    rows = []
    for ref, source in items:
        dataset = source() if callable(source) else source
        if dataset is not None:
            rows.append((ref, extract_values(dataset, tags)))
    write_values(conn, rows, now)


__all__ = [
    "MAX_TEXT",
    "NUMERIC_VRS",
    "SUPPORTED_VRS",
    "HeaderSource",
    "IndexedTag",
    "InstanceRef",
    "TagValue",
    "extract_values",
    "index_new_instances",
    "indexing_tags",
    "write_values",
]
