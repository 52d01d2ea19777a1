"""``medlake token``: create, list and revoke medlake API tokens, make one-time browser
login links; the start-up admin token and login link."""

from __future__ import annotations

import datetime as dt
import getpass
import re
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console
from rich.table import Table

from medlake.cli.lifetime import opened_archive
from medlake.cli.options import DataOption
from medlake.errors import MedlakeError
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.security import (
    Action,
    AuditRecord,
    Grant,
    Role,
    create_token,
    list_tokens,
    record_audit,
    revoke_token,
)
from medlake.security.audit import AUDITED_ACTIONS
from medlake.security.browser_login import LOGIN_LINK_LIFETIME, create_login_link
from medlake.security.tokens import CreatedToken

app = typer.Typer(
    help="medlake API tokens: create, list, revoke; browser login links.", no_args_is_help=True
)
console = Console()

#: Lifetime of the admin token `medlake serve` prints at start-up.
STARTUP_TOKEN_LIFETIME = dt.timedelta(hours=24)
_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expiry(text: str) -> dt.datetime | None:
    """``90d``, ``12h``, ``30m``, ``2w`` from now, or ``never``."""
    if text == "never":
        return None
    match = _DURATION.match(text)
    if match is None:
        raise typer.BadParameter(
            f"{text!r} is not a duration such as 90d, 12h, 30m, 2w, or never",
            param_hint="--expires-in",
        )
    return utcnow() + dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def cli_actor() -> str:
    """Who runs the command, for the audit log: ``cli:<login name>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def audit_cli(archive: Archive, action: Action, detail: str, entity: dict[str, str]) -> None:
    """Record an administrative command in the audit log (a failure fails the command)."""
    record_audit(
        archive.engine,
        AuditRecord(
            event=AUDITED_ACTIONS[action],
            operation=action.value,
            actor=cli_actor(),
            actor_kind="cli",
            entity=entity,
            detail=detail,
        ),
    )


@app.command("create")
def create(
    subject: Annotated[str, typer.Argument(help="Who the token is for (a user or service name).")],
    role: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--role",
            help="ROLE[@PARTITION[:Patient/ID]] granted to the subject (repeatable); roles: "
            "admin, ingest, reader (clinician), researcher, auditor; no @PARTITION = all.",
        ),
    ] = None,
    scope: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--scope", help="SMART scope limiting FHIR access, e.g. patient/*.read."),
    ] = None,
    expires_in: Annotated[
        str, typer.Option("--expires-in", help="Lifetime: 90d, 12h, 30m, 2w or never.")
    ] = "90d",
    description: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--description", help="What the token is for."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data: DataOption = None,
) -> None:
    """Create a token; its secret is printed once and stored only as a hash."""
    expires_at = parse_expiry(expires_in)
    grants = [Grant.parse(text) for text in role or []]
    with opened_archive(data) as archive:
        created: CreatedToken = create_token(
            archive.engine,
            subject,
            grants=grants,
            scopes=scope,
            expires_at=expires_at,
            description=description,
        )
        try:
            audit_cli(
                archive,
                Action.SECURITY_MANAGE,
                f"token {created.info.token_id} created for {subject}",
                {"resource": f"token/{created.info.token_id}"},
            )
        except MedlakeError:
            revoke_token(archive.engine, created.info.token_id)
            raise
    if as_json:
        print(orjson.dumps({**created.info.to_json(), "token": created.secret}).decode())
        return
    info = created.info
    console.print(f"token [bold]{info.token_id}[/] for {info.subject}")
    console.print(f"roles: {', '.join(sorted(str(g) for g in info.grants)) or 'none'}")
    if info.scopes is not None:
        console.print(f"scopes: {' '.join(sorted(info.scopes))}")
    console.print(f"expires: {info.expires_at.isoformat() if info.expires_at else 'never'}")
    console.print("secret (shown once; send it as Authorization: Bearer …):")
    print(created.secret)


@app.command("list")
def list_command(
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list revoked and expired tokens.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data: DataOption = None,
) -> None:
    """List tokens (never their secrets)."""
    with opened_archive(data) as archive:
        tokens = list_tokens(archive.engine, include_inactive=show_all)
    if as_json:
        print(orjson.dumps([t.to_json() for t in tokens]).decode())
        return
    table = Table(
        "id", "subject", "roles", "scopes", "status", "expires", "last used", "description"
    )
    for t in tokens:
        table.add_row(
            t.token_id,
            t.subject,
            " ".join(sorted(str(g) for g in t.grants)),
            " ".join(sorted(t.scopes)) if t.scopes is not None else "",
            t.status(),
            t.expires_at.isoformat(timespec="minutes") if t.expires_at else "never",
            t.last_used_at.isoformat(timespec="minutes") if t.last_used_at else "",
            t.description or "",  # tells browser sessions and login links apart
        )
    console.print(table)


@app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (from token list).")],
    data: DataOption = None,
) -> None:
    """Revoke a token: it is refused from the next request on."""
    with opened_archive(data) as archive:
        info = revoke_token(archive.engine, token_id)
        audit_cli(
            archive,
            Action.SECURITY_MANAGE,
            f"token {token_id} of {info.subject} revoked",
            {"resource": f"token/{token_id}"},
        )
    console.print(f"token {token_id} of {info.subject} is revoked")


def server_root(archive: Archive) -> str:
    """The URL of `medlake serve` by the settings: ``http(s)://host:port``."""
    settings = archive.settings
    scheme = "https" if settings.tls_cert_file else "http"
    return f"{scheme}://{settings.host}:{settings.http_port}"


def issue_login_link(archive: Archive, subject: str) -> str:
    """A new one-time login link of ``subject``, audited: the URL to open."""
    link = create_login_link(archive.engine, subject)
    try:
        audit_cli(
            archive,
            Action.SECURITY_MANAGE,
            f"one-time login link {link.info.token_id} created for {subject}",
            {"resource": f"token/{link.info.token_id}"},
        )
    except MedlakeError:
        revoke_token(archive.engine, link.info.token_id)
        raise
    return f"{server_root(archive)}/login?token={link.secret}"


@app.command("login-link")
def login_link(
    subject: Annotated[
        str, typer.Argument(help="Who signs in with it (an existing principal).")
    ] = "admin",
    data: DataOption = None,
) -> None:
    """Print a one-time browser login link (valid 10 minutes, signs in once) for the
    running server: opening it sets a session cookie and opens the viewer."""
    with opened_archive(data) as archive:
        url = issue_login_link(archive, subject)
    print(url)


def announce_access(archive: Archive, out: Console) -> None:
    """What `medlake serve` says about access at start-up: with authentication on, a
    fresh admin token (valid 24 hours, printed once) and a one-time login link for the
    browser (valid 10 minutes); off, a loud warning."""
    settings = archive.settings
    if not settings.auth_enabled:
        out.print(
            "[bold red]WARNING: authentication is OFF (--insecure-no-auth): anyone who can "
            "reach this port can read, change and delete every study as an admin, and "
            "nothing is audited. Use it only for local demos.[/]"
        )
        return
    created = create_token(
        archive.engine,
        "admin",
        grants=[Grant(Role.ADMIN)],
        expires_at=utcnow() + STARTUP_TOKEN_LIFETIME,
        description="printed by medlake serve at start-up",
    )
    audit_cli(
        archive,
        Action.SECURITY_MANAGE,
        f"start-up admin token {created.info.token_id} created",
        {"resource": f"token/{created.info.token_id}"},
    )
    root = server_root(archive)
    link = issue_login_link(archive, "admin")
    out.print("authentication is on; admin token for this start (valid 24 h, shown once):")
    out.print(f"  {created.secret}", highlight=False, soft_wrap=True)
    out.print(
        f"  curl -H 'Authorization: Bearer {created.secret}' {root}/dicomweb/studies",
        highlight=False,
        soft_wrap=True,
    )
    minutes = int(LOGIN_LINK_LIFETIME.total_seconds() // 60)
    out.print(f"browser: open this link to sign in as admin (once, within {minutes} min):")
    out.print(f"  {link}", highlight=False, soft_wrap=True)
    out.print(
        "more tokens: medlake token create NAME --role reader@default; "
        "a new login link: medlake token login-link"
    )


__all__ = [
    "announce_access",
    "app",
    "audit_cli",
    "cli_actor",
    "issue_login_link",
    "parse_expiry",
    "server_root",
]
