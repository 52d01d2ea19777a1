"""FHIR transaction and batch Bundles at POST /fhir, and ``process_bundle`` as other
services call it, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text
from starlette.testclient import TestClient

from medlake.clinical import store
from medlake.clinical.bundles import process_bundle
from medlake.errors import PreconditionFailed, Unprocessable
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive

FHIR = {"Content-Type": "application/fhir+json"}
PATIENT_URN = "urn:uuid:7d3b0f5e-1c2a-4a8e-9b61-0c5f3d2e9a10"
ENCOUNTER_URN = "urn:uuid:0b9e4c21-8f53-4d7a-a2f4-5e6c7d8e9f01"
MRN = "http://hospital.example/mrn"


def send(client: TestClient, bundle: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/fhir", content=json.dumps(bundle), headers=FHIR | headers)


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def patient(mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": "Doe"}],
    }


def observation(subject: str, value: float = 72.0) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": value, "unit": "/min"},
    }


def total(client: TestClient, resource_type: str | None = None) -> int:
    url = f"/fhir/{resource_type}/_history" if resource_type else "/fhir/_history"
    count: int = client.get(url).json()["total"]
    return count


def stored(client: TestClient, location: str) -> dict[str, Any]:
    path = location.split("/fhir/", 1)[1].rsplit("/_history", 1)[0]
    body: dict[str, Any] = client.get(f"/fhir/{path}").json()
    return body


def test_transaction_resolves_urn_uuid_references(client: TestClient) -> None:
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": PATIENT_URN},
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">Visit of '
            f'<a href="{PATIENT_URN}">the patient</a></div>',
        },
    }
    obs = observation(PATIENT_URN) | {
        "encounter": {"reference": ENCOUNTER_URN},
        # an identifier that happens to be the urn is data, not a reference
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": PATIENT_URN}],
    }
    response = send(
        client,
        bundle(
            "transaction",
            {"fullUrl": ENCOUNTER_URN, "resource": encounter,
             "request": {"method": "POST", "url": "Encounter"}},
            {"fullUrl": PATIENT_URN, "resource": patient("1"),
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
        ),
    )  # fmt: skip
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created"] * 3
    for entry in result["entry"]:
        assert entry["response"]["etag"] == 'W/"1"'
        assert entry["response"]["lastModified"]
    enc_loc, pat_loc, obs_loc = (e["response"]["location"] for e in result["entry"])
    patient_ref = "Patient/" + stored(client, pat_loc)["id"]
    encounter_ref = "Encounter/" + stored(client, enc_loc)["id"]
    saved_obs = stored(client, obs_loc)
    assert saved_obs["subject"]["reference"] == patient_ref
    assert saved_obs["encounter"]["reference"] == encounter_ref
    assert saved_obs["identifier"][0]["value"] == PATIENT_URN
    saved_enc = stored(client, enc_loc)
    assert saved_enc["subject"]["reference"] == patient_ref
    assert f'href="{patient_ref}"' in saved_enc["text"]["div"]
    # the search index saw the resolved reference
    found = client.get("/fhir/Observation", params={"subject": patient_ref}).json()
    assert found["total"] == 1


def test_transaction_is_all_or_nothing(client: TestClient) -> None:
    send(
        client,
        bundle(
            "transaction",
            {
                "resource": patient("0") | {"id": "p0"},
                "request": {"method": "PUT", "url": "Patient/p0"},
            },
            {
                "resource": patient("1") | {"id": "p1"},
                "request": {"method": "PUT", "url": "Patient/p1"},
            },
        ),
    )
    before = total(client)
    invalid = send(
        client,
        bundle(
            "transaction",
            {"resource": patient("1"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "status": "final"},
             "request": {"method": "POST", "url": "Observation"}},
        ),
    )  # fmt: skip
    assert invalid.status_code == 422
    issue = invalid.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[1].resource.code"]
    assert total(client) == before

    # a failure found only in the database (a stale If-Match) undoes the other entries too
    stale = send(
        client,
        bundle(
            "transaction",
            {"resource": patient("2"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Patient/p1"}},
            {"resource": patient("0") | {"id": "p0", "active": True},
             "request": {"method": "PUT", "url": "Patient/p0", "ifMatch": 'W/"5"'}},
        ),
    )  # fmt: skip
    assert stale.status_code == 412
    assert total(client) == before
    assert client.get("/fhir/Patient/p1").status_code == 200
    assert "active" not in client.get("/fhir/Patient/p0").json()


def test_transaction_rejects_a_resource_written_twice(client: TestClient) -> None:
    twice = send(
        client,
        bundle(
            "transaction",
            {
                "resource": patient("1") | {"id": "a"},
                "request": {"method": "PUT", "url": "Patient/a"},
            },
            {"request": {"method": "DELETE", "url": "Patient/a"}},
        ),
    )
    assert twice.status_code == 400
    assert "more than one entry" in twice.json()["issue"][0]["diagnostics"]


def test_if_match_in_transaction(client: TestClient) -> None:
    p0 = {
        "resource": patient("0") | {"id": "p0"},
        "request": {"method": "PUT", "url": "Patient/p0"},
    }
    send(client, bundle("transaction", p0))
    stale = send(
        client,
        bundle(
            "transaction",
            {"resource": patient("0") | {"id": "p0", "active": True},
             "request": {"method": "PUT", "url": "Patient/p0", "ifMatch": 'W/"3"'}},
        ),
    )  # fmt: skip
    assert stale.status_code == 412
    assert "Bundle.entry[0]" in stale.json()["issue"][0]["diagnostics"]


def test_conditional_create_and_conditional_references(client: TestClient) -> None:
    existing = client.post("/fhir/Patient", content=json.dumps(patient("500")), headers=FHIR)
    existing_id = existing.json()["id"]
    response = send(
        client,
        bundle(
            "transaction",
            {"fullUrl": PATIENT_URN, "resource": patient("500"),
             "request": {"method": "POST", "url": "Patient",
                         "ifNoneExist": f"identifier={MRN}|500"}},
            {"resource": observation(PATIENT_URN),
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": observation(f"Patient?identifier={MRN}|500", 80.0),
             "request": {"method": "POST", "url": "Observation"}},
            # conditional reference to a resource this same bundle creates conditionally
            {"resource": patient("501"),
             "request": {"method": "PUT", "url": f"Patient?identifier={MRN}|501"}},
            {"resource": observation(f"Patient?identifier={MRN}|501", 90.0),
             "request": {"method": "POST", "url": "Observation"}},
        ),
    )  # fmt: skip
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "200 OK", "201 Created", "201 Created", "201 Created", "201 Created",
    ]  # fmt: skip
    assert entries[0]["response"]["location"].split("/")[-3] == existing_id
    assert total(client, "Patient") == 2
    for index in (1, 2):
        obs = stored(client, entries[index]["response"]["location"])
        assert obs["subject"]["reference"] == f"Patient/{existing_id}"
    new_patient = stored(client, entries[3]["response"]["location"])
    assert stored(client, entries[4]["response"]["location"])["subject"]["reference"] == (
        f"Patient/{new_patient['id']}"
    )

    unresolved = send(
        client,
        bundle("transaction", {"resource": observation(f"Patient?identifier={MRN}|nobody"),
                               "request": {"method": "POST", "url": "Observation"}}),
    )  # fmt: skip
    assert unresolved.status_code == 412
    assert unresolved.json()["issue"][0]["code"] == "not-found"


def test_transaction_processing_order(client: TestClient) -> None:
    old = {
        "resource": patient("9") | {"id": "old"},
        "request": {"method": "PUT", "url": "Patient/old"},
    }
    send(client, bundle("transaction", old))
    response = send(
        client,
        bundle(
            "transaction",
            {"request": {"method": "GET", "url": "Patient/new"}},
            {
                "resource": patient("10") | {"id": "new"},
                "request": {"method": "PUT", "url": "Patient/new"},
            },
            {"request": {"method": "DELETE", "url": "Patient/old"}},
            {"request": {"method": "GET", "url": f"Patient?identifier={MRN}|10"}},
        ),
        Prefer="return=representation",
    )
    assert response.status_code == 200, response.text
    get_entry, put_entry, delete_entry, search_entry = response.json()["entry"]
    # GET runs after the writes: it sees the resource the PUT created
    assert get_entry["resource"]["id"] == "new"
    assert get_entry["response"]["status"] == "200 OK"
    assert put_entry["response"]["status"] == "201 Created"
    assert put_entry["resource"]["meta"]["versionId"] == "1"
    assert delete_entry["response"]["status"] == "204 No Content"
    assert search_entry["resource"]["type"] == "searchset"
    assert search_entry["resource"]["total"] == 1
    assert client.get("/fhir/Patient/old").status_code == 410


def test_batch_entries_succeed_and_fail_independently(client: TestClient) -> None:
    response = send(
        client,
        bundle(
            "batch",
            {"resource": patient("1"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "gender": "sometimes"},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"resource": patient("2") | {"id": "b2"},
             "request": {"method": "PUT", "url": "Patient/b2"}},
            {"request": {"method": "POST", "url": "Patient"}},
        ),
    )  # fmt: skip
    assert response.status_code == 200
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses[0] == "201 Created"
    assert statuses[1] == "422"
    assert statuses[2] == "404"
    assert statuses[3] == "201 Created"
    assert statuses[4] == "400"
    failed = result["entry"][1]["response"]["outcome"]
    assert failed["resourceType"] == "OperationOutcome"
    assert failed["issue"][0]["expression"] == ["Bundle.entry[1].resource.gender"]
    assert total(client, "Patient") == 2


def test_bundle_envelope_errors(client: TestClient) -> None:
    assert send(client, {"resourceType": "Patient"}).status_code == 400
    assert send(client, bundle("collection")).status_code == 400
    no_request = send(client, bundle("transaction", {"resource": patient("1")}))
    assert no_request.status_code == 400
    assert no_request.json()["issue"][0]["expression"] == ["Bundle.entry[0]"]
    patch = send(
        client, bundle("transaction", {"request": {"method": "PATCH", "url": "Patient/1"}})
    )
    assert patch.status_code == 405


def test_process_bundle_writes_hundreds_of_entries(archive: Archive) -> None:
    entries: list[dict[str, Any]] = []
    for n in range(150):
        urn = f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
        entries.append({"fullUrl": urn, "resource": patient(f"bulk-{n}"),
                        "request": {"method": "POST", "url": "Patient"}})  # fmt: skip
        entries.append({"resource": observation(urn, float(n)),
                        "request": {"method": "POST", "url": "Observation"}})  # fmt: skip
    result = process_bundle(
        archive, bundle("transaction", *entries), base_url="http://medlake.test/fhir"
    )
    assert len(result["entry"]) == 300
    assert {e["response"]["status"] for e in result["entry"]} == {"201 Created"}
    page = store.history(archive, resource_type="Observation", count=1000)
    assert page.total == 150
    patients = {v.id for v in store.history(archive, resource_type="Patient", count=1000).entries}
    for version in page.entries:
        resource = version.resource()
        assert resource is not None
        assert resource["subject"]["reference"].removeprefix("Patient/") in patients


def test_process_bundle_raises_the_entry_error(archive: Archive) -> None:
    with pytest.raises(Unprocessable) as invalid:
        process_bundle(
            archive,
            bundle("transaction", {"resource": {"resourceType": "Patient", "gender": "x"},
                                   "request": {"method": "POST", "url": "Patient"}}),
            base_url="http://medlake.test/fhir",
        )  # fmt: skip
    assert invalid.value.issues[0]["expression"] == ["Bundle.entry[0].resource.gender"]
    with pytest.raises(PreconditionFailed):
        process_bundle(
            archive,
            bundle("transaction", {"resource": observation("Patient?identifier=x|y"),
                                   "request": {"method": "POST", "url": "Observation"}}),
            base_url="http://medlake.test/fhir",
        )  # fmt: skip
    assert store.history(archive).total == 0


def test_what_then_writes_commits_with_the_transaction_or_not_at_all(archive: Archive) -> None:
    # The HL7 mapper marks its message mapped this way: never resources without the
    # mark, never the mark without the resources.
    entry = {"resource": patient("then-1"), "request": {"method": "POST", "url": "Patient"}}
    seen: list[dict[str, Any]] = []

    def then_fails(conn: Connection, response: dict[str, Any]) -> None:
        seen.append(response)
        conn.execute(text("SELECT 1"))
        raise RuntimeError("bookkeeping failed")

    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        process_bundle(
            archive, bundle("transaction", entry), base_url="http://medlake.test/fhir",
            then=then_fails,
        )  # fmt: skip
    assert seen[0]["entry"][0]["response"]["status"] == "201 Created"
    assert store.history(archive).total == 0  # the Patient went with the failure

    def then_writes(conn: Connection, response: dict[str, Any]) -> None:
        seen.append(response)

    result = process_bundle(
        archive, bundle("transaction", entry), base_url="http://medlake.test/fhir",
        then=then_writes,
    )  # fmt: skip
    assert seen[-1] is result
    assert store.history(archive, resource_type="Patient").total == 1


def test_a_batch_runs_then_in_a_transaction_of_its_own_after_the_entries(
    archive: Archive,
) -> None:
    # A batch has no one transaction: its entries stay when ``then`` fails, and what
    # ``then`` wrote before failing does not.
    entry = {"resource": patient("then-b"), "request": {"method": "POST", "url": "Patient"}}
    seen: list[dict[str, Any]] = []

    def then_fails(conn: Connection, response: dict[str, Any]) -> None:
        seen.append(response)
        partition_id(conn, "marked-then-failed", create=True)
        raise RuntimeError("bookkeeping failed")

    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        process_bundle(
            archive, bundle("batch", entry), base_url="http://medlake.test/fhir",
            then=then_fails,
        )  # fmt: skip
    assert seen[0]["type"] == "batch-response"
    assert seen[0]["entry"][0]["response"]["status"] == "201 Created"
    assert store.history(archive, resource_type="Patient").total == 1  # the entry stays
    with archive.engine.connect() as conn:
        assert partition_id(conn, "marked-then-failed", create=False) is None

    def then_writes(conn: Connection, response: dict[str, Any]) -> None:
        seen.append(response)
        partition_id(conn, "marked", create=True)

    result = process_bundle(
        archive, bundle("batch", entry), base_url="http://medlake.test/fhir", then=then_writes
    )
    assert seen[-1] is result
    assert store.history(archive, resource_type="Patient").total == 2
    with archive.engine.connect() as conn:
        assert partition_id(conn, "marked", create=False) is not None


def test_concurrent_transactions_on_one_new_resource(archive: Archive) -> None:
    start = threading.Barrier(4)

    def run(n: int) -> dict[str, Any]:
        start.wait()
        return process_bundle(
            archive,
            bundle(
                "transaction",
                {"fullUrl": PATIENT_URN, "resource": patient("race") | {"id": "race"},
                 "request": {"method": "PUT", "url": "Patient/race"}},
                {"resource": observation(PATIENT_URN, float(n)),
                 "request": {"method": "POST", "url": "Observation"}},
            ),
            base_url="http://medlake.test/fhir",
        )  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    etags = sorted(r["entry"][0]["response"]["etag"] for r in results)
    assert etags == ['W/"1"', 'W/"2"', 'W/"3"', 'W/"4"']
    assert store.history(archive, resource_type="Observation").total == 4
    for version in store.history(archive, resource_type="Observation").entries:
        resource = version.resource()
        assert resource is not None
        assert resource["subject"]["reference"] == "Patient/race"
