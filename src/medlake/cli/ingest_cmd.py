"""``medlake ingest``, ``watch``, ``batches``, ``batch show|resume`` and ``reconcile``:
the command line of the ingest pipeline (``medlake.ingest``)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from medlake.cli.log_setup import configure_logging
from medlake.cli.options import DataOption
from medlake.config import Settings, load_settings
from medlake.errors import InvalidInput, MedlakeError
from medlake.ingest.archive import Archive
from medlake.ingest.batches import (
    Batch,
    BatchStatus,
    count_errors,
    get_batch,
    list_batches,
    list_errors,
    resume_batch,
)
from medlake.ingest.events import (
    BatchFinished,
    BatchOpened,
    BatchPaused,
    EventHub,
    FilesDiscovered,
    FilesProcessed,
    IngestEvent,
)
from medlake.ingest.inspect import start_workers
from medlake.ingest.pipeline import default_workers, discover, open_batch, run_batch
from medlake.ingest.reconcile import reconcile_partition
from medlake.ingest.watch import DropZoneWatcher
from medlake.types import DEFAULT_PARTITION

console = Console()
batch_app = typer.Typer(help="Look at and resume ingest batches.", no_args_is_help=True)

PartitionOption = Annotated[str, typer.Option(help="Partition to store into.")]
WorkersOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Worker processes that copy, hash and parse (default: one per core)."),
]
#: Exit status of a batch that paused (too many rejections).
EXIT_PAUSED = 2
_SHOWN_ERRORS = 20


def _open(data: Path | None) -> Archive:
    return Archive.open(load_settings(data=data))


def _fail(exc: MedlakeError) -> typer.Exit:
    console.print(f"[red]error:[/] {escape(exc.message)}")
    return typer.Exit(2)


# --- medlake ingest -----------------------------------------------------------------------


class _ProgressView:
    """A Rich progress bar fed by ingest events: files, MB/s, rejects."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.files = 0
        self.total = 0
        self.rejected = 0
        self.rejections: list[tuple[str, str, str]] = []
        self.paused: str | None = None

    def __call__(self, event: IngestEvent) -> None:
        if isinstance(event, FilesDiscovered):
            self.total += event.count
            self._task(event.size)
        elif isinstance(event, BatchOpened):
            self.total = self.files + event.queued
            task = self._task(0)
            self.progress.update(task, total=event.queued_bytes + self._completed())
        elif isinstance(event, FilesProcessed):
            self.files += event.seen
            self.rejected += event.rejected
            self.rejections += event.rejections
            self.progress.update(self._task(0), advance=event.size, **self._fields())
        elif isinstance(event, BatchPaused):
            self.paused = event.reason

    def _completed(self) -> float:
        if self.task is None:
            return 0.0
        return float(self.progress.tasks[self.task].completed)

    def _fields(self) -> dict[str, Any]:
        return {"files": self.files, "total_files": self.total, "rejected": self.rejected}

    def _task(self, more_bytes: int) -> TaskID:
        if self.task is None:
            self.task = self.progress.add_task("ingest", total=more_bytes, **self._fields())
        else:
            total = self.progress.tasks[self.task].total or 0
            self.progress.update(self.task, total=total + more_bytes, **self._fields())
        return self.task


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
        TransferSpeedColumn(),
        TextColumn("[red]{task.fields[rejected]} rejected"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run_ingest(
    settings: Settings, source: str, partition: str, workers: int | None = None
) -> Batch:
    """Ingest ``source`` with a progress bar and print the batch's summary (also used by
    ``medlake demo``). Raises :class:`MedlakeError` for a source that cannot be read."""
    start_workers(default_workers(settings) if workers is None else workers)  # meanwhile: open
    archive = Archive.open(settings)
    try:
        batch, resumed = open_batch(archive, source, partition)
        if batch.status == BatchStatus.PAUSED:
            console.print(
                f"[yellow]batch {batch.id} of this source is paused[/]: "
                f"{escape(batch.detail.get('pause_reason') or '')}"
            )
            return batch
        if resumed:
            console.print(f"resuming batch {batch.id} ({batch.seen} files done)")
        return _run_with_progress(archive, batch, workers, with_discovery=True)
    finally:
        archive.close()


def _run_with_progress(
    archive: Archive, batch: Batch, workers: int | None, *, with_discovery: bool
) -> Batch:
    events = EventHub()
    with _progress() as progress:
        view = _ProgressView(progress)
        events.subscribe(view)
        if with_discovery:
            discover(archive, batch, events)
        started = time.monotonic()
        done = run_batch(archive, batch.id, workers=workers, events=events)
        elapsed = time.monotonic() - started
    _summary(archive, done, view, elapsed)
    return done


def _summary(archive: Archive, batch: Batch, view: _ProgressView, elapsed: float) -> None:
    mb = batch.bytes / 1e6
    rate = f"{mb:.1f} MB in {elapsed:.1f} s" if elapsed > 0 else f"{mb:.1f} MB"
    console.print(
        f"batch {batch.id}: {batch.seen} seen, {batch.stored} stored, "
        f"{batch.duplicates} duplicate, {batch.rejected} rejected ({rate})"
    )
    with archive.engine.connect() as conn:
        errors = list_errors(conn, batch.id, limit=_SHOWN_ERRORS)
        counts = count_errors(conn, batch.id)
    for error in errors:
        style = "yellow" if error.severity == "warn" else "red"
        word = "warning" if error.severity == "warn" else "rejected"
        console.print(
            f"[{style}]{word}[/] {escape(error.source)} "
            f"{escape(f'[{error.rule}]')}: {escape(error.message)}",
            soft_wrap=True,
        )
    if sum(counts.values()) > len(errors):
        console.print(f"… `medlake batch show {batch.id}` lists all {sum(counts.values())}")
    if batch.status == BatchStatus.PAUSED:
        reason = batch.detail.get("pause_reason") or view.paused or ""
        console.print(f"[yellow]paused[/]: {escape(reason)}")
    elif batch.verdict:
        style = "green" if batch.verdict == "balanced" else "red"
        console.print(f"reconciliation: [{style}]{batch.verdict}[/]")
        for difference in batch.detail.get("differences", []):
            console.print(f"  [red]{escape(difference)}[/]")


def _exit_code(batch: Batch) -> int:
    if batch.status == BatchStatus.PAUSED:
        return EXIT_PAUSED
    if batch.rejected or batch.verdict == "mismatch" or batch.status != BatchStatus.COMPLETED:
        return 1
    return 0


def ingest(
    source: Annotated[
        str, typer.Argument(help="A file, folder, glob, zip/tar archive or fsspec URL.")
    ],
    data: DataOption = None,
    partition: PartitionOption = DEFAULT_PARTITION,
    workers: WorkersOption = None,
    fhir: Annotated[
        bool,
        typer.Option("--fhir", help="Store NDJSON FHIR resources in the FHIR store (not staging)."),
    ] = False,
    mapping: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="CSV mapping (YAML file, or patients / labs / diagnoses): CSV → FHIR."),
    ] = None,
) -> None:
    """Ingest DICOM (and CSV / NDJSON clinical) files: validated, stored, reconciled.

    With --fhir (NDJSON) or --mapping (CSV) the files' resources go into the FHIR store
    through the bulk import (a file, folder or glob of local files).
    Resumable: running it again continues an unfinished batch of the same source.
    Exit status 1 when files were rejected or reconciliation failed, 2 when paused.
    """
    try:
        if fhir or mapping is not None:
            batch = run_fhir_import(load_settings(data=data), source, partition, mapping)
        else:
            batch = run_ingest(load_settings(data=data), source, partition, workers)
    except MedlakeError as exc:
        raise _fail(exc) from exc
    raise typer.Exit(_exit_code(batch))


def run_fhir_import(
    settings: Settings, source: str, partition: str, mapping: str | None = None
) -> Batch:
    """Import FHIR NDJSON files (or CSV files through ``mapping``) into the FHIR store
    and print the batch's summary and its first rejected lines."""
    suffixes = (".csv",) if mapping is not None else (".ndjson", ".jsonl")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(p for p in Path().glob(source) if p.is_file())
    if not files:
        raise InvalidInput(f"{source}: no {' / '.join(suffixes)} files to import")
    from medlake.clinical.bulk_import import import_files  # the FHIR model: only here

    archive = Archive.open(settings)
    try:
        started = time.monotonic()
        result = import_files(archive, files, partition=partition, mapping=mapping)
        elapsed = time.monotonic() - started
        if result.batch is None:
            raise InvalidInput(f"the import failed: {result.job.error_message}")
        _summary(archive, result.batch, _ProgressView(_progress()), elapsed)
        if result.job.error_message:
            console.print(f"[red]import failed[/]: {escape(result.job.error_message)}")
        return result.batch
    finally:
        archive.close()


# --- medlake watch -----------------------------------------------------------------------


def watch(
    source: Annotated[str, typer.Argument(help="Drop-zone folder or fsspec URL to watch.")],
    data: DataOption = None,
    partition: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Partition (default: setting dropzone_partition)."),
    ] = None,
    after: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="keep | move | delete ingested files (default: dropzone_after)."),
    ] = None,
    workers: WorkersOption = None,
) -> None:
    """Ingest files as they land in a drop zone, until Ctrl-C."""
    archive = _open(data)
    configure_logging(archive.settings)
    events = EventHub()

    def report(event: IngestEvent) -> None:
        if isinstance(event, FilesProcessed):
            console.print(
                f"{event.seen} files: {event.stored} stored, {event.duplicates} duplicate, "
                f"{event.rejected} rejected"
            )
            for source_name, rule, message in event.rejections[:_SHOWN_ERRORS]:
                console.print(
                    f"[red]rejected[/] {escape(source_name)} {escape(f'[{rule}]')}: "
                    f"{escape(message)}"
                )
        elif isinstance(event, BatchFinished):
            console.print(f"batch {event.batch_id} closed: {event.verdict}")
        elif isinstance(event, BatchPaused):
            console.print(f"[yellow]batch {event.batch_id} paused[/]: {escape(event.reason)}")

    events.subscribe(report)
    try:
        watcher = DropZoneWatcher(
            archive, source, partition=partition, after=after, workers=workers, events=events
        )
    except (MedlakeError, ValueError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"watching {watcher.zone.url} (Ctrl-C to stop)")
    watcher.start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
        archive.close()


# --- medlake batches / batch show / batch resume -----------------------------------------


def batches(
    data: DataOption = None,
    kind: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only batches of this kind: ingest, watch, stow, dimse."),
    ] = None,
    status: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Only batches in this status."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List ingest batches, newest first, with their counts and verdict."""
    archive = _open(data)
    try:
        with archive.engine.connect() as conn:
            found = list_batches(conn, kind=kind, status=status, limit=limit)
    finally:
        archive.close()
    if json:
        typer.echo(orjson.dumps([b.to_json() for b in found]).decode())
        return
    table = Table("id", "kind", "partition", "status", "seen", "stored", "dup", "rejected",
                  "verdict", "started", "source")  # fmt: skip
    for b in found:
        table.add_row(
            b.id, b.kind, b.partition, b.status, str(b.seen), str(b.stored), str(b.duplicates),
            str(b.rejected), b.verdict or "", b.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            b.source,
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} batches")


@batch_app.command("show")
def show(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    data: DataOption = None,
    errors: Annotated[int, typer.Option(help="Error rows to list.")] = 100,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One batch: counts, timings, verdict, and its rejected and warned files."""
    archive = _open(data)
    try:
        with archive.engine.connect() as conn:
            batch = get_batch(conn, batch_id)
            rows = list_errors(conn, batch_id, limit=errors)
            by_severity = count_errors(conn, batch_id)
    except MedlakeError as exc:
        raise _fail(exc) from exc
    finally:
        archive.close()
    if json:
        body = {**batch.to_json(), "errors": [e.to_json() for e in rows]}
        typer.echo(orjson.dumps(body).decode())
        return
    info = batch.to_json()
    shown = ("id", "kind", "partition", "source", "status", "verdict", "seen", "stored",
             "duplicates", "rejected", "bytes", "startedAt", "finishedAt", "seconds")  # fmt: skip
    for key in shown:
        console.print(f"{key:>11}: {escape(str(info[key]))}")
    for key in ("pause_reason", "differences", "reconciliation"):
        if batch.detail.get(key):
            console.print(f"{key:>11}: {escape(str(batch.detail[key]))}")
    total = sum(by_severity.values())
    console.print(
        f"{'errors':>11}: {total} ({', '.join(f'{v} {k}' for k, v in by_severity.items())})"
    )
    for e in rows:
        kept = f" (kept at {e.kept_at})" if e.kept_at else ""
        console.print(
            f"{e.severity} {escape(e.source)} {escape(f'[{e.rule}]')}: {escape(e.message)}"
            f"{escape(kept)}",
            soft_wrap=True,
        )


@batch_app.command("resume")
def resume(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    data: DataOption = None,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed", help="Also retry files that failed (source/lake/index)."),
    ] = False,
    workers: WorkersOption = None,
) -> None:
    """Resume a paused (or interrupted) batch after fixing what made it pause."""
    archive = _open(data)
    try:
        batch = resume_batch(archive.engine, batch_id, retry_failed=retry_failed)
        console.print(f"resuming batch {batch.id} ({batch.seen} files done)")
        if not batch.detail.get("discovered", True):
            discover(archive, batch)
        done = _run_with_progress(archive, batch, workers, with_discovery=False)
    except MedlakeError as exc:
        raise _fail(exc) from exc
    finally:
        archive.close()
    raise typer.Exit(_exit_code(done))


# --- medlake reconcile -------------------------------------------------------------------


def reconcile(
    data: DataOption = None,
    partition: Annotated[str, typer.Option(help="Partition to check.")] = DEFAULT_PARTITION,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check a whole partition against the lake: files with no row, rows with no file.

    Exit status 1 when they differ.
    """
    archive = _open(data)
    try:
        result = reconcile_partition(archive, partition)
    except MedlakeError as exc:
        raise _fail(exc) from exc
    finally:
        archive.close()
    if json:
        typer.echo(orjson.dumps(result.to_json()).decode())
    else:
        console.print(
            f"partition {partition}: {result.instance_rows} instance rows, "
            f"{result.flat_rows} flat rows, {result.lake_files} files in the lake"
        )
        for key in result.files_without_row[:_SHOWN_ERRORS]:
            console.print(f"[red]file without row[/] {escape(key)}")
        for key in result.rows_without_file[:_SHOWN_ERRORS]:
            console.print(f"[red]row without file[/] {escape(key)}")
        missing = len(result.files_without_row) + len(result.rows_without_file)
        console.print(
            "reconciliation: [green]balanced[/]"
            if result.balanced
            else f"reconciliation: [red]mismatch[/] ({missing} differences)"
        )
    raise typer.Exit(0 if result.balanced else 1)


def register(app: typer.Typer) -> None:
    """Add the ingest commands to the ``medlake`` application."""
    app.command()(ingest)
    app.command()(watch)
    app.command()(batches)
    app.command()(reconcile)
    app.add_typer(batch_app, name="batch")


__all__ = ["batch_app", "register", "run_ingest"]
