"""How a browser signs in: one-time login links and browser sessions.

A browser cannot add ``Authorization: Bearer`` to the requests a page makes (the OHIF
viewer's DICOMweb calls), so it holds a session cookie instead, as Jupyter does:

* ``medlake serve`` prints a **login link** ``/login?token=mll_<id>_<secret>``. The link
  signs in once: opening it consumes it (one atomic ``UPDATE … WHERE revoked_at IS
  NULL``, so of two requests racing with it only one wins) and it expires after
  :data:`LOGIN_LINK_LIFETIME` unused.
* Signing in (with a link, or with an API token typed into the form at ``/login``)
  opens a **session** ``mls_<id>_<secret>``, the cookie's value. It acts as the same
  principal with the same SMART scopes, for at most :data:`SESSION_LIFETIME` (and never
  beyond the expiry of the token it was opened with). Logging out ends it; revoking the
  token it was opened with ends it too.

Links and sessions are rows of ``api_tokens`` like API tokens (stored as the SHA-256 of
the whole secret, listed by ``medlake token list``, ended by ``medlake token revoke``);
their prefixes keep each kind from passing as another (see :mod:`medlake.security.tokens`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import Connection, Engine, delete, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from medlake.errors import NotFound
from medlake.index.schema import api_tokens, principals
from medlake.index.writes import utcnow
from medlake.security.audit import AuditRecord, append_audit
from medlake.security.errors import AuditUnavailable, Unauthenticated
from medlake.security.principals import Principal
from medlake.security.tokens import (
    TOKEN_PREFIX,
    CreatedToken,
    TokenInfo,
    authenticate_credential,
    find_credential,
    get_token,
    insert_credential,
    opened_with_description,
    principal_of_credential,
)

LOGIN_LINK_PREFIX = "mll"
SESSION_PREFIX = "mls"
#: How long a login link may wait to be opened.
LOGIN_LINK_LIFETIME = dt.timedelta(minutes=10)
#: The longest a browser session lasts.
SESSION_LIFETIME = dt.timedelta(hours=12)
#: How long an ended login link or session stays listed (``medlake token list --all``)
#: before it is deleted; the audit log keeps the record of each sign-in and log-out.
ENDED_KEPT_FOR = dt.timedelta(days=7)
#: ``api_tokens.kind`` of login links and sessions.
LOGIN_LINK_KIND = "login_link"
SESSION_KIND = "session"

#: What the caller records in the audit log when a session opens or ends (built from it).
AuditOf = Callable[["BrowserSession"], AuditRecord]


@dataclass(frozen=True)
class BrowserSession:
    """A session: ``secret`` is the cookie's value (``""`` once the session is ended)."""

    secret: str
    session_id: str
    principal: Principal
    expires_at: dt.datetime
    opened_with: str  # "login link <id>" | "token <id>"


def create_login_link(
    engine: Engine, subject: str, *, lifetime: dt.timedelta = LOGIN_LINK_LIFETIME
) -> CreatedToken:
    """A one-time login link of the existing principal ``subject`` (it signs in with the
    subject's roles); NotFound when no principal has that name."""
    with engine.begin() as conn:
        principal_id = conn.execute(
            select(principals.c.id).where(principals.c.subject == subject)
        ).scalar_one_or_none()
        if principal_id is None:
            raise NotFound(f"no principal {subject!r}: create a token for it first")
        now = utcnow()
        _prune_ended(conn, now)
        token_id, secret = insert_credential(
            conn,
            principal_id,
            LOGIN_LINK_PREFIX,
            kind=LOGIN_LINK_KIND,
            expires_at=now + lifetime,
            description="one-time browser login link",
        )
    return CreatedToken(secret, get_token(engine, token_id))


def open_session_with_link(engine: Engine, link: str, audit: AuditOf) -> BrowserSession:
    """Consume the login link ``link`` and open a session of its principal; the audit
    record commits with it. Unauthenticated when the link is unknown, used or expired."""

    def consume(conn: Connection, now: dt.datetime) -> tuple[TokenInfo, dt.datetime, str]:
        info = find_credential(conn, link, LOGIN_LINK_PREFIX, "login link")
        if info.revoked_at is not None:
            raise Unauthenticated(_used(info.token_id))
        if info.status(now) == "expired":
            minutes = int(LOGIN_LINK_LIFETIME.total_seconds() // 60)
            raise Unauthenticated(
                f"login link {info.token_id} has expired (a link is valid {minutes} minutes): "
                "sign in with an API token, or ask for a new link (medlake token login-link)"
            )
        consumed = conn.execute(
            update(api_tokens)
            .where(api_tokens.c.token_id == info.token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now, last_used_at=now)
        ).rowcount
        if consumed != 1:  # another request used it between the read and this write
            raise Unauthenticated(_used(info.token_id))
        return info, now + SESSION_LIFETIME, f"login link {info.token_id}"

    return _open(engine, consume, audit)


def open_session_with_token(engine: Engine, token: str, audit: AuditOf) -> BrowserSession:
    """Open a session of the principal of the API token ``token`` (its scopes, and no
    longer than its expiry); Unauthenticated when the token is not valid."""

    def check(conn: Connection, now: dt.datetime) -> tuple[TokenInfo, dt.datetime, str]:
        info = find_credential(conn, token, TOKEN_PREFIX, "API token")
        status = info.status(now)
        if status != "active":
            raise Unauthenticated(f"API token {info.token_id} is {status}")
        expires_at = now + SESSION_LIFETIME
        if info.expires_at is not None:
            expires_at = min(expires_at, info.expires_at)
        return info, expires_at, f"token {info.token_id}"

    return _open(engine, check, audit)


def _prune_ended(conn: Connection, now: dt.datetime) -> None:
    """Delete the login links and sessions that ended (used, logged out, revoked or
    expired) more than :data:`ENDED_KEPT_FOR` ago: every sign-in adds rows, which would
    otherwise stay for ever. API tokens are never deleted."""
    t = api_tokens.c
    cutoff = now - ENDED_KEPT_FOR
    conn.execute(
        delete(api_tokens).where(
            t.kind.in_((LOGIN_LINK_KIND, SESSION_KIND)),
            or_(t.revoked_at < cutoff, t.expires_at < cutoff),
        )
    )


def _used(token_id: str) -> str:
    return (
        f"login link {token_id} was already used (a link signs in once): sign in with an "
        "API token, or ask for a new link (medlake token login-link)"
    )


def _open(
    engine: Engine,
    source: Callable[[Connection, dt.datetime], tuple[TokenInfo, dt.datetime, str]],
    audit: AuditOf,
) -> BrowserSession:
    """Check the credential signing in (``source``), store the session and append its
    audit record, all in one transaction: a session nobody recorded does not exist."""
    now = utcnow()
    try:
        with engine.begin() as conn:
            info, expires_at, opened_with = source(conn, now)
            description = (
                opened_with_description(info.token_id)
                if opened_with.startswith("token ")
                else f"browser session opened with {opened_with}"
            )
            _prune_ended(conn, now)
            session_id, secret = insert_credential(
                conn,
                info.principal_id,
                SESSION_PREFIX,
                kind=SESSION_KIND,
                scopes=info.scopes,
                expires_at=expires_at,
                description=description,
            )
            principal = replace(principal_of_credential(info), token_id=session_id)
            session = BrowserSession(secret, session_id, principal, expires_at, opened_with)
            append_audit(conn, audit(session))
    except SQLAlchemyError as exc:
        raise AuditUnavailable(
            f"the session could not be opened: {exc.__class__.__name__}"
        ) from exc
    return session


def authenticate_session(engine: Engine, cookie: str) -> Principal:
    """The principal of the session cookie ``cookie``; Unauthenticated when it is not a
    session, or one that has ended or expired."""
    return authenticate_credential(engine, cookie, SESSION_PREFIX, "browser session")


def end_session(engine: Engine, cookie: str, audit: AuditOf) -> BrowserSession | None:
    """End the session of ``cookie`` (log out), recorded in the audit log; ``None`` when
    the cookie names no session that is still open (nothing to end)."""
    now = utcnow()
    try:
        with engine.begin() as conn:
            try:
                info = find_credential(conn, cookie, SESSION_PREFIX, "browser session")
            except Unauthenticated:
                return None
            if info.status(now) != "active":
                return None
            conn.execute(
                update(api_tokens)
                .where(api_tokens.c.token_id == info.token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            principal = principal_of_credential(info)
            opened_with = (info.description or "").removeprefix("browser session opened with ")
            expires_at = info.expires_at or now  # every session has an expiry
            session = BrowserSession("", info.token_id, principal, expires_at, opened_with)
            append_audit(conn, audit(session))
    except SQLAlchemyError as exc:
        raise AuditUnavailable(f"the session could not be ended: {exc.__class__.__name__}") from exc
    return session


__all__ = [
    "LOGIN_LINK_LIFETIME",
    "LOGIN_LINK_PREFIX",
    "SESSION_LIFETIME",
    "SESSION_PREFIX",
    "AuditOf",
    "BrowserSession",
    "authenticate_session",
    "create_login_link",
    "end_session",
    "open_session_with_link",
    "open_session_with_token",
]
