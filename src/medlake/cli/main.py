"""``medlake`` — the command line, the product's front door."""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import importlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

import medlake
from medlake.cli.options import DataOption
from medlake.errors import MedlakeError
from medlake.types import DEFAULT_PARTITION

if TYPE_CHECKING:
    from medlake.config import Settings

#: Command name -> the module of ``medlake.cli`` that defines it. A module is imported
#: only when one of its commands runs (or ``--help`` lists them): ``medlake ingest``
#: then starts without FastAPI, pynetdicom or the FHIR model. (Its worker processes
#: import none of this module: the console script is ``medlake.__main__``.)
_LAZY_COMMANDS = {
    "ingest": "ingest_cmd",  # ingest, watch, batches, batch show|resume, reconcile
    "watch": "ingest_cmd",
    "batches": "ingest_cmd",
    "batch": "ingest_cmd",
    "reconcile": "ingest_cmd",
    "dimse": "dimse_cmd",  # dimse, send, retrieve, ae add|list|remove|echo
    "send": "dimse_cmd",
    "retrieve": "dimse_cmd",
    "ae": "dimse_cmd",
    "mllp": "hl7_cmd",  # mllp, hl7 ls|show|senders
    "hl7": "hl7_cmd",
    "cohort": "cohort_cmd",  # cohort, fhir sync-imaging
    "fhir": "cohort_cmd",
    "lifecycle": "lifecycle_cmd",
    "token": "token_cmd",
    "audit": "audit_cmd",
    "keys": "keys_cmd",
    "lake": "lake_cmd",
}


class _LazyGroup(TyperGroup):
    """The root command: its own commands, then those of ``_LAZY_COMMANDS`` on demand."""

    # (click's types, untyped here: typer may vendor click under another name)
    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *_LAZY_COMMANDS]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _LAZY_COMMANDS:
            command = _load_command(cmd_name)
        return command

    def invoke(self, ctx: Any) -> Any:
        """Run the command; an error medlake raised on purpose is printed as one line
        (``error: <message>``, exit status 1), not as a traceback."""
        try:
            return super().invoke(ctx)
        except MedlakeError as exc:
            Console(stderr=True).print(f"[red]error:[/] {escape(exc.message)}", soft_wrap=True)
            raise typer.Exit(1) from exc

    def resolve_command(self, ctx: Any, args: Any) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:  # click's UsageError: suggest the lazy commands too
            message = getattr(exc, "message", None)
            matches = difflib.get_close_matches(args[0], _LAZY_COMMANDS) if args else []
            if isinstance(message, str) and matches and "Did you mean" not in message:
                exc.message = (  # type: ignore[attr-defined]
                    f"{message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
                )
            raise


def _load_command(name: str) -> Any:
    return lazy_group(_LAZY_COMMANDS[name]).commands.get(name)


@functools.cache
def lazy_group(module_name: str) -> Any:
    """The commands that ``medlake.cli.<module_name>`` adds to ``medlake``, built once
    (``--help`` asks for each of a module's commands)."""
    module = importlib.import_module(f"medlake.cli.{module_name}")
    holder = typer.Typer()
    if hasattr(module, "register"):
        module.register(holder)
    else:
        holder.add_typer(module.app, name=module_name.removesuffix("_cmd"))
    return typer.main.get_group(holder)


app = typer.Typer(
    cls=_LazyGroup, help="medlake: an open medical-data lakehouse.", no_args_is_help=True
)
console = Console()


def run() -> None:
    """The ``medlake`` console script: the app, then an exit that skips the collector.

    At exit, the interpreter's last garbage-collection passes walk every object the
    command made (0.3 s after ``medlake ingest``); ``gc.freeze`` leaves them out. By
    then every command has closed its files and connections.
    """
    try:
        app()
    finally:
        gc.freeze()


def _version(value: bool) -> None:
    if value:
        console.print(f"medlake {medlake.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """medlake: DICOM archive, clinical data and analytics in one lake."""


def _settings(**overrides: object) -> Settings:
    from medlake.config import load_settings

    return load_settings(**overrides)


@app.command()
def serve(
    data: DataOption = None,
    host: Annotated[Optional[str], typer.Option(help="Interface (env MEDLAKE_HOST).")] = None,  # noqa: UP045
    http_port: Annotated[
        int | None, typer.Option(help="HTTP port (env MEDLAKE_HTTP_PORT).")
    ] = None,
    dimse_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="DICOM (DIMSE) port; 0 = off (env MEDLAKE_DIMSE_PORT)."),
    ] = None,
    mllp_port: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="HL7 v2 (MLLP) port; 0 = off (env MEDLAKE_MLLP_PORT)."),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Serve without authentication: anyone reaching the port is an admin (demos).",
        ),
    ] = False,
) -> None:
    """Serve DICOMweb, the change feed and /healthz over HTTP, and the DIMSE SCP.

    HTTP on one port (/dicomweb, /changefeed, /healthz, the viewer); DIMSE (C-ECHO,
    C-STORE, C-FIND, C-MOVE, C-GET) on dimse_port, unless it is 0; HL7 v2 over MLLP on
    mllp_port, unless it is 0.
    """

    from medlake.api.http_server import server_config
    from medlake.api.metrics import metrics_of
    from medlake.cli import dimse_cmd, hl7_cmd, token_cmd
    from medlake.cli.log_setup import configure_logging
    from medlake.ingest.archive import Archive
    from medlake.ingest.workers import start_workers
    from medlake.web import create_web_app, viewer_path

    settings = _settings(
        data=data,
        host=host,
        http_port=http_port,
        dimse_port=dimse_port,
        mllp_port=mllp_port,
        insecure_no_auth=True if insecure_no_auth else None,
    )
    configure_logging(settings)
    try:
        archive = Archive.open(settings)
    except MedlakeError as exc:  # e.g. a wrong key file: say so, serve nothing
        console.print(f"[red]cannot open the archive: {exc.message}[/]")
        raise typer.Exit(1) from exc
    console.print(
        f"[bold]medlake {medlake.__version__}[/] lake [cyan]{archive.blobs.root}[/], "
        f"index [cyan]{settings.resolved_database_url.split('@')[-1]}[/]"
    )
    scheme = "https" if settings.tls_cert_file else "http"
    console.print(f"DICOMweb: {scheme}://{settings.host}:{settings.http_port}/dicomweb")
    web_app = create_web_app(archive, settings.ohif_dist)
    viewer = viewer_path(web_app)
    if viewer:
        console.print(f"Viewer (OHIF): {scheme}://{settings.host}:{settings.http_port}{viewer}")
    else:
        console.print("[yellow]no OHIF viewer[/]: run scripts/install-ohif.sh (MEDLAKE_OHIF_DIST)")
    token_cmd.announce_access(archive, console)
    start_workers(settings.parse_workers)  # STOW-RS parses headers there: ready before a request
    scp = dimse_cmd.start_scp(archive, settings)  # pynetdicom's threads, beside uvicorn
    if scp is not None:
        metrics_of(web_app).observe_dimse(scp)
    hl7 = hl7_cmd.start_mllp(archive, settings)  # listener and mapper threads, beside uvicorn
    try:
        # httptools with medlake's limit on request heads (414 / 431); uvloop when installed
        _server_stopped_by_signal(server_config(web_app, settings)).run()
    finally:
        if scp is not None:
            scp.stop()
        if hl7 is not None:
            hl7.stop()
        archive.close()


def _server_stopped_by_signal(config: Any) -> Any:
    """uvicorn's server, except that Ctrl-C / SIGTERM makes ``run()`` return normally.

    uvicorn (0.29+) raises the signal again once it has shut down, which ends the
    process right there (exit 130, or killed by SIGTERM) before ``medlake serve`` has
    stopped its DIMSE and MLLP listeners. Here the signal only stops the server.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)


@app.command("ls")
def list_studies(
    data: DataOption = None,
    partition: Annotated[str, typer.Option(help="Partition to list.")] = DEFAULT_PARTITION,
) -> None:
    """List the studies of a partition."""
    from rich.table import Table

    from medlake.cli.lifetime import opened_archive
    from medlake.dicom.attributes import Level
    from medlake.dicomweb.search import run_search
    from medlake.errors import NotFound

    try:
        with opened_archive(settings=_settings(data=data)) as archive:
            result = run_search(archive, Level.STUDY, partition, [("limit", "10000")])
    except NotFound:
        console.print(f"partition {partition!r} is empty")
        return
    table = Table(
        "StudyInstanceUID", "Date", "PatientID", "PatientName", "Modalities", "Series", "Instances"
    )

    def value(ds: dict[str, object], tag: str) -> str:
        element = ds.get(tag) or {}
        values = element.get("Value", []) if isinstance(element, dict) else []
        if not values:
            return ""
        first = values[0]
        return (
            str(first.get("Alphabetic", ""))
            if isinstance(first, dict)
            else "\\".join(map(str, values))
        )

    for ds in result.datasets:
        table.add_row(
            *(
                value(ds, t)
                for t in (
                    "0020000D",
                    "00080020",
                    "00100020",
                    "00100010",
                    "00080061",
                    "00201206",
                    "00201208",
                )
            )
        )
    console.print(table)
    console.print(f"{result.total} studies")


@app.command()
def demo(
    data: DataOption = None,
    http_port: Annotated[Optional[int], typer.Option(help="HTTP port.")] = None,  # noqa: UP045
    no_serve: Annotated[
        bool, typer.Option("--no-serve", help="Only load the sample data.")
    ] = False,
) -> None:
    """Generate sample studies, ingest them and serve them."""
    from medlake.cli import ingest_views
    from medlake.cli.demo_data import write_demo_studies

    settings = _settings(data=data or Path("demo-data"), http_port=http_port)
    source = settings.data / "demo-source"
    files = write_demo_studies(source)
    console.print(f"wrote {len(files)} sample instances to {source}")
    batch = ingest_views.run_ingest(settings, str(source), DEFAULT_PARTITION)
    if batch.stored + batch.duplicates < len(files):
        console.print("[red]some sample instances were not stored[/]")
        raise typer.Exit(1)
    if not no_serve:
        serve(
            data=settings.data,
            host=None,
            http_port=settings.http_port,
            dimse_port=None,
            insecure_no_auth=True,
        )
