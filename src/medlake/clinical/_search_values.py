"""Value handling shared by the search indexer and the search query builder: string
folding, FHIR dates as ranges, decimal precision, references and escaped lists."""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from functools import lru_cache

#: Open ends of a period (no start / no end), and the clamp of ranges that would
#: overflow Python's datetime. Both databases store and compare them like any instant.
LOWEST = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
HIGHEST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)

#: Widths of the indexed text columns (values longer than this are cut, like the index).
STRING_WIDTH = 512
TOKEN_WIDTH = 256
ID_WIDTH = 64

_DATE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_RELATIVE_REFERENCE = re.compile(
    r"^(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


@lru_cache(maxsize=16384)
def fold(text: str) -> str:
    """``text`` as string search compares it: accents removed, case folded, runs of
    whitespace made one space (FHIR: matching is case- and accent-insensitive).
    Cached: an import folds the same displays and names over and over."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(stripped.casefold().split())[:STRING_WIDTH]


def date_range(text: str) -> tuple[dt.datetime, dt.datetime] | None:
    """The period a FHIR date, dateTime or instant covers, in UTC, end exclusive:
    ``2020`` is the whole year, ``2020-03-04T10:00:00+01:00`` that one second. A
    value without a zone is taken as UTC. None when ``text`` is not a FHIR date."""
    match = _DATE.match(text.strip())
    if match is None:
        return None
    parts = match.groupdict()
    try:
        year = int(parts["year"])
        month = int(parts["month"] or 1)
        day = int(parts["day"] or 1)
        zone = _zone(parts["zone"])
        if parts["hour"] is None:
            start = dt.datetime(year, month, day, tzinfo=dt.UTC)
            if parts["day"]:
                return start, _add(start, dt.timedelta(days=1))
            if parts["month"]:
                return start, _next_month(start)
            return start, _next_year(start)
        fraction = parts["fraction"] or ""
        digits = min(len(fraction), 6)
        microsecond = int(fraction[:6].ljust(6, "0")) if fraction else 0
        local = dt.datetime(
            year,
            month,
            day,
            int(parts["hour"]),
            int(parts["minute"]),
            int(parts["second"] or 0),
            microsecond,
            tzinfo=zone,
        )
    except ValueError:
        return None
    start = local.astimezone(dt.UTC) if local.year > 1 else local.replace(tzinfo=dt.UTC)
    if parts["second"] is None:
        width = dt.timedelta(minutes=1)
    elif digits:
        width = dt.timedelta(microseconds=10 ** (6 - digits))
    else:
        width = dt.timedelta(seconds=1)
    return start, _add(start, width)


def _zone(text: str | None) -> dt.tzinfo:
    if text is None or text == "Z":
        return dt.UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def _add(start: dt.datetime, width: dt.timedelta) -> dt.datetime:
    try:
        return min(start + width, HIGHEST)
    except OverflowError:
        return HIGHEST


def _next_month(start: dt.datetime) -> dt.datetime:
    if start.month == 12:
        return _next_year(start)
    return start.replace(month=start.month + 1)


def _next_year(start: dt.datetime) -> dt.datetime:
    return HIGHEST if start.year == 9999 else start.replace(year=start.year + 1, month=1)


def decimal_value(text: str) -> Decimal | None:
    """``text`` as a decimal (FHIR number syntax, exponent allowed), None if it is not one."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def precision_range(value: Decimal) -> tuple[float, float]:
    """The implicit range of a search number: half a unit of its last significant digit
    either side (``100`` is [99.5, 100.5), ``100.0`` [99.95, 100.05), ``1e2`` [50, 150))."""
    exponent = value.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1)
    return float(value - half), float(value + half)


def relative_reference(text: str) -> tuple[str, str] | None:
    """``(type, id)`` of a relative reference ``Type/id`` (a version suffix dropped)."""
    match = _RELATIVE_REFERENCE.match(text)
    if match is None:
        return None
    return match.group("type"), match.group("id")


def split_escaped(text: str, separator: str) -> list[str]:
    """Split a search value at ``separator`` except where escaped with ``\\`` (FHIR:
    ``\\,``, ``\\$``, ``\\|`` and ``\\\\`` are literal); escapes of other separators are kept
    for a later split, the separator's own escape is resolved."""
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            following = text[index + 1]
            current.append(following if following == separator else char + following)
            index += 2
            continue
        if char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    """Resolve the FHIR search escapes that remain after splitting (``\\\\``, ``\\,``...)."""
    return re.sub(r"\\([\\,$|])", r"\1", text)
