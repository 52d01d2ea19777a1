"""FHIR R4 search: a query string in, a ``searchset`` Bundle (or matching row ids) out.

Criteria become SQL (``medlake.clinical._search_sql``); this module adds the result
parameters: ``_sort``, ``_count`` and paging links, ``_include``/``_revinclude``
(``:iterate`` and ``*``), ``_summary``, ``_elements`` and ``_total``. Parameters
are ANDed when repeated and ORed within one comma-separated value. Unknown
parameters raise :class:`UnknownSearchParameter` with ``strict`` handling and are
reported in an OperationOutcome entry otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Connection, Select, and_, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

from medlake.clinical._search_sql import (
    Clause,
    CriteriaBuilder,
    InvalidSearchValue,
    UnknownSearchParameter,
    split_key,
)
from medlake.clinical.compartments import compartment_condition, compartment_patients
from medlake.clinical.resources import parse_json
from medlake.clinical.search_params import COMMON_PARAMETERS, SEARCH_PARAMETERS, parameters_of
from medlake.index.schema import fhir_resources, fhir_search_values

__all__ = [
    "DEFAULT_COUNT",
    "MAX_COUNT",
    "InvalidSearchValue",
    "UnknownSearchParameter",
    "matching_resources",
    "search_bundle",
]

DEFAULT_COUNT = 20
MAX_COUNT = 1000
#: How many rounds of ``_include:iterate`` / ``_revinclude:iterate`` are followed.
MAX_ITERATIONS = 3

#: Parameters that shape the result rather than select resources.
_RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_offset",
        "_sort",
        "_include",
        "_revinclude",
        "_summary",
        "_elements",
        "_total",
        "_type",
        "_format",
        "_pretty",
        "_contained",
        "_containedType",
    }
)
#: The tag marking a resource returned with some elements left out (``_summary``, ``_elements``).
_SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
#: Elements with ``isSummary`` in the R4 definitions, for ``_summary=true``; other types
#: lose ``text``, ``contained`` and ``extension`` only. ``x[x]`` stands for every choice.
_SUMMARY_ELEMENTS: dict[str, frozenset[str]] = {
    "Patient": frozenset(
        {"identifier", "active", "name", "telecom", "gender", "birthDate", "deceased[x]",
         "address", "managingOrganization", "link"}
    ),
    "Observation": frozenset(
        {"identifier", "basedOn", "partOf", "status", "category", "code", "subject", "focus",
         "encounter", "effective[x]", "issued", "performer", "value[x]", "hasMember",
         "derivedFrom"}
    ),
}  # fmt: skip
_ALWAYS_KEPT = frozenset({"resourceType", "id", "meta", "implicitRules"})


@dataclass
class _Query:
    """A search request split into criteria and result parameters."""

    criteria: list[tuple[str, str]] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)
    includes: list[tuple[str, bool]] = field(default_factory=list)
    revincludes: list[tuple[str, bool]] = field(default_factory=list)
    summary: str | None = None
    elements: list[str] | None = None
    total: str = "accurate"
    types: list[str] = field(default_factory=list)


def matching_resources(
    conn: Connection,
    partition_id: int,
    resource_type: str,
    query: Sequence[tuple[str, str]],
    *,
    patients: Sequence[str] | None = None,
) -> list[int]:
    """``fhir_resources.id`` of the current, non-deleted resources of ``resource_type``
    matching ``query`` (conditional create/update/delete, conditional references);
    with ``patients``, only those in these patients' compartments.

    Result parameters (``_count``, ``_sort``...) are ignored; an unknown parameter is
    an error, since ignoring it could make a conditional write hit the wrong resource.
    """
    builder = CriteriaBuilder(partition_id, "", strict=True)
    parsed = _parse(query, strict=True, builder=builder)
    statement = _matches(builder, resource_type, parsed, patients, _sqlite(conn)).with_only_columns(
        fhir_resources.c.id
    )
    return [row.id for row in conn.execute(statement.order_by(fhir_resources.c.id))]


def search_bundle(
    conn: Connection,
    partition_id: int,
    resource_type: str | None,
    query: Sequence[tuple[str, str]],
    *,
    base_url: str,
    strict: bool,
    compartments: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Search ``resource_type`` (None: every type, ``_type`` narrows) in a partition and
    return the ``searchset`` Bundle of one page; ``base_url`` is the FHIR base of the
    partition (entry ``fullUrl`` and paging links start with it). ``compartments``
    (``Patient/123``; ``None``: no limit) keep matches, included resources and the
    total to resources in those compartments.

    Raises :class:`UnknownSearchParameter` for an unknown parameter when ``strict``
    and :class:`InvalidSearchValue` for a malformed value, modifier or result parameter.
    """
    patients = compartment_patients(compartments)
    base_url = base_url.rstrip("/")
    builder = CriteriaBuilder(partition_id, base_url, strict)
    parsed = _parse(query, strict=strict, builder=builder)
    matches = _matches(builder, resource_type, parsed, patients, _sqlite(conn))
    total: int | None = None
    if parsed.total != "none" or parsed.summary == "count":
        count_query = select(func.count()).select_from(matches.subquery())
        total = int(conn.execute(count_query).scalar_one())
    rows: list[Any] = []
    has_more = False
    if parsed.summary != "count" and parsed.count > 0:
        ordered = matches.order_by(*_order_by(builder, resource_type, parsed.sort))
        fetched = conn.execute(ordered.limit(parsed.count + 1).offset(parsed.offset)).all()
        has_more = len(fetched) > parsed.count
        rows = list(fetched[: parsed.count])
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = _links(base_url, resource_type, query, parsed, total, has_more)
    entries = [_entry(base_url, row, "match", parsed) for row in rows]
    included = _included(conn, partition_id, rows, parsed, patients)
    entries.extend(_entry(base_url, row, "include", None) for row in included)
    if builder.ignored:
        entries.append(_outcome_entry(builder.ignored))
    if entries:
        bundle["entry"] = entries
    return bundle


# --- parsing --------------------------------------------------------------------------------


def _parse(query: Sequence[tuple[str, str]], *, strict: bool, builder: CriteriaBuilder) -> _Query:
    parsed = _Query()
    for key, value in query:
        name, _, modifier = key.partition(":")
        if name not in _RESULT_PARAMETERS:
            parsed.criteria.append((key, value))
        elif name == "_count":
            parsed.count = min(_non_negative(key, value), MAX_COUNT)
        elif name == "_offset":
            parsed.offset = _non_negative(key, value)
        elif name == "_sort":
            parsed.sort.extend(
                (part.lstrip("-"), part.startswith("-")) for part in value.split(",") if part
            )
        elif name in ("_include", "_revinclude"):
            if modifier not in ("", "iterate", "recurse"):
                raise InvalidSearchValue(f"unsupported modifier {modifier!r} on {name}")
            target = parsed.includes if name == "_include" else parsed.revincludes
            target.append((value, bool(modifier)))
        elif name == "_summary":
            if value not in ("true", "false", "text", "data", "count"):
                raise InvalidSearchValue(
                    f"_summary must be true, false, text, data or count, not {value!r}"
                )
            parsed.summary = None if value == "false" else value
        elif name == "_elements":
            parsed.elements = [
                part.strip().split(".")[-1] for part in value.split(",") if part.strip()
            ]
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise InvalidSearchValue(
                    f"_total must be none, estimate or accurate, not {value!r}"
                )
            parsed.total = value
        elif name == "_type":
            parsed.types.extend(part for part in value.split(",") if part)
        elif name in ("_contained", "_containedType") and value not in ("false", "container"):
            message = f"{key}={value} is not supported (contained resources are not searched)"
            if strict:
                raise UnknownSearchParameter(message)
            builder.ignored.append(message)
    return parsed


def _non_negative(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise InvalidSearchValue(f"{key} must be a non-negative integer, not {value!r}")
    return number


# --- matching --------------------------------------------------------------------------------


def _sqlite(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite"


def _matches(
    builder: CriteriaBuilder,
    resource_type: str | None,
    parsed: _Query,
    patients: Sequence[str] | None,
    with_driver: bool,
) -> Select[Any]:
    """The current resources that match ``parsed``. With ``with_driver`` (SQLite), one
    criterion drives (see :meth:`CriteriaBuilder.criterion` and :func:`_driver`).
    PostgreSQL plans the ``EXISTS`` semi-joins well with statistics; without any (a
    fresh database, no autovacuum) the ``IN`` form made it pick an index that fits
    neither the type, the parameter nor the value, and test every candidate against
    every value."""
    resource = fhir_resources
    conditions: list[Clause] = [
        resource.c.partition_id == builder.partition_id,
        resource.c.deleted.is_(False),
    ]
    if resource_type is not None:
        conditions.append(resource.c.resource_type == resource_type)
    elif parsed.types:
        conditions.append(resource.c.resource_type.in_(parsed.types))
    driver = _driver(resource_type, parsed.criteria) if with_driver else None
    for i, (key, value) in enumerate(parsed.criteria):
        clause = builder.criterion(resource, resource_type, key, value, drive=i == driver)
        if clause is not None:
            conditions.append(clause)
    if patients is not None:
        conditions.append(compartment_condition(resource, patients, resource_type))
    return select(
        resource.c.id, resource.c.resource_type, resource.c.logical_id, resource.c.content
    ).where(*conditions)


def _driver(resource_type: str | None, criteria: Sequence[tuple[str, str]]) -> int | None:
    """Which criterion drives an SQLite search: the first identifier (one resource
    each, as a rule), else the first reference (one patient's resources), else the
    first other parameter of the resource's own values; None when there is none
    (``_id``, ``_lastUpdated``, chains, ``_has``, ``:missing``, ``:not``) or no type.
    A token such as ``gender`` or ``status`` drives only when nothing better is there:
    it matches a large share of the resources."""
    if resource_type is None:
        return None
    known = parameters_of(resource_type)
    ranked: list[tuple[int, int]] = []
    for i, (key, _value) in enumerate(criteria):
        name, modifier, chain = split_key(key)
        param = known.get(name)
        if chain or param is None or name.startswith("_") or modifier in ("missing", "not"):
            continue
        if name == "identifier" and not modifier:
            rank = 0
        elif param.type == "reference" and (not modifier or modifier[:1].isupper()):
            rank = 1
        else:
            rank = 2
        ranked.append((rank, i))
    return min(ranked)[1] if ranked else None


def _order_by(
    builder: CriteriaBuilder, resource_type: str | None, sort: list[tuple[str, bool]]
) -> list[Any]:
    resource = fhir_resources
    keys: list[Any] = []
    for name, descending in sort:
        expression: ColumnElement[Any]
        if name == "_id":
            expression = resource.c.logical_id
        elif name == "_lastUpdated":
            expression = resource.c.last_updated
        else:
            param = builder.parameter(resource_type, name)
            if param is None:
                continue
            expression = _sort_value(resource, param.name, param.type, descending)
        keys.append(expression.desc().nulls_last() if descending else expression.asc().nulls_last())
    keys.append(resource.c.id)
    return keys


def _sort_value(resource: FromClause, name: str, kind: str, descending: bool) -> ColumnElement[Any]:
    """The value a resource sorts by for one parameter: its lowest value ascending, its
    highest descending (spec: a resource with several values sorts by the one that
    comes first in the requested order)."""
    values = fhir_search_values.alias()
    column: Any
    if kind == "date":
        column = values.c.date_high if descending else values.c.date_low
    elif kind in ("number", "quantity"):
        column = values.c.number_value
    elif kind == "token":
        column = values.c.token_code
    elif kind == "reference":
        column = func.coalesce(values.c.ref_type + "/" + values.c.ref_id, values.c.string_value)
    elif kind in ("string", "uri"):
        column = values.c.string_value
    else:
        raise InvalidSearchValue(f"cannot sort by the {kind} parameter {name!r}")
    aggregate = func.max(column) if descending else func.min(column)
    return (
        select(aggregate)
        .where(values.c.resource_id == resource.c.id, values.c.param == name)
        .scalar_subquery()
    )


# --- includes --------------------------------------------------------------------------------


def _included(
    conn: Connection,
    partition_id: int,
    matches: list[Any],
    parsed: _Query,
    patients: Sequence[str] | None = None,
) -> list[Any]:
    """Resources named by ``_include`` / ``_revinclude`` for this page (not the matches),
    with ``patients`` only those in their compartments."""
    if not matches or not (parsed.includes or parsed.revincludes):
        return []
    seen = {row.id for row in matches}
    found: list[Any] = []
    sources = matches
    for round_number in range(1 + MAX_ITERATIONS):
        includes = [spec for spec, iterate in parsed.includes if round_number == 0 or iterate]
        revincludes = [spec for spec, iterate in parsed.revincludes if round_number == 0 or iterate]
        if not (includes or revincludes):
            break
        new: list[Any] = []
        for row in [
            *_forward(conn, partition_id, sources, includes, patients),
            *_reverse(conn, partition_id, sources, revincludes, patients),
        ]:
            if row.id not in seen:
                seen.add(row.id)
                new.append(row)
        if not new:
            break
        found.extend(new)
        sources = new
    return found


def _include_spec(spec: str, parameter: str) -> tuple[str, str, str | None]:
    parts = spec.split(":")
    if spec == "*":
        return "*", "*", None
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidSearchValue(
            f"{parameter}={spec!r}: expected SourceType:parameter[:TargetType]"
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _reference_params(source_type: str, name: str, parameter: str) -> list[str]:
    table = parameters_of(source_type) if source_type != "*" else COMMON_PARAMETERS
    if name == "*":
        if source_type == "*":
            return sorted(
                {
                    p.name
                    for t in SEARCH_PARAMETERS.values()
                    for p in t.values()
                    if p.type == "reference"
                }
            )
        return [p.name for p in table.values() if p.type == "reference"]
    param = table.get(name)
    if param is None or param.type != "reference":
        raise InvalidSearchValue(f"{parameter}: {source_type} has no reference parameter {name!r}")
    return [name]


def _forward(
    conn: Connection,
    partition_id: int,
    sources: list[Any],
    specs: list[str],
    patients: Sequence[str] | None,
) -> list[Any]:
    rows: list[Any] = []
    for spec in specs:
        source_type, name, target_type = _include_spec(spec, "_include")
        source_ids = [row.id for row in sources if source_type in ("*", row.resource_type)]
        if not source_ids:
            continue
        params = _reference_params(source_type, name, "_include")
        target = fhir_resources.alias()
        values = fhir_search_values.alias()
        conditions = [
            values.c.resource_id.in_(source_ids),
            values.c.param.in_(params),
            target.c.partition_id == partition_id,
            target.c.deleted.is_(False),
        ]
        if target_type:
            conditions.append(target.c.resource_type == target_type)
        if patients is not None:
            conditions.append(compartment_condition(target, patients, target_type))
        statement = (
            select(target.c.id, target.c.resource_type, target.c.logical_id, target.c.content)
            .distinct()
            .select_from(values)
            .join(
                target,
                and_(
                    target.c.resource_type == values.c.ref_type,
                    target.c.logical_id == values.c.ref_id,
                ),
            )
            .where(*conditions)
            .order_by(target.c.id)
        )
        rows.extend(conn.execute(statement))
    return rows


def _reverse(
    conn: Connection,
    partition_id: int,
    targets: list[Any],
    specs: list[str],
    patients: Sequence[str] | None,
) -> list[Any]:
    by_type: dict[str, list[str]] = {}
    for row in targets:
        by_type.setdefault(row.resource_type, []).append(row.logical_id)
    rows: list[Any] = []
    for spec in specs:
        source_type, name, target_type = _include_spec(spec, "_revinclude")
        params = _reference_params(source_type, name, "_revinclude")
        wanted = {t: ids for t, ids in by_type.items() if target_type in (None, t)}
        if not wanted:
            continue
        source = fhir_resources.alias()
        values = fhir_search_values.alias()
        conditions = [
            source.c.partition_id == partition_id,
            source.c.deleted.is_(False),
            values.c.param.in_(params),
            or_(
                *(
                    and_(values.c.ref_type == t, values.c.ref_id.in_(ids))
                    for t, ids in wanted.items()
                )
            ),
        ]
        if source_type != "*":
            conditions.append(source.c.resource_type == source_type)
        if patients is not None:
            only = source_type if source_type != "*" else None
            conditions.append(compartment_condition(source, patients, only))
        statement = (
            select(source.c.id, source.c.resource_type, source.c.logical_id, source.c.content)
            .distinct()
            .select_from(source)
            .join(values, values.c.resource_id == source.c.id)
            .where(*conditions)
            .order_by(source.c.id)
        )
        rows.extend(conn.execute(statement))
    return rows


# --- the bundle ------------------------------------------------------------------------------


def _entry(base_url: str, row: Any, mode: str, parsed: _Query | None) -> dict[str, Any]:
    # parse_json keeps decimals as written (72.50 stays 72.50), as a read does.
    resource: dict[str, Any] = parse_json(row.content, "stored resource")
    if parsed is not None:
        resource = _shaped(resource, parsed)
    return {
        "fullUrl": f"{base_url}/{row.resource_type}/{row.logical_id}",
        "resource": resource,
        "search": {"mode": mode},
    }


def _shaped(resource: dict[str, Any], parsed: _Query) -> dict[str, Any]:
    """``resource`` as ``_summary`` / ``_elements`` ask, tagged SUBSETTED when cut."""
    if parsed.elements is not None:
        keep = set(parsed.elements)
        return _subset(resource, lambda name: _element_kept(name, keep))
    if parsed.summary == "true":
        listed = _SUMMARY_ELEMENTS.get(str(resource.get("resourceType")))
        if listed is None:
            return _subset(resource, lambda name: name not in ("text", "contained", "extension"))
        return _subset(resource, lambda name: _element_kept(name, listed))
    if parsed.summary == "text":
        return _subset(resource, lambda name: name == "text")
    if parsed.summary == "data":
        return _subset(resource, lambda name: name != "text")
    return resource


def _element_kept(name: str, listed: set[str] | frozenset[str]) -> bool:
    if name in listed:
        return True
    return any(
        entry.endswith("[x]")
        and name.startswith(entry[:-3])
        and name[len(entry) - 3 : len(entry) - 2].isupper()
        for entry in listed
    )


def _subset(resource: dict[str, Any], kept: Any) -> dict[str, Any]:
    result = {key: value for key, value in resource.items() if key in _ALWAYS_KEPT or kept(key)}
    meta = dict(result.get("meta") or {})
    tags = [tag for tag in meta.get("tag", []) if tag.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, dict(_SUBSETTED)]
    result["meta"] = meta
    return result


def _links(
    base_url: str,
    resource_type: str | None,
    query: Sequence[tuple[str, str]],
    parsed: _Query,
    total: int | None,
    has_more: bool,
) -> list[dict[str, str]]:
    """self/first/previous/next/last: the request's own parameters with ``_offset`` and
    ``_count`` set, so every link stays valid without server-side state."""
    kept = [(key, value) for key, value in query if key not in ("_offset", "_count")]
    root = f"{base_url}/{resource_type}" if resource_type else base_url

    def url(offset: int) -> str:
        pairs = [*kept, ("_count", str(parsed.count))]
        if offset:
            pairs.append(("_offset", str(offset)))
        return f"{root}?{urlencode(pairs, safe=',:|$*')}"

    links = [{"relation": "self", "url": url(parsed.offset)}]
    if parsed.summary == "count" or parsed.count == 0:
        return links
    links.append({"relation": "first", "url": url(0)})
    if parsed.offset > 0:
        links.append({"relation": "previous", "url": url(max(0, parsed.offset - parsed.count))})
    if has_more:
        links.append({"relation": "next", "url": url(parsed.offset + parsed.count)})
    if total is not None:
        last = max(0, (total - 1) // parsed.count * parsed.count)
        links.append({"relation": "last", "url": url(last)})
    return links


def _outcome_entry(messages: list[str]) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": f"{message}; ignored",
                }
                for message in messages
            ],
        },
        "search": {"mode": "outcome"},
    }
