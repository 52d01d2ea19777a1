"""``medlake keys``: the key-encryption keys of encryption at rest (create, list, rotate,
retire)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medlake.cli.lifetime import opened_archive
from medlake.cli.options import DataOption
from medlake.cli.token_cmd import audit_cli
from medlake.config import Settings, load_settings
from medlake.ingest.archive import Archive
from medlake.security import Action
from medlake.security.lake_encryption import (
    LakeRotation,
    create_key_file,
    key_ids,
    retire_old_keys,
    rotate_lake,
)

app = typer.Typer(
    help="Key-encryption keys of encryption at rest: create, list, rotate, retire.",
    no_args_is_help=True,
)
console = Console()

KeyFileOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional
    typer.Option(
        "--key-file", help="Key file (default: encryption_key_file, else {data}/keys/kek.json)."
    ),
]


def _key_file(settings: Settings, key_file: Path | None) -> Path:
    return key_file or settings.resolved_encryption_key_file


@app.command("create")
def create(data: DataOption = None, key_file: KeyFileOption = None) -> None:
    """Write a new key file with one key-encryption key (refused if the file exists)."""
    path = _key_file(load_settings(data=data), key_file)
    key_id = create_key_file(path)
    console.print(f"created key {key_id} in {path} (mode 0600)")
    console.print(
        "[yellow]keep a copy of this file somewhere safe and apart from the lake: "
        "without it nothing encrypted can be read[/]"
    )


@app.command("list")
def list_keys(data: DataOption = None, key_file: KeyFileOption = None) -> None:
    """List the ids of the key file's keys (never the keys themselves)."""
    path = _key_file(load_settings(data=data), key_file)
    current, ids = key_ids(path)
    for key_id in ids:
        console.print(f"{key_id}{'  (current)' if key_id == current else ''}")


def _encrypted_archive(data: Path | None) -> contextlib.AbstractContextManager[Archive]:
    settings = load_settings(data=data)
    if not settings.encrypt_at_rest:
        console.print("[red]encrypt_at_rest is off: there are no lake keys to rotate[/]")
        raise typer.Exit(1)
    return opened_archive(settings=settings)  # opening checks that the key file fits the lake


def _report(report: LakeRotation) -> None:
    console.print(
        f"current key {report.key_id}: {report.rewrapped} blobs re-wrapped, "
        f"{report.current} already current, {report.not_encrypted} not encrypted"
    )
    for key, reason in report.failed[:20]:
        console.print(f"[red]{key}: {reason}[/]")
    if len(report.failed) > 20:
        console.print(f"[red]... and {len(report.failed) - 20} more[/]")


@app.command("rotate")
def rotate(data: DataOption = None) -> None:
    """Add a new key-encryption key, make it current and re-wrap every blob's data key
    with it (headers only; the data is not re-encrypted). Running servers pick up the
    new key by themselves. The old keys stay until `medlake keys retire`."""
    with _encrypted_archive(data) as archive:
        path = archive.settings.resolved_encryption_key_file
        with console.status("re-wrapping data keys"):
            report = rotate_lake(archive.blobs, path, archive.settings.workspace)
        _report(report)
        audit_cli(
            archive,
            Action.SECURITY_MANAGE,
            f"key rotation: new key {report.key_id}, {report.rewrapped} blobs re-wrapped, "
            f"{len(report.failed)} failed",
            {"resource": f"key-file:{path}"},
        )
    if not report.ok:
        raise typer.Exit(1)


@app.command("retire")
def retire(data: DataOption = None) -> None:
    """Remove every key but the current one from the key file, after checking that every
    encrypted blob is wrapped by the current key (re-wrapping those that are not)."""
    with _encrypted_archive(data) as archive:
        path = archive.settings.resolved_encryption_key_file
        with console.status("checking data keys"):
            report = retire_old_keys(archive.blobs, path, archive.settings.workspace)
        _report(report)
        removed = ", ".join(report.removed_keys) or "none"
        console.print(f"removed keys: {removed}")
        audit_cli(
            archive,
            Action.SECURITY_MANAGE,
            f"keys retired: {removed}; {len(report.failed)} blobs failed",
            {"resource": f"key-file:{path}"},
        )
    if not report.ok:
        console.print("[red]no key was removed: some blobs could not be checked[/]")
        raise typer.Exit(1)
