"""The stored HL7 v2 messages stay queryable: ``GET /hl7/messages`` (filters, paging),
``GET /hl7/messages/{id}`` (raw text, status, resources made), ``…/raw``, and
``medlake hl7 ls`` / ``show``. Messages arrive over MLLP from python-hl7's client."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from starlette.testclient import TestClient
from tests.hl7_support import MllpServer, adt, msh, oru, rows, running_listener
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.config import Settings
from medlake.ingest.archive import Archive


@pytest.fixture
def mllp(archive: Archive) -> Iterator[MllpServer]:
    """A listener on a free port (SQLite and PostgreSQL); its mapper runs on demand."""
    with running_listener(archive) as server:
        yield server


@pytest.fixture
def received(mllp: MllpServer) -> MllpServer:
    """Four messages received: two ADT^A01 (mapped), an ORU^R01 (mapped), a bad one."""
    with MLLPClient("127.0.0.1", mllp.port) as client:
        client.send_message(adt("A01", "Q-1"))
        client.send_message(oru("Q-2"))
        client.send_message(adt("A01", "Q-3", patient="999"))
        client.send_message(msh("ADT^A01", "Q-4") + "EVN|A01|2024\rPID|1||||DOE\rPV1|1|I\r")
    mllp.mapper.run_pending()
    return mllp


def test_list_filters_by_type_status_and_control_id(
    received: MllpServer, client: TestClient
) -> None:
    everything = client.get("/hl7/messages")
    assert everything.status_code == 200
    assert everything.headers["x-total-count"] == "4"
    assert [m["controlId"] for m in everything.json()] == ["Q-4", "Q-3", "Q-2", "Q-1"]

    adts = client.get("/hl7/messages", params={"type": "ADT^A01", "status": "mapped"}).json()
    assert [m["controlId"] for m in adts] == ["Q-3", "Q-1"]
    rejected = client.get("/hl7/messages", params={"status": "rejected"}).json()
    assert [(m["controlId"], m["ackCode"], m["errorCode"]) for m in rejected] == [
        ("Q-4", "AE", "101")
    ]
    (one,) = client.get("/hl7/messages", params={"control_id": "Q-2"}).json()
    assert one["messageType"] == "ORU^R01"
    assert "raw" not in one  # listings leave the message out

    page = client.get("/hl7/messages", params={"limit": 2, "offset": 1})
    assert page.headers["x-total-count"] == "4"
    assert [m["controlId"] for m in page.json()] == ["Q-3", "Q-2"]


def test_list_since(received: MllpServer, client: TestClient) -> None:
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()
    assert client.get("/hl7/messages", params={"since": later}).json() == []
    earlier = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).isoformat()
    assert len(client.get("/hl7/messages", params={"since": earlier}).json()) == 4


def test_bad_filters_are_400(client: TestClient) -> None:
    assert client.get("/hl7/messages", params={"status": "lost"}).status_code == 400
    assert client.get("/hl7/messages", params={"since": "yesterday"}).status_code == 400
    assert client.get("/hl7/messages", params={"limit": "-1"}).status_code == 400


def test_one_message_has_raw_text_status_and_resources(
    received: MllpServer, client: TestClient, archive: Archive
) -> None:
    (row,) = rows(archive, control_id="Q-2")
    response = client.get(f"/hl7/messages/{row.id}")
    assert response.status_code == 200
    body = response.json()
    assert body["raw"] == oru("Q-2")
    assert body["status"] == "mapped"
    kinds = sorted({ref.split("/")[0] for ref in body["resources"]})
    assert kinds == ["DiagnosticReport", "Observation", "Patient"]

    raw = client.get(f"/hl7/messages/{row.id}/raw")
    assert raw.headers["content-type"].startswith("x-application/hl7-v2+er7")
    assert raw.content == oru("Q-2").encode()


def test_unknown_message_is_404(client: TestClient) -> None:
    assert client.get("/hl7/messages/424242").status_code == 404
    assert client.get("/hl7/messages/abc").status_code == 400


def test_cli_lists_and_shows_messages(received: MllpServer, settings: Settings) -> None:
    runner = CliRunner()
    env = {"MEDLAKE_DATABASE_URL": settings.resolved_database_url}
    listed = runner.invoke(
        cli, ["hl7", "ls", "--data", str(settings.data), "--type", "ADT^A01"], env=env
    )
    assert listed.exit_code == 0, listed.output
    assert "Q-1" in listed.output and "Q-3" in listed.output and "Q-2" not in listed.output
    assert "3 of 3 messages" in listed.output  # Q-4 is an ADT^A01 too, rejected

    rejected = runner.invoke(
        cli, ["hl7", "ls", "--data", str(settings.data), "--status", "rejected"], env=env
    )
    assert "Q-4" in rejected.output and "PID-3" in rejected.output

    (row,) = rows(received.archive, control_id="Q-2")
    shown = runner.invoke(cli, ["hl7", "show", str(row.id), "--data", str(settings.data)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "OBX|1|NM|2093-3^Cholesterol^LN" in shown.output
    assert "Observation/" in shown.output

    missing = runner.invoke(cli, ["hl7", "show", "424242", "--data", str(settings.data)], env=env)
    assert missing.exit_code == 1


def test_medlake_mllp_receives_until_sigterm(settings: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).with_name("medlake")
    # As the fixture's settings: authentication off, so any sender is accepted.
    env = dict(
        os.environ,
        MEDLAKE_DATABASE_URL=settings.resolved_database_url,
        MEDLAKE_INSECURE_NO_AUTH="true",
    )
    server = subprocess.Popen(
        [str(script), "mllp", "--data", str(settings.data), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "medlake mllp did not listen"
                time.sleep(0.1)
        with MLLPClient("127.0.0.1", port) as client:
            ack = client.send_message(adt("A01", "CLI-1"))
        assert b"MSA|AA|CLI-1" in ack
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0].decode()
    assert server.returncode == 0, output
    assert f"MLLP: HL7 v2 on 127.0.0.1:{port}" in output
    archive = Archive.open(settings)
    try:
        (row,) = rows(archive, control_id="CLI-1")
        assert row.status in ("received", "mapped")
    finally:
        archive.close()
