"""Command-line options shared by every ``medlake`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

#: ``--data``: where the lake and the SQLite index live (as for ``medlake serve``).
DataOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional
    typer.Option("--data", help="Folder of the lake and SQLite index (env MEDLAKE_DATA)."),
]

__all__ = ["DataOption"]
