"""QIDO-RS (and C-FIND) matching turned into SQL (PS3.4 C.2.2.2, PS3.18 8.3.4).

The caller (a DICOMweb or DIMSE adapter) hands over attribute/value pairs; this
module validates each value for its VR and builds one SELECT over the
study/series/instance tables. It never sees HTTP.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Select,
    and_,
    exists,
    func,
    literal,
    or_,
    select,
)

from medlake.dicom.attributes import Attribute, Level
from medlake.errors import InvalidInput
from medlake.index.extended_values import NUMERIC_VRS
from medlake.index.schema import (
    extended_query_tag_values,
    instances,
    partitions,
    series,
    studies,
)
from medlake.types import is_uid

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


@dataclass(frozen=True)
class ExtendedTag:
    """An extended query tag: an attribute indexed on request, beyond the standard set."""

    id: int
    tag: int
    keyword: str
    vr: str
    level: Level


@dataclass
class QidoQuery:
    """One search: the level, its scope from the URL, and the matching keys."""

    level: Level
    partition: str
    study_uid: str | None = None
    series_uid: str | None = None
    filters: list[tuple[Attribute, str]] = field(default_factory=list)
    extended_filters: list[tuple[ExtendedTag, str]] = field(default_factory=list)
    fuzzy: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0


@dataclass
class QidoResult:
    """Matching rows (one mapping per study/series/instance) and the total count."""

    rows: list[Any]
    total: int


def _level_from(level: Level) -> FromClause:
    if level is Level.STUDY:
        return studies
    if level is Level.SERIES:
        return series.join(studies, studies.c.id == series.c.study_id)
    return instances.join(series, series.c.id == instances.c.series_id).join(
        studies, studies.c.id == instances.c.study_id
    )


def _column(attr: Attribute, level: Level) -> Any:
    table = {Level.STUDY: studies, Level.SERIES: series, Level.INSTANCE: instances}[attr.level]
    if attr.level is Level.STUDY and attr.column == "num_instances":
        return studies.c.num_instances
    if attr.column in ("patient_name", "referring_physician_name"):
        return table.c[attr.column + "_search"]
    return table.c[attr.column]


def _key_table(level: Level) -> Any:
    return {Level.STUDY: studies, Level.SERIES: series, Level.INSTANCE: instances}[level]


def build_select(query: QidoQuery) -> Select[Any]:
    """The SELECT (without paging) that answers ``query``; columns of every level above."""
    if query.level is Level.STUDY and query.series_uid:
        raise InvalidInput("a study-level search cannot be scoped to a series")
    tables: list[tuple[Level, Any]] = [(Level.STUDY, studies)]
    if query.level in (Level.SERIES, Level.INSTANCE):
        tables.append((Level.SERIES, series))
    if query.level is Level.INSTANCE:
        tables.append((Level.INSTANCE, instances))
    stmt = select(
        *[c.label(row_key(level, c.name)) for level, table in tables for c in table.c]
    ).select_from(_level_from(query.level))
    part = select(partitions.c.id).where(partitions.c.name == query.partition).scalar_subquery()
    stmt = stmt.where(_key_table(query.level).c.partition_id == part)
    # The partition filter on the scoping table lets its unique (partition, UID) index find
    # the one study / series; without it SQLite walks the partition (scale benchmark).
    if query.study_uid:
        stmt = stmt.where(studies.c.study_uid == query.study_uid, studies.c.partition_id == part)
    if query.series_uid:
        stmt = stmt.where(series.c.series_uid == query.series_uid, series.c.partition_id == part)
    for attr, value in query.filters:
        if _level_rank(attr.level) > _level_rank(query.level):
            raise InvalidInput(
                f"attribute {attr.keyword} is a {attr.level}-level attribute and cannot be "
                f"matched in a {query.level}-level search"
            )
        try:
            condition = match_condition(attr.vr, _column(attr, query.level), value, query.fuzzy)
        except InvalidInput as exc:
            raise InvalidInput(f"{attr.keyword} ({attr.tag_hex}): {exc.message}") from exc
        if condition is not None:
            stmt = stmt.where(condition)
    for tag, value in query.extended_filters:
        try:
            stmt = stmt.where(_extended_condition(tag, value, query.level, query.fuzzy))
        except InvalidInput as exc:
            raise InvalidInput(f"{tag.keyword or f'{tag.tag:08X}'}: {exc.message}") from exc
    return stmt


def row_key(level: Level, column: str) -> str:
    """Name of a column of ``level`` in the rows :func:`search` returns."""
    return f"{level.value}__{column}"


def _level_rank(level: Level) -> int:
    return {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}[level]


def search(conn: Connection, query: QidoQuery) -> QidoResult:
    """Run ``query``: one page of rows in stable (insertion) order, and the total."""
    stmt = build_select(query)
    total = conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    return QidoResult(_page(conn, query, stmt), int(total))


def fetch_page(conn: Connection, query: QidoQuery) -> list[Any]:
    """One page of ``query``'s rows (``limit`` from ``offset``), without counting them all:
    C-FIND walks every match page by page and has no use for the total."""
    return _page(conn, query, build_select(query))


def _page(conn: Connection, query: QidoQuery, stmt: Select[Any]) -> list[Any]:
    if query.limit < 0 or query.offset < 0:
        raise InvalidInput("limit and offset must be non-negative integers")
    order = _key_table(query.level).c.id
    page = stmt.order_by(order).limit(min(query.limit, MAX_LIMIT)).offset(query.offset)
    return list(conn.execute(page).mappings())


def match_condition(
    vr: str, column: ColumnElement[Any], value: str, fuzzy: bool
) -> ColumnElement[bool] | None:
    """The SQL condition matching ``column`` against a QIDO/C-FIND key of ``vr``.

    Empty value = universal match (None). Raises InvalidInput for values that
    are not valid for the VR (bad dates, bad ranges, malformed UIDs).
    """
    if value == "":
        return None
    if vr == "UI":
        uids = [u for u in re.split(r"[\\,]", value) if u]
        for uid in uids:
            if not is_uid(uid):
                raise InvalidInput(f"{uid!r} is not a valid DICOM UID")
        return column.in_(uids)
    if vr in ("DA", "TM", "DT"):
        return _range_condition(vr, column, value)
    if vr in ("IS", "US", "UL", "SS", "SL", "SV", "UV"):
        try:
            numbers = [int(v) for v in value.split("\\")]
        except ValueError as exc:
            raise InvalidInput(f"{value!r} is not an integer") from exc
        return column.in_(numbers)
    if vr in ("FL", "FD", "DS"):
        try:
            return column == float(value)
        except ValueError as exc:
            raise InvalidInput(f"{value!r} is not a number") from exc
    values = re.split(r"[\\,]", value) if vr == "CS" else value.split("\\")
    if vr == "PN":
        values = [v.upper() for v in values]
        if fuzzy:
            return or_(*[_fuzzy_name(column, v) for v in values])
    if column is studies.c.modalities_in_study:
        return or_(
            *[(literal("\\") + column + literal("\\")).contains(f"\\{v}\\", autoescape=True)
              for v in values]
        )  # fmt: skip
    return or_(*[_wildcard(column, v) for v in values])


def _wildcard(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    if "*" not in value and "?" not in value:
        return column == value
    if value == "*":
        return column.is_not(None)
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    pattern = escaped.replace("*", "%").replace("?", "_")
    return column.like(pattern, escape="!")


def _fuzzy_name(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    """PN fuzzy matching: every word of the key is a prefix of some name component,
    case-insensitive (e.g. ``joh smi`` matches ``SMITH^JOHN``)."""
    words = [w for w in re.split(r"[\s^=,]+", value.replace("*", "")) if w]
    if not words:
        return column.is_not(None)
    spaced = literal(" ") + func.replace(func.replace(column, "^", " "), "=", " ")
    return and_(*[spaced.contains(f" {w}", autoescape=True) for w in words])


def _range_condition(vr: str, column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    check = _check_date if vr == "DA" else _check_time if vr == "TM" else _check_datetime
    if "-" not in value or (vr == "DT" and value.count("-") != 1):
        for v in value.split("\\"):
            check(v)
        return column.in_(value.split("\\"))
    low, _, high = value.partition("-")
    if not low and not high:
        raise InvalidInput(f"{value!r} is not a valid range: both ends are empty")
    conditions = []
    if low:
        check(low)
        conditions.append(column >= low)
    if high:
        check(high)
        # A time or datetime range's upper end includes everything that starts with it.
        conditions.append(column <= high if vr == "DA" else column <= high + "\uffff")
    if low and high and low > high:
        raise InvalidInput(f"range {value!r} is invalid: its start is after its end")
    return and_(*conditions)


def _check_date(value: str) -> None:
    if not _DATE.match(value):
        raise InvalidInput(f"{value!r} is not a DICOM date (YYYYMMDD)")
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError as exc:
        raise InvalidInput(f"{value!r} is not a valid date") from exc


def _check_time(value: str) -> None:
    if not _TIME.match(value) or int(value[:2]) > 23 or (len(value) >= 4 and int(value[2:4]) > 59):
        raise InvalidInput(f"{value!r} is not a DICOM time (HHMMSS.FFFFFF)")


def _check_datetime(value: str) -> None:
    if not re.match(r"^\d{4,14}(\.\d{1,6})?([+-]\d{4})?$", value):
        raise InvalidInput(f"{value!r} is not a DICOM date-time")


def _extended_condition(
    tag: ExtendedTag, value: str, level: Level, fuzzy: bool
) -> ColumnElement[bool]:
    values = extended_query_tag_values
    column = values.c.value_number if tag.vr in NUMERIC_VRS else values.c.value_text
    condition = match_condition(tag.vr, column, value.upper() if tag.vr == "PN" else value, fuzzy)
    link = {
        Level.STUDY: values.c.study_id == studies.c.id,
        Level.SERIES: values.c.series_id == series.c.id,
        Level.INSTANCE: values.c.instance_id == instances.c.id,
    }[level]
    if _level_rank(tag.level) > _level_rank(level):
        raise InvalidInput(
            f"extended query tag {tag.keyword or f'{tag.tag:08X}'} is {tag.level}-level and "
            f"cannot be matched in a {level}-level search"
        )
    clause = and_(values.c.tag_id == tag.id, link)
    if condition is not None:
        clause = and_(clause, condition)
    return exists(select(values.c.tag_id).where(clause))


__all__: Sequence[str] = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "ExtendedTag",
    "QidoQuery",
    "QidoResult",
    "build_select",
    "fetch_page",
    "match_condition",
    "row_key",
    "search",
]
