"""``medlake audit``: check the audit log's hash chain, export it as FHIR AuditEvent."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console

from medlake.cli.lifetime import opened_archive
from medlake.cli.options import DataOption
from medlake.cli.token_cmd import audit_cli
from medlake.errors import MedlakeError
from medlake.security import Action, Anchor, export_audit_events, verify_chain

app = typer.Typer(help="The audit log: verify its hash chain, export it.", no_args_is_help=True)
console = Console(stderr=True)


def _instant(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not an ISO date or date-time", param_hint=name
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@app.command("verify")
def verify(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    anchor: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="SEQ:HASH printed by an earlier verify and kept outside the database: the "
            "chain must still hold that record (catches records cut from its end)."
        ),
    ] = None,
    data: DataOption = None,
) -> None:
    """Recompute the hash chain; exit 1 and name the first record that does not fit.

    Prints the head as SEQ:HASH: keep it elsewhere and pass it as --anchor next time.
    """
    try:
        kept = Anchor.parse(anchor) if anchor else None
    except MedlakeError as exc:
        raise typer.BadParameter(exc.message, param_hint="--anchor") from None
    with opened_archive(data) as archive:
        result = verify_chain(archive.engine, kept)
        audit_cli(
            archive,
            Action.AUDIT_READ,
            f"audit verify: {'intact' if result.ok else result.reason}",
            {},
        )
    if as_json:
        body = {
            "ok": result.ok,
            "checked": result.checked,
            "headHash": result.head_hash,
            "anchor": f"{result.checked}:{result.head_hash}" if result.checked else None,
            "firstBroken": result.first_broken,
            "reason": result.reason,
        }
        print(orjson.dumps(body).decode())
    elif result.ok:
        print(f"audit log intact: {result.checked} records")
        if result.checked:
            print(f"anchor (keep it; --anchor next time): {result.checked}:{result.head_hash}")
    else:
        print(f"audit log BROKEN at record {result.first_broken}: {result.reason}")
        print(f"{result.checked} records before it are intact")
    if not result.ok:
        raise typer.Exit(1)


@app.command("export")
def export(
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="NDJSON file to write; default: standard output."),
    ] = None,
    since: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--since", help="Only records at or after this ISO date/time (UTC)."),
    ] = None,
    until: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--until", help="Only records before this ISO date/time (UTC)."),
    ] = None,
    data: DataOption = None,
) -> None:
    """Write the audit log as FHIR R4 AuditEvent NDJSON (DICOM audit codes)."""
    start, end = _instant(since, "--since"), _instant(until, "--until")
    with opened_archive(data) as archive:
        if out is None:
            count = export_audit_events(archive.engine, sys.stdout.buffer, since=start, until=end)
            sys.stdout.buffer.flush()
        else:
            with out.open("wb") as fh:
                count = export_audit_events(archive.engine, fh, since=start, until=end)
        audit_cli(archive, Action.AUDIT_READ, f"audit export: {count} records", {})
    console.print(f"{count} audit events written" + (f" to {out}" if out else ""))
