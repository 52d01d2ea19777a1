"""Browser sign-in with authentication on: the one-time login link `medlake serve` prints,
the form at /login, the session cookie it sets (the same access as the token), logout,
and the refusals (a used or expired link, a cross-site change with the cookie)."""

from __future__ import annotations

import datetime as dt
import io
import re
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi import FastAPI
from rich.console import Console
from sqlalchemy import select, update
from tests.security_support import bearer, issue
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.cli.token_cmd import announce_access
from medlake.errors import NotFound
from medlake.index.schema import api_tokens, audit_log
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.security import create_token, revoke_token
from medlake.security.audit import LOGIN, AuditRecord
from medlake.security.browser_login import (
    ENDED_KEPT_FOR,
    SESSION_LIFETIME,
    create_login_link,
    open_session_with_link,
)
from medlake.security.errors import Unauthenticated
from medlake.web import create_web_app

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

COOKIE = "medlake_session"
ORIGIN = "http://testserver"  # the TestClient's own origin
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Origin": ORIGIN}


@pytest.fixture
def web_app(secure_archive: Archive, tmp_path: Path) -> FastAPI:
    """The app with authentication on and a (stand-in) viewer at /ohif/."""
    dist = tmp_path / "ohif-dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html><body>viewer</body></html>")
    return create_web_app(secure_archive, dist, background=False)


@pytest.fixture
def client(web_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(web_app) as test_client:
        yield test_client


@pytest.fixture
def admin_token(secure_archive: Archive) -> str:
    return issue(secure_archive, "admin", "admin")


def link_for(archive: Archive, subject: str = "admin") -> str:
    """The path and query of a new login link of ``subject``."""
    return f"/login?token={create_login_link(archive.engine, subject).secret}"


def session_of(response: object) -> str:
    """The session cookie a sign-in response set."""
    cookies = getattr(response, "cookies")  # noqa: B009
    value: str = cookies[COOKIE]
    return value


def max_age_of(set_cookie: str) -> int:
    """The Max-Age of a Set-Cookie header, in seconds."""
    match = re.search(r"Max-Age=(\d+)", set_cookie, re.I)
    assert match, set_cookie
    return int(match.group(1))


def with_cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session}"}


def sign_in(client: TestClient, path: str) -> str:
    """Open a login link; the session cookie (the client's own jar is left empty)."""
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 303, response.text
    client.cookies.clear()
    return session_of(response)


def audit_rows(archive: Archive) -> list[dict[str, object]]:
    with archive.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(audit_log).order_by(audit_log.c.seq))]


# --- the login link -------------------------------------------------------------------


def test_a_login_link_sets_a_session_cookie_and_opens_the_viewer(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    response = client.get(link_for(secure_archive), follow_redirects=False)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ohif/"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "same-origin"
    set_cookie = response.headers["set-cookie"]
    assert re.match(rf"{COOKIE}=mls_[0-9a-f]{{12}}_[\w-]{{43}};", set_cookie), set_cookie
    attributes = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "samesite=strict" in set_cookie.lower() and "path=/" in set_cookie.lower()
    assert "secure" not in attributes  # plain HTTP here; over TLS it is Secure
    max_age = max_age_of(set_cookie)
    assert SESSION_LIFETIME.total_seconds() - 60 < max_age <= SESSION_LIFETIME.total_seconds()
    client.cookies.clear()
    # the viewer's DICOMweb calls now pass with the cookie alone
    session = session_of(response)
    studies = client.get("/dicomweb/studies", headers=with_cookie(session))
    assert studies.status_code == 204, studies.text  # allowed; no study stored yet
    assert client.get("/dicomweb/studies").status_code == 401


def test_a_login_link_signs_in_once(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    path = link_for(secure_archive)
    sign_in(client, path)
    again = client.get(path, follow_redirects=False)
    assert again.status_code == 401
    assert "was already used (a link signs in once)" in again.text
    assert COOKIE not in again.headers.get("set-cookie", "")
    assert again.headers["content-type"].startswith("text/html")
    assert "<form method='post' action='/login'>" in again.text  # and a way to sign in


def test_an_expired_login_link_is_refused(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    link = create_login_link(secure_archive.engine, "admin")
    with secure_archive.engine.begin() as conn:
        conn.execute(
            update(api_tokens)
            .where(api_tokens.c.token_id == link.info.token_id)
            .values(expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    response = client.get(f"/login?token={link.secret}", follow_redirects=False)
    assert response.status_code == 401
    assert f"login link {link.info.token_id} has expired" in response.text
    assert COOKIE not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        ("mll_0123456789ab_" + "A" * 43, 401, "unknown login link"),
        ("mll_short", 401, "malformed login link"),
        ("mls_0123456789ab_" + "A" * 43, 401, "malformed login link"),
        ("eyJhbGciOiJSUzI1NiJ9.e30.sig", 401, "malformed login link"),
    ],
)
def test_a_link_that_is_not_a_login_link_is_refused(
    client: TestClient, token: str, status: int, message: str
) -> None:
    response = client.get(f"/login?token={token}", follow_redirects=False)
    assert response.status_code == status
    assert message in response.text
    assert "set-cookie" not in response.headers


def test_an_api_token_in_a_link_is_refused(client: TestClient, admin_token: str) -> None:
    response = client.get(f"/login?token={admin_token}", follow_redirects=False)
    assert response.status_code == 400
    assert "an API token does not belong in a link" in response.text
    assert "set-cookie" not in response.headers


def test_the_form_page(client: TestClient) -> None:
    page = client.get("/login")
    assert page.status_code == 200
    assert "<input id='token' name='token' type='password'" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_a_login_link_of_an_unknown_subject_is_not_made(secure_archive: Archive) -> None:

    with pytest.raises(NotFound, match="no principal 'nobody'"):
        create_login_link(secure_archive.engine, "nobody")


# --- the form, with an API token ------------------------------------------------------


def test_an_api_token_signs_in_through_the_form(
    client: TestClient, secure_archive: Archive
) -> None:
    reader = issue(secure_archive, "dr-reader", "reader@default")
    response = client.post(
        "/login", content=f"token={reader}", headers=FORM, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ohif/"
    client.cookies.clear()
    session = session_of(response)
    # the cookie grants exactly what the token grants
    for path in ("/dicomweb/studies", "/changefeed", "/changefeed?partition=default", "/batches"):
        by_token = client.get(path, headers=bearer(reader)).status_code
        by_cookie = client.get(path, headers=with_cookie(session)).status_code
        assert by_cookie == by_token, (path, by_cookie, by_token)
    assert client.get("/changefeed", headers=with_cookie(session)).status_code == 403


def test_a_session_lasts_no_longer_than_its_token(
    client: TestClient, secure_archive: Archive
) -> None:
    short = create_token(
        secure_archive.engine, "brief", expires_at=utcnow() + dt.timedelta(hours=1)
    ).secret
    response = client.post("/login", content=f"token={short}", headers=FORM, follow_redirects=False)
    assert response.status_code == 303
    max_age = max_age_of(response.headers["set-cookie"])
    assert 3500 < max_age <= 3600


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        ("", FORM, 400, "the form field token is missing or empty"),
        ("token=", FORM, 400, "the form field token is missing or empty"),
        ("token=hunter2", FORM, 401, "only a medlake API token (mlk_…) or a login link"),
        ("token=mlk_0123456789ab_" + "A" * 43, FORM, 401, "unknown API token"),
        ("token=x" + "x" * 5000, FORM, 413, "the sign-in form is larger than 4096 bytes"),
        ('{"token": "x"}', {"Content-Type": "application/json"}, 415, "send the sign-in form"),
        (
            "token=x",
            {**FORM, "Origin": "https://evil.example"},
            403,
            "sign-in forms from https://evil.example are refused",
        ),
    ],
)
def test_a_bad_sign_in_form_is_refused(
    client: TestClient, body: str, headers: dict[str, str], status: int, message: str
) -> None:
    response = client.post("/login", content=body, headers=headers, follow_redirects=False)
    assert response.status_code == status, response.text
    assert message in response.text
    assert "set-cookie" not in response.headers


def test_a_revoked_token_signs_in_no_more_and_ends_its_sessions(
    client: TestClient, secure_archive: Archive
) -> None:
    created = create_token(secure_archive.engine, "leaky", grants=[])
    response = client.post(
        "/login", content=f"token={created.secret}", headers=FORM, follow_redirects=False
    )
    session = session_of(response)
    client.cookies.clear()
    assert client.get("/partitions", headers=with_cookie(session)).status_code == 403  # no roles
    revoke_token(secure_archive.engine, created.info.token_id)
    ended = client.get("/partitions", headers=with_cookie(session))
    assert ended.status_code == 401
    assert "is revoked: sign in again at /login" in ended.json()["message"]
    again = client.post(
        "/login", content=f"token={created.secret}", headers=FORM, follow_redirects=False
    )
    assert (
        again.status_code == 401 and f"API token {created.info.token_id} is revoked" in again.text
    )


# --- the cookie -----------------------------------------------------------------------


def test_a_session_is_no_bearer_token_and_a_link_no_cookie(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    link = create_login_link(secure_archive.engine, "admin").secret
    session = sign_in(client, link_for(secure_archive))
    assert client.get("/dicomweb/studies", headers=bearer(session)).status_code == 401
    assert client.get("/dicomweb/studies", headers=with_cookie(link)).status_code == 401
    assert client.get("/dicomweb/studies", headers=with_cookie(admin_token)).status_code == 401


def test_the_bearer_wins_over_the_cookie(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    reader = issue(secure_archive, "dr-reader", "reader@default")
    admin_session = sign_in(client, link_for(secure_archive))
    both = {**with_cookie(admin_session), **bearer(reader)}
    assert client.get("/changefeed", headers=both).status_code == 403  # as the reader
    assert client.get("/changefeed", headers=with_cookie(admin_session)).status_code == 200


def test_a_change_with_the_cookie_needs_this_servers_origin(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    session = sign_in(client, link_for(secure_archive))
    cookie = with_cookie(session)
    no_origin = client.post("/partitions/fromcookie", headers=cookie)
    assert no_origin.status_code == 403
    assert (
        "POST with the session cookie needs Origin http://testserver (got none)"
        in (no_origin.json()["message"])
    )
    foreign = client.post(
        "/partitions/fromcookie", headers={**cookie, "Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403 and "got https://evil.example" in foreign.json()["message"]
    listed = client.get("/partitions", headers=cookie).json()
    assert [p["partitionName"] for p in listed] == ["default"]  # nothing was made
    same = client.post("/partitions/fromcookie", headers={**cookie, "Origin": ORIGIN})
    assert same.status_code in (200, 201), same.text
    # a bearer request needs no Origin
    bearer_made = client.post("/partitions/frombearer", headers=bearer(admin_token))
    assert bearer_made.status_code in (200, 201), bearer_made.text


def test_logout_ends_the_session(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    session = sign_in(client, link_for(secure_archive))
    # logout needs no Origin (the one exempt change)
    response = client.post("/logout", headers=with_cookie(session), follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    cleared = response.headers["set-cookie"]
    assert cleared.startswith(f'{COOKIE}=""') and "max-age=0" in cleared.lower(), cleared
    after = client.get("/dicomweb/studies", headers=with_cookie(session))
    assert after.status_code == 401
    assert "is revoked: sign in again at /login" in after.json()["message"]
    # a second logout, or one without a cookie, only clears the cookie
    assert (
        client.post("/logout", headers=with_cookie(session), follow_redirects=False).status_code
        == 303
    )
    assert client.post("/logout", follow_redirects=False).status_code == 303


def test_sign_in_and_out_are_audited_without_the_secret(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    path = link_for(secure_archive)
    session = sign_in(client, path)
    client.get(path, follow_redirects=False)  # replayed: refused
    client.post("/logout", headers=with_cookie(session), follow_redirects=False)
    rows = [r for r in audit_rows(secure_archive) if str(r["operation"]).startswith("session.")]
    summary = [(r["event_subtype"], r["operation"], r["actor"], r["outcome"]) for r in rows]
    assert summary == [
        ("110122", "session.login", "admin", 0),
        ("110122", "session.login", "anonymous", 4),
        ("110123", "session.logout", "admin", 0),
    ]
    assert "opened with login link" in str(rows[0]["detail"])
    assert "already used" in str(rows[1]["detail"])
    # mll_<id>_<secret>: the secret itself may contain "_" (URL-safe base64)
    secret = path.split("token=", 1)[1].split("_", 2)[2]
    everything = " ".join(str(v) for r in audit_rows(secure_archive) for v in r.values())
    assert secret not in everything and session.split("_", 2)[2] not in everything
    assert all(r["request"] in ("GET /login", "POST /logout") for r in rows)


# --- medlake serve, medlake token login-link ------------------------------------------


def test_serve_prints_a_login_link_that_signs_in(
    client: TestClient, secure_archive: Archive
) -> None:
    out = io.StringIO()
    announce_access(secure_archive, Console(file=out, width=400))
    printed = out.getvalue()
    match = re.search(r"http://[^/\s]+(/login\?token=mll_\S+)", printed)
    assert match, printed
    assert "admin token for this start" in printed  # the bearer token as well
    response = client.get(match.group(1), follow_redirects=False)
    assert response.status_code == 303
    client.cookies.clear()
    session = session_of(response)
    assert client.get("/changefeed", headers=with_cookie(session)).status_code == 200


def test_over_tls_the_cookie_is_secure(web_app: FastAPI, secure_archive: Archive) -> None:
    issue(secure_archive, "admin", "admin")
    with TestClient(web_app, base_url="https://medlake.example") as client:
        response = client.get(link_for(secure_archive), follow_redirects=False)
        assert response.status_code == 303
        assert "secure" in response.headers["set-cookie"].lower().split("; ")
        client.cookies.clear()
        cookie = with_cookie(session_of(response))
        # the origin a change must come from is the https one
        made = client.post(
            "/partitions/overtls", headers={**cookie, "Origin": "https://medlake.example"}
        )
        assert made.status_code in (200, 201), made.text
        plain = client.post(
            "/partitions/plain", headers={**cookie, "Origin": "http://medlake.example"}
        )
        assert plain.status_code == 403


def test_token_login_link_cli(
    client: TestClient, secure_archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = secure_archive.settings
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    data = ["--data", str(settings.data)]
    runner = CliRunner()
    issue(secure_archive, "dr-link", "reader@default")
    made = runner.invoke(cli, ["token", "login-link", "dr-link", *data])
    assert made.exit_code == 0, made.output
    match = re.fullmatch(r"https?://\S+(/login\?token=mll_\S+)\n", made.stdout)
    assert match, made.stdout
    response = client.get(match.group(1), follow_redirects=False)
    assert response.status_code == 303
    client.cookies.clear()
    session = with_cookie(session_of(response))
    assert client.get("/dicomweb/studies", headers=session).status_code == 204  # a reader
    assert client.get("/changefeed", headers=session).status_code == 403
    created = [r for r in audit_rows(secure_archive) if "login link" in str(r["detail"])]
    assert created and created[0]["operation"] == "security.manage"
    unknown = runner.invoke(cli, ["token", "login-link", "nobody", *data])
    assert unknown.exit_code == 1 and "no principal 'nobody'" in unknown.output


def test_two_requests_racing_with_one_link_sign_in_once(
    secure_archive: Archive, admin_token: str
) -> None:
    link = create_login_link(secure_archive.engine, "admin").secret
    start = threading.Barrier(4)

    def audit(session: object) -> AuditRecord:
        return AuditRecord(
            event=LOGIN, operation="session.login", actor="admin", actor_kind="token"
        )

    def attempt(_: int) -> str:
        start.wait()
        try:
            open_session_with_link(secure_archive.engine, link, audit)
        except Unauthenticated as exc:
            return exc.message
        return "signed in"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(attempt, range(4)))
    assert outcomes.count("signed in") == 1, outcomes
    assert all("was already used" in o for o in outcomes if o != "signed in"), outcomes


def test_login_links_and_sessions_that_ended_a_week_ago_are_deleted(
    client: TestClient, secure_archive: Archive, admin_token: str
) -> None:
    # Every sign-in adds a link and a session row; the ended ones go after a week.
    old_link = create_login_link(secure_archive.engine, "admin")
    old_session = sign_in(client, f"/login?token={old_link.secret}")
    recent_link = create_login_link(secure_archive.engine, "admin")
    unopened_link = create_login_link(secure_archive.engine, "admin")
    old_token = create_token(secure_archive.engine, "old-service", expires_at=None)
    long_ago = utcnow() - ENDED_KEPT_FOR - dt.timedelta(hours=1)
    old_session_id = old_session.split("_")[1]
    with secure_archive.engine.begin() as conn:
        ended = [old_link.info.token_id, old_session_id, old_token.info.token_id]
        conn.execute(
            update(api_tokens).where(api_tokens.c.token_id.in_(ended)).values(revoked_at=long_ago)
        )
        conn.execute(  # never opened, expired long ago (not revoked)
            update(api_tokens)
            .where(api_tokens.c.token_id == unopened_link.info.token_id)
            .values(expires_at=long_ago)
        )
        conn.execute(  # ended yesterday: still listed
            update(api_tokens)
            .where(api_tokens.c.token_id == recent_link.info.token_id)
            .values(expires_at=utcnow() - dt.timedelta(days=1))
        )
    sign_in(client, link_for(secure_archive))  # the next sign-in prunes
    with secure_archive.engine.connect() as conn:
        left = set(conn.execute(select(api_tokens.c.token_id)).scalars())
    assert old_link.info.token_id not in left
    assert unopened_link.info.token_id not in left
    assert old_session_id not in left
    assert recent_link.info.token_id in left
    assert old_token.info.token_id in left  # API tokens are never deleted
    assert client.get("/dicomweb/studies", headers=with_cookie(old_session)).status_code == 401
