"""HL7 v2 commands: ``medlake mllp`` (the MLLP listener alone), ``medlake hl7 ls``,
``medlake hl7 show`` and ``medlake hl7 senders add|list|remove`` (who may send); and
the listener that ``medlake serve`` runs beside HTTP."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console
from rich.table import Table

from medlake.cli.lifetime import StopSignal, opened_archive
from medlake.cli.log_setup import configure_logging
from medlake.cli.options import DataOption
from medlake.clinical.hl7 import (
    STATUSES,
    Hl7Mapper,
    Hl7Sender,
    MessageQuery,
    MllpListener,
    add_sender,
    get_message,
    list_messages,
    list_senders,
    remove_sender,
)
from medlake.config import Settings, load_settings
from medlake.ingest.archive import Archive

console = Console()
app = typer.Typer(help="HL7 v2 messages received over MLLP.", no_args_is_help=True)
senders_app = typer.Typer(
    help="Registered HL7 v2 senders: with authentication on, only their messages are "
    "accepted over MLLP.",
    no_args_is_help=True,
)


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
    """Start the MLLP listener of ``medlake serve`` (None when mllp_port and
    mllp_tls_port are 0), with the background mapper unless hl7_mapping is off."""
    if settings.mllp_port <= 0 and settings.mllp_tls_port <= 0:
        console.print("MLLP: off (mllp_port 0)")
        return None
    return _start(archive, settings, alone=False)


def _start(archive: Archive, settings: Settings, *, alone: bool) -> Hl7Service:
    """The listener and, unless hl7_mapping is off, the mapper; ``alone`` (``medlake
    mllp``): no server keeps the planner's statistics, the mapper does."""
    mapper = (
        Hl7Mapper(archive, fhir_base_url(settings), keep_statistics=alone)
        if settings.hl7_mapping
        else None
    )
    listener = MllpListener(
        archive,
        plain=settings.mllp_port > 0 or not settings.mllp_tls_port,
        on_accepted=mapper.wake if mapper is not None else None,
    )
    listener.start()  # a port that is taken: an error, nothing served
    if mapper is not None:
        mapper.yield_to(listener.receiver)
        mapper.start()
    mapping = "mapped to FHIR" if mapper is not None else "stored only (hl7_mapping off)"
    ports = [f"{listener.host}:{listener.port}"] if listener.plain else []
    if listener.tls_port:
        mutual = ", client certificate required" if settings.mllp_tls_ca_file else ""
        ports.append(f"TLS on {listener.host}:{listener.tls_port}{mutual}")
    senders = (
        "registered senders only"
        if settings.auth_enabled
        else f"any sender (unregistered ones: partition {settings.hl7_partition})"
    )
    console.print(f"MLLP: HL7 v2 on {', '.join(ports)}, accepting {senders}, {mapping}")
    if settings.auth_enabled and not list_senders(archive.engine):
        console.print(
            "[yellow]MLLP: no HL7 sender is registered: every message is refused "
            "(`medlake hl7 senders add`)[/]"
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
    tls_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="MLLP over TLS port (env MEDLAKE_MLLP_TLS_PORT; 0 = none)."),
    ] = None,
) -> None:
    """Run the HL7 v2 MLLP listener (and the FHIR mapper) alone until Ctrl-C."""
    settings = load_settings(data=data, mllp_host=host, mllp_port=port, mllp_tls_port=tls_port)
    configure_logging(settings)
    stop = StopSignal()
    with opened_archive(settings=settings) as archive:
        service = _start(archive, settings, alone=True)
        try:
            stop.wait()
        finally:
            service.stop()


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
    query = MessageQuery(
        message_type=message_type,
        status=status,
        control_id=control_id,
        since=since.replace(tzinfo=dt.UTC) if since and since.tzinfo is None else since,
        limit=limit,
        offset=offset,
    )
    with opened_archive(data) as archive, archive.engine.connect() as conn:
        total, rows = list_messages(conn, query)
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
    with opened_archive(data) as archive, archive.engine.connect() as conn:
        row = get_message(conn, message_id)
    for key, value in row.to_json().items():
        if value not in (None, [], ""):
            console.print(f"[bold]{key}[/]: {value}", highlight=False)
    console.print()
    text = row.raw_text if row.raw_text is not None else row.payload.decode("latin_1")
    console.print(text.replace("\r", "\n").rstrip("\n"), highlight=False, markup=False)


@senders_app.command("add")
def senders_add(
    name: Annotated[str, typer.Argument(help="A name for the sender (letters, digits, . _ -).")],
    host: Annotated[
        str,
        typer.Option(help="Host name or address it connects from; '*' = any (with --tls-subject)."),
    ],
    partition: Annotated[str, typer.Option(help="Partition its messages go into.")],
    application: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="MSH-3 sending application it must send (default: any)."),
    ] = None,
    facility: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="MSH-4 sending facility it must send (default: any)."),
    ] = None,
    tls_subject: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--tls-subject",
            help="Attributes its TLS client certificate's subject must have, e.g. "
            "'CN=lab-1' (the connection must then be TLS).",
        ),
    ] = None,
    description: Annotated[Optional[str], typer.Option(help="A note.")] = None,  # noqa: UP045
    replace: Annotated[bool, typer.Option(help="Replace it if it exists.")] = False,
    data: DataOption = None,
) -> None:
    """Register a sender whose messages the MLLP listener accepts into PARTITION."""
    sender = Hl7Sender(name, host, partition, application, facility, tls_subject, description)
    with opened_archive(data) as archive:
        added = add_sender(archive.engine, sender, replace=replace)
    console.print(f"registered HL7 sender {added.name} ({added.host}) -> {added.partition}")


@senders_app.command("list")
def senders_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data: DataOption = None,
) -> None:
    """List the registered senders."""
    with opened_archive(data) as archive:
        found = list_senders(archive.engine)
    if as_json:
        typer.echo(orjson.dumps([sender.to_json() for sender in found]).decode())
        return
    table = Table("name", "host", "partition", "MSH-3", "MSH-4", "TLS subject", "description")
    for sender in found:
        table.add_row(
            sender.name, sender.host, sender.partition, sender.application or "(any)",
            sender.facility or "(any)", sender.tls_subject or "", sender.description or "",
        )  # fmt: skip
    console.print(table)


@senders_app.command("remove")
def senders_remove(
    name: Annotated[str, typer.Argument(help="The sender to forget.")],
    data: DataOption = None,
) -> None:
    """Forget a registered sender (its open connections are refused within seconds)."""
    with opened_archive(data) as archive:
        remove_sender(archive.engine, name)
    console.print(f"removed HL7 sender {name}")


def register(root: typer.Typer) -> None:
    """Add ``medlake mllp`` and ``medlake hl7 ls|show|senders`` to the ``medlake``
    application."""
    root.command()(mllp)
    app.add_typer(senders_app, name="senders")
    root.add_typer(app, name="hl7")


__all__ = ["Hl7Service", "register", "start_mllp"]
