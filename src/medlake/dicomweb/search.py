"""QIDO-RS: turning query parameters into an index search and DICOM JSON results."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, select

from medlake.dicom.attributes import ATTRIBUTES, BY_TAG, Attribute, Level, lookup
from medlake.errors import InvalidInput, NotFound, UnknownAttribute
from medlake.index.qido import (
    DEFAULT_LIMIT,
    ExtendedTag,
    QidoQuery,
    row_key,
    search,
)
from medlake.index.schema import extended_query_tags, partitions
from medlake.ingest.archive import Archive
from medlake.types import check_uid

_RANK = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
_RESERVED = {"limit", "offset", "fuzzymatching", "includefield"}
_INSTANCE_AVAILABILITY = 0x00080056
_RETRIEVE_URL = 0x00081190


@dataclass
class SearchResult:
    """A page of DICOM JSON datasets, the total match count and any warning."""

    datasets: list[dict[str, Any]]
    total: int
    warning: str | None = None


def parse_query(
    level: Level,
    partition: str,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    extended: dict[int, ExtendedTag] | None = None,
) -> tuple[QidoQuery, set[int] | None]:
    """Build the query from URL parameters; returns it with the includefield tags
    (``None`` means ``all``). Unknown or unsupported attributes raise 400 naming them."""
    query = QidoQuery(level, partition, study_uid=study_uid, series_uid=series_uid)
    include: set[int] | None = set()
    extended = extended or {}
    for name, value in params:
        if name == "limit":
            query.limit = _non_negative(name, value)
        elif name == "offset":
            query.offset = _non_negative(name, value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise InvalidInput(f"fuzzymatching must be true or false, not {value!r}")
            query.fuzzy = value == "true"
        elif name == "includefield":
            for field_name in value.replace("\\", ",").split(","):
                if field_name == "all":
                    include = None
                elif field_name and include is not None:
                    found = lookup(field_name)
                    if found is None:
                        raise UnknownAttribute(
                            f"includefield names unknown attribute {field_name!r}"
                        )
                    include.add(found[0])
        else:
            _add_filter(query, name, value, extended)
    return query, include


def _non_negative(name: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _add_filter(query: QidoQuery, name: str, value: str, extended: dict[int, ExtendedTag]) -> None:
    if "." in name:
        raise UnknownAttribute(
            f"query attribute {name!r} is a sequence path; "
            "matching inside sequences is not supported"
        )
    found = lookup(name)
    if found is None:
        raise UnknownAttribute(f"unknown query attribute {name!r}")
    tag, keyword = found
    key = matching_key(tag, extended)
    if key is None:
        raise UnknownAttribute(
            f"attribute {keyword} ({tag:08X}) is not supported for matching; "
            "add it as an extended query tag to search on it"
        )
    add_filter(query, key, value)


def matching_key(tag: int, extended: dict[int, ExtendedTag]) -> Attribute | ExtendedTag | None:
    """What a query key on ``tag`` matches against: an indexed attribute, a ready
    extended query tag, or None when the attribute cannot be matched (QIDO-RS and
    C-FIND decide the same way)."""
    attr = BY_TAG.get(tag)
    if attr is not None and (not attr.computed or attr.keyword == "ModalitiesInStudy"):
        return attr
    return extended.get(tag)


def add_filter(query: QidoQuery, key: Attribute | ExtendedTag, value: str) -> None:
    """Add the matching key ``key`` = ``value`` to ``query``."""
    if isinstance(key, Attribute):
        query.filters.append((key, value))
    else:
        query.extended_filters.append((key, value))


def ready_extended_tags(conn: Connection) -> dict[int, ExtendedTag]:
    """The extended query tags that can be searched on (status ``ready``), by tag."""
    return {
        int(r.tag, 16): ExtendedTag(r.id, int(r.tag, 16), r.keyword or "", r.vr, Level(r.level))
        for r in conn.execute(
            select(extended_query_tags).where(extended_query_tags.c.status == "ready")
        )
    }


def run_search(
    archive: Archive,
    level: Level,
    partition: str,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    base_url: str = "",
) -> SearchResult:
    """Answer a QIDO-RS request at ``level``, scoped to a study/series when given."""
    if study_uid:
        check_uid(study_uid, "StudyInstanceUID")
    if series_uid:
        check_uid(series_uid, "SeriesInstanceUID")
    with archive.engine.connect() as conn:
        if (
            conn.execute(select(partitions.c.id).where(partitions.c.name == partition)).first()
            is None
        ):
            raise NotFound(f"partition {partition!r} does not exist")
        extended = ready_extended_tags(conn)
        query, include = parse_query(
            level, partition, params, study_uid=study_uid, series_uid=series_uid, extended=extended
        )
        result = search(conn, query)
    datasets = [to_dicom_json(row, level, include, base_url, partition) for row in result.rows]
    warning = None
    if query.offset + len(datasets) < result.total and query.limit == DEFAULT_LIMIT:
        warning = f'299 medlake "The number of results exceeded the maximum of {DEFAULT_LIMIT}"'
    return SearchResult(datasets, result.total, warning)


def to_dicom_json(
    row: Any, level: Level, include: set[int] | None, base_url: str, partition: str
) -> dict[str, Any]:
    """One QIDO result: the level's attributes (and those of the levels above), the
    requested includefield attributes, InstanceAvailability and RetrieveURL."""
    out: dict[str, Any] = {}
    for attr in ATTRIBUTES:
        if _RANK[attr.level] > _RANK[level]:
            continue
        value = row[row_key(attr.level, attr.column)]
        if level is not Level.STUDY and attr.computed and attr.level is Level.STUDY:
            continue
        out[attr.tag_hex] = _element(attr, value)
    extras: dict[str, Any] = orjson.loads(row[row_key(Level.STUDY, "extra")] or "{}")
    if level is not Level.STUDY:
        extras.update(orjson.loads(row[row_key(Level.SERIES, "extra")] or "{}"))
    for tag_hex, element in extras.items():
        if include is None or int(tag_hex, 16) in include:
            out.setdefault(tag_hex, element)
    out[f"{_INSTANCE_AVAILABILITY:08X}"] = {"vr": "CS", "Value": ["ONLINE"]}
    url = _retrieve_url(row, level, base_url)
    if url:
        out[f"{_RETRIEVE_URL:08X}"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


def _retrieve_url(row: Any, level: Level, base_url: str) -> str:
    if not base_url:
        return ""
    url = f"{base_url}/studies/{row[row_key(Level.STUDY, 'study_uid')]}"
    if level is not Level.STUDY:
        url += f"/series/{row[row_key(Level.SERIES, 'series_uid')]}"
    if level is Level.INSTANCE:
        url += f"/instances/{row[row_key(Level.INSTANCE, 'sop_uid')]}"
    return url


def person_name_json(value: str) -> dict[str, str]:
    """A PN value's component groups as DICOM JSON (PS3.18 F.2.2)."""
    groups = value.split("=")
    names = ("Alphabetic", "Ideographic", "Phonetic")
    return {name: group for name, group in zip(names, groups, strict=False) if group}


def _element(attr: Attribute, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": attr.vr}
    if attr.vr == "PN":
        return {"vr": "PN", "Value": [person_name_json(str(value))]}
    if attr.vr in ("IS", "US", "UL", "SS", "SL"):
        return {"vr": attr.vr, "Value": [int(value)]}
    if attr.vr == "CS" or attr.keyword == "SpecificCharacterSet":
        return {"vr": attr.vr, "Value": str(value).split("\\")}
    return {"vr": attr.vr, "Value": [value]}
