"""The calling-AE allow-list, per-AE partitions and permissions, and the HTTP API of the
known AEs (/application-entities)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from tests.dimse_support import free_port, fresh_copy, output, run_dcmtk
from tests.lake_inspection import LakeInspection

from medlake.dimse.ae_registry import ApplicationEntity, add_ae
from medlake.dimse.contexts import STUDY_ROOT_FIND, STUDY_ROOT_GET, VERIFICATION
from medlake.dimse.scp import DimseServer
from medlake.ingest.archive import Archive

if TYPE_CHECKING:
    from starlette.testclient import TestClient

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def server(archive: Archive) -> Iterator[DimseServer]:
    """A medlake SCP on the test's archive (settings may be changed before it starts)."""
    running = DimseServer(archive, host="127.0.0.1", port=0).start()
    try:
        yield running
    finally:
        running.stop()


def _require_known(archive: Archive) -> None:
    archive.settings = archive.settings.model_copy(update={"dimse_require_known_ae": True})


def _associate(server: DimseServer, calling: str, *contexts: str) -> object:
    ae = AE(ae_title=calling)
    for context in contexts or (VERIFICATION,):
        ae.add_requested_context(context, EXPLICIT if context == CT else None)
    return ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)


def test_unknown_calling_ae_is_rejected_when_known_aes_are_required(
    archive: Archive, server: DimseServer
) -> None:
    _require_known(archive)

    assoc = _associate(server, "STRANGER")

    assert assoc.is_rejected  # type: ignore[attr-defined]
    rejection = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    result = run_dcmtk(
        "echoscu", "-aet", "STRANGER", "-aec", server.ae_title, "127.0.0.1", str(server.port)
    )
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in output(result)


def test_registered_ae_is_accepted_when_known_aes_are_required(
    archive: Archive, server: DimseServer
) -> None:
    _require_known(archive)
    add_ae(archive, ApplicationEntity("FRIEND", "127.0.0.1", 104))

    assoc = _associate(server, "FRIEND")
    try:
        assert assoc.is_established  # type: ignore[attr-defined]
        assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_unknown_ae_may_store_and_query_by_default(
    archive: Archive, server: DimseServer, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(fresh_copy("CT_small.dcm", tmp_path))
    assoc = _associate(server, "ANYONE", CT)
    try:
        assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    assert (
        LakeInspection(archive)
        .instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        .is_file()
    )


def _find_studies(server: DimseServer, calling: str) -> tuple[int, set[str]]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    assoc = _associate(server, calling, STUDY_ROOT_FIND)
    try:
        responses = list(assoc.send_c_find(identifier, STUDY_ROOT_FIND))  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    found = {str(ds.StudyInstanceUID) for _, ds in responses if ds is not None}
    return int(responses[-1][0].Status), found


def test_a_registered_ae_stores_into_and_queries_its_partition(
    archive: Archive, server: DimseServer, tmp_path: Path
) -> None:
    add_ae(archive, ApplicationEntity("RESEARCHPACS", "127.0.0.1", 104, partition="research"))
    ds = pydicom.dcmread(fresh_copy("CT_small.dcm", tmp_path))
    assoc = _associate(server, "RESEARCHPACS", CT)
    try:
        assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]

    lake = LakeInspection(archive)
    path = lake.instance_path(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, partition="research"
    )
    assert path.is_file()
    assert _find_studies(server, "RESEARCHPACS") == (0, {str(ds.StudyInstanceUID)})
    assert _find_studies(server, "OTHER") == (0, set())  # default partition: empty


def test_permissions_of_a_registered_ae(
    archive: Archive, server: DimseServer, tmp_path: Path
) -> None:
    add_ae(archive, ApplicationEntity("VIEWONLY", "127.0.0.1", 104, allow_store=False))
    add_ae(archive, ApplicationEntity("SENDONLY", "127.0.0.1", 104, allow_query=False))
    ds = pydicom.dcmread(fresh_copy("CT_small.dcm", tmp_path))

    assoc = _associate(server, "VIEWONLY", CT)
    try:
        refused = assoc.send_c_store(ds)  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    status, _ = _find_studies(server, "SENDONLY")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    assoc = _associate(server, "SENDONLY", STUDY_ROOT_GET)
    try:
        get = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]

    assert refused.Status == 0x0124
    assert "may not store" in refused.ErrorComment
    assert status == 0x0124
    assert get[-1][0].Status == 0x0124
    LakeInspection(archive).assert_untouched()


# --- HTTP API ---------------------------------------------------------------------------------


def test_application_entities_api_round_trip(client: TestClient) -> None:
    body = {
        "aeTitle": "PACS1",
        "host": "pacs.example.org",
        "port": 104,
        "partition": "research",
        "description": "old PACS",
    }

    created = client.post("/application-entities", json=body)
    again = client.post("/application-entities", json=body)
    listed = client.get("/application-entities")
    one = client.get("/application-entities/PACS1")
    replaced = client.put(
        "/application-entities/PACS1", json={"host": "10.0.0.5", "port": 11112, "allowStore": False}
    )
    new = client.put("/application-entities/PACS2", json={"host": "10.0.0.6", "port": 104})
    deleted = client.delete("/application-entities/PACS1")
    gone = client.get("/application-entities/PACS1")
    deleted_again = client.delete("/application-entities/PACS1")

    assert created.status_code == 201, created.text
    assert created.json()["aeTitle"] == "PACS1"
    assert created.json()["partition"] == "research"
    assert again.status_code == 409
    assert [ae["aeTitle"] for ae in listed.json()] == ["PACS1"]
    assert one.json()["host"] == "pacs.example.org"
    assert replaced.status_code == 200
    assert replaced.json()["port"] == 11112 and replaced.json()["allowStore"] is False
    assert replaced.json()["partition"] == "default"  # replaced as a whole
    assert new.status_code == 201
    assert deleted.status_code == 204
    assert gone.status_code == 404
    assert deleted_again.status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"aeTitle": "X" * 17, "host": "h", "port": 104}, "AE title"),
        ({"aeTitle": "BAD\\AE", "host": "h", "port": 104}, "AE title"),
        ({"aeTitle": "OK", "host": "h", "port": 70000}, "port"),
        ({"aeTitle": "OK", "host": "h", "port": "104"}, "port"),
        ({"aeTitle": "OK", "host": "h"}, "port"),
        ({"aeTitle": "OK", "host": "h", "port": 104, "partition": "no/slash"}, "partition"),
        ({"aeTitle": "OK", "host": "h", "port": 104, "colour": "red"}, "unknown field"),
        ([1, 2], "JSON object"),
    ],
)
def test_invalid_application_entities_are_400(
    client: TestClient, body: object, message: str
) -> None:
    response = client.post("/application-entities", json=body)

    assert response.status_code == 400
    assert message in response.json()["message"]


def test_echo_endpoint(client: TestClient, archive: Archive, server: DimseServer) -> None:
    client.put("/application-entities/SELF", json={"host": "127.0.0.1", "port": server.port})
    client.put("/application-entities/NOBODY", json={"host": "127.0.0.1", "port": free_port()})

    ok = client.post("/application-entities/SELF/echo")
    down = client.post("/application-entities/NOBODY/echo")
    unknown = client.post("/application-entities/NOSUCH/echo")

    assert ok.status_code == 200
    assert ok.json() == {"aeTitle": "SELF", "status": 0, "success": True}
    assert down.status_code == 502
    assert "cannot connect" in down.json()["message"]
    assert unknown.status_code == 404
