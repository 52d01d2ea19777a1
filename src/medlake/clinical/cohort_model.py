"""The cohort query model: a JSON document describing patients, studies or series by
clinical and imaging criteria together (documented in ``docs/cohorts.md``).

::

    {
      "level": "studies",                       # patients | studies | series
      "where": {"all": [
        {"series": {"modality": "CT", "bodyPart": "CHEST"}},
        {"resource": "Condition", "code": "http://snomed.info/sct|44054006"},
        {"resource": "Observation", "code": "http://loinc.org|4548-4",
         "value": {"gt": 7, "unit": "%"}, "within": {"days": 90, "before": "study"}}
      ]},
      "fields": ["study_uid", "dicomweb_url"],  # optional; default: all of the level
      "limit": 100, "offset": 0                 # optional paging
    }

:func:`parse_cohort_query` turns the JSON into the frozen dataclasses below and
raises :class:`InvalidCohortQuery` (400) naming the first problem with its path in
the document (``where.all[2].value.gt: …``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

import orjson

from medlake.clinical._search_values import date_range
from medlake.clinical.resources import RESOURCE_TYPES
from medlake.clinical.search_params import parameters_of
from medlake.errors import InvalidInput
from medlake.types import check_partition

__all__ = [
    "FIELDS",
    "LEVELS",
    "AllOf",
    "AnyOf",
    "ClinicalCriterion",
    "CohortQuery",
    "Criterion",
    "DateBounds",
    "InvalidCohortQuery",
    "Not",
    "PatientCriterion",
    "SeriesCriterion",
    "StudyCriterion",
    "Window",
    "parse_cohort_query",
]

Level = Literal["patients", "studies", "series"]
LEVELS: tuple[Level, ...] = ("patients", "studies", "series")
Comparator = Literal["gt", "ge", "lt", "le", "eq", "ne"]
_COMPARATORS: tuple[Comparator, ...] = ("gt", "ge", "lt", "le", "eq", "ne")
_RANGE: tuple[Comparator, ...] = ("gt", "ge", "lt", "le")

#: The columns of each output level, in order (``fields`` picks among them).
FIELDS: dict[str, tuple[str, ...]] = {
    "patients": ("patient_key", "patient", "identifiers", "studies"),
    "studies": (
        "patient_key", "patient", "patient_id", "study_uid", "study_date",
        "study_description", "accession_number", "modalities", "series_count",
        "instance_count", "imaging_study", "dicomweb_url",
    ),
    "series": (
        "patient_key", "patient", "patient_id", "study_uid", "study_date",
        "study_description", "series_uid", "series_number", "modality", "body_part",
        "series_description", "instance_count", "dicomweb_url",
    ),
}  # fmt: skip

#: The date search parameter a clinical criterion's ``date`` and ``within`` use, by type.
DATE_PARAMS: dict[str, str] = {
    "Observation": "date",
    "Condition": "onset-date",
    "Procedure": "date",
    "Encounter": "date",
    "DiagnosticReport": "date",
    "MedicationRequest": "authoredon",
    "ImagingStudy": "started",
    "DocumentReference": "date",
    "ServiceRequest": "authored",
    "Consent": "date",
}
#: Largest page a query may ask for.
MAX_LIMIT = 1_000_000


class InvalidCohortQuery(InvalidInput):
    """The cohort query is not valid JSON or breaks the model (400)."""


# --- the model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DateBounds:
    """Comparisons with FHIR dates (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a dateTime):
    ``(("ge", "2020-01-01"), ("lt", "2021"))``."""

    comparisons: tuple[tuple[Comparator, str], ...]


@dataclass(frozen=True)
class Window:
    """``within``: the clinical event lies within ``days`` calendar days ``before``
    (or ``after``, or ``around``) the study date, the study date included."""

    days: int
    relation: Literal["before", "after", "around"]


@dataclass(frozen=True)
class ClinicalCriterion:
    """The patient has a FHIR resource of ``resource`` type matching everything given."""

    path: str
    resource: str
    #: ``system|code`` tokens (FHIR search syntax); any of them matches.
    codes: tuple[str, ...] = ()
    #: Comparisons with the resource's quantity value, and its unit (code or text).
    value: tuple[tuple[Comparator, str], ...] = ()
    unit: str | None = None
    unit_system: str | None = None
    date: DateBounds | None = None
    within: Window | None = None
    #: The date search parameter ``date`` and ``within`` compare.
    date_param: str | None = None
    #: Further FHIR search criteria, ANDed (``[("status", "final")]``).
    search: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PatientCriterion:
    """Demographics of the patient's FHIR Patient resource(s)."""

    path: str
    genders: tuple[str, ...] = ()
    birthdate: DateBounds | None = None
    #: Comparisons with the age in whole years, at ``age_at`` (the study date or today).
    age: tuple[tuple[Comparator, int], ...] = ()
    age_at: Literal["study", "today"] = "today"


@dataclass(frozen=True)
class StudyCriterion:
    """Attributes of the study (DICOM study level)."""

    path: str
    date: DateBounds | None = None
    description: str | None = None
    modalities: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesCriterion:
    """A series with all of these (at level ``series``: the row's series; otherwise
    some series of the study)."""

    path: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    description: str | None = None
    sop_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AllOf:
    """Every item holds."""

    items: tuple[Criterion, ...]


@dataclass(frozen=True)
class AnyOf:
    """At least one item holds."""

    items: tuple[Criterion, ...]


@dataclass(frozen=True)
class Not:
    """The item does not hold."""

    item: Criterion


Criterion = (
    AllOf | AnyOf | Not | ClinicalCriterion | PatientCriterion | StudyCriterion | SeriesCriterion
)


@dataclass(frozen=True)
class CohortQuery:
    """A parsed cohort query."""

    level: Level = "studies"
    where: Criterion | None = None
    fields: tuple[str, ...] = ()
    limit: int | None = None
    offset: int = 0
    partition: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """The output columns: ``fields``, or every column of the level."""
        return self.fields or FIELDS[self.level]

    @property
    def needs_study(self) -> bool:
        """Whether a criterion depends on a study (imaging criteria, ``within``, age at
        the study): the query is then evaluated per study, not per patient."""
        return self.where is not None and _needs_study(self.where)


def _needs_study(criterion: Criterion) -> bool:
    if isinstance(criterion, AllOf | AnyOf):
        return any(_needs_study(item) for item in criterion.items)
    if isinstance(criterion, Not):
        return _needs_study(criterion.item)
    if isinstance(criterion, StudyCriterion | SeriesCriterion):
        return True
    if isinstance(criterion, ClinicalCriterion):
        return criterion.within is not None
    return criterion.age_at == "study" and bool(criterion.age)


# --- parsing ------------------------------------------------------------------------------

T = TypeVar("T")


def _fail(path: str, message: str) -> InvalidCohortQuery:
    return InvalidCohortQuery(f"{path}: {message}" if path else message)


def _object(value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"must be a JSON object, not {_kind(value)}")
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"must be a non-empty string, not {_kind(value)}")
    return value.strip()


def _texts(
    value: Any, path: str, check: Callable[[str, str], str] | None = None
) -> tuple[str, ...]:
    """A string or a non-empty array of strings."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(path, "must not be an empty array")
    out = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]" if isinstance(value, list) else path
        text = _text(item, where)
        out.append(check(text, where) if check else text)
    return tuple(out)


def _number(value: Any, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"must be a number, not {_kind(value)}")
    return repr(value) if isinstance(value, float) else str(value)


def _date(value: Any, path: str) -> str:
    text = _text(value, path)
    if date_range(text) is None:
        raise _fail(path, f"{text!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or dateTime)")
    return text


def _comparisons(
    value: Any, path: str, parse: Callable[[Any, str], T], allowed: tuple[Comparator, ...]
) -> tuple[tuple[Comparator, T], ...]:
    obj = _object(value, path, allowed)
    if not obj:
        raise _fail(path, f"needs at least one of {', '.join(allowed)}")
    return tuple((op, parse(obj[op], f"{path}.{op}")) for op in allowed if op in obj)


def _date_bounds(value: Any, path: str) -> DateBounds:
    return DateBounds(_comparisons(value, path, _date, _COMPARATORS))


def _window(value: Any, path: str) -> Window:
    obj = _object(value, path, ("days", "before", "after", "around"))
    days = obj.get("days")
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise _fail(f"{path}.days", f"must be a whole number of days >= 0, not {days!r}")
    relations = [key for key in ("before", "after", "around") if key in obj]
    if len(relations) != 1:
        raise _fail(path, 'needs exactly one of "before", "after" or "around" (: "study")')
    relation = relations[0]
    if obj[relation] != "study":
        raise _fail(f"{path}.{relation}", f'must be "study", not {obj[relation]!r}')
    kind: Literal["before", "after", "around"] = relation
    return Window(days, kind)


def _token(text: str, path: str) -> str:
    if text.count("|") > 1 and "\\|" not in text:
        raise _fail(path, f"{text!r} is not a token: use system|code or code")
    return text


def _clinical(value: dict[str, Any], path: str) -> ClinicalCriterion:
    obj = _object(
        value, path, ("resource", "code", "value", "date", "within", "dateParam", "search")
    )
    resource = _text(obj["resource"], f"{path}.resource")
    if resource not in RESOURCE_TYPES:
        raise _fail(f"{path}.resource", f"{resource!r} is not a FHIR R4 resource type")
    params = parameters_of(resource)
    if "patient" not in params and "subject" not in params:
        raise _fail(f"{path}.resource", f"{resource} resources do not name a patient")
    codes = _texts(obj["code"], f"{path}.code", _token) if "code" in obj else ()
    if codes and "code" not in params:
        raise _fail(f"{path}.code", f"{resource} has no code search parameter")
    comparisons: tuple[tuple[Comparator, str], ...] = ()
    unit = unit_system = None
    if "value" in obj:
        where = f"{path}.value"
        raw = _object(obj["value"], where, (*_COMPARATORS, "unit", "system"))
        numbers = {k: v for k, v in raw.items() if k in _COMPARATORS}
        comparisons = _comparisons(numbers, where, _number, _COMPARATORS)
        unit = _text(raw["unit"], f"{where}.unit") if "unit" in raw else None
        unit_system = _text(raw["system"], f"{where}.system") if "system" in raw else None
        if "value-quantity" not in params:
            raise _fail(where, f"{resource} has no quantity value to compare")
    date_param = None
    if "dateParam" in obj:
        date_param = _text(obj["dateParam"], f"{path}.dateParam")
        if date_param not in params or params[date_param].type != "date":
            raise _fail(f"{path}.dateParam", f"{resource} has no date parameter {date_param!r}")
    date = _date_bounds(obj["date"], f"{path}.date") if "date" in obj else None
    within = _window(obj["within"], f"{path}.within") if "within" in obj else None
    if (date or within) and date_param is None:
        date_param = DATE_PARAMS.get(resource)
        if date_param is None:
            raise _fail(path, f"say which date of {resource} to use with dateParam")
    search: tuple[tuple[str, str], ...] = ()
    if "search" in obj:
        text = _text(obj["search"], f"{path}.search")
        search = tuple(parse_qsl(text.lstrip("?"), keep_blank_values=True, strict_parsing=False))
        if not search:
            raise _fail(f"{path}.search", f"{text!r} holds no search criteria")
    return ClinicalCriterion(
        path, resource, codes, comparisons, unit, unit_system, date, within, date_param, search
    )


_GENDERS = ("male", "female", "other", "unknown")


def _gender(text: str, path: str) -> str:
    if text not in _GENDERS:
        raise _fail(path, f"{text!r} is not a FHIR gender ({', '.join(_GENDERS)})")
    return text


def _age(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, f"must be a whole number of years >= 0, not {value!r}")
    return value


def _patient(value: Any, path: str) -> PatientCriterion:
    obj = _object(value, path, ("gender", "birthdate", "age"))
    if not obj:
        raise _fail(path, "needs gender, birthdate or age")
    genders = _texts(obj["gender"], f"{path}.gender", _gender) if "gender" in obj else ()
    birthdate = _date_bounds(obj["birthdate"], f"{path}.birthdate") if "birthdate" in obj else None
    age: tuple[tuple[Comparator, int], ...] = ()
    at: Literal["study", "today"] = "today"
    if "age" in obj:
        where = f"{path}.age"
        raw = _object(obj["age"], where, (*_RANGE, "at"))
        age = _comparisons({k: v for k, v in raw.items() if k != "at"}, where, _age, _RANGE)
        if "at" in raw:
            if raw["at"] not in ("study", "today"):
                raise _fail(f"{where}.at", f'must be "study" or "today", not {raw["at"]!r}')
            at = raw["at"]
    return PatientCriterion(path, genders, birthdate, age, at)


def _upper(text: str, _path: str) -> str:
    return text.upper()


def _uid(text: str, path: str) -> str:
    if not all(part.isdigit() for part in text.split(".")):
        raise _fail(path, f"{text!r} is not a DICOM UID")
    return text


def _study(value: Any, path: str) -> StudyCriterion:
    obj = _object(value, path, ("date", "description", "modality", "accession", "studyUid"))
    if not obj:
        raise _fail(path, "needs date, description, modality, accession or studyUid")
    return StudyCriterion(
        path,
        _date_bounds(obj["date"], f"{path}.date") if "date" in obj else None,
        _text(obj["description"], f"{path}.description") if "description" in obj else None,
        _texts(obj["modality"], f"{path}.modality", _upper) if "modality" in obj else (),
        _texts(obj["accession"], f"{path}.accession") if "accession" in obj else (),
        _texts(obj["studyUid"], f"{path}.studyUid", _uid) if "studyUid" in obj else (),
    )


def _series(value: Any, path: str) -> SeriesCriterion:
    obj = _object(value, path, ("modality", "bodyPart", "description", "sopClass"))
    if not obj:
        raise _fail(path, "needs modality, bodyPart, description or sopClass")
    return SeriesCriterion(
        path,
        _texts(obj["modality"], f"{path}.modality", _upper) if "modality" in obj else (),
        _texts(obj["bodyPart"], f"{path}.bodyPart", _upper) if "bodyPart" in obj else (),
        _text(obj["description"], f"{path}.description") if "description" in obj else None,
        _texts(obj["sopClass"], f"{path}.sopClass", _uid) if "sopClass" in obj else (),
    )


_KINDS = ("all", "any", "not", "resource", "patient", "study", "series")


def _criterion(value: Any, path: str) -> Criterion:
    if not isinstance(value, dict):
        raise _fail(path, f"a criterion must be a JSON object, not {_kind(value)}")
    kinds = [key for key in _KINDS if key in value]
    if len(kinds) != 1:
        listed = ", ".join(repr(k) for k in _KINDS)
        found = "none" if not kinds else ", ".join(repr(k) for k in kinds)
        raise _fail(path, f"a criterion needs exactly one of {listed} (found {found})")
    kind = kinds[0]
    if kind in ("all", "any"):
        _object(value, path, (kind,))
        items = value[kind]
        if not isinstance(items, list) or not items:
            raise _fail(f"{path}.{kind}", "must be a non-empty array of criteria")
        parsed = tuple(_criterion(item, f"{path}.{kind}[{i}]") for i, item in enumerate(items))
        return AllOf(parsed) if kind == "all" else AnyOf(parsed)
    if kind == "not":
        _object(value, path, ("not",))
        return Not(_criterion(value["not"], f"{path}.not"))
    if kind == "resource":
        return _clinical(value, path)
    _object(value, path, (kind,))
    if kind == "patient":
        return _patient(value[kind], f"{path}.patient")
    if kind == "study":
        return _study(value[kind], f"{path}.study")
    return _series(value[kind], f"{path}.series")


def parse_cohort_query(document: Any) -> CohortQuery:
    """A :class:`CohortQuery` from its JSON (text, bytes or already parsed)."""
    if isinstance(document, str | bytes):
        try:
            document = orjson.loads(document)
        except orjson.JSONDecodeError as exc:
            raise InvalidCohortQuery(f"the cohort query is not valid JSON: {exc}") from exc
    obj = _object(document, "", ("level", "where", "fields", "limit", "offset", "partition"))
    level = obj.get("level", "studies")
    if level not in LEVELS:
        raise _fail("level", f"must be one of {', '.join(LEVELS)}, not {level!r}")
    fields: tuple[str, ...] = ()
    if "fields" in obj:
        fields = _texts(obj["fields"], "fields")
        unknown = [f for f in fields if f not in FIELDS[level]]
        if unknown:
            raise _fail(
                "fields", f"{unknown[0]!r} is not a {level} field ({', '.join(FIELDS[level])})"
            )
    limit = obj.get("limit")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT
    ):
        raise _fail("limit", f"must be a whole number from 0 to {MAX_LIMIT}, not {limit!r}")
    offset = obj.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _fail("offset", f"must be a whole number >= 0, not {offset!r}")
    partition = None
    if "partition" in obj:
        partition = _text(obj["partition"], "partition")
        try:
            check_partition(partition)
        except InvalidInput as exc:
            raise _fail("partition", exc.message) from exc
    where = _criterion(obj["where"], "where") if "where" in obj else None
    return CohortQuery(level, where, fields, limit, offset, partition)
