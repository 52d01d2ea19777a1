"""medlake API tokens: created, listed, revoked; hashed at rest; refused once revoked or
expired, on every request."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from tests.dimse_support import free_port
from tests.security_support import bearer, issue
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.index.schema import api_tokens
from medlake.ingest.archive import Archive
from medlake.security import Grant, Role, create_token, list_tokens, revoke_token

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def test_a_token_is_stored_only_as_its_hash(secure_archive: Archive) -> None:
    created = create_token(secure_archive.engine, "svc", grants=[Grant(Role.READER, "default")])
    token_id, secret = created.info.token_id, created.secret.split("_", 2)[2]
    with secure_archive.engine.connect() as conn:
        row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).one()
    assert row.secret_sha256 == hashlib.sha256(created.secret.encode()).hexdigest()
    assert all(secret not in str(value) for value in row)
    database = secure_archive.settings.resolved_database_url
    if database.startswith("sqlite:///"):
        stored = b"".join(p.read_bytes() for p in Path(database[10:]).parent.glob("index.sqlite*"))
        assert secret.encode() not in stored


def test_create_list_revoke(secure_archive: Archive) -> None:
    engine = secure_archive.engine
    first = create_token(engine, "alice", grants=[Grant.parse("reader@default")])
    second = create_token(engine, "bob", grants=[Grant.parse("ingest")], scopes=["user/*.write"])
    listed = {t.token_id: t for t in list_tokens(engine)}
    assert set(listed) == {first.info.token_id, second.info.token_id}
    assert {str(g) for g in listed[first.info.token_id].grants} == {"reader@default"}
    assert listed[second.info.token_id].scopes == {"user/*.write"}
    assert listed[second.info.token_id].to_json()["status"] == "active"
    revoked = revoke_token(engine, first.info.token_id)
    assert revoked.status() == "revoked"
    assert [t.token_id for t in list_tokens(engine)] == [second.info.token_id]
    everything = list_tokens(engine, include_inactive=True)
    assert {t.token_id: t.status() for t in everything}[first.info.token_id] == "revoked"


def test_revoked_token_is_refused_on_replay(
    secure_archive: Archive, secure_client: TestClient
) -> None:
    token = issue(secure_archive, "alice", "reader@default")
    assert secure_client.get("/dicomweb/studies", headers=bearer(token)).status_code == 204
    revoke_token(secure_archive.engine, token.split("_")[1])
    replay = secure_client.get("/dicomweb/studies", headers=bearer(token))
    assert replay.status_code == 401
    assert "revoked" in replay.json()["message"]
    assert 'error="invalid_token"' in replay.headers["www-authenticate"]


def test_expired_and_forged_tokens_are_refused(
    secure_archive: Archive, secure_client: TestClient
) -> None:
    token = issue(secure_archive, "alice", "reader@default")
    token_id = token.split("_")[1]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert secure_client.get("/dicomweb/studies", headers=bearer(forged)).status_code == 401
    with secure_archive.engine.begin() as conn:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        conn.execute(
            update(api_tokens).where(api_tokens.c.token_id == token_id).values(expires_at=past)
        )
    expired = secure_client.get("/dicomweb/studies", headers=bearer(token))
    assert expired.status_code == 401
    assert "expired" in expired.json()["message"]
    for header in ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer " + "x" * 20000):
        assert (
            secure_client.get("/dicomweb/studies", headers={"Authorization": header}).status_code
            == 401
        )


def test_token_cli_create_list_revoke(
    secure_archive: Archive,
    secure_client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = secure_archive.settings
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    data = ["--data", str(settings.data)]
    runner = CliRunner()
    made = runner.invoke(
        cli,
        [
            "token",
            "create",
            "carol",
            "--role",
            "reader@default",
            "--expires-in",
            "12h",
            "--json",
            *data,
        ],
    )
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)  # the JSON is stdout; log lines go to stderr
    assert created["roles"] == ["reader@default"] and created["token"].startswith("mlk_")
    assert (
        secure_client.get("/dicomweb/studies", headers=bearer(created["token"])).status_code == 204
    )
    listed = runner.invoke(cli, ["token", "list", "--json", *data])
    assert listed.exit_code == 0, listed.output
    assert [t["id"] for t in json.loads(listed.stdout)] == [created["id"]]
    assert created["token"] not in listed.output
    revoked = runner.invoke(cli, ["token", "revoke", created["id"], *data])
    assert revoked.exit_code == 0, revoked.output
    assert (
        secure_client.get("/dicomweb/studies", headers=bearer(created["token"])).status_code == 401
    )
    bad = runner.invoke(cli, ["token", "create", "dave", "--role", "superuser", *data])
    assert bad.exit_code == 1 and "unknown role" in bad.output


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).with_name("medlake")
    return subprocess.Popen(
        [str(script), "serve", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _read_until(process: subprocess.Popen[bytes], pattern: str, timeout: float = 60) -> str:
    """Lines the server prints, up to one matching ``pattern``."""
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if not line and process.poll() is not None:
            break
        seen += line
        if re.search(pattern, line):
            return seen
    pytest.fail(f"the server did not print {pattern!r}: {seen}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.mark.parametrize("insecure", [False, True], ids=["auth", "insecure"])
def test_serve_prints_a_working_admin_token_or_warns_loudly(
    tmp_path: Path, db_url: str, insecure: bool
) -> None:
    port = free_port()
    env = {**os.environ, "MEDLAKE_DATABASE_URL": db_url, "MEDLAKE_MLLP_PORT": "0",
           "MEDLAKE_OHIF_DIST": str(tmp_path), "COLUMNS": "400"}  # fmt: skip
    args = ["--data", str(tmp_path / "data"), "--http-port", str(port), "--dimse-port", "0"]
    process = _serve([*args, "--insecure-no-auth"] if insecure else args, env)
    try:
        if insecure:
            printed = _read_until(process, "authentication is OFF")
            assert "mlk_" not in printed
        else:
            printed = _read_until(process, r"mlk_[0-9a-f]{12}_")
            token = re.search(r"mlk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", printed)
            assert token is not None, printed
        url = f"http://127.0.0.1:{port}/dicomweb/studies"
        deadline = time.monotonic() + 30
        while True:
            try:
                anonymous = httpx.get(url)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the HTTP port never opened"
                time.sleep(0.1)
        if insecure:
            assert anonymous.status_code == 204
        else:
            assert anonymous.status_code == 401
            assert httpx.get(url, headers=bearer(token.group(0))).status_code == 204
    finally:
        _stop(process)
