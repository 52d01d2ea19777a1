"""FHIR search criteria as SQL: one EXISTS over ``fhir_search_values`` per parameter
(on SQLite, the criterion that drives the search is an ``id IN (…)`` instead).

Every criterion becomes a boolean SQL expression on an alias of ``fhir_resources``,
so chains (``subject:Patient.name=x``) and reverse chains (``_has:...``) nest the
same builder on another alias. Nothing is filtered in Python.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, exists, false, literal, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

from medlake.clinical._search_values import (
    date_range,
    decimal_value,
    fold,
    precision_range,
    relative_reference,
    split_escaped,
    unescape,
)
from medlake.clinical.search_params import (
    COMMON_PARAMETERS,
    SEARCH_PARAMETERS,
    CompositeComponent,
    ParamType,
    SearchParameter,
    parameters_of,
)
from medlake.errors import FhirError, InvalidInput
from medlake.index.schema import fhir_resources, fhir_search_values

Clause = ColumnElement[bool]

_DECODED_PLUS_ZONE = re.compile(r"(T[0-9:.]+) (\d{2}:\d{2})$")
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

#: Modifiers each parameter type accepts (``missing`` is accepted by all, type names by
#: references).
_MODIFIERS: dict[str, frozenset[str]] = {
    "string": frozenset({"exact", "contains"}),
    "token": frozenset({"not", "text", "of-type"}),
    "uri": frozenset({"below", "above"}),
    "reference": frozenset({"identifier"}),
    "date": frozenset(),
    "number": frozenset(),
    "quantity": frozenset(),
    "composite": frozenset(),
}


class UnknownSearchParameter(FhirError, InvalidInput):
    """A search names a parameter the resource type does not have (strict handling)."""

    http_status = 400
    issue_code = "not-supported"


class InvalidSearchValue(FhirError, InvalidInput):
    """A search parameter's value or modifier is malformed or not supported."""

    http_status = 400
    issue_code = "invalid"


def split_key(key: str) -> tuple[str, str, str]:
    """A search key ``name:modifier.chain`` as (name, modifier, chain), each may be ""."""
    head, _, chain = key.partition(".")
    name, _, modifier = head.partition(":")
    return name, modifier, chain


@dataclass
class CriteriaBuilder:
    """Turns ``(name, value)`` pairs into SQL on an alias of ``fhir_resources``."""

    partition_id: int
    base_url: str
    strict: bool
    #: Unknown parameters ignored (lenient handling), for the OperationOutcome.
    ignored: list[str] = field(default_factory=list)
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    # --- entry point ------------------------------------------------------------------

    def criterion(
        self,
        resource: FromClause,
        resource_type: str | None,
        key: str,
        value: str,
        *,
        drive: bool = False,
    ) -> Clause | None:
        """The SQL condition of ``key=value`` on ``resource`` (an alias of
        ``fhir_resources`` of ``resource_type``; None = any type), or None when the
        parameter is unknown and handling is lenient.

        With ``drive`` (the criterion that drives a search on SQLite, chosen by
        :func:`medlake.clinical.search._driver`), a parameter's values are
        matched as ``id IN (values that match)``: SQLite then starts from the values,
        found through the (resource_type, param, …) indexes, instead of testing every
        resource of the type. The other criteria stay ``EXISTS`` tests of each
        candidate: as ``IN`` lists too, SQLite would first collect every resource that
        meets one (half of all patients for ``gender=male``)."""
        if key.startswith("_has:"):
            return self._reverse_chain(resource, resource_type, key, value)
        name, modifier, chain = split_key(key)
        if name == "_id":
            self._no_modifier(key, modifier, chain)
            values = [unescape(part) for part in split_escaped(value, ",")]
            return resource.c.logical_id.in_(values)
        if name == "_lastUpdated":
            self._no_modifier(key, modifier, chain)
            return or_(
                *(
                    _date_clause(
                        resource.c.last_updated, resource.c.last_updated, part, self.now, point=True
                    )
                    for part in split_escaped(value, ",")
                )
            )
        param = self.parameter(resource_type, name)
        if param is None:
            return None
        if chain:
            return self._chain(resource, resource_type, param, modifier, chain, value)
        return self._values(resource, resource_type, param, modifier, value, drive)

    def parameter(self, resource_type: str | None, name: str) -> SearchParameter | None:
        """The parameter ``name`` of ``resource_type``; unknown ones raise (strict) or are
        recorded and skipped (lenient)."""
        table = parameters_of(resource_type) if resource_type else COMMON_PARAMETERS
        param = table.get(name)
        if param is None:
            where = resource_type or "a search across all resource types"
            message = f"unknown search parameter {name!r} for {where}"
            if self.strict:
                raise UnknownSearchParameter(message)
            self.ignored.append(message)
        return param

    # --- chains --------------------------------------------------------------------------

    def _chain(
        self,
        resource: FromClause,
        resource_type: str | None,
        param: SearchParameter,
        modifier: str,
        chain: str,
        value: str,
    ) -> Clause | None:
        if param.type != "reference":
            raise InvalidSearchValue(
                f"{param.name!r} is not a reference parameter; it cannot be chained"
            )
        chained_name = chain.partition(".")[0].partition(":")[0]
        if modifier:
            targets: tuple[str, ...] = (modifier,)
        elif param.targets:
            targets = param.targets
        else:
            targets = tuple(SEARCH_PARAMETERS)
        targets = tuple(
            t
            for t in targets
            if chained_name in parameters_of(t) or chained_name.startswith("_has")
        )
        if not targets:
            self._unknown_chain(param.name, chained_name)
            return None
        target = fhir_resources.alias()
        values = fhir_search_values.alias()
        per_type: list[Clause] = []
        for target_type in targets:
            inner = self.criterion(target, target_type, chain, value)
            if inner is None:
                return None
            per_type.append(and_(target.c.resource_type == target_type, inner))
        return exists(
            select(literal(1))
            .select_from(values)
            .join(
                target,
                and_(
                    target.c.partition_id == self.partition_id,
                    target.c.resource_type == values.c.ref_type,
                    target.c.logical_id == values.c.ref_id,
                    target.c.deleted.is_(False),
                ),
            )
            .where(
                values.c.resource_id == resource.c.id,
                values.c.param == param.name,
                values.c.ref_type.in_(targets),
                or_(*per_type),
            )
        )

    def _unknown_chain(self, name: str, chained: str) -> None:
        message = f"no target of {name!r} has a search parameter {chained!r}"
        if self.strict:
            raise UnknownSearchParameter(message)
        self.ignored.append(message)

    def _reverse_chain(
        self, resource: FromClause, resource_type: str | None, key: str, value: str
    ) -> Clause | None:
        parts = key.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise InvalidSearchValue(f"{key!r}: _has needs the form _has:Type:reference:parameter")
        _, source_type, ref_name, rest = parts
        ref_param = self.parameter(source_type, ref_name)
        if ref_param is None:
            return None
        if ref_param.type != "reference":
            raise InvalidSearchValue(
                f"{key!r}: {ref_name!r} of {source_type} is not a reference parameter"
            )
        source = fhir_resources.alias()
        inner = self.criterion(source, source_type, rest, value)
        if inner is None:
            return None
        values = fhir_search_values.alias()
        own_type = literal(resource_type) if resource_type else resource.c.resource_type
        return exists(
            select(literal(1))
            .select_from(source)
            .join(values, values.c.resource_id == source.c.id)
            .where(
                source.c.partition_id == self.partition_id,
                source.c.resource_type == source_type,
                source.c.deleted.is_(False),
                values.c.param == ref_name,
                values.c.ref_type == own_type,
                values.c.ref_id == resource.c.logical_id,
                inner,
            )
        )

    # --- one parameter ------------------------------------------------------------------

    def _values(
        self,
        resource: FromClause,
        resource_type: str | None,
        param: SearchParameter,
        modifier: str,
        value: str,
        drive: bool,
    ) -> Clause:
        values = fhir_search_values.alias()

        def rows(condition: Clause) -> Clause:
            return exists(
                select(literal(1))
                .select_from(values)
                .where(
                    values.c.resource_id == resource.c.id, values.c.param == param.name, condition
                )
            )

        if modifier == "missing":
            if value not in ("true", "false"):
                raise InvalidSearchValue(
                    f"{param.name}:missing must be true or false, not {value!r}"
                )
            return not_(rows(true())) if value == "true" else rows(true())
        self._check_modifier(param, modifier)
        parts = split_escaped(value, ",")
        if param.type == "token" and modifier == "not":
            return not_(rows(or_(*(_token_clause(values, part, "") for part in parts))))
        predicate = self._predicate(param, modifier)
        condition = or_(*(predicate(values, part) for part in parts))
        if not drive or resource_type is None:  # (no index starts with the parameter alone)
            return rows(condition)
        return resource.c.id.in_(
            select(values.c.resource_id).where(
                values.c.resource_type == resource_type, values.c.param == param.name, condition
            )
        )

    def _check_modifier(self, param: SearchParameter, modifier: str) -> None:
        if not modifier:
            return
        if param.type == "reference" and modifier not in _MODIFIERS["reference"]:
            if param.targets and modifier not in param.targets:
                raise InvalidSearchValue(
                    f"{param.name}:{modifier}: {modifier!r} is not a target of {param.name!r}"
                    f" ({', '.join(param.targets)})"
                )
            if not modifier[:1].isupper():
                raise InvalidSearchValue(f"unsupported modifier {modifier!r} on {param.name!r}")
            return
        if modifier not in _MODIFIERS[param.type]:
            raise InvalidSearchValue(
                f"unsupported modifier {modifier!r} on the {param.type} parameter {param.name!r}"
            )

    def _no_modifier(self, key: str, modifier: str, chain: str) -> None:
        if modifier or chain:
            raise InvalidSearchValue(f"unsupported modifier or chain in {key!r}")

    def _predicate(
        self, param: SearchParameter, modifier: str
    ) -> Callable[[FromClause, str], Clause]:
        if param.type == "composite":
            return lambda values, text: self._composite_clause(param, values, text)
        if param.type == "reference":
            return lambda values, text: self._reference_clause(param, modifier, values, text)
        return self._typed_predicate(param.type, modifier)

    def _typed_predicate(
        self, kind: ParamType, modifier: str
    ) -> Callable[[FromClause, str], Clause]:
        if kind == "string":
            return lambda values, text: _string_clause(values, text, modifier)
        if kind == "token":
            return lambda values, text: _token_clause(values, text, modifier)
        if kind == "uri":
            return lambda values, text: _uri_clause(values, text, modifier)
        if kind == "date":
            return lambda values, text: _date_clause(
                values.c.date_low, values.c.date_high, text, self.now
            )
        if kind == "number":
            return lambda values, text: _number_clause(values, text)
        if kind == "quantity":
            return lambda values, text: _quantity_clause(values, text)
        raise InvalidSearchValue(f"parameters of type {kind} cannot be used here")

    def _reference_clause(
        self, param: SearchParameter, modifier: str, values: FromClause, text: str
    ) -> Clause:
        text = unescape(text)
        if modifier == "identifier":
            return _token_clause(values, text, "")
        base = self.base_url.rstrip("/") + "/"
        if text.startswith(base):
            text = text[len(base) :]
        relative = relative_reference(text)
        if relative is not None:
            if modifier and relative[0] != modifier:
                return false()
            return and_(values.c.ref_type == relative[0], values.c.ref_id == relative[1])
        if "/" in text or ":" in text:  # absolute URL, urn, canonical
            return values.c.string_value == text.split("|", 1)[0]
        clause = values.c.ref_id == text
        if modifier:
            return and_(clause, values.c.ref_type == modifier)
        if len(param.targets) == 1:
            return and_(clause, values.c.ref_type == param.targets[0])
        return clause

    def _composite_clause(self, param: SearchParameter, values: FromClause, text: str) -> Clause:
        parts = split_escaped(text, "$")
        if len(parts) != len(param.components):
            raise InvalidSearchValue(
                f"{param.name}={text!r}: a composite value needs"
                f" {len(param.components)} parts joined by '$'"
            )
        first: CompositeComponent = param.components[0]
        second: CompositeComponent = param.components[1]
        if first.type != "token":
            raise InvalidSearchValue(f"composite parameter {param.name!r} is not supported")
        return and_(
            _token_clause(values, parts[0], "", qualifier=True),
            self._typed_predicate(second.type, "")(values, parts[1]),
        )


# --- per-type predicates on one fhir_search_values alias --------------------------------------


def _like_pattern(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _string_clause(values: FromClause, text: str, modifier: str) -> Clause:
    text = unescape(text)
    if modifier == "exact":
        return values.c.string_exact == text
    pattern = _like_pattern(fold(text))
    if modifier == "contains":
        return values.c.string_value.like(f"%{pattern}%", escape="\\")
    return values.c.string_value.like(f"{pattern}%", escape="\\")


def _token_clause(
    values: FromClause, text: str, modifier: str, *, qualifier: bool = False
) -> Clause:
    if modifier == "text":
        pattern = _like_pattern(fold(unescape(text)))
        return or_(
            values.c.string_value.like(f"{pattern}%", escape="\\"),
            values.c.string_value.like(f"% {pattern}%", escape="\\"),
        )
    parts = [unescape(part) for part in split_escaped(text, "|")]
    if modifier == "of-type":
        if len(parts) != 3:
            raise InvalidSearchValue(f":of-type needs system|code|value, not {text!r}")
        return and_(
            values.c.qualifier_system == parts[0],
            values.c.qualifier_code == parts[1],
            values.c.token_code == parts[2],
        )
    system_column = values.c.qualifier_system if qualifier else values.c.token_system
    code_column = values.c.qualifier_code if qualifier else values.c.token_code
    if len(parts) == 1:
        return code_column == parts[0]
    if len(parts) != 2:
        raise InvalidSearchValue(f"a token is [system|]code, not {text!r}")
    system, code = parts
    if not system:
        return and_(code_column == code, system_column.is_(None))
    if not code:
        return system_column == system
    return and_(system_column == system, code_column == code)


def _uri_clause(values: FromClause, text: str, modifier: str) -> Clause:
    text = unescape(text)
    if modifier == "below":
        return values.c.string_value.like(f"{_like_pattern(text)}%", escape="\\")
    if modifier == "above":
        return literal(text).like(values.c.string_value + "%")
    return values.c.string_value == text


def _prefixed(text: str) -> tuple[str, str]:
    if text[:2] in PREFIXES and len(text) > 2:
        return text[:2], text[2:]
    return "eq", text


def _date_clause(
    low: ColumnElement[Any],
    high: ColumnElement[Any],
    text: str,
    now: dt.datetime,
    *,
    point: bool = False,
) -> Clause:
    """``low``/``high``: the target's range (high exclusive); ``point``: the target is an
    instant stored in ``low`` (``high`` is ignored), as ``_lastUpdated`` is."""
    prefix, value = _prefixed(unescape(text))
    # An unencoded "+" of a zone arrives as a space after form decoding; take it back.
    value = _DECODED_PLUS_ZONE.sub(r"\1+\2", value)
    bounds = date_range(value)
    if bounds is None:
        raise InvalidSearchValue(
            f"{text!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)"
        )
    start, end = bounds

    # For an instant t, "the target's end lies after X" means t >= X.
    def ends_after(bound: dt.datetime) -> Clause:
        return low >= bound if point else high > bound

    def ends_by(bound: dt.datetime) -> Clause:
        return low < bound if point else high <= bound

    within = and_(low >= start, ends_by(end))
    if prefix == "eq":
        return within
    if prefix == "ne":
        return not_(within)
    if prefix == "gt":
        return ends_after(end)
    if prefix == "lt":
        return low < start
    if prefix == "ge":
        return or_(ends_after(end), within)
    if prefix == "le":
        return or_(low < start, within)
    if prefix == "sa":
        return low >= end
    if prefix == "eb":
        return ends_by(start)
    # ap: the spec suggests 10% of the distance from now as the tolerance.
    tolerance = abs(now - start) / 10
    try:
        wide_start, wide_end = start - tolerance, end + tolerance
    except OverflowError:
        wide_start, wide_end = start, end
    return and_(low < wide_end, ends_after(wide_start))


def _number_condition(column: ColumnElement[Any], text: str) -> Clause:
    prefix, value = _prefixed(text)
    number = decimal_value(value)
    if number is None:
        raise InvalidSearchValue(f"{text!r} is not a number")
    lowest, highest = precision_range(number)
    exact = float(number)
    if prefix == "eq":
        return and_(column >= lowest, column < highest)
    if prefix == "ne":
        return or_(column < lowest, column >= highest)
    if prefix in ("gt", "sa"):
        return column > exact
    if prefix in ("lt", "eb"):
        return column < exact
    if prefix == "ge":
        return column >= exact
    if prefix == "le":
        return column <= exact
    spread = abs(exact) / 10
    return and_(column >= exact - spread, column <= exact + spread)


def _number_clause(values: FromClause, text: str) -> Clause:
    return _number_condition(values.c.number_value, unescape(text))


def _quantity_clause(values: FromClause, text: str) -> Clause:
    parts = [unescape(part) for part in split_escaped(text, "|")]
    if len(parts) not in (1, 3):
        raise InvalidSearchValue(f"a quantity is [prefix]number[|system|code], not {text!r}")
    clause = _number_condition(values.c.number_value, parts[0])
    if len(parts) == 1:
        return clause
    system, code = parts[1], parts[2]
    conditions = [clause]
    if system:
        conditions.append(values.c.token_system == system)
    if code:
        # Without a system the code may also be the human-readable unit (spec 3.1.1.4.7).
        conditions.append(
            values.c.token_code == code
            if system
            else or_(values.c.token_code == code, values.c.string_value == code)
        )
    return and_(*conditions)
