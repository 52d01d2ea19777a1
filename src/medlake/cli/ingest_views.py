"""What ``medlake ingest``, ``watch``, ``batches``, ``batch show|resume`` and
``reconcile`` do (:mod:`medlake.cli.ingest_cmd` declares them and imports this module
when one of them runs): progress bars, summaries and tables over ``medlake.ingest``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

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

from medlake.cli.lifetime import StopSignal, fail, opened_archive
from medlake.cli.log_setup import configure_logging
from medlake.config import Settings
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
from medlake.ingest.pipeline import discover, open_batch, run_batch
from medlake.ingest.reconcile import reconcile_partition
from medlake.ingest.watch import DropZoneWatcher
from medlake.ingest.workers import default_workers, start_workers

console = Console()
#: Exit status of a batch that paused (too many rejections).
EXIT_PAUSED = 2
_SHOWN_ERRORS = 20


#: Exit status of an error (status 1 says that files were rejected or that
#: reconciliation failed).
EXIT_ERROR = 2


def _opened(data: Path | None) -> contextlib.AbstractContextManager[Archive]:
    """The archive of ``--data``; an error exits with :data:`EXIT_ERROR`."""
    return opened_archive(data, error_status=EXIT_ERROR)


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
    with opened_archive(settings=settings) as archive:
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
    settings: Settings,
    source: str,
    partition: str,
    workers: int | None,
    fhir: bool,
    mapping: str | None,
) -> None:
    """``medlake ingest``: see :func:`medlake.cli.ingest_cmd.ingest`."""
    try:
        if fhir or mapping is not None:
            batch = run_fhir_import(settings, source, partition, mapping)
        else:
            batch = run_ingest(settings, source, partition, workers)
    except MedlakeError as exc:
        raise fail(exc, EXIT_ERROR) from exc
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

    with opened_archive(settings=settings) as archive:
        started = time.monotonic()
        result = import_files(archive, files, partition=partition, mapping=mapping)
        elapsed = time.monotonic() - started
        if result.batch is None:
            raise InvalidInput(f"the import failed: {result.job.error_message}")
        _summary(archive, result.batch, _ProgressView(_progress()), elapsed)
        if result.job.error_message:
            console.print(f"[red]import failed[/]: {escape(result.job.error_message)}")
        return result.batch


# --- medlake watch -----------------------------------------------------------------------


def watch(
    source: str, data: Path | None, partition: str | None, after: str | None, workers: int | None
) -> None:
    """``medlake watch``: see :func:`medlake.cli.ingest_cmd.watch`."""
    stop = StopSignal()
    with _opened(data) as archive:
        _watch(archive, source, partition, after, workers, stop)


def _watch(
    archive: Archive,
    source: str,
    partition: str | None,
    after: str | None,
    workers: int | None,
    stop: StopSignal,
) -> None:
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
    except ValueError as exc:  # e.g. an unknown --after
        raise InvalidInput(str(exc)) from exc
    console.print(f"watching {watcher.zone.url} (Ctrl-C to stop)")
    watcher.start()
    try:
        stop.wait()
    finally:
        watcher.stop()


# --- medlake batches / batch show / batch resume -----------------------------------------


def batches(
    data: Path | None, kind: str | None, status: str | None, limit: int, json: bool
) -> None:
    """``medlake batches``: see :func:`medlake.cli.ingest_cmd.batches`."""
    with _opened(data) as archive, archive.engine.connect() as conn:
        found = list_batches(conn, kind=kind, status=status, limit=limit)
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


def show(batch_id: str, data: Path | None, errors: int, json: bool) -> None:
    """``medlake batch show``: see :func:`medlake.cli.ingest_cmd.show`."""
    with _opened(data) as archive, archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
        rows = list_errors(conn, batch_id, limit=errors)
        by_severity = count_errors(conn, batch_id)
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


def resume(batch_id: str, data: Path | None, retry_failed: bool, workers: int | None) -> None:
    """``medlake batch resume``: see :func:`medlake.cli.ingest_cmd.resume`."""
    with _opened(data) as archive:
        batch = resume_batch(archive.engine, batch_id, retry_failed=retry_failed)
        console.print(f"resuming batch {batch.id} ({batch.seen} files done)")
        if not batch.detail.get("discovered", True):
            discover(archive, batch)
        done = _run_with_progress(archive, batch, workers, with_discovery=False)
    raise typer.Exit(_exit_code(done))


# --- medlake reconcile -------------------------------------------------------------------


def reconcile(data: Path | None, partition: str, json: bool) -> None:
    """``medlake reconcile``: see :func:`medlake.cli.ingest_cmd.reconcile`."""
    with _opened(data) as archive:
        result = reconcile_partition(archive, partition)
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


__all__ = ["batches", "ingest", "reconcile", "resume", "run_ingest", "show", "watch"]
