"""``medlake cohort``: run a cohort query file; ``medlake fhir sync-imaging``: bring the
ImagingStudy resources and patient links up to date."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console

from medlake.cli.lifetime import opened_archive
from medlake.cli.options import DataOption
from medlake.clinical.cohort import CohortResult, find_cohort
from medlake.clinical.imaging_study import sync_imaging_studies

console = Console(stderr=True)

#: ``medlake fhir …`` commands (FHIR-side maintenance).
fhir_app = typer.Typer(help="FHIR store maintenance.", no_args_is_help=True)


class OutputFormat(StrEnum):
    """What ``medlake cohort`` writes."""

    json = "json"
    csv = "csv"
    parquet = "parquet"


def _render(result: CohortResult, fmt: OutputFormat) -> bytes:
    if fmt is OutputFormat.csv:
        return result.to_csv()
    if fmt is OutputFormat.parquet:
        return result.to_parquet()
    return orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2) + b"\n"


def cohort(
    query_file: Annotated[
        Path, typer.Argument(help="The cohort query (JSON, see docs/cohorts.md); - for stdin.")
    ],
    data: DataOption = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="json (rows and counts), csv or parquet.")
    ] = OutputFormat.json,
    out: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional
        typer.Option("--out", help="Write to this file instead of standard output."),
    ] = None,
    partition: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Partition, unless the query names one (default: default)."),
    ] = None,
) -> None:
    """Find patients, studies or series by clinical and imaging criteria together."""
    text = sys.stdin.buffer.read() if str(query_file) == "-" else _read(query_file)
    if fmt is OutputFormat.parquet and out is None and sys.stdout.isatty():
        console.print("[red]error[/]: Parquet is binary; use --out FILE or a pipe")
        raise typer.Exit(2)
    with opened_archive(data) as archive:
        result = find_cohort(archive, text, partition=partition)
    body = _render(result, fmt)
    if out is None:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    else:
        out.write_bytes(body)
    counts = result.counts
    console.print(
        f"{counts.patients} patients, {counts.studies} studies, {counts.series} series, "
        f"{counts.instances} instances" + (f" -> {out}" if out else "")
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        console.print(f"[red]error[/]: cannot read {path}: {exc.strerror}")
        raise typer.Exit(2) from exc


@fhir_app.command("sync-imaging")
def sync_imaging(
    data: DataOption = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Every study of the archive (and delete ImagingStudies of studies that are "
            "gone), not only what changed since the last pass.",
        ),
    ] = False,
    partition: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="With --full: only this partition."),
    ] = None,
) -> None:
    """Write the ImagingStudy of every study stored or changed while no server ran, and
    link new FHIR Patients to their studies."""
    with opened_archive(data) as archive:
        report = sync_imaging_studies(archive, full=full, partition=partition)
    console.print(
        f"{report.studies} studies looked at: {report.written} ImagingStudy written, "
        f"{report.deleted} deleted, {report.patients_created} Patients made from DICOM; "
        f"{report.patient_versions} FHIR Patient versions linked"
    )
    for failure in report.failed:
        console.print(f"[red]failed[/]: {failure}")
    if report.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``cohort`` and ``fhir sync-imaging`` to the ``medlake`` command."""
    app.command("cohort")(cohort)
    app.add_typer(fhir_app, name="fhir")


__all__ = ["OutputFormat", "cohort", "fhir_app", "register", "sync_imaging"]
