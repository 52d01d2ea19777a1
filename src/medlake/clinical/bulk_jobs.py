"""FHIR bulk data jobs ($export, $import): the durable job record and its runner.

A job is a row of ``fhir_bulk_jobs`` (the FHIR asynchronous request pattern: the
kick-off creates it and answers 202, the status URL reads it). A
:class:`BulkJobRunner` thread in the server claims jobs one at a time and runs them;
the CLI runs its own job in-process with :func:`run_job_here`.

Durability: a running job records a *resume point* (``cursor``) with every step it
completes (an export file written to the lake, an import chunk committed, in the same
transaction as the chunk), and refreshes ``heartbeat_at`` as it goes. An interrupted
job **resumes** from its resume point, never starting over:

- a server that stops gracefully hands its running job back (status ``accepted``), and
  the next runner to start picks it up;
- a job whose process died (``kill -9``, a crash) is taken over at once by a runner on
  the same host (the owner's process no longer exists), and by a runner on another host
  once ``fhir_bulk_job_timeout`` seconds pass without a heartbeat.

Cancelling (DELETE on the status URL) marks the job ``cancelled``; the runner notices at
its next step, stops, and the job's files are removed from the lake. A cancelled job is
gone for its client: its status URL answers 404.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, insert, select, update

from medlake.errors import InvalidState, MedlakeError, NotFound
from medlake.index.schema import fhir_bulk_job_patients, fhir_bulk_jobs
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

#: Seconds an idle runner waits before looking for claimable jobs again (a kick-off in
#: this process wakes it at once).
_IDLE_POLL = 5.0


class JobKind(enum.StrEnum):
    """What a bulk data job does."""

    EXPORT = "export"
    IMPORT = "import"


class JobStatus(enum.StrEnum):
    """Where a bulk data job is in its life."""

    ACCEPTED = "accepted"  # waiting for a runner (new, or handed back by a stopping server)
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # DELETE on the status URL; its files are gone


@dataclass(frozen=True)
class JobFile:
    """One file item of a job's manifest: ``output`` (resources) or ``error``
    (OperationOutcomes). ``name`` is the file's name in the job's lake folder;
    ``input_url`` names the $import input it is about."""

    type: str
    name: str | None
    count: int
    input_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The item as stored in the job row."""
        out: dict[str, Any] = {"type": self.type, "name": self.name, "count": self.count}
        if self.input_url is not None:
            out["inputUrl"] = self.input_url
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobFile:
        """An item as stored in the job row."""
        return cls(data["type"], data.get("name"), int(data["count"]), data.get("inputUrl"))


@dataclass(frozen=True)
class BulkJob:
    """One row of ``fhir_bulk_jobs``."""

    id: str
    kind: JobKind
    partition: str
    status: JobStatus
    request: str
    parameters: dict[str, Any]
    transaction_time: dt.datetime | None
    progress: str | None
    cursor: dict[str, Any] | None
    output: list[JobFile]
    errors: list[JobFile]
    error_message: str | None
    batch_id: str | None
    owner: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def finished(self) -> bool:
        """Whether the job will not run any more (completed, failed or cancelled)."""
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; every stored time is UTC.
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _files(text: str | None) -> list[JobFile]:
    return [JobFile.from_json(item) for item in orjson.loads(text)] if text else []


def _job(row: Any) -> BulkJob:
    created = _aware(row.created_at)
    updated = _aware(row.updated_at)
    assert created is not None and updated is not None
    return BulkJob(
        id=row.id,
        kind=JobKind(row.kind),
        partition=row.partition,
        status=JobStatus(row.status),
        request=row.request,
        parameters=orjson.loads(row.parameters),
        transaction_time=_aware(row.transaction_time),
        progress=row.progress,
        cursor=orjson.loads(row.cursor) if row.cursor else None,
        output=_files(row.output),
        errors=_files(row.errors),
        error_message=row.error_message,
        batch_id=row.batch_id,
        owner=row.owner,
        created_at=created,
        updated_at=updated,
        finished_at=_aware(row.finished_at),
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_job(
    archive: Archive, kind: JobKind, partition: str, request: str, parameters: dict[str, Any]
) -> BulkJob:
    """Record a new job (status ``accepted``) and return it."""
    now = utcnow()
    job_id = str(uuid.uuid4())
    with archive.engine.begin() as conn:
        conn.execute(
            insert(fhir_bulk_jobs).values(
                id=job_id, kind=kind.value, partition=partition,
                status=JobStatus.ACCEPTED.value, request=request,
                parameters=_dumps(parameters), progress="accepted", created_at=now,
                updated_at=now,
            )
        )  # fmt: skip
        return read_job(conn, job_id)


def read_job(conn: Connection, job_id: str) -> BulkJob:
    """The job ``job_id`` (any status), or :class:`NotFound`."""
    row = conn.execute(select(fhir_bulk_jobs).where(fhir_bulk_jobs.c.id == job_id)).first()
    if row is None:
        raise NotFound(f"bulk data job {job_id} does not exist")
    return _job(row)


def get_job(archive: Archive, job_id: str, kind: JobKind | None = None) -> BulkJob:
    """The job ``job_id`` as its client sees it: 404 when unknown, cancelled, or not of
    ``kind``."""
    with archive.engine.connect() as conn:
        job = read_job(conn, job_id)
    if job.status == JobStatus.CANCELLED or (kind is not None and job.kind != kind):
        raise NotFound(f"bulk data job {job_id} does not exist (or was cancelled)")
    return job


def find_unfinished_job(
    archive: Archive, kind: JobKind, partition: str, request: str
) -> BulkJob | None:
    """The newest job of ``kind`` for the same request and partition that has not
    finished (the CLI resumes it instead of starting over)."""
    with archive.engine.connect() as conn:
        row = conn.execute(
            select(fhir_bulk_jobs)
            .where(
                fhir_bulk_jobs.c.kind == kind.value,
                fhir_bulk_jobs.c.partition == partition,
                fhir_bulk_jobs.c.request == request,
                fhir_bulk_jobs.c.status.in_([JobStatus.ACCEPTED.value, JobStatus.RUNNING.value]),
            )
            .order_by(fhir_bulk_jobs.c.created_at.desc())
            .limit(1)
        ).first()
    return _job(row) if row is not None else None


def cancel_job(archive: Archive, job_id: str, kind: JobKind | None = None) -> BulkJob:
    """Cancel a job (DELETE on its status URL): a waiting or finished job at once (its
    files are removed), a running one at its next step. 404 when unknown or cancelled."""
    job = get_job(archive, job_id, kind)
    now = utcnow()
    with archive.engine.begin() as conn:
        conn.execute(
            update(fhir_bulk_jobs)
            .where(fhir_bulk_jobs.c.id == job_id)
            .values(status=JobStatus.CANCELLED.value, progress="cancelled", updated_at=now,
                    finished_at=job.finished_at or now)
        )  # fmt: skip
    if job.status != JobStatus.RUNNING:
        remove_job_files(archive, job)
    return job


def remove_job_files(archive: Archive, job: BulkJob) -> None:
    """Delete the job's folder in the lake and its patient list."""
    prefix = archive.layout.bulk_job_prefix(job.partition, job.kind.value, job.id)
    for key in list(archive.blobs.list(prefix)):
        archive.blobs.delete(key)
    with archive.engine.begin() as conn:
        conn.execute(
            delete(fhir_bulk_job_patients).where(fhir_bulk_job_patients.c.job_id == job.id)
        )


def job_file_key(archive: Archive, job: BulkJob, name: str) -> str:
    """The lake key of one of the job's files (a name listed in its manifest)."""
    listed = {f.name for f in (*job.output, *job.errors) if f.name}
    if name not in listed:
        raise NotFound(f"bulk data job {job.id} has no file {name!r}")
    return archive.layout.bulk_job_file_key(job.partition, job.kind.value, job.id, name)


# --- running a job -------------------------------------------------------------------------


class JobStopped(Exception):
    """Raised at a step of a job that must stop: cancelled, taken over, or its runner
    is stopping (the job is then handed back and resumes later)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Owner:
    """Identity of a running job's process: ``host:pid:nonce``."""

    host: str
    pid: int
    nonce: str

    @classmethod
    def here(cls) -> _Owner:
        return cls(socket.gethostname()[:40], os.getpid(), uuid.uuid4().hex[:12])

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}:{self.nonce}"

    @classmethod
    def gone(cls, name: str | None) -> bool:
        """Whether ``name`` is a process of this host that no longer exists."""
        if not name:
            return True
        host, _, rest = name.partition(":")
        pid_text = rest.partition(":")[0]
        if host != socket.gethostname()[:40] or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # exists, owned by another user
        return False


@dataclass
class JobContext:
    """What a running job reports its progress through."""

    archive: Archive
    job: BulkJob
    owner: str
    stopping: threading.Event = field(default_factory=threading.Event)

    def checkpoint(
        self,
        conn: Connection | None = None,
        *,
        progress: str | None = None,
        **values: Any,
    ) -> None:
        """Record progress (and ``cursor``, ``output``, ``errors``, ``transaction_time``,
        ``batch_id`` when given) and the heartbeat, in ``conn``'s transaction when given
        (an import commits its resume point with its chunk).

        Raises :class:`JobStopped` when the job was cancelled or taken over (nothing is
        recorded, and ``conn``'s transaction must be rolled back) or the runner stops.
        """
        row: dict[str, Any] = {"heartbeat_at": utcnow(), "updated_at": utcnow()}
        if progress is not None:
            row["progress"] = progress[:100]
        for name, value in values.items():
            if name in ("cursor", "parameters"):
                value = _dumps(value)
            elif name in ("output", "errors"):
                value = _dumps([f.to_json() for f in value])
            row[name] = value
        statement = (
            update(fhir_bulk_jobs)
            .where(
                fhir_bulk_jobs.c.id == self.job.id,
                fhir_bulk_jobs.c.owner == self.owner,
                fhir_bulk_jobs.c.status == JobStatus.RUNNING.value,
            )
            .values(**row)
        )
        if conn is not None:
            changed = conn.execute(statement).rowcount
        else:
            with self.archive.engine.begin() as own:
                changed = own.execute(statement).rowcount
        if changed != 1:
            raise JobStopped("the job was cancelled or taken over by another server")
        if self.stopping.is_set():
            raise JobStopped("the server is stopping")


#: Runs one job: called with the context of a claimed job, returns when it is done.
JobHandler = Callable[[JobContext], None]


def _handler(kind: JobKind) -> JobHandler:
    # Imported here: both modules use this one for their job records.
    if kind == JobKind.EXPORT:
        from medlake.clinical.bulk_export import run_export

        return run_export
    from medlake.clinical.bulk_import import run_import

    return run_import


def _claim(archive: Archive, owner: str, job_id: str | None = None) -> BulkJob | None:
    """Claim a job to run: ``job_id``, or the oldest waiting one, or one whose runner is
    gone (its process on this host is dead, or it has been silent too long)."""
    timeout = dt.timedelta(seconds=archive.settings.fhir_bulk_job_timeout)
    t = fhir_bulk_jobs.c
    with archive.engine.connect() as conn:
        query = select(t.id, t.status, t.owner, t.heartbeat_at).where(
            t.status.in_([JobStatus.ACCEPTED.value, JobStatus.RUNNING.value])
        )
        if job_id is not None:
            query = query.where(t.id == job_id)
        candidates = conn.execute(query.order_by(t.created_at).limit(20)).all()
    stale_before = utcnow() - timeout
    for candidate in candidates:
        if candidate.status == JobStatus.RUNNING.value:
            beat = _aware(candidate.heartbeat_at)
            silent = beat is None or beat < stale_before
            if not (_Owner.gone(candidate.owner) or silent):
                continue
        same_owner = t.owner.is_(None) if candidate.owner is None else t.owner == candidate.owner
        with archive.engine.begin() as conn:
            claimed = conn.execute(
                update(fhir_bulk_jobs)
                .where(and_(t.id == candidate.id, t.status == candidate.status, same_owner))
                .values(status=JobStatus.RUNNING.value, owner=owner, heartbeat_at=utcnow(),
                        updated_at=utcnow())
            ).rowcount  # fmt: skip
            if claimed == 1:
                return read_job(conn, candidate.id)
    return None


def _run(context: JobContext) -> BulkJob:
    job = context.job
    archive = context.archive
    t = fhir_bulk_jobs.c
    mine = and_(t.id == job.id, t.owner == context.owner, t.status == JobStatus.RUNNING.value)
    try:
        _handler(job.kind)(context)
    except JobStopped as stopped:
        with archive.engine.begin() as conn:
            current = read_job(conn, job.id)
            if context.stopping.is_set() and current.status == JobStatus.RUNNING:
                # Handed back: the next runner resumes it from its resume point.
                conn.execute(
                    update(fhir_bulk_jobs).where(mine)
                    .values(status=JobStatus.ACCEPTED.value, owner=None, updated_at=utcnow())
                )  # fmt: skip
        if current.status == JobStatus.CANCELLED:
            remove_job_files(archive, current)
        log.info("bulk data job %s stopped: %s", job.id, stopped.reason)
    except Exception as exc:  # the job failed; the record says why
        message = exc.message if isinstance(exc, MedlakeError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, MedlakeError):
            log.exception("bulk data job %s failed", job.id)
        with archive.engine.begin() as conn:
            conn.execute(
                update(fhir_bulk_jobs).where(mine)
                .values(status=JobStatus.FAILED.value, error_message=message, progress="failed",
                        finished_at=utcnow(), updated_at=utcnow())
            )  # fmt: skip
    else:
        with archive.engine.begin() as conn:
            conn.execute(
                update(fhir_bulk_jobs).where(mine)
                .values(status=JobStatus.COMPLETED.value, progress="completed",
                        finished_at=utcnow(), updated_at=utcnow())
            )  # fmt: skip
    with archive.engine.connect() as conn:
        return read_job(conn, job.id)


def run_job_here(archive: Archive, job_id: str) -> BulkJob:
    """Run (or resume) one job in this thread, as the CLI does; returns it finished.
    :class:`InvalidState` when another live process is running it."""
    owner = _Owner.here().name
    job = _claim(archive, owner, job_id)
    if job is None:
        with archive.engine.connect() as conn:
            current = read_job(conn, job_id)
        if current.finished:
            return current
        raise InvalidState(f"bulk data job {job_id} is being run by {current.owner}")
    return _run(JobContext(archive, job, owner))


class BulkJobRunner:
    """A thread that runs the archive's bulk data jobs, one at a time, oldest first."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.owner = _Owner.here().name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; it first takes up jobs that an earlier run left unfinished."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="fhir-bulk-jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for work now (a job was just created)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; a running job is handed back (it resumes when a
        runner starts again)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = _claim(self.archive, self.owner)
            except Exception:  # the index is unreachable; try again later
                log.exception("cannot look for bulk data jobs")
                job = None
            if job is None:
                self._wake.wait(_IDLE_POLL)
                self._wake.clear()
                continue
            _run(JobContext(self.archive, job, self.owner, self._stop))


def job_patients_select(job_id: str) -> Any:
    """``SELECT patient_id`` of a job's patient list (for an ``IN`` condition)."""
    return select(fhir_bulk_job_patients.c.patient_id).where(
        fhir_bulk_job_patients.c.job_id == job_id
    )


def set_job_patients(conn: Connection, job_id: str, patient_ids: list[str]) -> None:
    """Replace the job's patient list (in the caller's transaction)."""
    conn.execute(delete(fhir_bulk_job_patients).where(fhir_bulk_job_patients.c.job_id == job_id))
    rows = [{"job_id": job_id, "patient_id": p} for p in sorted(set(patient_ids))]
    for start in range(0, len(rows), 1000):
        conn.execute(insert(fhir_bulk_job_patients), rows[start : start + 1000])


__all__ = [
    "BulkJob",
    "BulkJobRunner",
    "JobContext",
    "JobFile",
    "JobHandler",
    "JobKind",
    "JobStatus",
    "JobStopped",
    "cancel_job",
    "create_job",
    "find_unfinished_job",
    "get_job",
    "job_file_key",
    "job_patients_select",
    "read_job",
    "remove_job_files",
    "run_job_here",
    "set_job_patients",
]
