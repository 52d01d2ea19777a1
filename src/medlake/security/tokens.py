"""medlake's own API tokens.

A token reads ``mlk_<id>_<secret>``: the id is public (listed, revoked by it), the
secret is random (256 bits), shown once at creation and stored only as the SHA-256 of
the whole token. A token acts as its principal: it has the principal's role grants,
narrowed for FHIR by the token's SMART scopes when it has any.

The same table holds the browser's credentials (:mod:`medlake.security.browser_login`):
one-time login links ``mll_…`` and sessions ``mls_…``. The prefix is part of the hashed
secret, so a credential of one kind never passes as another (a session cookie is not a
bearer token, an API token not a login link) without a column to tell them apart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, Select, select, update

from medlake.errors import InvalidInput, NotFound
from medlake.index.schema import api_tokens, principals
from medlake.index.writes import utcnow
from medlake.security.errors import Unauthenticated
from medlake.security.principals import (
    Grant,
    Principal,
    PrincipalKind,
    add_grants,
    ensure_principal,
    stored_grants,
)
from medlake.security.scopes import check_scope

TOKEN_PREFIX = "mlk"
_CREDENTIAL = re.compile(r"^([a-z]{3})_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{12}$")
#: ``last_used_at`` is refreshed at most this often, so a busy token costs no write per request.
LAST_USED_RESOLUTION = dt.timedelta(hours=1)


@dataclass(frozen=True)
class TokenInfo:
    """What is known about a token, never its secret."""

    token_id: str
    principal_id: int
    subject: str
    kind: PrincipalKind
    grants: frozenset[Grant]
    scopes: frozenset[str] | None
    description: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    display_name: str | None = None

    def status(self, now: dt.datetime | None = None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and _aware(self.expires_at) <= (now or utcnow()):
            return "expired"
        return "active"

    def to_json(self) -> dict[str, object]:
        """The token as JSON (for ``medlake token list --json``)."""

        def iso(value: dt.datetime | None) -> str | None:
            return _aware(value).isoformat() if value else None

        return {
            "id": self.token_id,
            "subject": self.subject,
            "kind": self.kind.value,
            "roles": sorted(str(g) for g in self.grants),
            "scopes": sorted(self.scopes) if self.scopes is not None else None,
            "description": self.description,
            "status": self.status(),
            "createdAt": iso(self.created_at),
            "expiresAt": iso(self.expires_at),
            "revokedAt": iso(self.revoked_at),
            "lastUsedAt": iso(self.last_used_at),
        }


@dataclass(frozen=True)
class CreatedToken:
    """A new token: ``secret`` is the whole bearer token, shown this once."""

    secret: str
    info: TokenInfo


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands timestamps back without their (UTC) offset.
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def looks_like_api_token(credential: str) -> bool:
    """Whether ``credential`` has the shape of a medlake API token (not a JWT)."""
    return credential.startswith(f"{TOKEN_PREFIX}_")


def insert_credential(
    conn: Connection,
    principal_id: int,
    prefix: str,
    *,
    kind: str = "token",
    scopes: frozenset[str] | None = None,
    expires_at: dt.datetime | None = None,
    description: str | None = None,
) -> tuple[str, str]:
    """Store a new credential ``<prefix>_<id>_<secret>`` of a principal (only its hash)
    of ``kind`` (``token``, or a browser's ``login_link`` or ``session``); returns its id
    and the whole secret, which is never stored."""
    token_id = secrets.token_hex(6)
    secret = f"{prefix}_{token_id}_{secrets.token_urlsafe(32)}"
    conn.execute(
        api_tokens.insert().values(
            token_id=token_id,
            principal_id=principal_id,
            secret_sha256=_digest(secret),
            kind=kind,
            scopes=" ".join(sorted(scopes)) if scopes is not None else None,
            description=description,
            created_at=utcnow(),
            expires_at=expires_at,
        )
    )
    return token_id, secret


def find_credential(conn: Connection, credential: str, prefix: str, what: str) -> TokenInfo:
    """The stored credential ``credential`` of kind ``prefix``, whatever its status;
    Unauthenticated (naming it ``what``) when it is malformed, of another kind or unknown."""
    match = _CREDENTIAL.match(credential)
    if match is None or match.group(1) != prefix:
        raise Unauthenticated(f"malformed {what}")
    token_id = match.group(2)
    row = conn.execute(_select_tokens().where(api_tokens.c.token_id == token_id)).first()
    # Compared in constant time, and for unknown ids too, so timing tells nothing.
    expected = row.secret_sha256 if row is not None else _digest("")
    if not hmac.compare_digest(expected, _digest(credential)) or row is None:
        raise Unauthenticated(f"unknown {what}")
    return _info(row, stored_grants(conn, row.subject))


def create_token(
    engine: Engine,
    subject: str,
    *,
    grants: Iterable[Grant] = (),
    scopes: Iterable[str] | None = None,
    expires_at: dt.datetime | None = None,
    description: str | None = None,
    kind: PrincipalKind = PrincipalKind.TOKEN,
) -> CreatedToken:
    """Create a token for ``subject`` (created as a principal on first use) and grant
    the principal ``grants``. ``scopes`` (SMART) narrow what the token may do in FHIR."""
    scope_set = frozenset(check_scope(s) for s in scopes) if scopes is not None else None
    if expires_at is not None and _aware(expires_at) <= utcnow():
        raise InvalidInput(f"expiry {expires_at.isoformat()} is in the past")
    with engine.begin() as conn:
        principal_id = ensure_principal(conn, subject, kind)
        add_grants(conn, principal_id, grants)
        token_id, secret = insert_credential(
            conn,
            principal_id,
            TOKEN_PREFIX,
            scopes=scope_set,
            expires_at=expires_at,
            description=description,
        )
    return CreatedToken(secret, get_token(engine, token_id))


def _select_tokens() -> Select[Any]:
    return select(
        api_tokens.c.token_id,
        api_tokens.c.principal_id,
        api_tokens.c.secret_sha256,
        api_tokens.c.scopes,
        api_tokens.c.description,
        api_tokens.c.created_at,
        api_tokens.c.expires_at,
        api_tokens.c.revoked_at,
        api_tokens.c.last_used_at,
        principals.c.subject,
        principals.c.kind,
        principals.c.display_name,
    ).join(principals, principals.c.id == api_tokens.c.principal_id)


def _info(row: Row[Any], grants: frozenset[Grant]) -> TokenInfo:
    """A row of :func:`_select_tokens` as a TokenInfo."""
    return TokenInfo(
        token_id=row.token_id,
        principal_id=row.principal_id,
        subject=row.subject,
        kind=PrincipalKind(row.kind),
        grants=grants,
        scopes=frozenset(row.scopes.split()) if row.scopes is not None else None,
        description=row.description,
        created_at=_aware(row.created_at),
        expires_at=_aware(row.expires_at) if row.expires_at else None,
        revoked_at=_aware(row.revoked_at) if row.revoked_at else None,
        last_used_at=_aware(row.last_used_at) if row.last_used_at else None,
        display_name=row.display_name,
    )


def get_token(engine: Engine, token_id: str) -> TokenInfo:
    """One token by its id; NotFound when there is none."""
    if not _TOKEN_ID.match(token_id):
        raise InvalidInput(f"token id {token_id!r} is invalid: 12 hex digits expected")
    with engine.connect() as conn:
        row = conn.execute(_select_tokens().where(api_tokens.c.token_id == token_id)).first()
        if row is None:
            raise NotFound(f"no API token with id {token_id}")
        return _info(row, stored_grants(conn, row.subject))


def list_tokens(engine: Engine, *, include_inactive: bool = False) -> list[TokenInfo]:
    """Every token, oldest first; revoked and expired ones only with ``include_inactive``."""
    with engine.connect() as conn:
        rows = conn.execute(_select_tokens().order_by(api_tokens.c.id)).all()
        grants = {s: stored_grants(conn, s) for s in {r.subject for r in rows}}
    found = [_info(r, grants[r.subject]) for r in rows]
    return found if include_inactive else [t for t in found if t.status() == "active"]


def opened_with_description(token_id: str) -> str:
    """The description of a browser session opened with the token ``token_id`` (how
    :func:`revoke_token` finds the sessions to end with it)."""
    return f"browser session opened with token {token_id}"


def revoke_token(engine: Engine, token_id: str) -> TokenInfo:
    """Revoke a token at once (a revoked token is kept, listed, never valid again), and
    end the browser sessions opened with it."""
    info = get_token(engine, token_id)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(api_tokens)
            .where(
                (api_tokens.c.token_id == token_id)
                | (api_tokens.c.description == opened_with_description(token_id)),
                api_tokens.c.revoked_at.is_(None),
            )
            .values(revoked_at=now)
        )
    return get_token(engine, token_id) if info.revoked_at is None else info


def authenticate_credential(
    engine: Engine, credential: str, prefix: str = TOKEN_PREFIX, what: str = "API token"
) -> Principal:
    """The principal a credential of kind ``prefix`` (an API token unless said) stands
    for; Unauthenticated when it is malformed, unknown, revoked or expired."""
    now = utcnow()
    with engine.connect() as conn:
        info = find_credential(conn, credential, prefix, what)
    status = info.status(now)
    if status != "active":
        raise Unauthenticated(f"{what} {info.token_id} is {status}")
    if info.last_used_at is None or now - info.last_used_at > LAST_USED_RESOLUTION:
        with engine.begin() as conn:
            conn.execute(
                update(api_tokens)
                .where(api_tokens.c.token_id == info.token_id)
                .values(last_used_at=now)
            )
    return principal_of_credential(info)


def principal_of_credential(info: TokenInfo) -> Principal:
    """The principal a stored credential acts as."""
    return Principal(
        subject=info.subject,
        kind=info.kind,
        grants=info.grants,
        scopes=info.scopes,
        display_name=info.display_name,
        token_id=info.token_id,
    )


def authenticate_token(engine: Engine, credential: str) -> Principal:
    """The principal a bearer API token stands for; Unauthenticated when the token is
    malformed, unknown, revoked or expired."""
    return authenticate_credential(engine, credential)


__all__ = [
    "LAST_USED_RESOLUTION",
    "TOKEN_PREFIX",
    "CreatedToken",
    "TokenInfo",
    "authenticate_credential",
    "authenticate_token",
    "create_token",
    "find_credential",
    "get_token",
    "insert_credential",
    "list_tokens",
    "looks_like_api_token",
    "opened_with_description",
    "principal_of_credential",
    "revoke_token",
]
