"""Clinical files (CSV, NDJSON) through the ingest pipeline: schema check, the file kept
byte-for-byte in the lake, its records staged in ``clinical_rows`` by patient identifier.

One file holds one table (CSV: named by the file, ``labs.csv`` → ``labs``) or one FHIR
resource type (NDJSON: every line's ``resourceType``). The ``clinical_schema`` rule
checks a file as a whole: a file that fails is rejected entire (kept aside, one
error row naming the first problem and the row), so counts stay per file. The full
clinical model (FHIR resources, search) is a separate piece of work; these staging
rows are its input.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from medlake.errors import DatabaseUnavailable, MedlakeError, StorageError
from medlake.index.schema import clinical_files, clinical_rows
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchLedger, FileOutcome, FileRecord, record_files
from medlake.ingest.inspect import Inspection
from medlake.ingest.store import keep_aside
from medlake.ingest.validation import (
    Finding,
    RuleConfig,
    Severity,
    failure_finding,
    rejection,
)

log = logging.getLogger(__name__)

_ROWS_PER_INSERT = 1000
_MAX_PATIENT_ID = 64
_TABLE_NAME = re.compile(r"[^a-z0-9_]+")


@dataclass
class ClinicalCheck:
    """What the schema check found out about one clinical file."""

    table: str
    format: str  # csv | ndjson
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)


def table_of(source: str) -> str:
    """The table a CSV file belongs to: its name up to the first dot, as an identifier."""
    name = source.rsplit("!", 1)[-1].replace("\\", "/").rsplit("/", 1)[-1]
    stem = name.split(".", 1)[0].lower()
    return (_TABLE_NAME.sub("_", stem).strip("_") or "table")[:64]


def suffix_of(source: str) -> str:
    """``.csv`` or ``.ndjson`` (``.jsonl`` is NDJSON too)."""
    return ".csv" if source.lower().endswith(".csv") else ".ndjson"


def check_file(path: Path, source: str, rules: RuleConfig) -> ClinicalCheck:
    """Check a staged clinical file against its schema (rule ``clinical_schema``)."""
    fmt = "csv" if suffix_of(source) == ".csv" else "ndjson"
    check = ClinicalCheck(table_of(source) if fmt == "csv" else "", fmt)
    try:
        problem = (
            _check_csv(path, check, rules) if fmt == "csv" else _check_ndjson(path, check, rules)
        )
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text: {exc.reason} at byte {exc.start}"
    except OSError as exc:
        problem = f"cannot read the staged file: {exc.strerror or exc}"
    if not check.table:
        check.table = table_of(source)
    if problem is not None:
        finding = rules.finding("clinical_schema", problem)
        if finding is not None:
            check.findings.append(finding)
    return check


def _check_csv(path: Path, check: ClinicalCheck, rules: RuleConfig) -> str | None:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            return "the CSV file has no header row"
        names = [h.strip() for h in header]
        if any(not n for n in names):
            return f"the CSV header has an empty column name: {header}"
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            return f"the CSV header repeats the columns {duplicates}"
        patient = _patient_column(names, rules)
        if patient is None:
            return (
                f"no patient identifier column: the header {names} has none of "
                f"{list(rules.patient_columns)} (setting clinical_patient_columns)"
            )
        missing = [c for c in rules.required_columns.get(check.table, ()) if c not in names]
        if missing:
            return f"table {check.table} requires the columns {missing}, which the file lacks"
        column = names.index(patient)
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            check.rows += 1
            if len(row) != len(names):
                return f"line {number}: {len(row)} fields, the header has {len(names)}"
            value = row[column].strip()
            if not value:
                return f"line {number}: the patient identifier ({patient}) is empty"
            if len(value) > _MAX_PATIENT_ID:
                return f"line {number}: patient identifier longer than {_MAX_PATIENT_ID}"
    return None


def _check_ndjson(path: Path, check: ClinicalCheck, rules: RuleConfig) -> str | None:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            check.rows += 1
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                return f"line {number}: not JSON ({exc})"
            if not isinstance(resource, dict):
                return f"line {number}: not a JSON object"
            kind = resource.get("resourceType")
            if not isinstance(kind, str) or not kind:
                return f"line {number}: no resourceType"
            if not check.table:
                check.table = kind
            elif kind != check.table:
                return f"line {number}: resourceType {kind} in a file of {check.table} resources"
            missing = [f for f in rules.required_columns.get(kind, ()) if f not in resource]
            if missing:
                return f"line {number}: {kind} requires the fields {missing}"
            patient = _patient_of(resource)
            if not patient:
                return f"line {number}: no patient reference (subject or patient, or a Patient id)"
            if len(patient) > _MAX_PATIENT_ID:
                return f"line {number}: patient identifier longer than {_MAX_PATIENT_ID}"
    return None


def _patient_column(names: list[str], rules: RuleConfig) -> str | None:
    lowered = {n.lower(): n for n in names}
    for candidate in rules.patient_columns:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _patient_of(resource: dict[str, object]) -> str:
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id") or "")
    for key in ("subject", "patient"):
        ref = resource.get(key)
        reference = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(reference, str):
            return reference.rsplit("/", 1)[-1]
    return ""


def already_staged(conn: Connection, partition: str, table: str, sha256: str) -> bool:
    """Whether the same file (same bytes) was already staged into ``table``."""
    return (
        conn.execute(
            select(clinical_files.c.id).where(
                clinical_files.c.partition == partition,
                clinical_files.c.table_name == table,
                clinical_files.c.sha256 == sha256,
            )
        ).first()
        is not None
    )


def stage_rows(
    conn: Connection,
    *,
    batch_id: str,
    partition: str,
    source: str,
    path: Path,
    check: ClinicalCheck,
    sha256: str,
    size: int,
    blob_key: str,
    rules: RuleConfig,
) -> int:
    """Insert the file's ``clinical_files`` row and its records (caller's transaction);
    returns the number of records."""
    file_id = conn.execute(
        insert(clinical_files)
        .values(
            batch_id=batch_id, partition=partition, table_name=check.table, format=check.format,
            source=source, sha256=sha256, size=size, rows=check.rows, blob_key=blob_key,
            created_at=utcnow(),
        )
        .returning(clinical_files.c.id)
    ).scalar_one()  # fmt: skip
    records = _csv_records(path, rules) if check.format == "csv" else _ndjson_records(path)
    written = 0
    chunk: list[dict[str, object]] = []
    for number, patient, data in records:
        chunk.append({"file_id": file_id, "row_number": number, "patient_id": patient,
                      "data": data})  # fmt: skip
        if len(chunk) >= _ROWS_PER_INSERT:
            conn.execute(insert(clinical_rows), chunk)
            written += len(chunk)
            chunk = []
    if chunk:
        conn.execute(insert(clinical_rows), chunk)
        written += len(chunk)
    return written


def _csv_records(path: Path, rules: RuleConfig) -> Iterator[tuple[int, str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        names = [h.strip() for h in next(reader, [])]
        patient = _patient_column(names, rules)
        column = names.index(patient) if patient is not None else None
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            record: dict[str, object] = dict(zip(names, row, strict=False))
            if len(row) > len(names):
                record["_extra"] = row[len(names) :]
            value = row[column].strip() if column is not None and column < len(row) else ""
            yield number, value[:_MAX_PATIENT_ID], orjson.dumps(record).decode()


def _ndjson_records(path: Path) -> Iterator[tuple[int, str, str]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError:
                resource = {}
            patient = _patient_of(resource) if isinstance(resource, dict) else ""
            yield number, patient[:_MAX_PATIENT_ID], line.rstrip("\n")


def count_staged(conn: Connection, batch_id: str) -> tuple[int, int, int, list[str]]:
    """(files, declared rows, staged rows, lake keys) of a batch's clinical files."""
    files = conn.execute(
        select(clinical_files.c.id, clinical_files.c.rows, clinical_files.c.blob_key).where(
            clinical_files.c.batch_id == batch_id
        )
    ).all()
    if not files:
        return 0, 0, 0, []
    staged = 0
    ids = [f.id for f in files]
    for start in range(0, len(ids), 500):
        staged += conn.execute(
            select(func.count()).where(clinical_rows.c.file_id.in_(ids[start : start + 500]))
        ).scalar_one()
    return len(files), sum(f.rows for f in files), staged, [f.blob_key for f in files]


__all__ = [
    "ClinicalCheck",
    "already_staged",
    "check_file",
    "count_staged",
    "stage_rows",
    "store_clinical_file",
    "suffix_of",
    "table_of",
]


class _LakeWriteFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def store_clinical_file(
    archive: Archive,
    ledger: BatchLedger,
    partition: str,
    staged: Path,
    inspection: Inspection,
) -> FileOutcome | None:
    """Check, keep in the lake and stage one clinical file of a batch; its outcome is
    recorded in ``ledger`` (one file) in the transaction that stages its rows.

    Returns the outcome, or None when not even the failure could be recorded (the
    index is unavailable: the queue item stays claimed and a later run retries it).
    """
    source = ledger.sources[0]
    size = inspection.size or 0
    label = str(ledger.queue_ids[0]) if ledger.queue_ids else "1"

    def record(outcome: FileOutcome, findings: list[Finding], kept_at: str | None = None) -> None:
        queue_id = ledger.queue_ids[0] if ledger.queue_ids else None
        file = FileRecord(source, outcome, size, None, findings, kept_at, queue_id)
        with archive.write_lock, archive.engine.begin() as conn:
            record_files(conn, ledger, [file])

    try:
        if inspection.error is not None:
            record(FileOutcome.FAILED, [failure_finding(inspection.error, rejected=False)])
            return FileOutcome.FAILED
        check = check_file(staged, source, archive.rules)
        refused = rejection(check.findings)
        warnings = [f for f in check.findings if f.severity is Severity.WARN]
        if refused is not None:
            kept = keep_aside(archive, ledger.batch_id, label, source, staged)
            record(FileOutcome.REJECTED, [failure_finding(refused, rejected=True)], kept)
            return FileOutcome.REJECTED
        key = archive.layout.clinical_import_key(check.table, inspection.sha256, suffix_of(source))
        try:
            with archive.write_lock, archive.engine.begin() as conn:
                if already_staged(conn, partition, check.table, inspection.sha256):
                    outcome = FileOutcome.DUPLICATE
                else:
                    stage_rows(
                        conn, batch_id=ledger.batch_id, partition=partition, source=source,
                        path=staged, check=check, sha256=inspection.sha256, size=size,
                        blob_key=key, rules=archive.rules,
                    )  # fmt: skip
                    [error] = archive.blobs.put_files([(key, staged)], synced=inspection.synced)
                    if error is not None:
                        raise _LakeWriteFailed(error)
                    outcome = FileOutcome.STORED
                queue_id = ledger.queue_ids[0] if ledger.queue_ids else None
                record_files(conn, ledger, [FileRecord(source, outcome, size, None, warnings,
                                                       None, queue_id)])  # fmt: skip
            return outcome
        except _LakeWriteFailed as failed:
            error = (
                failed.error
                if isinstance(failed.error, MedlakeError)
                else StorageError(str(failed.error))
            )
            record(FileOutcome.FAILED, [failure_finding(error, rejected=False)])
            return FileOutcome.FAILED
        except SQLAlchemyError as exc:
            if archive.blobs.exists(key) and not _staged_elsewhere(archive, key):
                archive.blobs.delete(key)  # moved, then the commit failed: no orphan
            cause = getattr(exc, "orig", None) or exc
            error = DatabaseUnavailable(f"index write failed: {exc.__class__.__name__}: {cause}")
            record(FileOutcome.FAILED, [failure_finding(error, rejected=False)])
            return FileOutcome.FAILED
    except SQLAlchemyError as exc:
        log.error("could not record the outcome of %s in batch %s: %s",
                  source, ledger.batch_id, exc)  # fmt: skip
        ledger.counts = None
        return None
    finally:
        staged.unlink(missing_ok=True)


def _staged_elsewhere(archive: Archive, key: str) -> bool:
    """Whether another committed clinical file row uses ``key`` (same bytes, same table)."""
    with archive.engine.connect() as conn:
        return (
            conn.execute(
                select(clinical_files.c.id).where(clinical_files.c.blob_key == key)
            ).first()
            is not None
        )
