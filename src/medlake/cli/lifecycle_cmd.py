"""``medlake lifecycle``: move unread blobs to the cool and cold tiers, and show tiers."""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medlake.cli.lifetime import opened_archive
from medlake.cli.options import DataOption
from medlake.dicomweb.lifecycle import count_candidates, lifecycle_status, run_lifecycle
from medlake.ingest.archive import Archive
from medlake.storage.base import Tier

app = typer.Typer(
    help="Access tiers: move blobs unread for N days to cool, M days to cold.",
    no_args_is_help=True,
)
console = Console()

NowOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--now",
        help="Act as if it were this ISO date/time (UTC unless it has an offset); for testing "
        "a policy, e.g. --now 2030-01-01.",
    ),
]
CoolOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--cool-after-days", help="Override cool_after_days (env MEDLAKE_COOL_AFTER_DAYS)"
    ),
]
ColdOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--cold-after-days", help="Override cold_after_days (env MEDLAKE_COLD_AFTER_DAYS)"
    ),
]


def parse_now(value: str | None) -> dt.datetime | None:
    """``--now`` as an aware datetime (naive means UTC)."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is not an ISO date or date-time (e.g. 2030-01-01 or 2030-01-01T12:00)",
            param_hint="--now",
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _archive(
    data: Path | None, cool: int | None, cold: int | None
) -> AbstractContextManager[Archive]:
    """The archive with the policy's overrides; an error (a policy that does not hold,
    among others) exits with status 2."""
    return opened_archive(data, error_status=2, cool_after_days=cool, cold_after_days=cold)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@app.command("run")
def run(
    data: DataOption = None,
    now: NowOption = None,
    cool_after_days: CoolOption = None,
    cold_after_days: ColdOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would move.")
    ] = False,
) -> None:
    """Apply the lifecycle policy once: unread blobs move to cool, then cold."""
    when = parse_now(now)
    with _archive(data, cool_after_days, cold_after_days) as archive:
        total = count_candidates(archive, when)
        with Progress(
            TextColumn("[bold]lifecycle"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console, transient=True,
        ) as progress:  # fmt: skip
            task = progress.add_task("lifecycle", total=total)
            report = run_lifecycle(
                archive,
                when,
                dry_run=dry_run,
                progress=lambda n: progress.update(task, advance=n),
            )
    verb = "would move" if dry_run else "moved"
    console.print(f"lifecycle as of {report.now:%Y-%m-%d %H:%M} UTC")
    table = Table("", "instances")
    table.add_row("examined", str(report.examined))
    table.add_row(f"{verb} to cool", str(report.to_cool))
    table.add_row(f"{verb} to cold", str(report.to_cold))
    table.add_row("failed", f"[red]{report.failed}[/]" if report.failed else "0")
    console.print(table)
    for message in report.errors[:20]:
        console.print(f"[red]failed[/] {message}")
    if report.failed:
        raise typer.Exit(1)


@app.command("status")
def status(
    data: DataOption = None,
    now: NowOption = None,
    cool_after_days: CoolOption = None,
    cold_after_days: ColdOption = None,
) -> None:
    """Instances and bytes per tier, and how many a run now would move."""
    when = parse_now(now)
    with _archive(data, cool_after_days, cold_after_days) as archive:
        current = lifecycle_status(archive, when)
    policy = current.policy
    console.print(
        f"policy: cool after {policy.cool_after.days} days unread, "
        f"cold after {policy.cold_after.days} days"
    )
    table = Table("tier", "instances", "size", "due now")
    for tier in Tier:
        usage = current.usage[tier]
        due = current.due.get(tier)
        table.add_row(
            tier.value, str(usage.instances), _size(usage.bytes), "" if due is None else str(due)
        )
    console.print(table)
