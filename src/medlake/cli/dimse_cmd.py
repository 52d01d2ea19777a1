"""DIMSE commands: ``medlake dimse`` (the SCP alone), ``send``, ``retrieve`` and
``ae add|list|remove|echo``; and the SCP that ``medlake serve`` runs beside HTTP."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console
from rich.table import Table

from medlake.cli.lifetime import StopSignal, opened_archive
from medlake.cli.log_setup import configure_logging
from medlake.cli.options import DataOption
from medlake.config import Settings, load_settings
from medlake.dicomweb.retrieve import retrieve as locate_for_retrieve
from medlake.dimse import ae_registry, scu
from medlake.dimse._transport import FAST_TRANSPORT
from medlake.dimse.scp import DimseServer
from medlake.ingest.archive import Archive
from medlake.types import DEFAULT_PARTITION

console = Console()
ae_app = typer.Typer(
    help="Known DICOM Application Entities: C-MOVE destinations, send/retrieve peers, "
    "and the calling-AE allow-list with each AE's partition.",
    no_args_is_help=True,
)

PeerTitle = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--aec", help="AE title of the peer: a registered one, or with --host/--port."),
]
PeerHost = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--host", help="Host of an unregistered peer (with --port and --aec)."),
]
PeerPort = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--port", help="Port of an unregistered peer (with --host and --aec)."),
]


def _files(path: Path) -> Iterator[Path]:
    """``path`` itself, or every regular file under it, in sorted order."""
    if path.is_file():
        yield path
        return
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            yield Path(root, name)


def start_scp(archive: Archive, settings: Settings) -> DimseServer | None:
    """Start the DIMSE SCP of ``medlake serve`` (None when dimse_port is 0); it runs in
    pynetdicom's threads beside uvicorn until :meth:`DimseServer.stop`."""
    if settings.dimse_port <= 0:
        console.print("DIMSE: off (dimse_port 0)")
        return None
    _quiet_pynetdicom(settings)
    server = DimseServer(archive).start()  # a port that is taken: an error, nothing served
    _announce(server, settings)
    return server


def _quiet_pynetdicom(settings: Settings) -> None:
    # pynetdicom logs every association and message at INFO; keep that for DEBUG runs.
    if settings.log_level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _announce(server: DimseServer, settings: Settings) -> None:
    policy = (
        "registered calling AEs only"
        if settings.dimse_require_known_ae
        else "any calling AE (unregistered ones: default partition)"
    )
    console.print(
        f"DIMSE: {server.ae_title} on {server.host}:{server.port}, accepting {policy}"
        + ("" if FAST_TRANSPORT else " [yellow](stock pynetdicom transport: slower)[/]")
    )


def dimse(
    data: DataOption = None,
    host: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Interface (env MEDLAKE_DIMSE_HOST, else MEDLAKE_HOST)."),
    ] = None,
    port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="DIMSE port (env MEDLAKE_DIMSE_PORT)."),
    ] = None,
    ae_title: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--ae-title", help="Our AE title (env MEDLAKE_AE_TITLE)."),
    ] = None,
) -> None:
    """Run the DIMSE SCP alone (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET) until Ctrl-C."""
    settings = load_settings(data=data, dimse_host=host, dimse_port=port, ae_title=ae_title)
    configure_logging(settings)
    _quiet_pynetdicom(settings)
    stop = StopSignal()
    with opened_archive(settings=settings) as archive:
        server = DimseServer(archive).start()
        _announce(server, settings)
        try:
            stop.wait()
        finally:
            server.stop()


def send(
    paths: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Argument(help="Part-10 files or folders to send (instead of --study).", exists=True),
    ] = None,
    study: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--study", help="StudyInstanceUID to send from the archive (repeatable)."),
    ] = None,
    series: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--series", help="Only this SeriesInstanceUID of the (one) --study."),
    ] = None,
    aec: PeerTitle = None,
    host: PeerHost = None,
    port: PeerPort = None,
    partition: Annotated[str, typer.Option(help="Partition to send from.")] = DEFAULT_PARTITION,
    data: DataOption = None,
) -> None:
    """C-STORE files, or studies of the archive, to another AE.

    Each instance goes in the transfer syntax it is stored in. Exits 1 if any failed.
    """
    if not paths and not study:
        raise typer.BadParameter("give files/folders to send, or --study UID")
    with opened_archive(data) as archive:
        peer = scu.resolve_peer(archive, aec, host, port)
        items: list[scu.Outgoing] = []
        failed: list[tuple[str, str]] = []
        for uid in study or []:
            found = locate_for_retrieve(archive, partition, uid, series)
            items.extend(scu.stored_items(archive, found))
        if paths:
            files, unusable = scu.file_items(f for p in paths for f in _files(p))
            items.extend(files)
            failed.extend(unusable)
        console.print(f"sending {len(items)} instances to {peer}")
        result = scu.send(archive, peer, items)
    failed.extend(result.failed)
    for what, why in failed[:20]:
        console.print(f"[red]failed[/] {what}: {why}")
    warned = f" ({result.warnings} with warnings)" if result.warnings else ""
    console.print(f"{result.sent} sent{warned}, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


def retrieve(
    study: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--study", help="StudyInstanceUID to retrieve (repeatable)."),
    ] = None,
    query: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--query",
            help="KEYWORD=VALUE study-level C-FIND key selecting the studies, e.g. "
            "PatientID=123 or StudyDate=20240101-20241231 (repeatable; none and no "
            "--study: every study of the peer).",
        ),
    ] = None,
    aec: PeerTitle = None,
    host: PeerHost = None,
    port: PeerPort = None,
    method: Annotated[
        str,
        typer.Option(
            help="get: C-GET, the instances come back on the same association; move: "
            "C-MOVE to our AE title (the peer must know it as a destination)."
        ),
    ] = "get",
    partition: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Partition to store into (C-GET; default: the peer's registered one)."),
    ] = None,
    listen: Annotated[
        bool,
        typer.Option(
            help="With --method move: run a temporary SCP on dimse_port to receive the "
            "instances (--no-listen when `medlake serve` already listens there)."
        ),
    ] = True,
    data: DataOption = None,
) -> None:
    """Pull studies from another AE (PACS) into the archive with C-GET or C-MOVE.

    For instance to migrate an existing archive in. Exits 1 if any sub-operation failed.
    """
    settings = load_settings(data=data)
    _quiet_pynetdicom(settings)
    server: DimseServer | None = None
    with opened_archive(settings=settings) as archive:
        try:
            peer = scu.resolve_peer(archive, aec, host, port)
            uids = list(study or [])
            if not uids:
                keys = dict(_key_value(k) for k in query or [])
                uids = scu.find_studies(archive, peer, keys)
                console.print(f"{len(uids)} studies match at {peer}")
            if method == "move" and listen:
                server = DimseServer(archive).start()
                _announce(server, settings)
            result = scu.retrieve(archive, peer, uids, method=method, partition=partition)
        finally:
            if server is not None:
                server.stop()
    for problem in result.problems[:20]:
        console.print(f"[red]problem[/] {problem}")
    console.print(
        f"{result.studies} studies: {result.completed} instances completed, "
        f"{result.warnings} with warnings, {result.failed} failed"
    )
    if not result.ok:
        raise typer.Exit(1)


def _key_value(text: str) -> tuple[str, str]:
    keyword, sep, value = text.partition("=")
    if not sep or not keyword.strip():
        raise typer.BadParameter(f"--query takes KEYWORD=VALUE, not {text!r}")
    return keyword.strip(), value


@ae_app.command("add")
def ae_add(
    ae_title: Annotated[str, typer.Argument(help="The AE title (1-16 characters).")],
    host: Annotated[str, typer.Argument(help="Host name or address.")],
    port: Annotated[int, typer.Argument(help="Its DIMSE port.")],
    partition: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Partition its C-STOREs go into and its queries read (default)."),
    ] = None,
    store: Annotated[bool, typer.Option(help="May it C-STORE into medlake?")] = True,
    query: Annotated[bool, typer.Option(help="May it C-FIND / C-MOVE / C-GET?")] = True,
    description: Annotated[Optional[str], typer.Option(help="A note.")] = None,  # noqa: UP045
    tls: Annotated[
        bool,
        typer.Option(help="medlake reaches it over DICOM TLS (send, retrieve, C-MOVE target)."),
    ] = False,
    check_host: Annotated[
        bool,
        typer.Option(help="Admit its associations only from the addresses of HOST."),
    ] = True,
    replace: Annotated[bool, typer.Option(help="Replace it if it exists.")] = False,
    data: DataOption = None,
) -> None:
    """Register an AE."""
    ae = ae_registry.ApplicationEntity(
        ae_title, host, port, partition, store, query, description, tls=tls,
        check_host=check_host,
    )  # fmt: skip
    with opened_archive(data) as archive:
        added = ae_registry.add_ae(archive, ae, replace=replace)
    console.print(f"registered {added.ae_title} at {added.host}:{added.port}")


@ae_app.command("list")
def ae_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data: DataOption = None,
) -> None:
    """List the registered AEs."""
    with opened_archive(data) as archive:
        found = ae_registry.list_aes(archive)
    if as_json:
        typer.echo(orjson.dumps([ae.to_json() for ae in found]).decode())
        return
    table = Table(
        "AE title", "host", "port", "partition", "store", "query", "TLS", "host check",
        "description",
    )  # fmt: skip
    for ae in found:
        table.add_row(
            ae.ae_title, ae.host, str(ae.port), ae.effective_partition,
            *("yes" if flag else "no"
              for flag in (ae.allow_store, ae.allow_query, ae.tls, ae.check_host)),
            ae.description or "",
        )  # fmt: skip
    console.print(table)


@ae_app.command("remove")
def ae_remove(
    ae_title: Annotated[str, typer.Argument(help="The AE title to forget.")],
    data: DataOption = None,
) -> None:
    """Forget a registered AE."""
    with opened_archive(data) as archive:
        ae_registry.remove_ae(archive, ae_title)
    console.print(f"removed {ae_title.strip()}")


@ae_app.command("echo")
def ae_echo(
    ae_title: Annotated[str, typer.Argument(help="A registered AE title.")],
    data: DataOption = None,
) -> None:
    """C-ECHO a registered AE (exit 1 unless it answers Success)."""
    with opened_archive(data) as archive:
        peer = scu.resolve_peer(archive, ae_title)
        code = scu.echo(archive, peer)
    console.print(f"{peer}: C-ECHO status 0x{code:04X}")
    if code != 0:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the DIMSE commands to the ``medlake`` application."""
    app.command()(dimse)
    app.command()(send)
    app.command()(retrieve)
    app.add_typer(ae_app, name="ae")


__all__ = ["ae_app", "register", "start_scp"]
