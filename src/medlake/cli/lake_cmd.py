"""``medlake lake``: work with lake files outside the server (decrypt)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medlake.cli.keys_cmd import KeyFileOption
from medlake.cli.options import DataOption
from medlake.config import load_settings
from medlake.errors import MedlakeError
from medlake.security.lake_encryption import KeyFile, decrypt_file

app = typer.Typer(help="Lake files outside the server: decrypt.", no_args_is_help=True)
console = Console()


@app.command("decrypt")
def decrypt(
    source: Annotated[
        str,
        typer.Argument(
            help="A lake file or folder (local path), or one file's fsspec URL (s3://…)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Where the plaintext goes: a file, or a folder.")
    ],
    data: DataOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Write the plaintext of encrypted lake files (e.g. copied out with azcopy), as they
    were received. A folder is decrypted file by file into the same tree under --out;
    files that are not encrypted are copied as they are."""
    path = key_file or load_settings(data=data).resolved_encryption_key_file
    try:
        keys = KeyFile(path)
        folder = Path(source)
        if "://" not in source and folder.is_dir():
            # Hidden *.part files are writes in flight, not lake files.
            files = sorted(
                p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".part")
            )
            encrypted = sum(decrypt_file(p, out / p.relative_to(folder), keys) for p in files)
            console.print(f"{len(files)} files written under {out} ({encrypted} were encrypted)")
            return
        was_encrypted = decrypt_file(source, out, keys)
    except MedlakeError as exc:
        console.print(f"[red]{exc.message}[/]")
        raise typer.Exit(1) from exc
    console.print(f"wrote {out}" + ("" if was_encrypted else " (it was not encrypted)"))
