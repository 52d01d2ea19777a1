"""Extracting search parameter values from FHIR resources into ``fhir_search_values``.

The REST store calls :func:`index_resource` in the transaction that writes the
resource, so a search never sees a resource without its values (or old values of a
new version). Each parameter's element paths select elements; the parameter type
decides which typed columns a value fills (see the table comment in
``medlake.index.schema``). :func:`reindex_all` rebuilds every row after the
parameter table changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy import Connection, Engine, delete, select

from medlake.clinical._search_values import (
    HIGHEST,
    ID_WIDTH,
    LOWEST,
    STRING_WIDTH,
    TOKEN_WIDTH,
    date_range,
    fold,
    relative_reference,
)
from medlake.clinical.search_params import (
    RESOURCE_COLUMN_PARAMETERS,
    SearchParameter,
    parameters_of,
)
from medlake.index.bulk_rows import append_rows
from medlake.index.schema import fhir_resources, fhir_search_values

__all__ = ["extract_values", "index_resource", "index_resources", "reindex_all", "unindex_resource"]

Row = dict[str, Any]

_COLUMNS = (
    "string_value",
    "string_exact",
    "token_system",
    "token_code",
    "qualifier_system",
    "qualifier_code",
    "date_low",
    "date_high",
    "number_value",
    "ref_type",
    "ref_id",
)
#: HumanName and Address parts a string parameter on the whole datatype matches.
_STRING_PARTS = (
    "text",
    "family",
    "given",
    "prefix",
    "suffix",
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
)
#: The columns of a row, in the order :func:`_value_rows` gives them.
_ROW_COLUMNS = ("resource_id", "resource_type", "param", *_COLUMNS)
#: Bound of one IN list (SQLite allows 32766 variables; PostgreSQL many more).
_CHUNK = 500


def index_resource(conn: Connection, resource_pk: int, resource: dict[str, Any]) -> None:
    """Replace the search values of ``fhir_resources.id = resource_pk`` with those of
    ``resource``, in the caller's transaction."""
    index_resources(conn, [(resource_pk, resource)])


def index_resources(conn: Connection, items: Sequence[tuple[int, dict[str, Any]]]) -> None:
    """:func:`index_resource` for many resources at once (one DELETE per 500 resources,
    then every new row appended in one go): the bulk-import form."""
    for start in range(0, len(items), _CHUNK):
        conn.execute(
            delete(fhir_search_values).where(
                fhir_search_values.c.resource_id.in_(
                    [pk for pk, _ in items[start : start + _CHUNK]]
                )
            )
        )
    rows = [row for pk, resource in items for row in _value_rows(pk, resource)]
    append_rows(conn, fhir_search_values, _ROW_COLUMNS, rows)


def unindex_resource(conn: Connection, resource_pk: int) -> None:
    """Remove the search values of a resource (it was deleted), in the caller's transaction."""
    conn.execute(delete(fhir_search_values).where(fhir_search_values.c.resource_id == resource_pk))


def reindex_all(engine: Engine, *, batch_size: int = 500) -> int:
    """Rebuild ``fhir_search_values`` for every current, non-deleted resource (after the
    parameter table changed), one transaction per ``batch_size`` resources; returns how
    many resources were indexed. Values of deleted resources are removed."""
    with engine.begin() as conn:
        deleted = select(fhir_resources.c.id).where(fhir_resources.c.deleted.is_(True))
        conn.execute(
            delete(fhir_search_values).where(fhir_search_values.c.resource_id.in_(deleted))
        )
    last_id = 0
    count = 0
    while True:
        with engine.begin() as conn:
            page = conn.execute(
                select(fhir_resources.c.id, fhir_resources.c.content)
                .where(
                    fhir_resources.c.id > last_id,
                    fhir_resources.c.deleted.is_(False),
                    fhir_resources.c.content.is_not(None),
                )
                .order_by(fhir_resources.c.id)
                .limit(batch_size)
            ).all()
            if not page:
                return count
            index_resources(conn, [(row.id, json.loads(row.content)) for row in page])
        last_id = page[-1].id
        count += len(page)


def extract_values(resource: dict[str, Any]) -> list[Row]:
    """The ``fhir_search_values`` rows of ``resource`` (without ``resource_id``)."""
    return [dict(zip(_ROW_COLUMNS, row, strict=True)) for row in _value_rows(None, resource)]


@dataclass(frozen=True)
class _Plan:
    """How one parameter of a resource type is extracted: its extractor, and the
    top-level elements its paths start at (None: evaluate it on every resource, as
    ``exists()`` paths give a value for absent elements too). Skipping the parameters
    whose elements a resource lacks saves most of the work of indexing it."""

    param: SearchParameter
    heads: frozenset[str] | None


@cache
def _plans(resource_type: str) -> tuple[_Plan, ...]:
    plans = []
    for param in parameters_of(resource_type).values():
        if param.name not in RESOURCE_COLUMN_PARAMETERS:
            plans.append(_Plan(param, _heads(param)))
    return tuple(plans)


def _heads(param: SearchParameter) -> frozenset[str] | None:
    """The top-level elements without which ``param`` has no value (None: unknown)."""
    heads: set[str] = set()
    for path in param.paths:
        if path.exists:
            return None
        if path.steps:
            heads.add(path.steps[0][0])
        elif param.components:
            # A composite rooted at the resource itself: it has a value only where its
            # first component (the code) has one.
            for component_path in param.components[0].paths:
                if component_path.exists or not component_path.steps:
                    return None
                heads.add(component_path.steps[0][0])
        else:
            return None
    return frozenset(heads)


def _value_rows(resource_pk: int | None, resource: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of ``resource`` as tuples in the order of ``_ROW_COLUMNS``."""
    resource_type = str(resource.get("resourceType", ""))
    rows: list[tuple[Any, ...]] = []
    memo: _Memo = {}
    for plan in _plans(resource_type):
        if plan.heads is not None and plan.heads.isdisjoint(resource.keys()):
            continue
        seen: set[tuple[Any, ...]] = set()
        for values in _param_values(plan.param, resource, memo):
            key = tuple(map(values.get, _COLUMNS))
            if key in seen:
                continue
            seen.add(key)
            rows.append((resource_pk, resource_type, plan.param.name, *key))
    return rows


#: Values already extracted from an element of the resource being indexed, by
#: (extractor, element identity, reference targets): several parameters read the same
#: elements (``Observation.code`` feeds ``code``, ``combo-code`` and two composites).
#: The rows are never changed once made, so sharing them is safe.
#: The element is kept with its rows, so its identity cannot be reused meanwhile.
_Memo = dict[tuple[Any, int, tuple[str, ...]], tuple[Any, list[Row]]]


def _extracted(extract: Any, element: Any, param: SearchParameter, memo: _Memo) -> list[Row]:
    # Only reference values depend on the parameter (its targets).
    key = (extract, id(element), param.targets if extract is _reference_values else ())
    found = memo.get(key)
    if found is None:
        found = memo[key] = (element, extract(element, param))
    return found[1]


def _param_values(param: SearchParameter, resource: dict[str, Any], memo: _Memo) -> Iterable[Row]:
    if param.type == "composite":
        return _composite_values(param, resource, memo)
    extract = _EXTRACTORS[param.type]
    values: list[Row] = []
    for element in param.evaluate(resource):
        values.extend(_extracted(extract, element, param, memo))
    return values


def _composite_values(param: SearchParameter, resource: dict[str, Any], memo: _Memo) -> list[Row]:
    first, second = param.components[0], param.components[1]
    values: list[Row] = []
    for root in param.evaluate(resource):
        codes = [
            row
            for element in first.evaluate(root)
            for row in _extracted(_token_values, element, param, memo)
            if row.get("token_code")
        ]
        if not codes:
            continue
        extract = _EXTRACTORS[second.type]
        seconds = [
            row
            for element in second.evaluate(root)
            for row in _extracted(extract, element, param, memo)
        ]
        for code in codes:
            for value in seconds:
                values.append(
                    {
                        **value,
                        "qualifier_system": code.get("token_system"),
                        "qualifier_code": code["token_code"],
                    }
                )
    return values


def _cut(text: Any, width: int) -> str | None:
    if text is None or text == "":
        return None
    return str(text)[:width]


def _string_values(element: Any, _param: SearchParameter) -> list[Row]:
    if isinstance(element, str):
        texts = [element]
    elif isinstance(element, dict):
        texts = []
        for part in _STRING_PARTS:
            value = element.get(part)
            for one in value if isinstance(value, list) else (value,):
                if isinstance(one, str):
                    texts.append(one)
    else:
        return []
    return [
        {"string_value": fold(text), "string_exact": text[:STRING_WIDTH]}
        for text in texts
        if text.strip()
    ]


def _token_values(element: Any, _param: SearchParameter) -> list[Row]:
    if isinstance(element, bool):
        return [{"token_code": "true" if element else "false"}]
    if isinstance(element, str):
        return [{"token_code": _cut(element, TOKEN_WIDTH)}]
    if not isinstance(element, dict):
        return []
    if "value" in element:  # Identifier, ContactPoint
        row: Row = {
            "token_system": _cut(element.get("system"), TOKEN_WIDTH),
            "token_code": _cut(element.get("value"), TOKEN_WIDTH),
        }
        id_type = element.get("type")
        codings = id_type.get("coding", []) if isinstance(id_type, dict) else []
        if not codings:
            return [row]
        return [
            {
                **row,
                "qualifier_system": _cut(coding.get("system"), TOKEN_WIDTH),
                "qualifier_code": _cut(coding.get("code"), TOKEN_WIDTH),
            }
            for coding in codings
            if isinstance(coding, dict)
        ]
    if "coding" in element or "text" in element:  # CodeableConcept
        rows = [
            row for coding in element.get("coding", []) for row in _token_values(coding, _param)
        ]
        if isinstance(element.get("text"), str):
            rows.append({"string_value": fold(element["text"])})
        return rows
    if "code" in element or "system" in element:  # Coding
        display = element.get("display")
        return [
            {
                "token_system": _cut(element.get("system"), TOKEN_WIDTH),
                "token_code": _cut(element.get("code"), TOKEN_WIDTH),
                "string_value": fold(display) if isinstance(display, str) else None,
            }
        ]
    return []


def _date_values(element: Any, _param: SearchParameter) -> list[Row]:
    if isinstance(element, str):
        bounds = date_range(element)
        return [{"date_low": bounds[0], "date_high": bounds[1]}] if bounds else []
    if not isinstance(element, dict):
        return []
    if "start" in element or "end" in element:  # Period
        start = date_range(element["start"]) if isinstance(element.get("start"), str) else None
        end = date_range(element["end"]) if isinstance(element.get("end"), str) else None
        return [
            {
                "date_low": start[0] if start else LOWEST,
                "date_high": end[1] if end else HIGHEST,
            }
        ]
    rows = [row for event in element.get("event", []) for row in _date_values(event, _param)]
    repeat = element.get("repeat")
    if isinstance(repeat, dict) and isinstance(repeat.get("boundsPeriod"), dict):
        rows.extend(_date_values(repeat["boundsPeriod"], _param))
    return rows


def _number_values(element: Any, _param: SearchParameter) -> list[Row]:
    if isinstance(element, bool):
        return []
    if isinstance(element, int | float):
        return [{"number_value": float(element)}]
    if isinstance(element, str):
        try:
            return [{"number_value": float(Decimal(element))}]
        except ArithmeticError:
            return []
    return []


def _quantity_values(element: Any, param: SearchParameter) -> list[Row]:
    if not isinstance(element, dict):
        return []
    numbers = _number_values(element.get("value"), param)
    if not numbers:
        return []
    return [
        {
            **numbers[0],
            "token_system": _cut(element.get("system"), TOKEN_WIDTH),
            "token_code": _cut(element.get("code"), TOKEN_WIDTH),
            "string_value": _cut(element.get("unit"), STRING_WIDTH),
        }
    ]


def _reference_values(element: Any, param: SearchParameter) -> list[Row]:
    if isinstance(element, str):  # canonical
        return [{"string_value": _cut(element.split("|", 1)[0], STRING_WIDTH)}]
    if not isinstance(element, dict):
        return []
    row: Row = {}
    declared_type = element.get("type") if isinstance(element.get("type"), str) else None
    reference = element.get("reference")
    if isinstance(reference, str) and not reference.startswith("#"):
        relative = relative_reference(reference)
        if relative is not None:
            row["ref_type"], row["ref_id"] = relative[0], relative[1][:ID_WIDTH]
            declared_type = relative[0]
        else:
            row["string_value"] = _cut(reference, STRING_WIDTH)
    identifier = element.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value"):
        row["token_system"] = _cut(identifier.get("system"), TOKEN_WIDTH)
        row["token_code"] = _cut(identifier.get("value"), TOKEN_WIDTH)
    if not row:
        return []
    # ``where(resolve() is Patient)``: a parameter keeps only references to its targets.
    if param.targets and declared_type is not None and declared_type not in param.targets:
        return []
    if "ref_type" not in row and declared_type is not None:
        row["ref_type"] = declared_type
    return [row]


def _uri_values(element: Any, _param: SearchParameter) -> list[Row]:
    if isinstance(element, str) and element:
        return [{"string_value": element[:STRING_WIDTH]}]
    return []


_EXTRACTORS = {
    "string": _string_values,
    "token": _token_values,
    "date": _date_values,
    "number": _number_values,
    "quantity": _quantity_values,
    "reference": _reference_values,
    "uri": _uri_values,
}
