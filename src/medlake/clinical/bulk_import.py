"""FHIR bulk import (``$import``, ``medlake ingest --fhir`` / ``--mapping``): NDJSON
files of FHIR resources, or CSV files through a mapping, into the FHIR store.

Every import is an ingest **batch** (``batches``), and every line is accounted for:

- each line is parsed and validated (R4 rules of ``medlake.clinical.resources``); a line
  that is not a valid resource (or a CSV row that cannot be mapped) becomes an
  ``ingest_errors`` row whose ``source`` names the file and line and whose ``message``
  is the ``OperationOutcome`` (JSON) saying why;
- valid resources are stored in chunks of ``fhir_import_chunk`` through the store's
  write session (one transaction per chunk: one multi-row INSERT per table, search
  values included). A resource with an ``id`` is written with that id (an update), so
  importing a file again is idempotent: a resource whose content equals the stored
  version counts as a **duplicate** and makes no new version. A resource without an id
  gets a new one (importing it again adds it again). Conditional references
  (``Patient?identifier=system|value``) are resolved in the store; one that matches no
  resource, or several, rejects its line;
- the chunk's resources, their counts (``seen``, ``stored``, ``duplicates``,
  ``rejected``), their error rows and the job's resume point commit together, so the
  counts are exact after a crash and an interrupted import resumes after the last
  committed chunk;
- at the end the batch is reconciled (lines read = stored + duplicates + rejected, and
  one error row per rejected line) and closed; the manifest lists, per input, the
  resources taken in and an NDJSON file of the OperationOutcomes of its rejected lines.

Inputs (:func:`resolve_input`): files in the lake (a URL of one of this server's bulk
data files, or a URL under the lake's root), and ``file://`` URLs under the folder of
the ``fhir_import_root`` setting. The CLI passes local paths.
"""

from __future__ import annotations

import collections
import io
import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
from sqlalchemy import func, select

from medlake.clinical.bulk_jobs import (
    BulkJob,
    JobContext,
    JobFile,
    JobKind,
    JobStopped,
    create_job,
    find_unfinished_job,
    read_job,
    run_job_here,
)
from medlake.clinical.csv_mapping import CsvMapping, RowError, load_mapping, map_rows
from medlake.clinical.outcome import operation_outcome
from medlake.clinical.resources import (
    RESOURCE_TYPES,
    check_envelope,
    dump_resource,
    issue,
    parse_json,
    validate_resource,
)
from medlake.clinical.store import (
    CurrentRow,
    WriteOp,
    WriteSession,
    fhir_instant,
    new_logical_id,
    run_write,
)
from medlake.errors import InvalidInput, MedlakeError, NotFound, PreconditionFailed
from medlake.index.schema import fhir_resources, ingest_errors
from medlake.ingest.archive import Archive
from medlake.ingest.batches import (
    Batch,
    BatchKind,
    BatchLedger,
    FileOutcome,
    FileRecord,
    create_batch,
    finish_batch,
    get_batch,
    record_files,
)
from medlake.ingest.validation import Finding, Severity

log = logging.getLogger(__name__)

#: Input formats: FHIR NDJSON (``$import``'s ``inputFormat``), or CSV through a mapping.
NDJSON_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
NDJSON = "application/fhir+ndjson"
CSV_FORMAT = "text/csv"
#: The kind of the import's batch (``medlake batches --kind ingest`` lists them) and the
#: prefix of its source, which keeps it apart from a plain ``medlake ingest`` of the same
#: path (that stages the file instead).
_BATCH_KIND = BatchKind.INGEST
SOURCE_PREFIX = "fhir-import:"
#: Rule names of the error rows.
RULE_RESOURCE = "fhir_resource"
RULE_MAPPING = "csv_mapping"
#: The bulk data files of this server, by URL path: ``.../$bulk-file/{job}/{name}``.
BULK_FILE_SEGMENT = "$bulk-file"


# --- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportInput:
    """One input file: the resource type it holds (checked per line when given), the
    URL as the client gave it, and where medlake reads it (a lake key or a local path)."""

    type: str | None
    url: str
    key: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As stored in the job row."""
        return {"type": self.type, "url": self.url, "key": self.key, "path": self.path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImportInput:
        """As stored in the job row."""
        return cls(data.get("type"), data["url"], data.get("key"), data.get("path"))


@dataclass(frozen=True)
class ImportRequest:
    """What to import: the inputs, and the CSV mapping when they are CSV files."""

    inputs: list[ImportInput]
    mapping: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As stored in the job row."""
        return {"inputs": [i.to_json() for i in self.inputs], "mapping": self.mapping}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImportRequest:
        """As stored in the job row."""
        return cls([ImportInput.from_json(i) for i in data["inputs"]], data.get("mapping"))


def resolve_input(
    archive: Archive,
    url: str,
    resource_type: str | None,
    *,
    partition: str,
    base_url: str | None = None,
) -> ImportInput:
    """Where an ``$import`` input URL is read from; 400 for one medlake may not read.

    Accepted: a download URL of one of this server's bulk data files (``base_url``, the
    FHIR base the request came to, names the server) and a URL or path under the lake's
    root, both only of the clinical area of ``partition`` (what may be imported into a
    partition is what its readers may read already); and a ``file://`` URL under
    ``fhir_import_root``.
    """
    if resource_type is not None and resource_type not in RESOURCE_TYPES:
        raise InvalidInput(f"input type {resource_type!r} is not a FHIR R4 resource type")
    if base_url is not None:
        key = _bulk_file_key(archive, url, base_url, partition)
        if key is not None:
            return ImportInput(resource_type, url, key=key)
    lake_key = _lake_key(archive, url, partition)
    if lake_key is not None:
        return ImportInput(resource_type, url, key=lake_key)
    parts = urlsplit(url)
    if parts.scheme == "file":
        root = archive.settings.fhir_import_root
        if root is None:
            raise InvalidInput(
                f"input {url}: file:// inputs are refused (set fhir_import_root to allow a folder)"
            )
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(root.resolve()):
            raise InvalidInput(f"input {url} is outside the import root {root}")
        if not path.is_file():
            raise InvalidInput(f"input {url}: no such file")
        return ImportInput(resource_type, url, path=str(path))
    raise InvalidInput(
        f"input {url} is neither a file in the lake nor a file:// URL under fhir_import_root"
    )


def _bulk_file_key(archive: Archive, url: str, base_url: str, partition: str) -> str | None:
    """The lake key of one of this server's bulk data file URLs
    (``{server}/fhir[/partitions/{p}]/$bulk-file/{job}/{name}``) of a job of ``partition``."""
    server = urlsplit(base_url)
    parts = urlsplit(url)
    marker = f"/{BULK_FILE_SEGMENT}/"
    if (parts.scheme, parts.netloc) != (server.scheme, server.netloc) or marker not in parts.path:
        return None
    job_id, _, name = unquote(parts.path.rsplit(marker, 1)[1]).partition("/")
    with archive.engine.connect() as conn:
        try:
            job = read_job(conn, job_id)
        except NotFound:
            raise InvalidInput(f"input {url}: no such bulk data job") from None
    if job.partition != partition:
        # Said like a missing job: a job id of another partition tells nothing about it.
        raise InvalidInput(f"input {url}: no such bulk data job")
    if name not in {f.name for f in (*job.output, *job.errors)}:
        raise InvalidInput(f"input {url}: bulk data job {job_id} has no such file")
    return archive.layout.bulk_job_file_key(job.partition, job.kind.value, job.id, name)


def _lake_key(archive: Archive, url: str, partition: str) -> str | None:
    """The key of a URL (or local path) under the lake's root, if it is one; the key
    must name an existing blob in the clinical area of ``partition``."""
    root = archive.settings.resolved_lake_url.rstrip("/")
    candidates = [url]
    if url.startswith("file://"):
        candidates.append(unquote(urlsplit(url).path))
    for candidate in candidates:
        if candidate.startswith(root + "/"):
            key = candidate[len(root) + 1 :]
            area = f"{archive.layout.clinical_root(partition)}/"
            if ".." in key.split("/") or not key.startswith(area):
                raise InvalidInput(f"input {url} is not a file of the clinical area {area}")
            if not archive.blobs.exists(key):
                raise InvalidInput(f"input {url}: no such file in the lake")
            return key
    return None


def parse_import_parameters(
    archive: Archive, body: Any, *, base_url: str, partition: str
) -> ImportRequest:
    """The ``Parameters`` resource of a ``$import`` kick-off: ``inputFormat``
    (``application/fhir+ndjson``), and ``input`` parts of ``type`` and ``url`` each."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise InvalidInput("the body of $import must be a Parameters resource")
    input_format = None
    inputs: list[ImportInput] = []
    for index, parameter in enumerate(body.get("parameter") or []):
        name = parameter.get("name") if isinstance(parameter, dict) else None
        if name == "inputFormat":
            input_format = _primitive(parameter, index)
        elif name == "input":
            parts = {p.get("name"): p for p in parameter.get("part") or [] if isinstance(p, dict)}
            if "url" not in parts:
                raise InvalidInput(f"Parameters.parameter[{index}] (input) has no url part")
            if "type" not in parts:
                raise InvalidInput(f"Parameters.parameter[{index}] (input) has no type part")
            url = _primitive(parts["url"], index)
            kind = _primitive(parts["type"], index)
            inputs.append(resolve_input(archive, url, kind, partition=partition, base_url=base_url))
        elif name in ("inputSource", "mode", "storageDetail"):
            continue  # informational (inputSource) or irrelevant to medlake's one mode
        else:
            raise InvalidInput(f"unknown $import parameter {name!r}")
    if input_format is not None and input_format not in NDJSON_FORMATS:
        raise InvalidInput(
            f"inputFormat {input_format!r} is not supported; use application/fhir+ndjson"
        )
    if not inputs:
        raise InvalidInput("$import needs at least one input (type and url)")
    return ImportRequest(inputs)


def _primitive(parameter: dict[str, Any], index: int) -> str:
    values = [v for k, v in parameter.items() if k.startswith("value")]
    if len(values) != 1 or not isinstance(values[0], str):
        raise InvalidInput(f"Parameters.parameter[{index}]: {parameter.get('name')} needs a value")
    return values[0]


def start_import(
    archive: Archive, request: ImportRequest, *, partition: str, kickoff_url: str
) -> BulkJob:
    """Record the import job (a runner starts it)."""
    return create_job(archive, JobKind.IMPORT, partition, kickoff_url, request.to_json())


@dataclass(frozen=True)
class ImportResult:
    """What an import run from the CLI came to."""

    job: BulkJob
    batch: Batch | None


def import_files(
    archive: Archive, paths: Sequence[Path], *, partition: str, mapping: str | None = None
) -> ImportResult:
    """Import local NDJSON files (or CSV files through ``mapping``) in this process:
    the CLI's ``medlake ingest --fhir`` / ``--mapping``. Running it again for the same
    files continues an interrupted import instead of starting over."""
    if mapping is not None:
        load_mapping(mapping)  # a broken mapping fails before anything is recorded
    inputs = []
    for path in paths:
        if not path.is_file():
            raise InvalidInput(f"{path}: no such file")
        inputs.append(ImportInput(None, str(path), path=str(path.resolve())))
    request = ImportRequest(inputs, mapping)
    label = SOURCE_PREFIX + " ".join(i.path or i.url for i in inputs)
    job = find_unfinished_job(archive, JobKind.IMPORT, partition, label)
    if job is None:
        job = create_job(archive, JobKind.IMPORT, partition, label, request.to_json())
    done = run_job_here(archive, job.id)
    batch = None
    if done.batch_id is not None:
        with archive.engine.connect() as conn:
            batch = get_batch(conn, done.batch_id)
    return ImportResult(done, batch)


# --- reading the inputs ---------------------------------------------------------------------


@dataclass
class _Line:
    """One line (NDJSON) or row (CSV) of an input, checked."""

    number: int
    size: int
    resource: dict[str, Any] | None = None
    error: MedlakeError | None = None
    rule: str = RULE_RESOURCE
    #: The line as read (NDJSON), until it is checked.
    raw: bytes | None = None
    #: The OperationOutcome (JSON) of a line rejected by a checker process.
    error_text: str | None = None

    @property
    def rejected(self) -> bool:
        """Whether the line is rejected."""
        return self.error is not None or self.error_text is not None


def _open(archive: Archive, item: ImportInput) -> BinaryIO:
    try:
        if item.key is not None:
            return archive.blobs.open(item.key)
        assert item.path is not None
        return Path(item.path).open("rb")
    except (OSError, MedlakeError) as exc:
        raise InvalidInput(f"cannot read the input {item.url}: {exc}") from exc


def _check(resource: Any, expected_type: str | None) -> None:
    """Validate a parsed resource: :class:`MedlakeError` saying what is wrong."""
    check_envelope(resource)
    if expected_type is not None and resource["resourceType"] != expected_type:
        raise InvalidInput(f"a {resource['resourceType']} in an input of type {expected_type}")
    validate_resource(resource)


def verdicts(lines: list[tuple[int, bytes]], expected_type: str | None) -> list[str | None]:
    """Parse and validate JSON lines: per line None (valid) or the OperationOutcome (JSON)
    of why not. Runs in a checker process for large inputs."""
    out: list[str | None] = []
    for number, raw in lines:
        try:
            _check(parse_json(raw, f"line {number}"), expected_type)
        except MedlakeError as exc:
            out.append(_error_text(exc, number))
        else:
            out.append(None)
    return out


def _ndjson_lines(handle: BinaryIO, after: int) -> Iterator[_Line]:
    for number, raw in enumerate(handle, start=1):
        if number > after and raw.strip():
            yield _Line(number, len(raw), raw=raw)


def _csv_lines(handle: BinaryIO, mapping: CsvMapping, after: int) -> Iterator[_Line]:
    text = io.TextIOWrapper(handle, encoding=mapping.csv.encoding, newline="")
    for number, mapped in map_rows(mapping, text):
        if number <= after:
            continue
        if isinstance(mapped, RowError):
            yield _Line(number, 0, error=InvalidInput(str(mapped)), rule=RULE_MAPPING)
        else:
            yield _Line(number, 0, resource=mapped, raw=dump_resource(mapped))


#: Inputs larger than this are checked (parsed, validated) by a second process while
#: this one stores: validation costs about as much CPU as the store's own work.
CHECKER_PROCESS_BYTES = 4 * 1024 * 1024


class _Checker:
    """Checks the lines of chunks, up to two chunks ahead of the one being stored; in a
    worker process (``spawn``, so it shares nothing with the server's threads) or here."""

    def __init__(self, in_process: bool) -> None:
        self._pool: ProcessPoolExecutor | None = None
        if not in_process:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, lines: list[_Line], expected_type: str | None) -> Future[list[str | None]]:
        """Start checking ``lines`` (those already rejected are left as they are)."""
        items = [
            (line.number, line.raw) for line in lines if line.raw is not None and not line.rejected
        ]
        if self._pool is not None and items:
            return self._pool.submit(verdicts, items, expected_type)
        done: Future[list[str | None]] = Future()
        try:
            done.set_result(verdicts(items, expected_type))
        except BaseException as exc:
            done.set_exception(exc)
        return done

    def close(self) -> None:
        """Stop the worker process."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _checked_chunks(
    lines: Iterator[_Line], size: int, checker: _Checker, expected_type: str | None
) -> Iterator[list[_Line]]:
    """The lines in chunks of ``size``, checked."""
    ahead: collections.deque[tuple[list[_Line], Future[list[str | None]]]] = collections.deque()
    pending: list[_Line] = []

    def submit() -> None:
        nonlocal pending
        ahead.append((pending, checker.submit(pending, expected_type)))
        pending = []

    for line in lines:
        pending.append(line)
        if len(pending) >= size:
            submit()
            if len(ahead) > 2:
                chunk, future = ahead.popleft()
                yield _merge(chunk, future.result())
    if pending:
        submit()
    while ahead:
        chunk, future = ahead.popleft()
        yield _merge(chunk, future.result())


def _merge(chunk: list[_Line], found: list[str | None]) -> list[_Line]:
    """The chunk with the verdicts of its checked lines: resources parsed (NDJSON; a CSV
    row's resource is there already), rejections recorded."""
    verdict = iter(found)
    for line in chunk:
        if line.raw is None or line.rejected:
            continue
        error_text = next(verdict)
        if error_text is not None:
            line.error_text, line.resource = error_text, None
        elif line.resource is None:
            line.resource = parse_json(line.raw)
        line.raw = None
    return chunk


def _transactions(chunk: list[_Line]) -> Iterator[_Chunk]:
    """A checked chunk as transactions: cut where a resource id repeats (the store
    writes each resource once per transaction)."""
    current = _Chunk()
    for line in chunk:
        if not current.add(line):
            yield current
            current = _Chunk()
            current.add(line)
    if current.lines:
        yield current


# --- storing chunks ------------------------------------------------------------------------


def _meta_free(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` without the meta elements the store sets (to compare content)."""
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def _conditional_targets(value: Any, found: list[str]) -> list[str]:
    """Every conditional reference (``Type?criteria``) in ``value``."""
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str) and "?" in reference and "/" not in reference.split("?")[0]:
            found.append(reference)
        for item in value.values():
            if isinstance(item, dict | list):
                _conditional_targets(item, found)
    elif isinstance(value, list):
        for item in value:
            _conditional_targets(item, found)
    return found


def _resolve(session: WriteSession, reference: str, cache: dict[str, str]) -> str:
    """``Type/id`` of the one resource a conditional reference matches (412 otherwise)."""
    if reference in cache:
        return cache[reference]
    resource_type, _, query = reference.partition("?")
    if resource_type not in RESOURCE_TYPES:
        raise InvalidInput(f"conditional reference {reference!r} names no resource type")
    rows = session.matches(resource_type, parse_qsl(query, keep_blank_values=True))
    if len(rows) != 1:
        what = "no resource matches" if not rows else f"{len(rows)} resources match"
        message = f"conditional reference {reference!r}: {what}; it must match exactly one"
        code = "not-found" if not rows else "multiple-matches"
        raise PreconditionFailed(message, issues=[issue(code, message)])
    cache[reference] = f"{resource_type}/{rows[0].logical_id}"
    return cache[reference]


def _with_references(value: Any, resolved: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _with_references(v, resolved) for k, v in value.items()}
        reference = out.get("reference")
        if isinstance(reference, str) and reference in resolved:
            out["reference"] = resolved[reference]
        return out
    if isinstance(value, list):
        return [_with_references(v, resolved) for v in value]
    return value


def _error_text(error: MedlakeError, number: int) -> str:
    """The ``OperationOutcome`` (JSON) of a rejected line; each issue says the line."""
    outcome = operation_outcome(error)
    for one in outcome["issue"]:
        one["diagnostics"] = f"line {number}: {one.get('diagnostics', error.message)}"
    return dump_resource(outcome).decode()


@dataclass
class _Chunk:
    """The lines of one transaction, and what they came to."""

    lines: list[_Line] = field(default_factory=list)
    keys: set[tuple[str, str]] = field(default_factory=set)

    def add(self, line: _Line) -> bool:
        """Add a line; False (not added) when its resource's id is already in the chunk
        (the store writes each resource once per transaction)."""
        resource = line.resource
        if resource is not None and isinstance(resource.get("id"), str):
            key = (resource["resourceType"], resource["id"])
            if key in self.keys:
                return False
            self.keys.add(key)
        self.lines.append(line)
        return True


@dataclass
class _Counts:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0


def _store_chunk(
    context: JobContext,
    ledger: BatchLedger,
    item: ImportInput,
    chunk: _Chunk,
    cursor: dict[str, Any],
) -> _Counts:
    """Store one chunk, its error rows, its counts and the resume point in one transaction."""

    def work(session: WriteSession) -> tuple[_Counts, dict[str, list[int]]]:
        counts = _Counts()
        records: list[FileRecord] = []
        cache: dict[str, str] = {}
        planned: list[tuple[_Line, dict[str, Any]]] = []
        for line in chunk.lines:
            if not line.rejected:
                assert line.resource is not None
                try:
                    targets = _conditional_targets(line.resource, [])
                    resolved = {ref: _resolve(session, ref, cache) for ref in targets}
                except MedlakeError as exc:
                    line.error = exc
                else:
                    resource = (
                        _with_references(line.resource, resolved) if resolved else line.resource
                    )
                    planned.append((line, resource))
        outcomes = _write(session, planned)
        for line in chunk.lines:
            source = f"{item.url} line {line.number}"
            if line.rejected:
                text = line.error_text
                if text is None:
                    assert line.error is not None
                    text = _error_text(line.error, line.number)
                finding = Finding(line.rule, Severity.REJECT, text)
                records.append(FileRecord(source, FileOutcome.REJECTED, line.size, None, [finding]))
                counts.rejected += 1
                continue
            outcome = outcomes[id(line)]
            records.append(FileRecord(source, outcome, line.size))
            if outcome is FileOutcome.DUPLICATE:
                counts.duplicates += 1
            else:
                counts.stored += 1
        record_files(session.conn, ledger, records)
        totals = dict(cursor.get("totals") or {})
        before = totals.get(str(cursor["input"]), [0, 0])
        totals[str(cursor["input"])] = [
            before[0] + counts.stored + counts.duplicates,
            before[1] + counts.rejected,
        ]
        assert ledger.counts is not None
        context.checkpoint(
            session.conn,
            cursor={**cursor, "totals": totals},
            progress=f"{ledger.counts.seen} lines read: {ledger.counts.stored} stored, "
            f"{ledger.counts.duplicates} unchanged, {ledger.counts.rejected} rejected",
        )
        return counts, totals

    # ``work`` may run again (PostgreSQL reports a lost race at commit): it only reads
    # ``cursor``; the totals it committed are taken over once it succeeded.
    counts, totals = run_write(context.archive, context.job.partition, work)
    cursor["totals"] = totals
    return counts


def _write(
    session: WriteSession, planned: list[tuple[_Line, dict[str, Any]]]
) -> dict[int, FileOutcome]:
    """Write the planned resources (updates by id, creates without one); resources equal
    to their stored version are duplicates and not written. Outcomes by ``id(line)``."""
    by_type: dict[str, list[str]] = {}
    for _line, resource in planned:
        if isinstance(resource.get("id"), str):
            by_type.setdefault(resource["resourceType"], []).append(resource["id"])
    current: dict[tuple[str, str], CurrentRow] = {}
    for kind, ids in by_type.items():
        for found_id, found in session.current(kind, ids).items():
            current[(kind, found_id)] = found
    stored = _stored_contents(session, [c.pk for c in current.values() if not c.deleted])
    outcomes: dict[int, FileOutcome] = {}
    ops: list[WriteOp] = []
    for line, resource in planned:
        resource_type = resource["resourceType"]
        logical_id = resource.get("id")
        if not isinstance(logical_id, str):
            ops.append(WriteOp(resource_type, new_logical_id(), resource, "POST", None))
            outcomes[id(line)] = FileOutcome.STORED
            continue
        row = current.get((resource_type, logical_id))
        unchanged = row is not None and stored.get(row.pk) == _meta_free(resource)
        if unchanged:
            outcomes[id(line)] = FileOutcome.DUPLICATE
            continue
        ops.append(WriteOp(resource_type, logical_id, resource, "PUT", row))
        outcomes[id(line)] = FileOutcome.STORED
    if ops:
        session.apply(ops)
    return outcomes


def _stored_contents(session: WriteSession, pks: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(pks), 500):
        rows = session.conn.execute(
            select(fhir_resources.c.id, fhir_resources.c.content).where(
                fhir_resources.c.id.in_(pks[start : start + 500])
            )
        )
        for row in rows:
            if row.content is not None:
                out[row.id] = _meta_free(orjson.loads(row.content))
    return out


# --- the job -------------------------------------------------------------------------------


def run_import(context: JobContext) -> None:
    """Run (or resume) an import job: each input, chunk by chunk, then reconcile and
    close its batch and write the error files of the manifest."""
    archive = context.archive
    job = context.job
    request = ImportRequest.from_json(job.parameters)
    mapping = load_mapping(request.mapping) if request.mapping is not None else None
    cursor = job.cursor
    if cursor is None or job.batch_id is None:
        with archive.engine.begin() as conn:
            batch = create_batch(
                conn, _BATCH_KIND, job.partition,
                job.request if job.request.startswith(SOURCE_PREFIX)
                else SOURCE_PREFIX + " ".join(i.url for i in request.inputs),
                {"fhir_import_job": job.id, "format": CSV_FORMAT if mapping else NDJSON},
            )  # fmt: skip
        cursor = {"input": 0, "line": 0, "totals": {}}
        context.checkpoint(
            progress="importing", cursor=cursor, batch_id=batch.id,
            transaction_time=batch.started_at,
        )  # fmt: skip
        batch_id = batch.id
    else:
        batch_id = job.batch_id
    try:
        cursor = _import_inputs(context, request, mapping, batch_id, cursor)
    except JobStopped:
        raise  # interrupted, not failed: it resumes, with its batch still open
    except Exception as exc:
        # The job fails; its batch closes as failed, with what it committed counted.
        reason = exc.message if isinstance(exc, MedlakeError) else f"{type(exc).__name__}: {exc}"
        with archive.engine.begin() as conn:
            finish_batch(conn, batch_id, differences=[f"the import stopped: {reason}"], extra={})
        raise
    _finish(context, request, batch_id, cursor)


def _import_inputs(
    context: JobContext,
    request: ImportRequest,
    mapping: CsvMapping | None,
    batch_id: str,
    cursor: dict[str, Any],
) -> dict[str, Any]:
    """Store every input from the resume point on; returns the final resume point."""
    chunk_size = context.archive.settings.fhir_import_chunk
    checker = _Checker(in_process=_input_bytes(context.archive, request) < CHECKER_PROCESS_BYTES)
    try:
        return _store_inputs(context, request, mapping, batch_id, cursor, checker, chunk_size)
    finally:
        checker.close()


def _input_bytes(archive: Archive, request: ImportRequest) -> int:
    total = 0
    for item in request.inputs:
        try:
            if item.key is not None:
                total += archive.blobs.size(item.key)
            elif item.path is not None:
                total += Path(item.path).stat().st_size
        except (OSError, MedlakeError):
            continue  # reported when the input is opened
    return total


def _store_inputs(
    context: JobContext,
    request: ImportRequest,
    mapping: CsvMapping | None,
    batch_id: str,
    cursor: dict[str, Any],
    checker: _Checker,
    chunk_size: int,
) -> dict[str, Any]:
    for index in range(int(cursor["input"]), len(request.inputs)):
        item = request.inputs[index]
        after = int(cursor["line"]) if index == cursor["input"] else 0
        cursor = {**cursor, "input": index, "line": after}
        ledger = BatchLedger(batch_id, sources=[])
        expected = item.type or (mapping.resource_type if mapping is not None else None)
        with _open(context.archive, item) as handle:
            lines = (
                _csv_lines(handle, mapping, after)
                if mapping is not None
                else _ndjson_lines(handle, after)
            )
            for checked in _checked_chunks(lines, chunk_size, checker, expected):
                for chunk in _transactions(checked):
                    cursor["line"] = chunk.lines[-1].number
                    _store_chunk(context, ledger, item, chunk, cursor)
        cursor = {**cursor, "input": index + 1, "line": 0}
        context.checkpoint(cursor=cursor)
    return cursor


def _finish(
    context: JobContext, request: ImportRequest, batch_id: str, cursor: dict[str, Any]
) -> None:
    """Reconcile and close the batch; the manifest's output and error files."""
    archive = context.archive
    with archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
        error_rows = conn.execute(
            select(func.count()).where(
                ingest_errors.c.batch_id == batch_id, ingest_errors.c.severity == "reject"
            )
        ).scalar_one()
    differences = []
    if not batch.balanced:
        differences.append(
            f"{batch.seen} lines read but {batch.stored} stored + {batch.duplicates} unchanged "
            f"+ {batch.rejected} rejected"
        )
    if error_rows != batch.rejected:
        differences.append(f"{batch.rejected} lines rejected but {error_rows} error rows")
    figures = {"lines": batch.seen, "stored": batch.stored, "duplicates": batch.duplicates,
               "rejected": batch.rejected, "error_rows": error_rows}  # fmt: skip
    output, errors = _manifest_files(context, request, batch_id, cursor)
    with archive.engine.begin() as conn:
        finish_batch(conn, batch_id, differences=differences, extra={"reconciliation": figures})
        context.checkpoint(conn, progress="completed", output=output, errors=errors)


def _manifest_files(
    context: JobContext, request: ImportRequest, batch_id: str, cursor: dict[str, Any]
) -> tuple[list[JobFile], list[JobFile]]:
    """Per input: the resources taken in, and the OperationOutcomes of its rejected lines
    written to ``OperationOutcome-{n}.ndjson`` in the job's lake folder."""
    archive, job = context.archive, context.job
    totals = cursor.get("totals") or {}
    output: list[JobFile] = []
    errors: list[JobFile] = []
    for index, item in enumerate(request.inputs):
        taken, rejected = totals.get(str(index), [0, 0])
        kind = item.type or (request_type(request) or "Resource")
        output.append(JobFile(kind, None, taken, item.url))
        if not rejected:
            continue
        name = f"OperationOutcome-{index + 1}.ndjson"
        folder = archive.staging_dir / "bulk" / job.id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.part"
        count = 0
        prefix = f"{item.url} line "
        with path.open("wb") as handle, archive.engine.connect() as conn:
            last = 0
            while True:
                rows = conn.execute(
                    select(ingest_errors.c.id, ingest_errors.c.source, ingest_errors.c.message)
                    .where(ingest_errors.c.batch_id == batch_id, ingest_errors.c.id > last)
                    .order_by(ingest_errors.c.id)
                    .limit(1000)
                ).all()
                if not rows:
                    break
                last = rows[-1].id
                for row in rows:
                    if row.source.startswith(prefix) and row.message.startswith("{"):
                        handle.write(row.message.encode() + b"\n")
                        count += 1
        key = archive.layout.bulk_job_file_key(job.partition, "import", job.id, name)
        archive.blobs.put_file(key, path)
        errors.append(JobFile("OperationOutcome", name, count, item.url))
    return output, errors


def request_type(request: ImportRequest) -> str | None:
    """The resource type of a CSV import (its mapping's), None for NDJSON."""
    return load_mapping(request.mapping).resource_type if request.mapping else None


def import_manifest(job: BulkJob, *, file_url: Any, requires_access_token: bool) -> dict[str, Any]:
    """The complete-status body of a finished import (``file_url(name)`` is the download
    URL of an error file)."""
    assert job.transaction_time is not None
    body: dict[str, Any] = {
        "transactionTime": fhir_instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": requires_access_token,
        "output": [{"type": f.type, "count": f.count, "inputUrl": f.input_url} for f in job.output],
        "error": [
            {"type": f.type, "count": f.count, "inputUrl": f.input_url, "url": file_url(f.name)}
            for f in job.errors
        ],
    }
    if job.batch_id is not None:
        body["extension"] = {"batch": job.batch_id}
    return body


__all__ = [
    "BULK_FILE_SEGMENT",
    "CSV_FORMAT",
    "NDJSON_FORMATS",
    "SOURCE_PREFIX",
    "ImportInput",
    "ImportRequest",
    "ImportResult",
    "import_files",
    "import_manifest",
    "parse_import_parameters",
    "resolve_input",
    "run_import",
    "start_import",
]
