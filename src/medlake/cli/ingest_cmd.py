"""``medlake ingest``, ``watch``, ``batches``, ``batch show|resume`` and ``reconcile``:
the command line of the ingest pipeline (``medlake.ingest``).

This module only declares the commands; what they do is in
:mod:`medlake.cli.ingest_views`, imported when one runs. ``medlake ingest`` starts its
worker processes first, so that they start Python and pydicom while this process
imports the pipeline (half a second each, otherwise one after the other).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from medlake.cli.options import DataOption
from medlake.types import DEFAULT_PARTITION

batch_app = typer.Typer(help="Look at and resume ingest batches.", no_args_is_help=True)

PartitionOption = Annotated[str, typer.Option(help="Partition to store into.")]
WorkersOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Worker processes that copy, hash and parse (default: one per core)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


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
    from medlake.config import load_settings
    from medlake.ingest.workers import default_workers, start_workers

    settings = load_settings(data=data)
    if not fhir and mapping is None:
        start_workers(default_workers(settings) if workers is None else workers)
    from medlake.cli import ingest_views

    ingest_views.ingest(settings, source, partition, workers, fhir, mapping)


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
    from medlake.cli import ingest_views

    ingest_views.watch(source, data, partition, after, workers)


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
    json: JsonOption = False,
) -> None:
    """List ingest batches, newest first, with their counts and verdict."""
    from medlake.cli import ingest_views

    ingest_views.batches(data, kind, status, limit, json)


@batch_app.command("show")
def show(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    data: DataOption = None,
    errors: Annotated[int, typer.Option(help="Error rows to list.")] = 100,
    json: JsonOption = False,
) -> None:
    """One batch: counts, timings, verdict, and its rejected and warned files."""
    from medlake.cli import ingest_views

    ingest_views.show(batch_id, data, errors, json)


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
    from medlake.cli import ingest_views

    ingest_views.resume(batch_id, data, retry_failed, workers)


def reconcile(
    data: DataOption = None,
    partition: Annotated[str, typer.Option(help="Partition to check.")] = DEFAULT_PARTITION,
    json: JsonOption = False,
) -> None:
    """Check a whole partition against the lake: files with no row, rows with no file.

    Exit status 1 when they differ.
    """
    from medlake.cli import ingest_views

    ingest_views.reconcile(data, partition, json)


def register(app: typer.Typer) -> None:
    """Add the ingest commands to the ``medlake`` application."""
    app.command()(ingest)
    app.command()(watch)
    app.command()(batches)
    app.command()(reconcile)
    app.add_typer(batch_app, name="batch")


__all__ = ["batch_app", "register"]
