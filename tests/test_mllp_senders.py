"""Who may send HL7 v2 over MLLP: with authentication on, only registered senders
(``medlake hl7 senders add``: host, optional MSH-3 / MSH-4, partition); everyone else
gets AR with an ERR and nothing stored, and the refusal is audited. Every stored
message is audited in the transaction of its row. With authentication off everyone is
accepted, as before. python-hl7's MLLP client against a real listener, on SQLite and
PostgreSQL (through ``archive``)."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from tests.hl7_support import ack_code, adt, err_codes, msh, oru, read_acks, rows, segments
from typer.testing import CliRunner

from medlake.cli.main import app
from medlake.clinical.hl7 import Hl7Sender, MllpListener, add_sender, frame, remove_sender
from medlake.clinical.hl7 import receiver as receiver_module
from medlake.config import Settings
from medlake.errors import Conflict, InvalidInput, NotFound
from medlake.index.schema import audit_log
from medlake.ingest.archive import Archive
from medlake.security import verify_chain


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with authentication on (as on a fresh install)."""
    return settings.model_copy(update={"insecure_no_auth": False})


def send(listener: MllpListener, *messages: str) -> list[bytes]:
    """Send messages one at a time over one connection; their ACKs."""
    with MLLPClient("127.0.0.1", listener.port) as client:
        return [client.send_message(m) for m in messages]


def audit_rows(archive: Archive) -> list[dict[str, object]]:
    """The audit log, in chain order."""
    with archive.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(audit_log).order_by(audit_log.c.seq))]


def lab_result(control_id: str, sender: str) -> str:
    """An ORU^R01 from ``sender`` (``MSH-3|MSH-4``) instead of LAB|HOSP."""
    return oru(control_id).replace("MSH|^~\\&|LAB|HOSP|", f"MSH|^~\\&|{sender}|", 1)


# --- authentication on --------------------------------------------------------------------


def test_unregistered_sender_gets_ar_nothing_is_stored_and_the_refusal_is_audited(
    mllp_start: Callable[..., MllpListener], archive: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    listener = mllp_start()
    with caplog.at_level(logging.INFO):
        (ack,) = send(listener, adt("A01", "UNKNOWN-1", patient="PATIENT-SECRET", family="ZORG"))

    assert ack_code(ack) == "AR"
    assert segments(ack)["MSA"][0][2] == "UNKNOWN-1"
    assert err_codes(ack) == ["207"]
    explanation = segments(ack)["ERR"][0][8]
    assert "sender not authorized" in explanation
    assert "127.0.0.1" in explanation and "SENDAPP" in explanation
    assert rows(archive) == []
    (refusal,) = audit_rows(archive)
    assert (refusal["event_type"], refusal["event_subtype"]) == ("110114", "110122")
    assert refusal["outcome"] == 4
    assert refusal["operation"] == "hl7.receive"
    assert refusal["actor_kind"] == "hl7"
    assert refusal["source_address"] == "127.0.0.1"
    assert refusal["request"] == "MLLP ADT^A01 MSH-10=UNKNOWN-1"
    assert "no registered HL7 sender" in str(refusal["detail"])
    logged = caplog.text
    assert "refused" in logged
    assert "PATIENT-SECRET" not in logged and "ZORG" not in logged


def test_registered_sender_is_accepted_into_its_partition_and_audited(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("adt-feed", "127.0.0.1", "ward"))
    listener = mllp_start()

    acks = send(listener, adt("A01", "OK-1"), adt("A08", "OK-2"), adt("A01", "OK-1"))

    assert [ack_code(a) for a in acks] == ["AA", "AA", "AA"]
    stored = rows(archive)
    assert [(r.control_id, r.partition, r.status) for r in stored] == [
        ("OK-1", "ward", "received"),
        ("OK-2", "ward", "received"),
        ("OK-1", "ward", "duplicate"),
    ]
    audited = audit_rows(archive)
    assert [(a["event_type"], a["action"], a["outcome"]) for a in audited] == [
        ("110110", "C", 0)
    ] * 3
    assert {a["actor"] for a in audited} == {"adt-feed"}
    assert {a["partition"] for a in audited} == {"ward"}
    assert [a["request"] for a in audited] == [
        "MLLP ADT^A01 MSH-10=OK-1",
        "MLLP ADT^A08 MSH-10=OK-2",
        "MLLP ADT^A01 MSH-10=OK-1",
    ]
    assert audited[0]["detail"] == f"hl7_messages {stored[0].id}: received, ACK AA"
    assert f"duplicate of {stored[0].id}" in str(audited[2]["detail"])
    assert verify_chain(archive.engine).ok


def test_a_message_the_sender_got_wrong_is_stored_rejected_and_audited_as_a_failure(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("adt-feed", "127.0.0.1", "ward"))
    listener = mllp_start()

    (ack,) = send(listener, msh("ADT^A01^ADT_A01", "BAD-1") + "PID|1\r")

    assert ack_code(ack) in ("AE", "AR")
    (row,) = rows(archive)
    assert (row.status, row.partition) == ("rejected", "ward")
    (record,) = audit_rows(archive)
    assert (record["actor"], record["outcome"]) == ("adt-feed", 4)


def test_msh3_and_msh4_must_match_when_registered(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(
        archive.engine,
        Hl7Sender("lab", "127.0.0.1", "lab", application="LAB", facility="HOSP"),
    )
    listener = mllp_start()

    acks = send(
        listener,
        lab_result("R-1", "LAB|HOSP"),
        lab_result("R-2", "LAB^2.16.840.1.113883.19.1^ISO|HOSP"),  # HD: namespace ID
        lab_result("R-3", "RIS|HOSP"),
        lab_result("R-4", "LAB|OTHER"),
    )

    assert [ack_code(a) for a in acks] == ["AA", "AA", "AR", "AR"]
    assert [r.control_id for r in rows(archive)] == ["R-1", "R-2"]
    assert "MSH-3 'RIS'" in segments(acks[2])["ERR"][0][8]


def test_a_sender_registered_for_another_host_is_refused(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("remote", "192.0.2.10", "ward"))
    listener = mllp_start()

    (ack,) = send(listener, adt("A01", "ELSEWHERE-1"))

    assert ack_code(ack) == "AR"
    assert rows(archive) == []


def test_the_most_specific_sender_wins(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("host-only", "127.0.0.1", "general"))
    add_sender(archive.engine, Hl7Sender("lab", "localhost", "lab", application="LAB"))
    listener = mllp_start()

    send(listener, lab_result("S-1", "LAB|HOSP"), adt("A01", "S-2"))

    assert [(r.control_id, r.partition) for r in rows(archive)] == [
        ("S-1", "lab"),
        ("S-2", "general"),
    ]
    assert [a["actor"] for a in audit_rows(archive)] == ["lab", "host-only"]


def test_pipelined_messages_of_allowed_and_refused_senders_are_answered_in_order(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("lab", "127.0.0.1", "lab", application="LAB"))
    listener = mllp_start()
    messages = [lab_result(f"P-{n}", "LAB|HOSP" if n % 2 else "RIS|HOSP") for n in range(6)]

    with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sock:
        sock.sendall(b"".join(frame(m.encode()) for m in messages))
        acks = read_acks(sock, 6)

    assert [segments(a)["MSA"][0][1:3] for a in acks] == [
        ["AR" if n % 2 == 0 else "AA", f"P-{n}"] for n in range(6)
    ]
    assert [r.control_id for r in rows(archive)] == ["P-1", "P-3", "P-5"]
    assert [a["outcome"] for a in audit_rows(archive)] == [4, 0, 4, 0, 4, 0]
    assert verify_chain(archive.engine).ok


def test_bytes_outside_a_block_from_an_unregistered_peer_are_not_stored(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    listener = mllp_start()

    with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")

    deadline = time.monotonic() + 30  # the connection's end makes them an event
    while not audit_rows(archive) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows(archive) == []
    (refusal,) = audit_rows(archive)
    assert refusal["request"] == "MLLP (no MSH)"


def test_a_failed_audit_write_fails_the_message(
    mllp_start: Callable[..., MllpListener], archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's rule: a request whose audit record cannot be written fails; here the
    message is answered AR and its row is rolled back with the audit insert."""
    add_sender(archive.engine, Hl7Sender("adt-feed", "127.0.0.1", "ward"))
    listener = mllp_start()

    def audit_down(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("INSERT INTO audit_log", {}, Exception("disk full"))

    monkeypatch.setattr(receiver_module, "append_audits", audit_down)
    (failed,) = send(listener, adt("A01", "NO-AUDIT-1"))
    monkeypatch.undo()
    (resent,) = send(listener, adt("A01", "NO-AUDIT-1"))

    assert ack_code(failed) == "AR"
    assert "could not be stored" in segments(failed)["ERR"][0][8]
    assert ack_code(resent) == "AA"
    assert [(r.control_id, r.status) for r in rows(archive)] == [("NO-AUDIT-1", "received")]
    assert len(audit_rows(archive)) == 1


def test_a_removed_sender_is_refused(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("adt-feed", "127.0.0.1", "ward"))
    listener = mllp_start()
    (before,) = send(listener, adt("A01", "RM-1"))

    remove_sender(archive.engine, "adt-feed")
    listener.senders.invalidate()  # else within senders.REFRESH_SECONDS
    (after,) = send(listener, adt("A01", "RM-2"))

    assert (ack_code(before), ack_code(after)) == ("AA", "AR")


# --- authentication off -------------------------------------------------------------------


def test_without_authentication_everyone_is_accepted_and_nothing_audited(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    add_sender(archive.engine, Hl7Sender("lab", "127.0.0.1", "lab", application="LAB"))
    listener = mllp_start(insecure_no_auth=True, hl7_partition="inbox")

    acks = send(listener, adt("A01", "OPEN-1"), lab_result("OPEN-2", "LAB|HOSP"))

    assert [ack_code(a) for a in acks] == ["AA", "AA"]
    assert [(r.control_id, r.partition) for r in rows(archive)] == [
        ("OPEN-1", "inbox"),
        ("OPEN-2", "lab"),  # a registered sender keeps its partition
    ]
    assert audit_rows(archive) == []


# --- registering senders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "message"),
    [
        (Hl7Sender("bad name", "127.0.0.1", "ward"), "sender name 'bad name' is invalid"),
        (Hl7Sender("x", "two words", "ward"), "host 'two words' of sender x"),
        (Hl7Sender("x", "", "ward"), "host '' of sender x"),
        (Hl7Sender("x", "127.0.0.1", "no/slash"), "no/slash"),
        (Hl7Sender("x", "*", "ward", tls_subject="lab-1"), "TLS subject 'lab-1' is invalid"),
        (Hl7Sender("x", "*", "ward", application="LAB"), "from any host (*) needs a TLS"),
        (Hl7Sender("x", "h", "ward", application="LAB\r"), "sending application (MSH-3)"),
        (Hl7Sender("x", "h", "ward", facility="F" * 256), "sending facility (MSH-4)"),
    ],
    ids=[
        "name",
        "host-space",
        "host-empty",
        "partition",
        "tls-subject",
        "any-host",
        "msh3",
        "msh4",
    ],
)
def test_bad_sender_is_refused_with_what_is_wrong(
    archive: Archive, sender: Hl7Sender, message: str
) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        add_sender(archive.engine, sender)
    assert audit_rows(archive) == []


def test_a_taken_name_conflicts_unless_replaced_and_an_unknown_one_is_not_found(
    archive: Archive,
) -> None:
    add_sender(archive.engine, Hl7Sender("lab", "127.0.0.1", "lab"))
    with pytest.raises(Conflict, match="'lab' is already registered"):
        add_sender(archive.engine, Hl7Sender("lab", "127.0.0.2", "other"))
    replaced = add_sender(archive.engine, Hl7Sender("lab", "127.0.0.2", "other"), replace=True)
    with pytest.raises(NotFound, match="'ghost' is not registered"):
        remove_sender(archive.engine, "ghost")

    assert (replaced.host, replaced.partition) == ("127.0.0.2", "other")


def test_senders_commands(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", str(settings.database_url))
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    data = ["--data", str(tmp_path / "cli-data")]

    added = runner.invoke(
        app,
        ["hl7", "senders", "add", "lab", "--host", "127.0.0.1", "--partition", "lab",
         "--application", "LAB", "--tls-subject", "CN=lab-1", *data],
    )  # fmt: skip
    listed = runner.invoke(app, ["hl7", "senders", "list", "--json", *data])
    again = runner.invoke(
        app, ["hl7", "senders", "add", "lab", "--host", "h", "--partition", "lab", *data]
    )
    bad = runner.invoke(
        app, ["hl7", "senders", "add", "x y", "--host", "h", "--partition", "lab", *data]
    )
    removed = runner.invoke(app, ["hl7", "senders", "remove", "lab", *data])
    missing = runner.invoke(app, ["hl7", "senders", "remove", "lab", *data])

    assert added.exit_code == 0, added.output
    assert "registered HL7 sender lab" in added.output
    (entry,) = orjson.loads(listed.stdout)
    assert entry["host"] == "127.0.0.1" and entry["sendingApplication"] == "LAB"
    assert entry["tlsSubject"] == "CN=lab-1" and entry["partition"] == "lab"
    assert again.exit_code == 1 and "already registered" in again.output
    assert bad.exit_code == 1 and "sender name 'x y' is invalid" in bad.output
    assert removed.exit_code == 0
    assert missing.exit_code == 1 and "not registered" in missing.output
