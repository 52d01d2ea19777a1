"""Cohort queries: patients, studies or series found by clinical and imaging criteria
together, in one SQL query that runs on SQLite and PostgreSQL.

A :class:`~medlake.clinical.cohort_model.CohortQuery` is evaluated for each *study*
(with its patient key, ``study_patients``) when any criterion depends on a study
(imaging criteria, ``within``, age at the study), and for each *patient key*
otherwise, so patients without images can be found too. Criteria become SQL:

- clinical criteria: the patient key is ``IN`` the keys of the FHIR resources that
  match (``fhir_search_values`` rows, the same FHIR search semantics as the REST API
  through :class:`~medlake.clinical._search_sql.CriteriaBuilder`), reached through
  each resource's patient reference and ``patient_records`` and computed once per
  query from the index rows of the criterion's code (or code and value); a ``within``
  window becomes the studies near such a resource, or, next to criteria that narrow
  the rows first, an ``EXISTS`` on each remaining row (see "compiling the criteria");
- demographics: the same over the patient's own Patient resources;
- study / series criteria: columns of ``studies`` and ``series``, ``instances`` for the
  SOP Class.

Counts come from the same evaluation. :func:`find_cohort` is the Python API;
``POST /cohorts`` and ``medlake cohort`` call it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    CTE,
    Connection,
    DateTime,
    FromClause,
    Select,
    and_,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from medlake.clinical._search_sql import CriteriaBuilder, _quantity_clause, _token_clause
from medlake.clinical._search_values import date_range, split_escaped, unescape
from medlake.clinical.cohort_model import (
    AllOf,
    AnyOf,
    ClinicalCriterion,
    CohortQuery,
    Comparator,
    Criterion,
    DateBounds,
    InvalidCohortQuery,
    Not,
    PatientCriterion,
    SeriesCriterion,
    StudyCriterion,
    parse_cohort_query,
)
from medlake.clinical.imaging_study import dicomweb_root
from medlake.clinical.search_params import parameters_of
from medlake.errors import InvalidInput, NotFound
from medlake.index.schema import (
    fhir_resources,
    fhir_search_values,
    instances,
    patient_identifiers,
    patient_records,
    patients,
    series,
    studies,
    study_patients,
)
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

__all__ = ["CohortCounts", "CohortResult", "find_cohort"]

Clause = ColumnElement[bool]


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortCounts:
    """How many patients, studies, series and instances the whole cohort holds."""

    patients: int
    studies: int
    series: int
    instances: int


#: Columns holding lists (JSON arrays, Parquet lists, ``;``-joined in CSV).
_LISTS = frozenset({"identifiers", "modalities"})
_INTEGERS = frozenset({"patient_key", "studies", "series_count", "instance_count", "series_number"})


@dataclass(frozen=True)
class CohortResult:
    """The rows of one page of a cohort (all rows when no limit was asked), with the
    counts of the whole cohort."""

    level: str
    fields: tuple[str, ...]
    rows: list[dict[str, Any]]
    counts: CohortCounts
    offset: int = 0
    limit: int | None = None

    @property
    def total(self) -> int:
        """Rows of the whole cohort at its level."""
        return {
            "patients": self.counts.patients,
            "studies": self.counts.studies,
            "series": self.counts.series,
        }[self.level]

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object (``rows`` of field -> value, dates as ISO text)."""
        rows = [
            {k: v.isoformat() if isinstance(v, dt.date) else v for k, v in row.items()}
            for row in self.rows
        ]
        return {
            "level": self.level,
            "counts": {
                "patients": self.counts.patients,
                "studies": self.counts.studies,
                "series": self.counts.series,
                "instances": self.counts.instances,
            },
            "total": self.total,
            "offset": self.offset,
            "limit": self.limit,
            "fields": list(self.fields),
            "rows": rows,
        }

    def to_csv(self) -> bytes:
        """The rows as CSV (UTF-8, header line, lists joined with ``;``)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.fields)
        for row in self.rows:
            writer.writerow([_csv_value(row[f]) for f in self.fields])
        return out.getvalue().encode()

    def to_arrow(self) -> Any:
        """The rows as a ``pyarrow.Table`` (typed columns: integers, dates, lists)."""
        # Imported here: only the Arrow outputs pay for loading pyarrow.
        import pyarrow as pa

        arrays = []
        for name in self.fields:
            values = [row[name] for row in self.rows]
            if name in _INTEGERS:
                kind: Any = pa.int64()
            elif name == "study_date":
                kind = pa.date32()
            elif name in _LISTS:
                kind = pa.list_(pa.string())
            else:
                kind = pa.string()
            arrays.append(pa.array(values, type=kind))
        return pa.Table.from_arrays(arrays, names=list(self.fields))

    def to_parquet(self) -> bytes:
        """The rows as a Parquet file."""
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(self.to_arrow(), sink)
        return sink.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


# --- dates moved in SQL ------------------------------------------------------------------------


class _ShiftedDay(FunctionElement[dt.datetime]):
    """A TIMESTAMP column moved by whole years and days (cohort time windows)."""

    type = DateTime(timezone=True)
    name = "shifted_day"
    inherit_cache = True


@compiles(_ShiftedDay, "sqlite")
def _shift_sqlite(element: _ShiftedDay, compiler: SQLCompiler, **kw: Any) -> str:
    column, years, days = (compiler.process(c, **kw) for c in element.clauses)
    # SQLAlchemy stores SQLite times as 'YYYY-MM-DD HH:MM:SS.ffffff'; strftime gives
    # milliseconds, so three zeros make the text compare like the stored values.
    return (
        f"(strftime('%Y-%m-%d %H:%M:%f', {column}, printf('%+d years', {years}), "
        f"printf('%+d days', {days})) || '000')"
    )


@compiles(_ShiftedDay, "postgresql")
def _shift_postgresql(element: _ShiftedDay, compiler: SQLCompiler, **kw: Any) -> str:
    column, years, days = (compiler.process(c, **kw) for c in element.clauses)
    return f"({column} + make_interval(years => {years}, days => {days}))"


def _shifted(column: ColumnElement[Any], *, years: int = 0, days: int = 0) -> ColumnElement[Any]:
    return _ShiftedDay(column, literal(years), literal(days))


# --- compiling the criteria ---------------------------------------------------------------
#
# The statement's shape does not rest on row estimates (PostgreSQL takes resource_type,
# param and token_code for independent columns and estimated one row for each clinical
# subquery; with nested loops on that estimate the example query read 252 million rows):
#
# - a clinical criterion becomes the patient keys it holds for (with a time window: the
#   studies), computed once for the statement from the one index range every matching
#   resource is in (the code's rows, or the (code, value) pairs' rows), in a common
#   table expression that PostgreSQL must materialise; rows are then tested by ``IN``.
# - time windows and demographics next to criteria that narrow the rows (imaging,
#   clinical criteria without a window) are tested against the candidate rows those
#   leave, materialised first, from each candidate patient's own resources: the
#   example's window then looks at 2,700 candidates, not at every HbA1c of the archive.


@dataclass
class _Scope:
    """What the criteria are evaluated against."""

    partition_pk: int
    builder: CriteriaBuilder
    #: The patient key of the row (``study_patients.patient_id`` or ``patients.id``).
    patient: ColumnElement[Any]
    #: The study row and its date (None when evaluated per patient).
    study: FromClause | None
    study_day: ColumnElement[Any] | None
    #: The series row (level ``series`` only).
    series: FromClause | None
    today: dt.date
    #: Numbers the common table expressions of the statement.
    names: Iterator[int] = field(default_factory=lambda: itertools.count(1))


def _once(query: Select[Any], scope: _Scope, name: str) -> CTE:
    """``query`` as a common table expression computed once per statement."""
    cte = query.cte(f"{name}_{next(scope.names)}")
    # PostgreSQL would otherwise fold it into the outer query and plan both together.
    return cte.prefix_with("MATERIALIZED", dialect="postgresql")


def _top_level(where: Criterion) -> tuple[list[Criterion], list[Criterion]]:
    """The items of the outermost ``all`` split into (narrowing, per row): time windows
    and demographics are tested on the candidate rows when something else narrows the
    rows first."""
    items: list[Criterion] = list(where.items) if isinstance(where, AllOf) else [where]
    late = [item for item in items if _checked_per_row(item)]
    early = [item for item in items if not _checked_per_row(item)]
    if not early:
        return items, []
    return early, late


def _checked_per_row(criterion: Criterion) -> bool:
    if isinstance(criterion, ClinicalCriterion):
        return criterion.within is not None
    return isinstance(criterion, PatientCriterion)


def _compile(criterion: Criterion, scope: _Scope) -> Clause:
    if isinstance(criterion, AllOf):
        return and_(*(_compile(item, scope) for item in criterion.items))
    if isinstance(criterion, AnyOf):
        return or_(*(_compile(item, scope) for item in criterion.items))
    if isinstance(criterion, Not):
        return not_(_compile(criterion.item, scope))
    if isinstance(criterion, ClinicalCriterion):
        return _clinical(criterion, scope)
    if isinstance(criterion, PatientCriterion):
        return _patient(criterion, scope)
    if isinstance(criterion, StudyCriterion):
        return _study(criterion, scope)
    return _series(criterion, scope)


def _compile_per_row(criterion: Criterion, scope: _Scope) -> Clause:
    """A criterion of :func:`_top_level`'s second list."""
    if isinstance(criterion, ClinicalCriterion):
        return _clinical_in_window(criterion, scope)
    return _compile(criterion, scope)


def _search(
    scope: _Scope, path: str, resource: FromClause, kind: str, key: str, value: str
) -> Clause:
    """One FHIR search criterion on ``resource`` (REST search semantics)."""
    try:
        clause = scope.builder.criterion(resource, kind, key, value)
    except InvalidInput as exc:
        raise InvalidCohortQuery(f"{path}: {exc.message}") from exc
    assert clause is not None  # strict: an unknown parameter raised
    return clause


def _code_of(token: str) -> str:
    """The code part of a ``system|code`` token (what the index stores in token_code)."""
    return unescape(split_escaped(token, "|")[-1])


def _reference_param(resource_type: str) -> str:
    return "patient" if "patient" in parameters_of(resource_type) else "subject"


#: The composite search parameter pairing a resource's ``code`` with its ``value-quantity``.
_CODE_VALUE = "code-value-quantity"


def _pairs_code_and_value(resource_type: str) -> bool:
    """Whether ``code-value-quantity`` of the type pairs exactly its ``code`` and
    ``value-quantity`` values (Observation). A resource has one value, so "a code of
    the list and a value in range" is then "a (code, value) pair with both", one index
    row instead of two lookups per resource."""
    params = parameters_of(resource_type)
    pair, code, value = params.get(_CODE_VALUE), params.get("code"), params.get("value-quantity")
    if pair is None or code is None or value is None or len(pair.components) != 2:
        return False
    first, second = pair.components
    return (
        all(not path.steps for path in pair.paths)
        and first.paths == code.paths
        and second.paths == value.paths
    )


def _escape_composite(token: str) -> str:
    """A token as the first part of a composite value: ``$`` separates the parts."""
    out, escaped = [], False
    for char in token:
        if char == "$" and not escaped:
            out.append("\\")
        out.append(char)
        escaped = char == "\\" and not escaped
    return "".join(out)


def _quantity(c: ClinicalCriterion, op: Comparator, number: str) -> str:
    """One ``value`` comparison as a FHIR quantity search value."""
    value = f"{op}{number}"
    if c.unit or c.unit_system:
        value += f"|{_escape(c.unit_system or '')}|{_escape(c.unit or '')}"
    return value


def _driver(c: ClinicalCriterion) -> tuple[Select[Any], bool] | None:
    """The ids of the resources matching ``c``'s code and value, read from one index
    range of ``fhir_search_values``, and whether they are exactly those (True) or a
    superset that the FHIR search conditions must still check; None when no index
    narrows the type's resources."""
    kind = c.resource
    v = fhir_search_values.alias()
    codes = [_code_of(token) for token in c.codes]
    if codes and all(codes):
        # A resource matches the codes when one of its code rows matches a token. For
        # Observation the (code, value) pair rows hold the value too; otherwise a value
        # is compared on another row of the resource, by the search conditions.
        paired = bool(c.value) and _pairs_code_and_value(kind)
        try:
            if paired:
                tokens = [_token_clause(v, token, "", qualifier=True) for token in c.codes]
                values = [_quantity_clause(v, _quantity(c, op, n)) for op, n in c.value]
                where = [v.c.param == _CODE_VALUE, v.c.qualifier_code.in_(codes), *values]
            else:
                tokens = [_token_clause(v, token, "") for token in c.codes]
                where = [v.c.param == "code", v.c.token_code.in_(codes)]
        except InvalidInput as exc:
            raise InvalidCohortQuery(f"{c.path}: {exc.message}") from exc
        query = select(v.c.resource_id).where(v.c.resource_type == kind, *where, or_(*tokens))
        return query, paired or not c.value
    ranges = [(op, number) for op, number in c.value if op in ("gt", "ge", "lt", "le")]
    if ranges:
        # Rows with the first comparison's value (and unit): every match has one.
        op, number = ranges[0]
        value = _quantity_clause(v, _quantity(c, op, number))
        where = [v.c.resource_type == kind, v.c.param == "value-quantity", value]
        return select(v.c.resource_id).where(*where), False
    return None


@dataclass(frozen=True)
class _Resources:
    """A clinical criterion's resources, with the patient key each belongs to."""

    resource: FromClause
    record: FromClause
    #: resource ⋈ its patient reference ⋈ ``patient_records``.
    joined: FromClause
    #: The criterion's FHIR search conditions on ``resource``.
    conditions: list[Clause]


def _code_and_value(c: ClinicalCriterion, scope: _Scope, r: FromClause) -> list[Clause]:
    """The FHIR search conditions of ``c``'s code and value on ``r``."""
    kind = c.resource
    if c.codes and c.value and _pairs_code_and_value(kind):
        tokens = ",".join(_escape_composite(token) for token in c.codes)
        return [
            _search(
                scope, f"{c.path}.value", r, kind, _CODE_VALUE, f"{tokens}${_quantity(c, op, n)}"
            )
            for op, n in c.value
        ]
    conditions = []
    if c.codes:
        conditions.append(_search(scope, f"{c.path}.code", r, kind, "code", ",".join(c.codes)))
    for op, n in c.value:
        conditions.append(
            _search(scope, f"{c.path}.value", r, kind, "value-quantity", _quantity(c, op, n))
        )
    return conditions


def _resources(c: ClinicalCriterion, scope: _Scope, *, coded: bool = False) -> _Resources:
    """``coded``: the resources come from an exact :func:`_driver`, so the conditions
    leave out the code and value."""
    kind = c.resource
    r = fhir_resources.alias()
    subject = fhir_search_values.alias()
    record = patient_records.alias()
    # Not ``deleted``: a deleted resource has no search values, so no patient reference.
    conditions: list[Clause] = [r.c.partition_id == scope.partition_pk, r.c.resource_type == kind]
    if not coded:
        conditions += _code_and_value(c, scope, r)
    if c.date is not None:
        assert c.date_param is not None
        for op, text in c.date.comparisons:
            conditions.append(_search(scope, f"{c.path}.date", r, kind, c.date_param, op + text))
    for key, value in c.search:
        conditions.append(_search(scope, f"{c.path}.search", r, kind, key, value))
    joined = r.join(
        subject,
        and_(
            subject.c.resource_id == r.c.id,
            subject.c.resource_type == kind,
            subject.c.param == _reference_param(kind),
            subject.c.ref_type == "Patient",
        ),
    ).join(
        record,
        and_(record.c.partition_id == scope.partition_pk, record.c.fhir_id == subject.c.ref_id),
    )
    return _Resources(r, record, joined, conditions)


def _window_days(c: ClinicalCriterion) -> tuple[int, int]:
    """The window as days from the study date: first day, and the day after the last."""
    assert c.within is not None
    days = c.within.days
    return {
        "before": (-days, 1),
        "after": (0, days + 1),
        "around": (-days, days + 1),
    }[c.within.relation]


def _clinical(c: ClinicalCriterion, scope: _Scope) -> Clause:
    """The set form: the patient keys the criterion holds for (with a window: the
    studies), computed once."""
    driver = _driver(c)
    found = _resources(c, scope, coded=driver is not None and driver[1])
    r, record = found.resource, found.record
    conditions = list(found.conditions)
    if driver is not None:
        ids = _once(driver[0], scope, "index_rows")
        conditions.append(r.c.id.in_(select(ids.c.resource_id)))
    if c.within is None:
        keys = select(record.c.patient_id).select_from(found.joined).where(*conditions)
        matched = _once(keys, scope, "patients")
        return scope.patient.in_(select(matched.c.patient_id))
    if scope.study is None or scope.study_day is None:
        raise InvalidCohortQuery(f"{c.path}.within: needs a study")
    when = fhir_search_values.alias()
    dated = found.joined.join(
        when, and_(when.c.resource_id == r.c.id, when.c.param == c.date_param)
    )
    events = _once(
        select(record.c.patient_id, when.c.date_low).select_from(dated).where(*conditions),
        scope,
        "events",
    )
    low, high = _window_days(c)
    linked = study_patients.alias()
    near = (
        select(linked.c.study_id)
        .select_from(linked.join(events, events.c.patient_id == linked.c.patient_id))
        .where(
            linked.c.partition_id == scope.partition_pk,
            events.c.date_low >= _shifted(linked.c.study_date, days=low),
            events.c.date_low < _shifted(linked.c.study_date, days=high),
        )
    )
    return scope.study.c.id.in_(near)


def _clinical_in_window(c: ClinicalCriterion, scope: _Scope) -> Clause:
    """The per-row form of a time window: the row's patient has a matching resource
    dated within the window around the row's study."""
    if scope.study_day is None:
        raise InvalidCohortQuery(f"{c.path}.within: needs a study")
    found = _resources(c, scope)
    low, high = _window_days(c)
    when = fhir_search_values.alias()
    in_window = exists(
        select(literal(1))
        .where(
            when.c.resource_id == found.resource.c.id,
            when.c.param == c.date_param,
            when.c.date_low >= _shifted(scope.study_day, days=low),
            when.c.date_low < _shifted(scope.study_day, days=high),
        )
        .correlate_except(when)  # the study's row is two queries out: name it correlated
    )
    # From the patient's own resources of the type (reference index), each checked
    # against the criteria and the window.
    return exists(
        select(literal(1))
        .select_from(found.joined)
        .where(found.record.c.patient_id == scope.patient, in_window, *found.conditions)
    )


def _escape(text: str) -> str:
    for char in ("\\", ",", "$", "|"):
        text = text.replace(char, "\\" + char)
    return text


def _minus_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a year without one
        return day.replace(year=day.year - years, day=28)


def _patient(c: PatientCriterion, scope: _Scope) -> Clause:
    record = patient_records.alias()
    person = fhir_resources.alias()
    joined = record.join(
        person,
        and_(
            person.c.partition_id == scope.partition_pk,
            person.c.resource_type == "Patient",
            person.c.logical_id == record.c.fhir_id,
            person.c.deleted.is_(False),
        ),
    )
    conditions: list[Clause] = [record.c.partition_id == scope.partition_pk]
    if c.genders:
        gender = _search(
            scope, f"{c.path}.gender", person, "Patient", "gender", ",".join(c.genders)
        )
        conditions.append(gender)
    if c.birthdate is not None:
        for op, text in c.birthdate.comparisons:
            where = f"{c.path}.birthdate"
            conditions.append(_search(scope, where, person, "Patient", "birthdate", op + text))
    at_study: list[Clause] = []
    born = fhir_search_values.alias()
    for op, years in c.age:
        # age >= n: born on or before the day n years back; age <= n: after the day n+1 back.
        oldest = {"ge": years, "gt": years + 1, "le": None, "lt": None}[op]
        youngest = {"le": years + 1, "lt": years, "ge": None, "gt": None}[op]
        if youngest == 0:
            return false()
        if c.age_at == "today":
            if oldest is not None:
                day = _minus_years(scope.today, oldest).isoformat()
                conditions.append(
                    _search(scope, c.path, person, "Patient", "birthdate", f"le{day}")
                )
            if youngest is not None:
                day = _minus_years(scope.today, youngest).isoformat()
                conditions.append(
                    _search(scope, c.path, person, "Patient", "birthdate", f"gt{day}")
                )
            continue
        if scope.study_day is None:
            raise InvalidCohortQuery(f"{c.path}.age.at: needs a study")
        if oldest is not None:
            at_study.append(born.c.date_low <= _shifted(scope.study_day, years=-oldest))
        if youngest is not None:
            at_study.append(born.c.date_low > _shifted(scope.study_day, years=-youngest))
    # Correlated: demographics rarely narrow much (half the patients are women), so they
    # are checked on the rows the other criteria left, from the patient's own records.
    if not at_study:
        return exists(
            select(literal(1))
            .select_from(joined)
            .where(record.c.patient_id == scope.patient, *conditions)
        )
    return exists(
        select(literal(1))
        .select_from(joined.join(born, and_(born.c.resource_id == person.c.id,
                                            born.c.param == "birthdate")))
        .where(record.c.patient_id == scope.patient, *conditions, *at_study)
    )  # fmt: skip


def _dicom_day(text: str, path: str) -> tuple[str, str]:
    """The first day of a FHIR date and the day after its end, as DICOM DA text."""
    bounds = date_range(text)
    if bounds is None:  # parse_cohort_query checked it
        raise InvalidCohortQuery(f"{path}: {text!r} is not a FHIR date")
    start, end = bounds
    last = end - dt.timedelta(microseconds=1)
    return start.strftime("%Y%m%d"), (last.date() + dt.timedelta(days=1)).strftime("%Y%m%d")


def _day_clause(column: ColumnElement[Any], bounds: DateBounds, path: str) -> Clause:
    clauses: list[Clause] = []
    for op, text in bounds.comparisons:
        first, after = _dicom_day(text, path)
        within = and_(column >= first, column < after)
        compare: dict[Comparator, Clause] = {
            "eq": within,
            "ne": not_(within),
            "gt": column >= after,
            "ge": column >= first,
            "lt": column < first,
            "le": column < after,
        }
        clauses.append(compare[op])
    return and_(*clauses)


def _contains(column: ColumnElement[Any], text: str) -> Clause:
    pattern = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return func.lower(column).like(f"%{pattern}%", escape="\\")


def _study(c: StudyCriterion, scope: _Scope) -> Clause:
    st = scope.study
    if st is None:
        raise InvalidCohortQuery(f"{c.path}: needs a study")
    conditions: list[Clause] = []
    if c.date is not None:
        conditions.append(_day_clause(st.c.study_date, c.date, f"{c.path}.date"))
    if c.description is not None:
        conditions.append(_contains(st.c.study_description, c.description))
    if c.modalities:
        conditions.append(
            st.c.id.in_(
                select(series.c.study_id).where(
                    series.c.partition_id == scope.partition_pk,
                    series.c.modality.in_(c.modalities),
                )
            )
        )
    if c.accession_numbers:
        conditions.append(st.c.accession_number.in_(c.accession_numbers))
    if c.study_uids:
        conditions.append(st.c.study_uid.in_(c.study_uids))
    return and_(*conditions)


def _series_conditions(c: SeriesCriterion, one: FromClause) -> list[Clause]:
    conditions: list[Clause] = []
    if c.modalities:
        conditions.append(one.c.modality.in_(c.modalities))
    if c.body_parts:
        conditions.append(func.upper(one.c.body_part_examined).in_(c.body_parts))
    if c.description is not None:
        conditions.append(_contains(one.c.series_description, c.description))
    if c.sop_classes:
        conditions.append(
            exists(
                select(literal(1)).where(
                    instances.c.series_id == one.c.id,
                    instances.c.sop_class_uid.in_(c.sop_classes),
                )
            )
        )
    return conditions


def _series(c: SeriesCriterion, scope: _Scope) -> Clause:
    if scope.series is not None:
        return and_(*_series_conditions(c, scope.series))
    if scope.study is None:
        raise InvalidCohortQuery(f"{c.path}: needs a study")
    one = series.alias()
    return scope.study.c.id.in_(
        select(one.c.study_id).where(
            one.c.partition_id == scope.partition_pk, *_series_conditions(c, one)
        )
    )


# --- running ------------------------------------------------------------------------------


def _dicom_date(value: str | None) -> dt.date | None:
    if not value or len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def find_cohort(
    archive: Archive,
    query: CohortQuery | dict[str, Any] | str | bytes,
    *,
    partition: str | None = None,
    base_url: str | None = None,
) -> CohortResult:
    """Run a cohort query (a :class:`CohortQuery`, or its JSON) and return its rows and
    counts.

    ``partition`` is used when the query names none (default ``default``);
    ``base_url`` is the root URL for the DICOMweb URLs of the rows (default
    ``public_base_url``). 400 for an invalid query, 404 for an unknown partition.
    """
    parsed = query if isinstance(query, CohortQuery) else parse_cohort_query(query)
    name = parsed.partition or partition or DEFAULT_PARTITION
    root = dicomweb_root(archive.settings, name, base_url=base_url)
    with archive.engine.connect() as conn:
        partition_pk = partition_id(conn, name, create=False)
        if partition_pk is None:
            raise NotFound(f"partition {name!r} does not exist")
        builder = CriteriaBuilder(partition_pk, "", strict=True)
        if parsed.level == "patients" and not parsed.needs_study:
            return _by_patient(conn, parsed, partition_pk, builder)
        return _by_study(conn, parsed, partition_pk, builder, root)


@dataclass(frozen=True)
class _PatientRow:
    key: int
    fhir_id: str
    studies: int


def _fhir_ids(conn: Connection, keys: list[int]) -> dict[int, str]:
    """The FHIR Patient id of each patient key."""
    if not keys:
        return {}
    rows = conn.execute(select(patients.c.id, patients.c.fhir_id).where(patients.c.id.in_(keys)))
    return {int(row.id): str(row.fhir_id) for row in rows}


def _window(query: CohortQuery) -> slice:
    """The rows of the page asked for."""
    end = None if query.limit is None else query.offset + query.limit
    return slice(query.offset, end)


def _by_study(
    conn: Connection, query: CohortQuery, partition_pk: int, builder: CriteriaBuilder, root: str
) -> CohortResult:
    st, sp, p = studies, study_patients, patients
    linked = st.join(sp, sp.c.study_id == st.c.id)
    se = series.alias() if query.level == "series" else None
    if se is not None:
        linked = linked.join(se, se.c.study_id == st.c.id)
    scope = _Scope(partition_pk, builder, sp.c.patient_id, st, sp.c.study_date,
                   se, dt.datetime.now(dt.UTC).date())  # fmt: skip
    early, late = _top_level(query.where) if query.where is not None else ([], [])
    # One evaluation of the criteria: the keys of every matching row, in output order;
    # the counts are taken from them and the page's details fetched by primary key.
    keys: list[ColumnElement[Any]] = [st.c.id, sp.c.patient_id, st.c.num_series, st.c.num_instances]
    order: list[ColumnElement[Any]] = [st.c.id]
    if se is not None:
        keys += [se.c.id.label("series_pk"), se.c.num_instances.label("series_instances")]
        order += [se.c.series_number, se.c.id]
    where = [st.c.partition_id == partition_pk, *(_compile(item, scope) for item in early)]
    statement = select(*keys).select_from(linked).where(*where)
    if late:
        # The narrowing criteria once, then the per-row ones on the rows they left.
        extra = [sp.c.study_date] + ([se.c.series_number] if se is not None else [])
        candidates = _once(statement.add_columns(*extra), scope, "candidates")
        row_scope = replace(scope, patient=candidates.c.patient_id,
                            study_day=candidates.c.study_date, study=None, series=None)  # fmt: skip
        statement = select(*(candidates.c[key.name] for key in keys)).where(
            *(_compile_per_row(item, row_scope) for item in late)
        )
        order = [candidates.c.id]
        if se is not None:
            order += [candidates.c.series_number, candidates.c.series_pk]
    matches = conn.execute(statement.order_by(*order)).all()
    study_sizes = {m.id: (m.num_series, m.num_instances) for m in matches}
    counts = CohortCounts(
        patients=len({m.patient_id for m in matches}),
        studies=len(study_sizes),
        series=len(matches) if se is not None else sum(n for n, _ in study_sizes.values()),
        instances=sum(m.series_instances for m in matches)
        if se is not None
        else sum(n for _, n in study_sizes.values()),
    )
    if query.level == "patients":
        per_patient: dict[int, int] = {}
        for m in matches:
            per_patient[m.patient_id] = per_patient.get(m.patient_id, 0) + 1
        chosen = sorted(per_patient)[_window(query)]
        fhir_ids = _fhir_ids(conn, chosen)
        rows = [_PatientRow(key, fhir_ids[key], per_patient[key]) for key in chosen]
        return _patient_rows(conn, query, rows, counts)
    page = matches[_window(query)]
    if not page:
        return CohortResult(query.level, query.columns, [], counts, query.offset, query.limit)
    columns = [
        p.c.id.label("patient_key"), p.c.fhir_id, st.c.patient_id, st.c.study_uid,
        st.c.study_date, st.c.study_description, st.c.accession_number,
        st.c.modalities_in_study, st.c.num_series, st.c.num_instances,
    ]  # fmt: skip
    if se is not None:
        columns += [
            se.c.series_uid, se.c.series_number, se.c.modality, se.c.body_part_examined,
            se.c.series_description, se.c.num_instances.label("series_instances"),
        ]  # fmt: skip
        chosen = [m.series_pk for m in page]
        detail = select(*columns, se.c.id.label("pk")).where(se.c.id.in_(chosen))
    else:
        chosen = [m.id for m in page]
        detail = select(*columns, st.c.id.label("pk")).where(st.c.id.in_(chosen))
    named = linked.join(p, p.c.id == sp.c.patient_id)
    found = {row.pk: row for row in conn.execute(detail.select_from(named))}
    out = []
    for row in (found[pk] for pk in chosen):
        study_url = f"{root}/studies/{row.study_uid}"
        values: dict[str, Any] = {
            "patient_key": row.patient_key,
            "patient": row.fhir_id,
            "patient_id": row.patient_id,
            "study_uid": row.study_uid,
            "study_date": _dicom_date(row.study_date),
            "study_description": row.study_description,
            "accession_number": row.accession_number,
            "modalities": [m for m in (row.modalities_in_study or "").split("\\") if m],
            "series_count": row.num_series,
            "instance_count": row.num_instances,
            "imaging_study": f"ImagingStudy/{row.study_uid}",
            "dicomweb_url": study_url,
        }
        if se is not None:
            values.update(
                series_uid=row.series_uid,
                series_number=row.series_number,
                modality=row.modality,
                body_part=row.body_part_examined,
                series_description=row.series_description,
                instance_count=row.series_instances,
                dicomweb_url=f"{study_url}/series/{row.series_uid}",
            )
        out.append({name: values[name] for name in query.columns})
    return CohortResult(query.level, query.columns, out, counts, query.offset, query.limit)


def _by_patient(
    conn: Connection, query: CohortQuery, partition_pk: int, builder: CriteriaBuilder
) -> CohortResult:
    p = patients
    scope = _Scope(partition_pk, builder, p.c.id, None, None, None,
                   dt.datetime.now(dt.UTC).date())  # fmt: skip
    early, late = _top_level(query.where) if query.where is not None else ([], [])
    where = [p.c.partition_id == partition_pk, p.c.merged_into.is_(None)]
    statement = select(p.c.id).where(*where, *(_compile(item, scope) for item in early))
    order: ColumnElement[Any] = p.c.id
    if late:
        candidates = _once(statement, scope, "candidates")
        row_scope = replace(scope, patient=candidates.c.id)
        statement = select(candidates.c.id).where(
            *(_compile_per_row(item, row_scope) for item in late)
        )
        order = candidates.c.id
    # One evaluation of the criteria: every matching key; the page and counts from them.
    matched = list(conn.execute(statement.order_by(order)).scalars())
    linked = study_patients.join(studies, studies.c.id == study_patients.c.study_id)
    per_patient: dict[int, int] = dict.fromkeys(matched, 0)
    n_series = n_instances = 0
    for start in range(0, len(matched), 500):
        found = conn.execute(
            select(study_patients.c.patient_id, studies.c.num_series, studies.c.num_instances)
            .select_from(linked)
            .where(study_patients.c.patient_id.in_(matched[start : start + 500]))
        )
        for row in found:
            per_patient[row.patient_id] += 1
            n_series += row.num_series
            n_instances += row.num_instances
    counts = CohortCounts(len(matched), sum(per_patient.values()), n_series, n_instances)
    chosen = matched[_window(query)]
    fhir_ids = _fhir_ids(conn, chosen)
    rows = [_PatientRow(key, fhir_ids[key], per_patient[key]) for key in chosen]
    return _patient_rows(conn, query, rows, counts)


def _patient_rows(
    conn: Connection, query: CohortQuery, rows: Any, counts: CohortCounts
) -> CohortResult:
    keys = [row.key for row in rows]
    identifiers: dict[int, list[str]] = {key: [] for key in keys}
    for start in range(0, len(keys), 500):
        found = conn.execute(
            select(patient_identifiers.c.patient_id, patient_identifiers.c.system,
                   patient_identifiers.c.value)
            .where(patient_identifiers.c.patient_id.in_(keys[start : start + 500]))
            .order_by(patient_identifiers.c.id)
        )  # fmt: skip
        for row in found:
            text = f"{row.system}|{row.value}" if row.system else row.value
            identifiers[row.patient_id].append(text)
    out = []
    for row in rows:
        values = {
            "patient_key": row.key,
            "patient": row.fhir_id,
            "identifiers": identifiers[row.key],
            "studies": row.studies,
        }
        out.append({name: values[name] for name in query.columns})
    return CohortResult(query.level, query.columns, out, counts, query.offset, query.limit)
