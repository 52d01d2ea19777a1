"""Browser sign-in: ``/login`` and ``/logout``, for the session cookie the viewer uses.

* ``GET /login?token=mll_…`` opens a one-time login link (printed by ``medlake serve``):
  the link is consumed, a session opens, its cookie is set and the browser is sent on
  (``303``) to the viewer, or to ``/`` when none is served. A used, expired or unknown
  link is ``401`` with the reason.
* ``GET /login`` is a small form; ``POST /login`` with the form field ``token`` (an API
  token, or a login link) signs in the same way.
* ``POST /logout`` ends the session and clears the cookie.

The cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` over TLS, and
lasts as long as its session (:mod:`medlake.security.browser_login`). Opening and ending
a session, and every refused attempt, are recorded in the audit log (DCM 110114 User
Authentication, 110122 Login / 110123 Logout).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from medlake.api.auth import SESSION_COOKIE, own_origin, principal_of, session_cookie
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.security.audit import (
    AUTHENTICATION_FAILED,
    LOGIN,
    LOGOUT,
    AuditEventType,
    AuditRecord,
    Outcome,
    record_audit,
)
from medlake.security.browser_login import (
    LOGIN_LINK_PREFIX,
    AuditOf,
    BrowserSession,
    end_session,
    open_session_with_link,
    open_session_with_token,
)
from medlake.security.errors import Unauthenticated
from medlake.security.policy import Action
from medlake.security.tokens import TOKEN_PREFIX, looks_like_api_token

router = APIRouter(include_in_schema=False)

#: The largest sign-in form accepted (a token is under 100 bytes).
MAX_FORM_BYTES = 4096
_FORM_TYPE = "application/x-www-form-urlencoded"
#: The pages hold a secret in their URL: never cached, never sent to another site as a
#: Referer. (Not ``no-referrer``: Chromium then sends ``Origin: null`` with the form.)
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}


@router.get("/login")
async def login(request: Request, token: str | None = None) -> Response:
    """The sign-in form, or, with ``?token=``, sign in with a one-time login link."""
    if token is None:
        return _page(request, 200)
    if looks_like_api_token(token):
        return _page(
            request,
            400,
            "an API token does not belong in a link (links are kept in the browser's "
            "history): paste it into the form below",
        )
    return await _sign_in(request, token, open_session_with_link)


@router.post("/login")
async def login_with_form(request: Request) -> Response:
    """Sign in with the form field ``token``: an API token (``mlk_…``) or a login link."""
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != own_origin(request.scope):
        # Another site's form would sign this browser in as someone else.
        return _page(request, 403, f"sign-in forms from {origin} are refused: use this page")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != _FORM_TYPE:
        return _page(request, 415, f"send the sign-in form as {_FORM_TYPE}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _page(request, 413, f"the sign-in form is larger than {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("latin-1"))
    token = (fields.get("token") or [""])[0].strip()
    if not token:
        return _page(request, 400, "the form field token is missing or empty")
    if not token.startswith((f"{TOKEN_PREFIX}_", f"{LOGIN_LINK_PREFIX}_")):
        return await _refused(
            request, "only a medlake API token (mlk_…) or a login link (mll_…) signs in here"
        )
    link = token.startswith(f"{LOGIN_LINK_PREFIX}_")
    return await _sign_in(
        request, token, open_session_with_link if link else open_session_with_token
    )


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the browser's session (when it has one) and clear its cookie."""
    cookie = session_cookie(request.scope)
    if cookie is not None:
        archive = _archive(request)
        await run_in_threadpool(end_session, archive.engine, cookie, _audit_of(request, LOGOUT))
    response = RedirectResponse("/login", status_code=303, headers=_HEADERS)
    response.delete_cookie(
        SESSION_COOKIE, path="/", secure=_tls(request), httponly=True, samesite="strict"
    )
    return response


# -- pieces ----------------------------------------------------------------------------


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _landing(request: Request) -> str:
    """Where a browser goes once signed in: the viewer, or ``/`` when none is served."""
    viewer: str | None = getattr(request.app.state, "viewer_path", None)
    return viewer or "/"


def _tls(request: Request) -> bool:
    return request.url.scheme == "https"


async def _sign_in(
    request: Request, secret: str, opener: Callable[[Engine, str, AuditOf], BrowserSession]
) -> Response:
    """Open a session with ``secret`` (by ``opener``: a login link or an API token) and set
    its cookie; the form again with ``401`` and the reason when it does not sign in."""
    engine = _archive(request).engine
    try:
        session = await run_in_threadpool(opener, engine, secret, _audit_of(request, LOGIN))
    except Unauthenticated as exc:
        return await _refused(request, exc.message)
    return _signed_in(request, session)


def _signed_in(request: Request, session: BrowserSession) -> Response:
    response = RedirectResponse(_landing(request), status_code=303, headers=_HEADERS)
    lifetime = int((session.expires_at - utcnow()).total_seconds())
    response.set_cookie(
        SESSION_COOKIE,
        session.secret,
        max_age=max(lifetime, 0),
        path="/",
        secure=_tls(request),
        httponly=True,
        samesite="strict",
    )
    return response


def _request_line(request: Request) -> str:
    # Never the query: it holds the login link's secret.
    return f"{request.method} {request.url.path}"


def _audit_of(request: Request, event: AuditEventType) -> AuditOf:
    """The audit record of a session opened (LOGIN) or ended (LOGOUT) by ``request``."""
    client = request.client
    action = Action.LOGIN if event is LOGIN else Action.LOGOUT

    def record(session: BrowserSession) -> AuditRecord:
        principal = session.principal
        done = "opened with " + session.opened_with if event is LOGIN else "ended"
        return AuditRecord(
            event=event,
            operation=action.value,
            actor=principal.subject,
            actor_kind=principal.kind.value,
            actor_name=principal.display_name,
            source_address=client.host if client else None,
            entity={"resource": f"token/{session.session_id}"},
            request=_request_line(request),
            detail=f"browser session {session.session_id} {done}",
        )

    return record


async def _refused(request: Request, message: str) -> Response:
    """``401`` with the form and the reason, recorded as a failed authentication."""
    return await run_in_threadpool(_page_audited, request, message)


def _page_audited(request: Request, message: str) -> Response:
    client = request.client
    record_audit(
        _archive(request).engine,
        AuditRecord(
            event=AUTHENTICATION_FAILED,
            operation=Action.LOGIN.value,
            actor="anonymous",
            actor_kind="none",
            source_address=client.host if client else None,
            request=_request_line(request),
            outcome=Outcome.MINOR_FAILURE,
            detail=message,
        ),
    )
    return _page(request, 401, message)


def _page(request: Request, status: int, message: str | None = None) -> Response:
    """The sign-in page (with ``message`` when something went wrong)."""
    principal = principal_of(request)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width'>",
        "<title>medlake: sign in</title><style>body{font-family:sans-serif;max-width:32em;",
        "margin:4em auto;padding:0 1em}input{width:100%;margin:.5em 0;padding:.4em}",
        ".error{color:#a00}</style></head><body><h1>medlake</h1>",
    ]
    if message:
        parts.append(f"<p class='error' role='alert'>{html.escape(message)}</p>")
    if principal is not None and status < 400:
        name = html.escape(principal.display_name or principal.subject)
        parts.append(
            f"<p>Signed in as <b>{name}</b>. <a href='{_landing(request)}'>Continue</a></p>"
            "<form method='post' action='/logout'><button>Sign out</button></form>"
        )
    parts.append(
        "<form method='post' action='/login'><label for='token'>API token or login link "
        "secret</label><input id='token' name='token' type='password' autocomplete='off' "
        "required><button>Sign in</button></form>"
        "<p>A login link is printed by <code>medlake serve</code> and signs in once; "
        "<code>medlake token create</code> makes API tokens.</p></body></html>"
    )
    return Response("".join(parts), status, media_type="text/html; charset=utf-8", headers=_HEADERS)


__all__ = ["MAX_FORM_BYTES", "router"]
