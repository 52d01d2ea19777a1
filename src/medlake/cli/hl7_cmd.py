"""HL7 v2 commands: ``medlake mllp`` (the MLLP listener alone), ``medlake hl7 ls`` and
``medlake hl7 show``; and the listener that ``medlake serve`` runs beside HTTP."""

from __future__ import annotations

import datetime as dt
import signal
import threading
from dataclasses import dataclass
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from medlake.cli.log_setup import configure_logging
from medlake.cli.options import DataOption
from medlake.clinical.hl7 import (
    STATUSES,
    Hl7Mapper,
    MessageQuery,
    MllpError,
    MllpListener,
    get_message,
    list_messages,
)
from medlake.config import Settings, load_settings
from medlake.errors import MedlakeError
from medlake.ingest.archive import Archive

console = Console()
app = typer.Typer(help="HL7 v2 messages received over MLLP.", no_args_is_help=True)


@dataclass
class Hl7Service:
    """The MLLP listener and the mapper that turns its messages into FHIR resources."""

    listener: MllpListener
    mapper: Hl7Mapper | None

    def stop(self) -> None:
        """Stop receiving, then stop mapping."""
        self.listener.stop()
        if self.mapper is not None:
            self.mapper.stop()


def fhir_base_url(settings: Settings) -> str:
    """The FHIR base the mapped resources are reported under."""
    return f"http://{settings.host}:{settings.http_port}/fhir"


def start_mllp(archive: Archive, settings: Settings) -> Hl7Service | None:
    """Start the MLLP listener of ``medlake serve`` (None when mllp_port is 0), with the
    background mapper unless hl7_mapping is off."""
    if settings.mllp_port <= 0:
        console.print("MLLP: off (mllp_port 0)")
        return None
    return _start(archive, settings)


def _start(archive: Archive, settings: Settings) -> Hl7Service:
    mapper = Hl7Mapper(archive, fhir_base_url(settings)) if settings.hl7_mapping else None
    listener = MllpListener(archive, on_accepted=mapper.wake if mapper is not None else None)
    try:
        listener.start()
    except MllpError as exc:
        console.print(f"[red]error[/]: {exc.message}")
        raise typer.Exit(1) from exc
    if mapper is not None:
        mapper.yield_to(listener.receiver)
        mapper.start()
    mapping = "mapped to FHIR" if mapper is not None else "stored only (hl7_mapping off)"
    console.print(
        f"MLLP: HL7 v2 on {listener.host}:{listener.port}, partition "
        f"{settings.hl7_partition}, {mapping}"
    )
    return Hl7Service(listener, mapper)


def mllp(
    data: DataOption = None,
    host: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Interface (env MEDLAKE_MLLP_HOST, else MEDLAKE_HOST)."),
    ] = None,
    port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="MLLP port (env MEDLAKE_MLLP_PORT)."),
    ] = None,
) -> None:
    """Run the HL7 v2 MLLP listener (and the FHIR mapper) alone until Ctrl-C."""
    settings = load_settings(data=data, mllp_host=host, mllp_port=port)
    configure_logging(settings)
    archive = Archive.open(settings)
    service = _start(archive, settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):  # timed waits: see `medlake dimse`
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        archive.close()


@app.command("ls")
def list_command(
    data: DataOption = None,
    message_type: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--type", help="Message type and trigger event, e.g. ADT^A01."),
    ] = None,
    status: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help=f"One of {', '.join(STATUSES)}."),
    ] = None,
    control_id: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--control-id", help="Message control ID (MSH-10)."),
    ] = None,
    since: Annotated[
        Optional[dt.datetime],  # noqa: UP045
        typer.Option(help="Received at or after (ISO date or date-time, UTC)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
    offset: Annotated[int, typer.Option(help="Rows to skip.")] = 0,
) -> None:
    """List received messages, newest first."""
    archive = Archive.open(load_settings(data=data))
    try:
        query = MessageQuery(
            message_type=message_type,
            status=status,
            control_id=control_id,
            since=since.replace(tzinfo=dt.UTC) if since and since.tzinfo is None else since,
            limit=limit,
            offset=offset,
        )
        with archive.engine.connect() as conn:
            total, rows = list_messages(conn, query)
    except MedlakeError as exc:
        console.print(f"[red]error[/]: {exc.message}")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    table = Table("id", "received", "type", "control id", "sender", "status", "ack", "detail")
    for row in rows:
        sender = "/".join(p for p in (row.sending_application, row.sending_facility) if p)
        detail = (row.error_text or "").splitlines()[0] if row.error_text else ""
        if not detail and row.resources:
            detail = ", ".join(row.resources[:3]) + (" …" if len(row.resources) > 3 else "")
        table.add_row(
            str(row.id),
            row.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            row.message_type or "",
            row.control_id or "",
            sender,
            row.status,
            row.ack_code or "",
            detail[:80],
        )
    console.print(table)
    console.print(f"{len(rows)} of {total} messages")


@app.command("show")
def show_command(
    message_id: Annotated[int, typer.Argument(help="Message id (from `medlake hl7 ls`).")],
    data: DataOption = None,
) -> None:
    """Show one message: its row, the resources made from it, and the message itself."""
    archive = Archive.open(load_settings(data=data))
    try:
        with archive.engine.connect() as conn:
            row = get_message(conn, message_id)
    except MedlakeError as exc:
        console.print(f"[red]error[/]: {exc.message}")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    for key, value in row.to_json().items():
        if value not in (None, [], ""):
            console.print(f"[bold]{key}[/]: {value}", highlight=False)
    console.print()
    text = row.raw_text if row.raw_text is not None else row.payload.decode("latin_1")
    console.print(text.replace("\r", "\n").rstrip("\n"), highlight=False, markup=False)


def register(root: typer.Typer) -> None:
    """Add ``medlake mllp`` and ``medlake hl7 ls|show`` to the ``medlake`` application."""
    root.command()(mllp)
    root.add_typer(app, name="hl7")


__all__ = ["Hl7Service", "register", "start_mllp"]
