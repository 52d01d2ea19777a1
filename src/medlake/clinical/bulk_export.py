"""FHIR Bulk Data export (Bulk Data Access IG v2, ``$export``): system, all patients,
and Group level.

The kick-off (:func:`parse_export_request`, :func:`start_export`) checks the
parameters and records a job (:mod:`medlake.clinical.bulk_jobs`); the job
(:func:`run_export`) writes one or more NDJSON files per resource type into the lake
(``medlake/{workspace}/clinical/{partition}/export/{job}/{Type}-{n}.ndjson``, at most
``fhir_export_file_resources`` resources each) and lists them in the job's manifest.

- **What is exported**: the current, non-deleted version of each resource, as stored
  (``meta.versionId`` and ``lastUpdated`` included), with ``lastUpdated`` at or before
  the job's ``transactionTime`` and, with ``_since``, after it. Before it reads, the job
  waits for write transactions that began before ``transactionTime`` to finish, so a
  later ``_since=transactionTime`` export misses nothing. A resource changed after
  ``transactionTime`` while the export runs is left out (the next ``_since`` export has it).
- **Patient and Group level**: the Patient compartment (R4 ``CompartmentDefinition``
  patient) of every patient, or of the Group's members (``Group.member.entity``
  references to Patients, nested Groups followed, inactive members left out), found
  through the reference rows of ``fhir_search_values``; the Patient resources themselves
  are included. The member list is fixed when the job starts (``_since`` returns no
  older resources of patients added to the Group later).
- **Memory stays flat**: each type is read in primary-key order in keyset pages of
  :data:`PAGE_ROWS` rows (one short read transaction each), and the stored JSON text is
  written out as it is, never parsed.
- **Resume**: after each file moves into the lake, the job records the type and the last
  primary key written; an interrupted job continues after it (the file being written
  when it stopped is written again).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Connection, and_, or_, select, text

from medlake.clinical._search_sql import CriteriaBuilder
from medlake.clinical._search_values import date_range, relative_reference
from medlake.clinical.bulk_jobs import (
    BulkJob,
    JobContext,
    JobFile,
    JobKind,
    create_job,
    job_patients_select,
    read_job,
    set_job_patients,
)
from medlake.clinical.compartments import (
    compartment_condition,
    compartment_params,
    compartment_patients,
)
from medlake.clinical.resources import RESOURCE_TYPES, check_id, dump_resource, issue
from medlake.clinical.store import fhir_instant, now_ms, read_resource, write_transaction
from medlake.errors import InvalidInput, InvalidResource, NotFound
from medlake.index.schema import fhir_resources
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive
from medlake.security.errors import Forbidden

log = logging.getLogger(__name__)

#: Rows read per keyset page.
PAGE_ROWS = 1000
#: The output format medlake writes, and the spellings of it a client may ask for.
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({NDJSON, "application/ndjson", "ndjson"})
#: Seconds at most to wait for write transactions older than ``transactionTime``.
SETTLE_TIMEOUT = 60.0
#: Export levels: ``$export``, ``Patient/$export``, ``Group/[id]/$export``.
LEVELS = ("system", "patient", "group")

#: Kick-off parameters medlake does not support (an error unless ``Prefer:
#: handling=lenient``, then a warning in the manifest's error file).
_UNSUPPORTED = frozenset({"_elements", "includeAssociatedData"})
#: Search parameters a ``_typeFilter`` query must not use (Bulk Data IG).
_RESULT_PARAMETERS = frozenset(
    {"_include", "_revinclude", "_sort", "_count", "_summary", "_elements", "_total",
     "_contained", "_containedType", "_offset"}
)  # fmt: skip


# --- the kick-off --------------------------------------------------------------------------


@dataclass
class ExportRequest:
    """The checked parameters of an $export kick-off."""

    level: str  # system | patient | group
    group_id: str | None = None
    types: list[str] | None = None
    since: dt.datetime | None = None
    #: ``Type?query`` strings (``_typeFilter``).
    type_filters: list[str] = field(default_factory=list)
    #: Patient ids of the ``patient`` parameter (POST kick-off).
    patients: list[str] | None = None
    #: What lenient handling let through (written to the manifest's error file).
    warnings: list[str] = field(default_factory=list)
    #: Patient ids of the compartments the caller is limited to (None: no limit); the
    #: export covers no one else, and only such a caller may fetch its status and files.
    compartments: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as stored in the job row."""
        return {
            "level": self.level,
            "group": self.group_id,
            "types": self.types,
            "since": self.since.isoformat() if self.since else None,
            "typeFilters": self.type_filters,
            "patients": self.patients,
            "warnings": self.warnings,
            "compartments": self.compartments,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRequest:
        """The request as stored in the job row."""
        since = data.get("since")
        return cls(
            level=data["level"],
            group_id=data.get("group"),
            types=data.get("types"),
            since=dt.datetime.fromisoformat(since) if since else None,
            type_filters=list(data.get("typeFilters") or []),
            patients=data.get("patients"),
            warnings=list(data.get("warnings") or []),
            compartments=data.get("compartments"),
        )


def _split(values: Sequence[str]) -> list[str]:
    """Comma-delimited values, repeated parameters treated as one (Bulk Data IG)."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _instant(value: str) -> dt.datetime:
    """A FHIR instant (``_since``): date, time and zone required."""
    if (
        "T" not in value
        or date_range(value) is None
        or not (value.endswith("Z") or value[-6] in "+-")
    ):
        raise InvalidInput(
            f"_since {value!r} is not a FHIR instant (e.g. 2024-01-31T12:00:00Z, with a zone)"
        )
    bounds = date_range(value)
    assert bounds is not None
    return bounds[0]


def parameters_from_resource(body: Any) -> list[tuple[str, str]]:
    """The kick-off parameters of a POST body (a ``Parameters`` resource) as
    ``(name, value)`` pairs; a ``patient`` reference becomes its ``reference`` text."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidResource(
            "the body of a POST $export must be a Parameters resource",
            issues=[issue("structure", "the body of a POST $export must be a Parameters resource")],
        )
    pairs: list[tuple[str, str]] = []
    for index, parameter in enumerate(body.get("parameter") or []):
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if not isinstance(name, str):
            raise InvalidInput(f"Parameters.parameter[{index}] has no name")
        values = [v for k, v in parameter.items() if k.startswith("value")]
        if len(values) != 1:
            raise InvalidInput(f"Parameters.parameter[{index}] ({name}) needs exactly one value[x]")
        value = values[0]
        if isinstance(value, dict):  # valueReference
            value = value.get("reference")
        if not isinstance(value, str):
            raise InvalidInput(f"Parameters.parameter[{index}] ({name}) has no usable value")
        pairs.append((name, value))
    return pairs


def parse_export_request(
    level: str,
    parameters: Sequence[tuple[str, str]],
    *,
    group_id: str | None = None,
    lenient: bool = False,
    post: bool = False,
) -> ExportRequest:
    """Check the kick-off parameters (query string pairs, or a POST body's parameters).

    Unsupported parameters and resource types are errors (400), or with ``lenient``
    (``Prefer: handling=lenient``) warnings that end up in the manifest's error file.
    """
    if level not in LEVELS:
        raise ValueError(f"export level {level!r}")
    request = ExportRequest(level, group_id)
    grouped: dict[str, list[str]] = {}
    for name, value in parameters:
        grouped.setdefault(name, []).append(value)

    def refuse(message: str) -> None:
        if not lenient:
            raise InvalidInput(message)
        request.warnings.append(message)

    for name in grouped:
        if name in _UNSUPPORTED:
            refuse(f"the $export parameter {name} is not supported")
        elif name not in ("_outputFormat", "_since", "_type", "_typeFilter", "patient"):
            refuse(f"unknown $export parameter {name!r}")
    for value in grouped.get("_outputFormat", []):
        if value not in OUTPUT_FORMATS:
            raise InvalidInput(
                f"_outputFormat {value!r} is not supported; use {NDJSON} (or application/ndjson, "
                "ndjson)"
            )
    since = grouped.get("_since", [])
    if len(since) > 1:
        raise InvalidInput("_since may be given once")
    if since:
        request.since = _instant(since[0])
    if "_type" in grouped:
        request.types = _checked_types(_split(grouped["_type"]), level, refuse)
    request.type_filters = _checked_filters(_split(grouped.get("_typeFilter", [])), request)
    if "patient" in grouped:
        if level == "system" or not post:
            raise InvalidInput("the patient parameter is for Patient and Group exports by POST")
        request.patients = [_patient_id(value) for value in grouped["patient"]]
    return request


def _checked_types(types: list[str], level: str, refuse: Any) -> list[str]:
    kept: list[str] = []
    for name in dict.fromkeys(types):
        if name not in RESOURCE_TYPES:
            refuse(f"_type {name!r} is not a FHIR R4 resource type medlake supports")
        elif level != "system" and name != "Patient" and not compartment_params(name):
            refuse(f"_type {name!r} is outside the Patient compartment")
        else:
            kept.append(name)
    if not kept:
        raise InvalidInput("_type names no resource type that can be exported")
    return kept


def _checked_filters(filters: list[str], request: ExportRequest) -> list[str]:
    for text_filter in filters:
        resource_type, mark, query = text_filter.partition("?")
        if not mark or resource_type not in RESOURCE_TYPES:
            raise InvalidInput(f"_typeFilter {text_filter!r} is not of the form Type?query")
        if request.types is not None and resource_type not in request.types:
            raise InvalidInput(f"_typeFilter {text_filter!r} names a type that _type leaves out")
        pairs = parse_qsl(query, keep_blank_values=True)
        if not pairs:
            raise InvalidInput(f"_typeFilter {text_filter!r} has no search criteria")
        for key, _value in pairs:
            if key.partition(":")[0] in _RESULT_PARAMETERS:
                raise InvalidInput(f"_typeFilter {text_filter!r} must not use {key}")
        # Unknown parameters and malformed values fail here, at kick-off, not in the job.
        _filter_condition(0, resource_type, [text_filter])
    return filters


def _patient_id(reference: str) -> str:
    relative = relative_reference(reference)
    if relative is None or relative[0] != "Patient":
        raise InvalidInput(f"patient {reference!r} is not a Patient reference (Patient/123)")
    return relative[1]


def group_members(
    archive: Archive,
    partition: str,
    group_id: str,
    *,
    compartments: frozenset[str] | None = None,
) -> list[str]:
    """Ids of the Patients a Group has as active members (nested Groups followed);
    404 / 410 when the Group does not exist or was deleted (or, with ``compartments``,
    is outside them: a Group is in the compartments of its members)."""
    check_id(group_id, "Group id")
    members: list[str] = []
    seen: set[str] = set()
    pending = [group_id]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        limit = compartments if current == group_id else None
        stored = read_resource(archive, "Group", current, partition=partition, compartments=limit)
        group = stored.resource() or {}
        for member in group.get("member") or []:
            if member.get("inactive") is True:
                continue
            reference = (member.get("entity") or {}).get("reference")
            target = (
                relative_reference(_relative(reference)) if isinstance(reference, str) else None
            )
            if target is None:
                continue
            if target[0] == "Patient":
                members.append(target[1])
            elif target[0] == "Group":
                pending.append(target[1])
    return sorted(set(members))


def _relative(reference: str) -> str:
    """``Type/id`` of an absolute reference (``https://x/fhir/Patient/1`` → ``Patient/1``)."""
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


def start_export(
    archive: Archive,
    request: ExportRequest,
    *,
    partition: str,
    kickoff_url: str,
    compartments: frozenset[str] | None = None,
) -> BulkJob:
    """Record the export job (the runner starts it). A Group export checks its Group
    (404 / 410); a ``patient`` list must name existing patients (and, for a Group,
    members of it). ``compartments`` (``Patient/123``) limit the export to those
    patients' compartments: a system-level export, or a ``patient`` outside them, is
    refused (403)."""
    patients = compartment_patients(compartments)
    if patients is not None:
        if request.level == "system":
            raise Forbidden(
                "a system-level $export cannot be limited to compartments; use "
                "Patient/$export or Group/[id]/$export"
            )
        outside = sorted(set(request.patients or []) - set(patients))
        if outside:
            raise Forbidden(f"patients {outside} are outside the compartments of this caller")
        request.compartments = list(patients)
    if request.level == "group":
        assert request.group_id is not None
        members = group_members(archive, partition, request.group_id, compartments=compartments)
        if request.patients is not None:
            outside = sorted(set(request.patients) - set(members))
            if outside:
                raise InvalidInput(
                    f"patients {outside} are not members of Group/{request.group_id}"
                )
    elif request.patients is not None:
        for patient in request.patients:
            read_resource(archive, "Patient", patient, partition=partition)
    return create_job(archive, JobKind.EXPORT, partition, kickoff_url, request.to_json())


# --- the job -------------------------------------------------------------------------------


def _filter_condition(partition_pk: int, resource_type: str, filters: list[str]) -> Any:
    """The ``_typeFilter`` condition of one type: any of its queries matches."""
    builder = CriteriaBuilder(partition_pk, "", strict=True)
    alternatives = []
    for text_filter in filters:
        filter_type, _, query = text_filter.partition("?")
        if filter_type != resource_type:
            continue
        parts = [
            builder.criterion(fhir_resources, resource_type, key, value)
            for key, value in parse_qsl(query, keep_blank_values=True)
        ]
        alternatives.append(and_(*(p for p in parts if p is not None)))
    return or_(*alternatives) if alternatives else None


@dataclass
class _Plan:
    """What the job reads: its types (fixed when it starts) and the conditions."""

    partition_pk: int
    types: list[str]
    request: ExportRequest
    transaction_time: dt.datetime
    job_id: str
    #: A patient list restricts the compartments (Group members, ``patient``).
    listed_patients: bool

    def conditions(self, resource_type: str) -> list[Any]:
        r = fhir_resources.c
        conditions: list[Any] = [
            r.partition_id == self.partition_pk,
            r.resource_type == resource_type,
            r.deleted.is_(False),
            r.last_updated <= self.transaction_time,
        ]
        if self.request.since is not None:
            conditions.append(r.last_updated > self.request.since)
        if self.request.level != "system":
            conditions.append(self._compartment(resource_type))
        type_filter = _filter_condition(self.partition_pk, resource_type, self.request.type_filters)
        if type_filter is not None:
            conditions.append(type_filter)
        return conditions

    def _compartment(self, resource_type: str) -> Any:
        patients = job_patients_select(self.job_id) if self.listed_patients else None
        return compartment_condition(fhir_resources, patients, resource_type)


def _wait_for_writers(archive: Archive, transaction_time: dt.datetime) -> None:
    """Wait until every write transaction that began at or before ``transaction_time``
    has ended, so none of them commits a version the export's reads would miss."""
    if archive.engine.dialect.name == "sqlite":
        # One writer at a time: getting the write lock means the earlier ones are done.
        with write_transaction(archive):
            return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND xact_start <= :started "
        "AND state NOT IN ('idle')"
    )
    while time.monotonic() < deadline:
        with archive.engine.connect() as conn:
            if not conn.execute(query, {"started": transaction_time}).scalar_one():
                return
        time.sleep(0.05)
    log.warning("$export: write transactions older than %s still open after %.0f s",
                transaction_time.isoformat(), SETTLE_TIMEOUT)  # fmt: skip


def _present_types(conn: Connection, partition_pk: int) -> list[str]:
    rows = conn.execute(
        select(fhir_resources.c.resource_type)
        .distinct()
        .where(fhir_resources.c.partition_id == partition_pk)
    ).scalars()
    return sorted(rows)


def _start(context: JobContext, request: ExportRequest) -> dict[str, Any]:
    """First run of a job: fix ``transactionTime``, the patient list and the types."""
    archive, job = context.archive, context.job
    transaction_time = now_ms()
    _wait_for_writers(archive, transaction_time)
    with archive.engine.begin() as conn:
        partition_pk = partition_id(conn, job.partition, create=False)
        if partition_pk is None:
            raise NotFound(f"partition {job.partition!r} does not exist")
        present = _present_types(conn, partition_pk)
    if request.level == "group":
        assert request.group_id is not None
        patients = request.patients or group_members(archive, job.partition, request.group_id)
    else:
        patients = request.patients or list(request.compartments or [])
    if request.compartments is not None:
        patients = [p for p in patients if p in request.compartments]
    with archive.engine.begin() as conn:
        set_job_patients(conn, job.id, patients)
    if request.types is not None:
        types = [t for t in request.types if t in present]
    elif request.level == "system":
        types = present
    else:
        types = [t for t in present if t == "Patient" or compartment_params(t)]
    cursor = {
        "types": types,
        "index": 0,
        "after": 0,
        "file": 0,
        "listed": request.level == "group"
        or request.patients is not None
        or request.compartments is not None,
        "partition": partition_pk,
    }
    context.checkpoint(
        progress="exporting", cursor=cursor, transaction_time=transaction_time, output=[]
    )
    return cursor


class _FileWriter:
    """The NDJSON file of one type being written, moved into the lake when closed."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.path = folder / f"{name}.part"
        self.handle = self.path.open("w", encoding="utf-8")
        self.count = 0
        self.last_pk = 0

    def write(self, pk: int, content: str) -> None:
        self.handle.write(content)
        self.handle.write("\n")
        self.count += 1
        self.last_pk = pk

    def close(self) -> None:
        self.handle.close()


def _pages(conn_source: Archive, plan: _Plan, resource_type: str, after: int) -> Iterator[Any]:
    """The rows of one type after primary key ``after``, in keyset pages."""
    conditions = plan.conditions(resource_type)
    r = fhir_resources.c
    while True:
        with conn_source.engine.connect() as conn:
            rows = conn.execute(
                select(r.id, r.content)
                .where(r.id > after, *conditions)
                .order_by(r.id)
                .limit(PAGE_ROWS)
            ).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].id


def run_export(context: JobContext) -> None:
    """Run (or resume) an export job: every type's files into the lake, then the
    manifest's error file when lenient handling let something through."""
    archive, job = context.archive, context.job
    request = ExportRequest.from_json(job.parameters)
    cursor = job.cursor if job.cursor is not None else _start(context, request)
    with archive.engine.connect() as conn:
        job = read_job(conn, job.id)  # as _start left it
    assert job.transaction_time is not None
    plan = _Plan(
        cursor["partition"], cursor["types"], request, job.transaction_time, job.id,
        cursor["listed"],
    )  # fmt: skip
    output = list(job.output)
    folder = archive.staging_dir / "bulk" / job.id
    folder.mkdir(parents=True, exist_ok=True)
    per_file = archive.settings.fhir_export_file_resources
    try:
        for index in range(cursor["index"], len(plan.types)):
            resource_type = plan.types[index]
            after = cursor["after"] if index == cursor["index"] else 0
            number = cursor["file"] if index == cursor["index"] else 0
            written = sum(f.count for f in output if f.type == resource_type)
            writer: _FileWriter | None = None
            for row in _pages(archive, plan, resource_type, after):
                if writer is None:
                    number += 1
                    writer = _FileWriter(folder, f"{resource_type}-{number}.ndjson")
                writer.write(row.id, row.content)
                written += 1
                if writer.count >= per_file:
                    output.append(_move(context, writer, resource_type))
                    cursor = {**cursor, "index": index, "after": writer.last_pk, "file": number}
                    writer = None
                    context.checkpoint(
                        progress=_progress(resource_type, written, index, plan),
                        cursor=cursor, output=output,
                    )  # fmt: skip
                elif written % 10_000 == 0:
                    context.checkpoint(progress=_progress(resource_type, written, index, plan))
            if writer is not None:
                output.append(_move(context, writer, resource_type))
            cursor = {**cursor, "index": index + 1, "after": 0, "file": 0}
            context.checkpoint(
                progress=_progress(resource_type, written, index, plan),
                cursor=cursor, output=output,
            )  # fmt: skip
        errors: list[JobFile] = []
        if request.warnings:
            errors.append(_warnings_file(context, request.warnings))
        context.checkpoint(progress="completed", errors=errors)
    finally:
        for leftover in folder.glob("*.part"):
            leftover.unlink(missing_ok=True)
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


def _progress(resource_type: str, written: int, index: int, plan: _Plan) -> str:
    return f"{resource_type}: {written} resources (type {index + 1} of {len(plan.types)})"


def _move(context: JobContext, writer: _FileWriter, resource_type: str) -> JobFile:
    writer.close()
    archive, job = context.archive, context.job
    key = archive.layout.bulk_job_file_key(job.partition, "export", job.id, writer.name)
    archive.blobs.put_file(key, writer.path)
    return JobFile(resource_type, writer.name, writer.count)


def _warnings_file(context: JobContext, warnings: list[str]) -> JobFile:
    archive, job = context.archive, context.job
    name = "OperationOutcome-1.ndjson"
    lines = [
        dump_resource(
            {"resourceType": "OperationOutcome",
             "issue": [issue("not-supported", message, severity="warning")]}
        )
        for message in warnings
    ]  # fmt: skip
    key = archive.layout.bulk_job_file_key(job.partition, "export", job.id, name)
    archive.blobs.put_bytes(key, b"\n".join(lines) + b"\n")
    return JobFile("OperationOutcome", name, len(lines))


def job_within_compartments(job: BulkJob, compartments: frozenset[str] | None) -> bool:
    """Whether a caller limited to ``compartments`` (``None``: no limit) may see the job:
    only an export kicked off with compartments that all lie within them (its files hold
    nothing else)."""
    patients = compartment_patients(compartments)
    if patients is None:
        return True
    limited = job.parameters.get("compartments") if job.kind == JobKind.EXPORT else None
    return limited is not None and set(limited) <= set(patients)


def manifest(job: BulkJob, *, file_url: Any, requires_access_token: bool) -> dict[str, Any]:
    """The complete-status body of a finished export (``file_url(name)`` is the
    download URL of a file)."""
    assert job.transaction_time is not None
    return {
        "transactionTime": fhir_instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": requires_access_token,
        "output": [{"type": f.type, "url": file_url(f.name), "count": f.count} for f in job.output],
        "error": [{"type": f.type, "url": file_url(f.name), "count": f.count} for f in job.errors],
    }


__all__ = [
    "LEVELS",
    "NDJSON",
    "OUTPUT_FORMATS",
    "ExportRequest",
    "group_members",
    "job_within_compartments",
    "manifest",
    "parameters_from_resource",
    "parse_export_request",
    "run_export",
    "start_export",
]
