"""DICOM TLS (PS3.15 BCP 195 profiles) on the DIMSE port: dcmtk's echoscu / storescu /
storescp built with TLS and pynetdicom as peers, against the certificates of
``tests.tls_support`` (a test CA, medlake's certificate, a modality's, and a stranger's
from another CA)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select
from starlette.testclient import TestClient
from tests.dimse_support import dcmtk, free_port, fresh_copy, output, run_dcmtk
from tests.tls_support import Pki

from medlake.config import Settings
from medlake.dimse.ae_registry import ApplicationEntity, add_ae
from medlake.dimse.contexts import STUDY_ROOT_FIND, STUDY_ROOT_MOVE
from medlake.dimse.scp import DimseServer
from medlake.dimse.scu import echo, file_items, resolve_peer, send
from medlake.errors import InvalidInput, NetworkError
from medlake.index.schema import audit_log, instances
from medlake.ingest.archive import Archive

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def settings(settings: Settings, pki: Pki) -> Settings:
    """The suite's settings with medlake's certificate and a DICOM TLS port."""
    return settings.model_copy(
        update={
            "tls_cert_file": pki.server_cert,
            "tls_key_file": pki.server_key,
            "dimse_tls_port": free_port(),
        }
    )


def _mutual(archive: Archive, pki: Pki) -> None:
    archive.settings = archive.settings.model_copy(update={"dimse_tls_ca_file": pki.ca})


@pytest.fixture
def server(archive: Archive) -> Iterator[DimseServer]:
    """medlake's SCP: plain on a free port, TLS on dimse_tls_port (settings may change
    before the test starts it)."""
    scp = DimseServer(archive, host="127.0.0.1", port=0)
    try:
        yield scp
    finally:
        scp.stop()


def _tls_options(pki: Pki, who: str = "client") -> list[str]:
    key, cert = getattr(pki, f"{who}_key"), getattr(pki, f"{who}_cert")
    return ["+tls", str(key), str(cert), "-pw", "+cf", str(pki.ca)]


def _echoscu(
    server: DimseServer, *options: str, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    return run_dcmtk(
        "echoscu", *options, "-to", "20", "-ta", "20", "-aet", "MODALITY", "-aec",
        server.ae_title, "127.0.0.1", str(port or server.tls_port), timeout=60,
    )  # fmt: skip


def _stored_sops(archive: Archive) -> set[str]:
    with archive.engine.connect() as conn:
        return {r.sop_uid for r in conn.execute(select(instances.c.sop_uid))}


def test_dcmtk_echoes_and_stores_over_tls(
    archive: Archive, server: DimseServer, pki: Pki, tmp_path: Path
) -> None:
    server.start()
    ct = fresh_copy("CT_small.dcm", tmp_path)

    echoed = _echoscu(server, *_tls_options(pki))
    stored = run_dcmtk(
        "storescu", *_tls_options(pki), "-aet", "MODALITY", "-aec", server.ae_title,
        "127.0.0.1", str(server.tls_port), str(ct),
    )  # fmt: skip
    plain_to_tls = _echoscu(server)
    plain = _echoscu(server, port=server.port)

    assert echoed.returncode == 0, output(echoed)
    assert stored.returncode == 0, output(stored)
    assert str(pydicom.dcmread(ct).SOPInstanceUID) in _stored_sops(archive)
    assert plain_to_tls.returncode != 0  # the TLS port speaks nothing else
    assert plain.returncode == 0, output(plain)  # the plain port is still there


def _tls_ae(pki: Pki, who: str | None = "client") -> tuple[AE, tuple[ssl.SSLContext, str]]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if who is not None:
        context.load_cert_chain(getattr(pki, f"{who}_cert"), getattr(pki, f"{who}_key"))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, EXPLICIT)
    ae.add_requested_context(STUDY_ROOT_FIND)
    return ae, (context, "localhost")


def test_pynetdicom_stores_and_finds_over_tls(
    archive: Archive, server: DimseServer, pki: Pki, tmp_path: Path
) -> None:
    """Many small messages through the event-driven transport on a TLS socket (bytes
    already decrypted by OpenSSL are invisible to select())."""
    server.start()
    ae, tls_args = _tls_ae(pki)
    files = [fresh_copy("CT_small.dcm", tmp_path / str(n)) for n in range(12)]
    assoc = ae.associate("127.0.0.1", server.tls_port, ae_title=server.ae_title, tls_args=tls_args)
    try:
        assert assoc.is_established
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID
        identifier.SOPInstanceUID = ""
        found = list(assoc.send_c_find(identifier, STUDY_ROOT_FIND))
    finally:
        assoc.release()

    assert statuses == [0] * 12
    assert {str(ds.SOPInstanceUID) for _, ds in found if ds is not None} == {
        str(pydicom.dcmread(files[0]).SOPInstanceUID)
    }
    assert found[-1][0].Status == 0


def test_mutual_tls_requires_a_client_certificate_of_the_ca(
    archive: Archive, server: DimseServer, pki: Pki
) -> None:
    _mutual(archive, pki)
    server.start()

    anonymous = _echoscu(server, "+tla", "+cf", str(pki.ca))
    stranger = _echoscu(server, *_tls_options(pki, "stranger"))
    modality = _echoscu(server, *_tls_options(pki))
    ae, tls_args = _tls_ae(pki)
    assoc = ae.associate("127.0.0.1", server.tls_port, ae_title=server.ae_title, tls_args=tls_args)
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientName = "DOE*"
        assert list(assoc.send_c_find(identifier, STUDY_ROOT_FIND))[-1][0].Status == 0
    finally:
        assoc.release()

    assert anonymous.returncode != 0
    assert stranger.returncode != 0
    assert modality.returncode == 0, output(modality)
    with archive.engine.connect() as conn:
        names = {r.actor_name for r in conn.execute(select(audit_log).where(
            audit_log.c.event_type == "110112"))}  # fmt: skip
    assert names == {"MODALITY at 127.0.0.1 (TLS O=medlake tests, CN=modality-1)"}


def test_a_silent_connection_does_not_hold_up_the_tls_port(
    archive: Archive, server: DimseServer, pki: Pki
) -> None:
    """The handshake runs in the connection's thread: a peer that connects and says
    nothing does not stop the next one (the DIMSE timeout is long here)."""
    archive.settings = archive.settings.model_copy(update={"dimse_timeout": 300.0})
    server.ae.network_timeout = 300.0
    server.start()
    with socket.create_connection(("127.0.0.1", server.tls_port)):
        echoed = _echoscu(server, *_tls_options(pki))
    assert echoed.returncode == 0, output(echoed)


@dataclass
class TlsStoreScp:
    """dcmtk's storescp with TLS, writing what it receives into ``folder``."""

    port: int
    folder: Path


@pytest.fixture
def tls_storescp(pki: Pki, tmp_path: Path) -> Iterator[TlsStoreScp]:
    """A TLS storage peer that requires a client certificate of the test CA."""
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [dcmtk("storescp"), "+tls", str(pki.server_key), str(pki.server_cert), "-pw",
         "+cf", str(pki.ca), "-aet", "TLSPACS", "-od", str(folder), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None:
                pytest.fail(f"storescp exited: {process.stdout.read() if process.stdout else ''}")
            subprocess.run(["sleep", "0.05"], check=True)
        yield TlsStoreScp(port, folder)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_medlake_sends_and_moves_to_a_tls_peer(
    archive: Archive,
    client: TestClient,
    server: DimseServer,
    pki: Pki,
    tls_storescp: TlsStoreScp,
    tmp_path: Path,
) -> None:
    _mutual(archive, pki)  # our SCU verifies peers against the test CA
    registered = client.put(
        "/application-entities/TLSPACS",
        json={"host": "127.0.0.1", "port": tls_storescp.port, "tls": True},
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["tls"] is True
    peer = resolve_peer(archive, "TLSPACS")
    ct, mr = fresh_copy("CT_small.dcm", tmp_path), fresh_copy("MR_small.dcm", tmp_path)

    assert echo(archive, peer) == 0
    items, unusable = file_items([ct])
    result = send(archive, peer, items)
    assert result.ok and result.sent == 1 and not unusable
    # C-MOVE: a plain association to our SCP, the sub-operations to the TLS peer.
    server.start()
    add_ae(archive, ApplicationEntity("MOVER", "127.0.0.1", 104))
    store = AE(ae_title="MOVER")
    store.add_requested_context(
        pydicom.dcmread(mr).SOPClassUID, pydicom.dcmread(mr).file_meta.TransferSyntaxUID
    )
    sender = store.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    assert sender.send_c_store(pydicom.dcmread(mr)).Status == 0
    sender.release()
    mover = AE(ae_title="MOVER")
    mover.add_requested_context(STUDY_ROOT_MOVE)
    assoc = mover.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = pydicom.dcmread(mr).StudyInstanceUID
    try:
        responses = list(assoc.send_c_move(identifier, "TLSPACS", STUDY_ROOT_MOVE))
    finally:
        assoc.release()

    final = responses[-1][0]
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 1
    received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in tls_storescp.folder.iterdir()}
    assert received == {
        str(pydicom.dcmread(ct).SOPInstanceUID),
        str(pydicom.dcmread(mr).SOPInstanceUID),
    }


def test_a_tls_peer_with_a_certificate_we_do_not_trust_is_refused(
    archive: Archive, client: TestClient, tls_storescp: TlsStoreScp
) -> None:
    """Without dimse_tls_ca_file the SCU trusts the system's CAs only: the test CA's
    certificate is refused, so nothing is sent in clear or to an unverified peer."""
    client.put(
        "/application-entities/TLSPACS",
        json={"host": "127.0.0.1", "port": tls_storescp.port, "tls": True},
    )
    with pytest.raises(NetworkError) as refused:
        echo(archive, resolve_peer(archive, "TLSPACS"))
    assert "TLS" in refused.value.message


def test_a_tls_port_without_a_certificate_is_refused(archive: Archive) -> None:
    archive.settings = archive.settings.model_copy(
        update={"tls_cert_file": None, "tls_key_file": None}
    )
    with pytest.raises(InvalidInput, match="tls_cert_file"):
        DimseServer(archive, host="127.0.0.1", port=0).start()
    with pytest.raises(ValueError, match="tls_cert_file"):
        Settings(dimse_tls_port=2762)
