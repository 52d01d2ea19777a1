"""CSV mapping files: YAML that turns each row of a CSV file into a FHIR resource.

A mapping names the resource type, how a row's resource gets its id, and a list of
fields, each setting one element (a FHIRPath-like path such as
``code.coding[0].system``) from a column, a constant or a template, through optional
value transforms (dates, decimals, code maps). The resources then take the same path
as NDJSON resources in a bulk import (:mod:`medlake.clinical.bulk_import`): validated,
stored in chunks, a row that cannot be mapped or is not valid FHIR recorded as an
``ingest_errors`` row with its line number. The format is documented in
``docs/csv-mapping.md``; three mappings ship with medlake (:func:`shipped_mappings`).
"""

from __future__ import annotations

import csv
import datetime as dt
import re
import string
import uuid
import zoneinfo
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from importlib import resources as package_files
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medlake.clinical.resources import ID_PATTERN, RESOURCE_TYPES, FhirDecimal
from medlake.errors import InvalidInput

__all__ = [
    "CsvMapping",
    "FieldMapping",
    "RowError",
    "load_mapping",
    "map_rows",
    "shipped_mappings",
]

Transform = Literal["string", "date", "datetime", "decimal", "integer", "boolean", "upper", "lower"]

_STEP = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)(?:\[(?P<index>\d+)\])?$")
#: Formats tried when a ``date`` / ``datetime`` field names none.
_DATE_FORMATS = ("%Y-%m-%d",)
_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S",
                     "%Y-%m-%d %H:%M", "%Y-%m-%d")  # fmt: skip
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
#: Namespace of the ids made from id templates that are not valid FHIR ids.
_ID_NAMESPACE = uuid.UUID("0f3b7e1c-6c1e-5b8e-9a55-6d65646c616b")


class RowError(ValueError):
    """A row that cannot be mapped, and why (the import records it with its line)."""


class FieldMapping(BaseModel):
    """One element of the resource, set from a column, a constant or a template."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: Where the value goes: ``name[0].given[0]``, ``valueQuantity.value``.
    path: str
    #: The CSV column holding the value.
    column: str | None = None
    #: A constant (any YAML value: text, number, object, list).
    value: Any = None
    #: Text with ``{column}`` placeholders, e.g. ``Patient?identifier=urn:x|{mrn}``.
    template: str | None = None
    #: Replace a column's value by another (``M: male``); matched exactly, then
    #: ignoring case. A value missing from the map is an error unless ``default`` is set.
    map: dict[str, Any] | None = None
    transform: Transform = "string"
    #: ``strptime`` formats of a ``date`` / ``datetime`` column, tried in order.
    formats: list[str] = Field(default_factory=list)
    #: Zone of a ``datetime`` written without one (IANA name or ``+01:00``).
    timezone: str = "UTC"
    #: Split the value at this separator into a list (``given`` names).
    split: str | None = None
    #: Used when the column is empty (or its value is not in ``map``).
    default: Any = None
    #: An empty value (no ``default``) makes the row fail instead of leaving the element out.
    required: bool = False
    #: Set the element only when this column has a value (a constant that belongs with
    #: an optional column, such as ``telecom[0].system: phone``).
    when: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FieldMapping:
        sources = [self.column is not None, self.value is not None, self.template is not None]
        if sum(sources) != 1:
            raise ValueError(f"field {self.path!r}: give exactly one of column, value, template")
        _parse_path(self.path)
        if self.transform in ("date", "datetime"):
            for text in self.formats:
                if "%" not in text:
                    raise ValueError(f"field {self.path!r}: {text!r} is not a strptime format")
            _zone(self.timezone)
        return self

    def columns(self) -> list[str]:
        """The CSV columns this field reads."""
        found = [self.when] if self.when is not None else []
        if self.column is not None:
            found.append(self.column)
        if self.template is not None:
            found.extend(_placeholders(self.template))
        return found


class CsvOptions(BaseModel):
    """How the CSV file is read."""

    model_config = ConfigDict(extra="forbid")

    delimiter: str = ","
    encoding: str = "utf-8-sig"


class CsvMapping(BaseModel):
    """A whole mapping file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    resource_type: str = Field(alias="resourceType")
    description: str = ""
    #: Template of the resource id; the same row always gets the same id, so importing a
    #: file again updates its resources instead of adding new ones. Without it, every
    #: import creates new resources.
    id: str | None = None
    csv: CsvOptions = Field(default_factory=CsvOptions)
    fields: list[FieldMapping]

    @model_validator(mode="after")
    def _known_type(self) -> CsvMapping:
        if self.resource_type not in RESOURCE_TYPES:
            raise ValueError(f"resourceType {self.resource_type!r} is not a FHIR R4 resource type")
        if not self.fields:
            raise ValueError("a mapping needs at least one field")
        return self

    def columns(self) -> set[str]:
        """Every column the mapping reads."""
        found = {c for f in self.fields for c in f.columns()}
        if self.id is not None:
            found.update(_placeholders(self.id))
        return found

    def map_row(self, row: dict[str, str]) -> dict[str, Any]:
        """The resource of one row (``row``: column -> text); :class:`RowError` when a
        value cannot be mapped."""
        resource: dict[str, Any] = {"resourceType": self.resource_type}
        if self.id is not None:
            resource["id"] = _make_id(self.resource_type, _fill(self.id, row, "id", True) or "")
        for mapped in self.fields:
            value = _field_value(mapped, row)
            if value is not None:
                _assign(resource, _parse_path(mapped.path), value)
        compacted: dict[str, Any] = _compact(resource)
        return compacted


# --- values ------------------------------------------------------------------------------------


def _placeholders(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc}") from exc


def _cell(row: dict[str, str], column: str) -> str:
    if column not in row:
        raise RowError(f"column {column!r} is missing from the CSV header")
    return (row[column] or "").strip()


def _fill(template: str, row: dict[str, str], path: str, required: bool) -> str | None:
    values = {name: _cell(row, name) for name in _placeholders(template)}
    empty = [name for name, value in values.items() if not value]
    if empty:
        if required:
            raise RowError(f"{path}: column {empty[0]!r} is empty")
        return None
    return template.format(**values)


def _field_value(mapped: FieldMapping, row: dict[str, str]) -> Any:
    if mapped.when is not None and not (row.get(mapped.when) or "").strip():
        return None
    if mapped.value is not None:
        return mapped.value
    if mapped.template is not None:
        return _fill(mapped.template, row, mapped.path, mapped.required)
    assert mapped.column is not None
    if mapped.column not in row and not mapped.required:
        return mapped.default
    text = _cell(row, mapped.column)
    if not text:
        if mapped.default is not None:
            return mapped.default
        if mapped.required:
            raise RowError(f"{mapped.path}: column {mapped.column!r} is empty")
        return None
    value: Any = text
    if mapped.map is not None:
        value = _mapped(mapped, text)
        if not isinstance(value, str):
            return value
    if mapped.split is not None:
        return [
            _transformed(mapped, part.strip()) for part in value.split(mapped.split) if part.strip()
        ]
    return _transformed(mapped, value)


def _mapped(mapped: FieldMapping, text: str) -> Any:
    assert mapped.map is not None
    if text in mapped.map:
        return mapped.map[text]
    folded = {str(key).casefold(): value for key, value in mapped.map.items()}
    if text.casefold() in folded:
        return folded[text.casefold()]
    if mapped.default is not None:
        return mapped.default
    allowed = ", ".join(str(key) for key in mapped.map)
    raise RowError(f"{mapped.path}: {mapped.column} {text!r} is not one of {allowed}")


def _transformed(mapped: FieldMapping, text: str) -> Any:
    where = f"{mapped.path}: {mapped.column or 'value'} {text!r}"
    kind = mapped.transform
    if kind == "string":
        return text
    if kind == "upper":
        return text.upper()
    if kind == "lower":
        return text.lower()
    if kind == "decimal":
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise RowError(f"{where} is not a decimal number") from None
        if not number.is_finite():
            raise RowError(f"{where} is not a finite number")
        # FHIR keeps the written precision (5.40 is not 5.4): the text goes out as written.
        return FhirDecimal(text) if any(c in text for c in ".eE") else int(number)
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise RowError(f"{where} is not an integer") from None
    if kind == "boolean":
        if text.casefold() in _TRUE:
            return True
        if text.casefold() in _FALSE:
            return False
        raise RowError(f"{where} is not a boolean (true/false, yes/no, 1/0)")
    formats = mapped.formats or list(_DATE_FORMATS if kind == "date" else _DATETIME_FORMATS)
    parsed, pattern = _parse_time(text, formats, where)
    if kind == "date" or "%H" not in pattern:
        return parsed.date().isoformat()  # a date alone stays a date (FHIR dateTime allows it)
    if parsed.tzinfo is None:
        # FHIR: a dateTime with a time SHALL have a zone.
        parsed = parsed.replace(tzinfo=_zone(mapped.timezone))
    return parsed.isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(text: str, formats: list[str], where: str) -> tuple[dt.datetime, str]:
    for pattern in formats:
        try:
            return dt.datetime.strptime(text, pattern), pattern
        except ValueError:
            continue
    raise RowError(f"{where} does not match the date format(s) {', '.join(formats)}")


def _zone(name: str) -> dt.tzinfo:
    if name.upper() in ("UTC", "Z"):
        return dt.UTC
    offset = re.match(r"^([+-])(\d{2}):(\d{2})$", name)
    if offset:
        sign = -1 if offset.group(1) == "-" else 1
        return dt.timezone(
            sign * dt.timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3)))
        )
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone {name!r} is neither an IANA zone nor +hh:mm") from None


def _make_id(resource_type: str, text: str) -> str:
    """``text`` when it is a valid FHIR id, else a UUID derived from it (same text, same id)."""
    if ID_PATTERN.match(text):
        return text
    return str(uuid.uuid5(_ID_NAMESPACE, f"{resource_type}/{text}"))


# --- paths -------------------------------------------------------------------------------------


def _parse_path(path: str) -> list[tuple[str, int | None]]:
    steps: list[tuple[str, int | None]] = []
    for part in path.split("."):
        match = _STEP.match(part)
        if match is None:
            raise ValueError(f"path {path!r}: {part!r} is not a name or name[index]")
        index = match.group("index")
        steps.append((match.group("name"), int(index) if index is not None else None))
    return steps


def _assign(target: dict[str, Any], steps: list[tuple[str, int | None]], value: Any) -> None:
    node: Any = target
    for position, (name, index) in enumerate(steps):
        last = position == len(steps) - 1
        if index is None:
            if last:
                node[name] = value
                return
            node = node.setdefault(name, {})
            continue
        items = node.setdefault(name, [])
        while len(items) <= index:
            items.append(None)
        if last:
            items[index] = value
            return
        if items[index] is None:
            items[index] = {}
        node = items[index]


def _compact(value: Any) -> Any:
    """Drop the gaps and empty objects optional fields left (FHIR JSON has no nulls)."""
    if isinstance(value, dict):
        out = {k: _compact(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        items = [_compact(v) for v in value]
        return [v for v in items if v not in (None, {}, [])]
    return value


# --- files -------------------------------------------------------------------------------------


def shipped_mappings() -> dict[str, Path]:
    """The mapping files that ship with medlake, by name (``patients``, ``labs``, ...)."""
    folder = package_files.files("medlake.clinical") / "mappings"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith((".yaml", ".yml"))
    }


def load_mapping(name_or_path: str | Path) -> CsvMapping:
    """A mapping from a YAML file, or a shipped one by name (``labs``); 400
    (:class:`InvalidInput`) naming what is wrong with it."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = shipped_mappings().get(
            path.stem if path.suffix in (".yaml", ".yml") else str(name_or_path)
        )
        if shipped is None:
            known = ", ".join(sorted(shipped_mappings()))
            raise InvalidInput(
                f"mapping {str(name_or_path)!r} is neither a file nor a shipped mapping ({known})"
            )
        path = shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read the mapping {path}: {exc}") from exc
    return parse_mapping(data, str(path))


def parse_mapping(data: Any, where: str = "mapping") -> CsvMapping:
    """A mapping from its parsed YAML (or JSON) document."""
    try:
        return CsvMapping.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'mapping'}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False)
        )
        raise InvalidInput(f"{where} is not a valid CSV mapping: {problems}") from exc


def map_rows(
    mapping: CsvMapping, stream: TextIO
) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """``(line, resource or error)`` for each data row of a CSV file; ``line`` is the
    file line the row starts on (the header is line 1)."""
    reader = csv.reader(stream, delimiter=mapping.csv.delimiter)
    header = next(reader, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(names):
            yield line, RowError(f"{len(cells)} fields, the header has {len(names)}")
            continue
        try:
            yield line, mapping.map_row(dict(zip(names, cells, strict=True)))
        except RowError as exc:
            yield line, exc
