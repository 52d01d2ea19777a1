"""HL7 v2 over MLLP with TLS (``mllp_tls_port``): python-hl7's MLLP client on a TLS socket
(BCP 195 profile, the certificates of ``tests.tls_support``) beside the plain port;
plaintext, certificate-less and untrusted clients refused with nothing stored; a sender
identified by its client certificate. SQLite only (the transport does not depend on the
index)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select
from tests.dimse_support import free_port
from tests.hl7_support import ack_code, adt, err_codes, rows
from tests.tls_support import Pki

from medlake.clinical.hl7 import Hl7Sender, MllpError, MllpListener, add_sender, frame
from medlake.config import Settings
from medlake.index.schema import audit_log
from medlake.ingest.archive import Archive


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: TLS is the transport's business, not the index's."""
    return f"sqlite:///{tmp_path / 'index.sqlite'}"


@pytest.fixture
def settings(settings: Settings, pki: Pki) -> Settings:
    """The suite's settings (authentication off) with medlake's certificate and an MLLP
    TLS port."""
    return settings.model_copy(
        update={
            "tls_cert_file": pki.server_cert,
            "tls_key_file": pki.server_key,
            "mllp_tls_port": free_port(),
        }
    )


def _context(pki: Pki, who: str | None = "client") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if who is not None:
        context.load_cert_chain(getattr(pki, f"{who}_cert"), getattr(pki, f"{who}_key"))
    return context


def _tls_client(listener: MllpListener, pki: Pki, who: str | None = "client") -> MLLPClient:
    """python-hl7's MLLP client, its socket wrapped in TLS (it has no TLS option); it
    gives up after 10 s, well before a server-side handshake timeout."""
    client = MLLPClient("127.0.0.1", listener.tls_port)
    client.socket.settimeout(10)
    client.socket = _context(pki, who).wrap_socket(client.socket, server_hostname="localhost")
    return client


def _refused(listener: MllpListener, pki: Pki, who: str | None) -> bool:
    """Whether a TLS client presenting ``who``'s certificate (None: none) is cut off
    before any ACK (TLS 1.3 reports a refused client certificate on the first read)."""
    try:
        with _tls_client(listener, pki, who) as client:
            answer = client.send_message(adt("A01", f"REFUSED-{who}"))
    except (ssl.SSLError, OSError):
        return True
    return answer == b""


def test_python_hl7_client_over_tls_beside_the_plain_port(
    mllp_start: Callable[..., MllpListener], archive: Archive, pki: Pki
) -> None:
    listener = mllp_start()

    with _tls_client(listener, pki, who=None) as client:
        over_tls = client.send_message(adt("A01", "TLS-1"))
        cipher = client.socket.cipher()
        version = client.socket.version()
    with MLLPClient("127.0.0.1", listener.port) as client:
        plain = client.send_message(adt("A01", "PLAIN-1"))

    assert ack_code(over_tls) == "AA"
    assert ack_code(plain) == "AA"
    assert version in ("TLSv1.2", "TLSv1.3")
    assert cipher is not None and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
    assert [r.control_id for r in rows(archive)] == ["TLS-1", "PLAIN-1"]


def test_plaintext_client_on_the_tls_port_is_closed_and_nothing_is_stored(
    mllp_start: Callable[..., MllpListener], archive: Archive
) -> None:
    listener = mllp_start()

    with socket.create_connection(("127.0.0.1", listener.tls_port), timeout=30) as sock:
        sock.sendall(frame(adt("A01", "PLAIN-ON-TLS").encode()))
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""

    assert b"MSA" not in answer  # a TLS alert at most, never an ACK
    assert rows(archive) == []
    with MLLPClient("127.0.0.1", listener.port) as client:  # the listener is still fine
        assert ack_code(client.send_message(adt("A01", "AFTER"))) == "AA"


def test_mutual_tls_requires_a_client_certificate_of_the_ca(
    mllp_start: Callable[..., MllpListener], archive: Archive, pki: Pki
) -> None:
    listener = mllp_start(mllp_tls_ca_file=pki.ca)

    without_certificate = _refused(listener, pki, None)
    untrusted = _refused(listener, pki, "stranger")
    with _tls_client(listener, pki) as client:
        trusted = client.send_message(adt("A01", "MUTUAL-1"))

    assert without_certificate
    assert untrusted
    assert ack_code(trusted) == "AA"
    assert [r.control_id for r in rows(archive)] == ["MUTUAL-1"]


def test_a_silent_client_does_not_hold_up_the_tls_port(
    mllp_start: Callable[..., MllpListener], pki: Pki
) -> None:
    """The handshake runs in the connection's thread: a client that connects and never
    says hello delays nobody."""
    listener = mllp_start()
    silent = socket.create_connection(("127.0.0.1", listener.tls_port), timeout=30)
    with silent, _tls_client(listener, pki) as client:  # it times out if it has to wait
        answer = client.send_message(adt("A01", "NOT-HELD-UP"))

    assert ack_code(answer) == "AA"


def test_sender_known_by_its_certificate_only_over_mutual_tls(
    mllp_start: Callable[..., MllpListener], archive: Archive, pki: Pki
) -> None:
    """With authentication on, a sender registered by certificate subject (any host)
    is accepted over mutual TLS; the same message over the plain port is refused."""
    add_sender(archive.engine, Hl7Sender("modality", "*", "lab", tls_subject="CN=modality-1"))
    listener = mllp_start(insecure_no_auth=False, mllp_tls_ca_file=pki.ca)

    with _tls_client(listener, pki) as client:
        over_tls = client.send_message(adt("A01", "CERT-1"))
    with MLLPClient("127.0.0.1", listener.port) as client:
        plain = client.send_message(adt("A01", "CERT-2"))

    assert ack_code(over_tls) == "AA"
    assert ack_code(plain) == "AR"
    assert err_codes(plain) == ["207"]
    assert [(r.control_id, r.partition) for r in rows(archive)] == [("CERT-1", "lab")]
    with archive.engine.connect() as conn:
        audited = conn.execute(
            select(audit_log.c.actor, audit_log.c.actor_name, audit_log.c.outcome).order_by(
                audit_log.c.seq
            )
        ).all()
    assert audited[0].actor == "modality"
    assert "CN=modality-1" in audited[0].actor_name
    assert [a.outcome for a in audited] == [0, 4]


def test_tls_port_needs_a_certificate(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="mllp_tls_port needs tls_cert_file"):
        Settings(data=tmp_path, mllp_tls_port=free_port(), insecure_no_auth=True)


def test_an_unreadable_certificate_stops_the_start_and_leaves_no_port_open(
    archive: Archive, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    archive.settings = archive.settings.model_copy(
        update={"tls_cert_file": broken, "tls_key_file": broken}
    )
    listener = MllpListener(archive, host="127.0.0.1", port=free_port())

    with pytest.raises(MllpError, match=f"cannot load the TLS certificate {broken}"):
        listener.start()
    with pytest.raises(OSError):  # the plain port was closed again
        socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
