"""DIMSE peers as principals: a calling AE title is admitted from its registered host
only, acts with the roles of its permissions in its partition, and every C-STORE,
C-FIND, C-MOVE / C-GET is audited with the AE as the actor (dcmtk and pynetdicom peers)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from sqlalchemy import select, text
from starlette.testclient import TestClient
from tests.dimse_support import fresh_copy, output, run_dcmtk

from medlake.dimse.ae_registry import ApplicationEntity, add_ae, calling_ae_rules
from medlake.dimse.contexts import STUDY_ROOT_FIND, STUDY_ROOT_GET, VERIFICATION
from medlake.dimse.scp import DimseServer
from medlake.index.schema import audit_log
from medlake.ingest.archive import Archive
from medlake.security import Grant, PrincipalKind, export_audit_events, verify_chain

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def server(archive: Archive) -> Iterator[DimseServer]:
    running = DimseServer(archive, host="127.0.0.1", port=0).start()
    try:
        yield running
    finally:
        running.stop()


def _associate(server: DimseServer, calling: str, *contexts: str, **kwargs: Any) -> Any:
    ae = AE(ae_title=calling)
    for context in contexts or (VERIFICATION,):
        ae.add_requested_context(context, EXPLICIT if context in (CT, MR) else None)
    return ae.associate("127.0.0.1", server.port, ae_title=server.ae_title, **kwargs)


def _audit(archive: Archive, expected: int = 0) -> list[Any]:
    """The audit records, once there are ``expected`` of them: C-STOREs are recorded when
    the association ends, just after the release response has gone to the peer."""
    for _ in range(400):
        with archive.engine.connect() as conn:
            rows = list(conn.execute(select(audit_log).order_by(audit_log.c.seq)))
        if len(rows) >= expected:
            return rows
        time.sleep(0.05)
    return rows


def test_a_registered_ae_is_admitted_only_from_its_host(
    archive: Archive, server: DimseServer, client: TestClient
) -> None:
    add_ae(archive, ApplicationEntity("FARAWAY", "10.9.9.9", 104))
    add_ae(archive, ApplicationEntity("BYNAME", "localhost", 104, partition="research"))

    elsewhere = _associate(server, "FARAWAY")
    by_name = _associate(server, "BYNAME")
    by_name_established = by_name.is_established
    by_name.release()
    unchecked = client.put(
        "/application-entities/FARAWAY", json={"host": "10.9.9.9", "port": 104, "checkHost": False}
    )
    admitted = _associate(server, "FARAWAY")
    admitted_established = admitted.is_established
    admitted.release()
    dcmtk = run_dcmtk(
        "echoscu", "-aet", "BYNAME", "-aec", server.ae_title, "127.0.0.1", str(server.port)
    )

    assert elsewhere.is_rejected
    rejection = elsewhere.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    assert by_name_established  # "localhost" resolves to the peer's 127.0.0.1
    assert unchecked.json()["checkHost"] is False
    assert admitted_established
    assert dcmtk.returncode == 0, output(dcmtk)
    [refused] = [r for r in _audit(archive, 1) if r.event_type == "110114"]
    assert (refused.actor, refused.actor_kind, refused.source_address, refused.outcome) == (
        "FARAWAY", "ae", "127.0.0.1", 4,
    )  # fmt: skip
    rules = calling_ae_rules(archive, "BYNAME", "127.0.0.1")
    assert rules is not None and rules.principal is not None
    assert rules.principal.kind is PrincipalKind.AE
    assert rules.principal.grants == {
        Grant.parse("ingest@research"),
        Grant.parse("reader@research"),
    }


def _study_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def test_phi_access_over_dimse_is_audited_with_the_ae_as_actor(
    archive: Archive, server: DimseServer, tmp_path: Path
) -> None:
    add_ae(archive, ApplicationEntity("MODALITY", "127.0.0.1", 104))
    add_ae(archive, ApplicationEntity("VIEWONLY", "127.0.0.1", 104, allow_store=False))
    first = fresh_copy("CT_small.dcm", tmp_path / "a", PatientID="AUDIT-1")
    study_a = str(pydicom.dcmread(first).StudyInstanceUID)
    second = fresh_copy("CT_small.dcm", tmp_path / "b", StudyInstanceUID=study_a)
    other = fresh_copy("MR_small.dcm", tmp_path / "c")
    study_b = str(pydicom.dcmread(other).StudyInstanceUID)

    stored = run_dcmtk(
        "storescu", "-aet", "MODALITY", "-aec", server.ae_title, "127.0.0.1", str(server.port),
        str(first), str(second), str(other),
    )  # fmt: skip
    assert stored.returncode == 0, output(stored)
    assoc = _associate(server, "MODALITY", STUDY_ROOT_FIND)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "AUDIT-1"
    query.StudyInstanceUID = ""
    matches = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
    assoc.release()
    getter = AE(ae_title="VIEWONLY")
    getter.add_requested_context(STUDY_ROOT_GET)
    getter.add_requested_context(CT, EXPLICIT)
    assoc = getter.associate(
        "127.0.0.1", server.port, ae_title=server.ae_title, ext_neg=[build_role(CT, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )  # fmt: skip
    got = list(assoc.send_c_get(_study_identifier(study_a), STUDY_ROOT_GET))
    assoc.release()
    assoc = _associate(server, "VIEWONLY", CT)
    refused = assoc.send_c_store(pydicom.dcmread(first))  # VIEWONLY may not store
    assoc.release()

    assert [str(ds.StudyInstanceUID) for _, ds in matches if ds is not None] == [study_a]
    assert got[-1][0].NumberOfCompletedSuboperations == 2
    assert refused.Status == 0x0124
    rows = _audit(archive, 5)
    summary = [
        (r.actor, r.actor_kind, r.event_type, r.event_subtype, r.action, r.outcome, r.operation)
        for r in rows
    ]
    assert summary == [
        ("MODALITY", "ae", "110104", None, "C", 0, "dicom.store"),  # at the release, per study
        ("MODALITY", "ae", "110104", None, "C", 0, "dicom.store"),
        ("MODALITY", "ae", "110112", None, "E", 0, "dicom.search"),
        ("VIEWONLY", "ae", "110104", None, "R", 0, "dicom.read"),
        ("VIEWONLY", "ae", "110113", "110132", "E", 4, "dicom.store"),
    ]
    stores = {json.loads(r.entity)["study"]: r.detail for r in rows[:2]}
    assert stores == {study_a: "instances stored: 2", study_b: "instances stored: 1"}
    assert "PatientID=AUDIT-1" in json.loads(rows[2].entity)["query"]
    assert json.loads(rows[3].entity)["study"] == study_a
    assert {r.source_address for r in rows} == {"127.0.0.1"}
    assert {r.partition for r in rows} == {"default"}
    assert verify_chain(archive.engine).ok

    out = io.BytesIO()
    export_audit_events(archive.engine, out)
    events = [AuditEvent.model_validate(orjson.loads(line)) for line in out.getvalue().splitlines()]
    requestor = events[0].agent[0]
    assert requestor.type.coding[0].code == "110153"  # Source Role ID: the sending AE
    assert requestor.who.identifier.value == "MODALITY"
    assert requestor.network.address == "127.0.0.1"


def _break_audit_log(archive: Archive) -> None:
    with archive.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER audit_log_full BEFORE INSERT ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            )
            return
        conn.execute(
            text(
                "CREATE FUNCTION audit_log_full() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER audit_log_full BEFORE INSERT ON audit_log "
                "FOR EACH ROW EXECUTE FUNCTION audit_log_full()"
            )
        )


def test_no_answer_is_sent_when_the_audit_record_cannot_be_written(
    archive: Archive, server: DimseServer, tmp_path: Path
) -> None:
    ct = fresh_copy("CT_small.dcm", tmp_path)
    assoc = _associate(server, "MODALITY", CT)
    assert assoc.send_c_store(pydicom.dcmread(ct)).Status == 0
    assoc.release()
    _break_audit_log(archive)

    assoc = _associate(server, "MODALITY", STUDY_ROOT_FIND)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
    assoc.release()
    getter = AE(ae_title="MODALITY")
    getter.add_requested_context(STUDY_ROOT_GET)
    getter.add_requested_context(CT, EXPLICIT)
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = getter.associate(
        "127.0.0.1", server.port, ae_title=server.ae_title, ext_neg=[build_role(CT, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    got = list(assoc.send_c_get(_study_identifier(str(pydicom.dcmread(ct).StudyInstanceUID)),
                                STUDY_ROOT_GET))  # fmt: skip
    assoc.release()

    assert [ds for _, ds in found if ds is not None] == []
    assert found[-1][0].Status == 0xA700
    assert got[-1][0].Status == 0xA701
    assert received == []
