"""FHIR R4 REST interactions at /fhir: create, read, vread, update, delete, history,
conditional interactions, version checks and bad input, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from medlake.clinical import store
from medlake.errors import PreconditionFailed
from medlake.ingest.archive import Archive

FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
EXAMPLES = Path(__file__).with_name("fhir_examples")


def post(client: TestClient, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(
        f"/fhir/{resource['resourceType']}", content=json.dumps(resource), headers=FHIR | headers
    )


def put(client: TestClient, url: str, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.put(f"/fhir/{url}", content=json.dumps(resource), headers=FHIR | headers)


def patient(mrn: str = "1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "http://hospital.example/mrn", "value": mrn}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "gender": "female",
        **extra,
    }


def outcome(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert body["resourceType"] == "OperationOutcome"
    return body


# --- create / read / update / delete / vread / history -------------------------------------


def test_create_assigns_id_and_version(client: TestClient) -> None:
    response = post(client, patient() | {"id": "client-chosen"})
    assert response.status_code == 201
    body = response.json()
    assert body["id"] != "client-chosen"  # create ignores the id of the body
    assert body["meta"]["versionId"] == "1"
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"].endswith(f"/fhir/Patient/{body['id']}/_history/1")
    assert "GMT" in response.headers["last-modified"]

    read = client.get(f"/fhir/Patient/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body
    assert read.headers["etag"] == 'W/"1"'
    assert read.headers["last-modified"] == response.headers["last-modified"]


def test_conditional_read_answers_304_while_the_copy_is_current(client: TestClient) -> None:
    pid = post(client, patient()).json()["id"]
    url = f"/fhir/Patient/{pid}"
    first = client.get(url)
    etag, modified = first.headers["etag"], first.headers["last-modified"]

    def read(**headers: str) -> httpx.Response:
        return client.get(url, headers=headers)

    for headers in (
        {"If-None-Match": etag},
        {"If-None-Match": '"1"'},  # weak comparison
        {"If-None-Match": f'W/"7", {etag}'},
        {"If-None-Match": "*"},
        {"If-Modified-Since": modified},
    ):
        cached = read(**headers)
        assert cached.status_code == 304, headers
        assert cached.content == b""
        assert cached.headers["etag"] == etag and cached.headers["last-modified"] == modified
    for headers in (
        {"If-None-Match": 'W/"2"'},
        {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"},
        {"If-Modified-Since": "not a date"},  # ignored, as RFC 9110 says
        {"If-None-Match": 'W/"2"', "If-Modified-Since": modified},  # If-None-Match decides
    ):
        assert read(**headers).status_code == 200, headers
    assert put(client, f"Patient/{pid}", patient(id=pid, gender="other")).status_code == 200
    changed = read(**{"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["gender"] == "other"
    assert changed.headers["etag"] == 'W/"2"'
    assert client.delete(url).status_code == 204
    assert read(**{"If-None-Match": "*"}).status_code == 410
    capability = client.get("/fhir/metadata").json()
    patient_type = next(r for r in capability["rest"][0]["resource"] if r["type"] == "Patient")
    assert patient_type["conditionalRead"] == "full-support"


def test_update_delete_and_history(client: TestClient) -> None:
    created = post(client, patient()).json()
    pid = created["id"]
    changed = put(client, f"Patient/{pid}", patient(id=pid, gender="other"))
    assert changed.status_code == 200
    assert changed.json()["meta"]["versionId"] == "2"
    assert changed.headers["etag"] == 'W/"2"'

    old = client.get(f"/fhir/Patient/{pid}/_history/1")
    assert old.status_code == 200
    assert old.json()["gender"] == "female"
    assert old.headers["etag"] == 'W/"1"'

    deleted = client.delete(f"/fhir/Patient/{pid}")
    assert deleted.status_code == 204
    gone = client.get(f"/fhir/Patient/{pid}")
    assert gone.status_code == 410
    assert outcome(gone)["issue"][0]["code"] == "deleted"
    assert client.get(f"/fhir/Patient/{pid}/_history/3").status_code == 410
    assert client.get(f"/fhir/Patient/{pid}/_history/9").status_code == 404
    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204  # nothing left to delete

    history = client.get(f"/fhir/Patient/{pid}/_history").json()
    assert history["type"] == "history"
    assert history["total"] == 3
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "PUT", "POST"]
    assert "resource" not in history["entry"][0]
    assert history["entry"][1]["resource"]["gender"] == "other"

    # an update brings it back with the next version number
    revived = put(client, f"Patient/{pid}", patient(id=pid))
    assert revived.status_code == 201
    assert revived.json()["meta"]["versionId"] == "4"
    assert client.get(f"/fhir/Patient/{pid}").status_code == 200


def test_update_as_create_with_client_id(client: TestClient) -> None:
    first = put(client, "Patient/mrn-42", patient(id="mrn-42"))
    assert first.status_code == 201
    assert first.headers["location"].endswith("/fhir/Patient/mrn-42/_history/1")
    second = put(client, "Patient/mrn-42", patient(id="mrn-42", active=True))
    assert second.status_code == 200
    assert second.json()["meta"]["versionId"] == "2"


def test_if_match_version_check(client: TestClient) -> None:
    pid = post(client, patient()).json()["id"]
    ok = put(client, f"Patient/{pid}", patient(id=pid, active=True), **{"If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = put(client, f"Patient/{pid}", patient(id=pid, active=False), **{"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert "version 2" in outcome(stale)["issue"][0]["diagnostics"]
    assert client.get(f"/fhir/Patient/{pid}").json()["active"] is True
    refused = client.delete(f"/fhir/Patient/{pid}", headers={"If-Match": 'W/"7"'})
    assert refused.status_code == 412
    bad = put(client, f"Patient/{pid}", patient(id=pid), **{"If-Match": "yesterday"})
    assert bad.status_code == 400


def test_type_and_system_history_with_since_and_paging(client: TestClient) -> None:
    first = post(client, patient("1")).json()
    since = first["meta"]["lastUpdated"]
    post(client, patient("2"))
    post(client, patient("3"))
    obs = json.loads((EXAMPLES / "observation.json").read_text())
    post(client, obs)

    everything = client.get("/fhir/_history").json()
    assert everything["total"] == 4
    patients = client.get("/fhir/Patient/_history").json()
    assert patients["total"] == 3
    assert {e["resource"]["resourceType"] for e in patients["entry"]} == {"Patient"}
    later = client.get("/fhir/_history", params={"_since": since}).json()
    assert later["total"] == 4  # _since includes versions made at that instant
    after_last = client.get("/fhir/_history", params={"_since": "2999-01-01T00:00:00Z"}).json()
    assert after_last["total"] == 0

    seen: list[str] = []
    url: str | None = "/fhir/_history?_count=3"
    pages = 0
    while url:
        page = client.get(url).json()
        seen += [e["fullUrl"] for e in page.get("entry", [])]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        pages += 1
    assert pages == 2
    assert len(seen) == len(set(seen)) == 4
    assert client.get("/fhir/_history", params={"_since": "last week"}).status_code == 400


def test_prefer_return(client: TestClient) -> None:
    minimal = post(client, patient(), Prefer="return=minimal")
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["location"]
    as_outcome = post(client, patient(), Prefer="return=OperationOutcome")
    assert as_outcome.status_code == 201
    assert outcome(as_outcome)["issue"][0]["severity"] == "information"


def test_decimal_precision_is_kept(client: TestClient) -> None:
    body = (EXAMPLES / "observation.json").read_bytes()
    assert b'"value": 6.30' in body
    created = client.post("/fhir/Observation", content=body, headers=FHIR)
    assert created.status_code == 201
    oid = created.json()["id"]
    assert b'"value":6.30' in client.get(f"/fhir/Observation/{oid}").content
    history = client.get(f"/fhir/Observation/{oid}/_history").content
    assert b'"value":6.30' in history


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_resources_round_trip(client: TestClient, name: str) -> None:
    original = json.loads((EXAMPLES / name).read_text())
    created = client.post(
        f"/fhir/{original['resourceType']}", content=(EXAMPLES / name).read_bytes(), headers=FHIR
    )
    assert created.status_code == 201, created.text
    stored = client.get(f"/fhir/{original['resourceType']}/{created.json()['id']}").json()
    meta = stored.pop("meta")
    assert meta["versionId"] == "1"
    stored.pop("id")
    assert stored == original


# --- conditional interactions --------------------------------------------------------------


def test_conditional_create(client: TestClient) -> None:
    condition = {"If-None-Exist": "identifier=http://hospital.example/mrn|77"}
    first = post(client, patient("77"), **condition)
    assert first.status_code == 201
    again = post(client, patient("77"), **condition)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["meta"]["versionId"] == "1"
    assert client.get("/fhir/Patient/_history").json()["total"] == 1

    post(client, patient("78", name=[{"family": "Roe"}]))
    post(client, patient("79", name=[{"family": "Roe"}]))
    several = post(client, patient("80"), **{"If-None-Exist": "family=Roe"})
    assert several.status_code == 412
    assert outcome(several)["issue"][0]["code"] == "multiple-matches"


def test_conditional_update(client: TestClient) -> None:
    url = "Patient?identifier=http://hospital.example/mrn|55"
    created = put(client, url, patient("55"))
    assert created.status_code == 201
    pid = created.json()["id"]
    updated = put(client, url, patient("55", active=True))
    assert updated.status_code == 200
    assert updated.json()["id"] == pid
    assert updated.json()["meta"]["versionId"] == "2"
    wrong_id = put(client, url, patient("55", id="someone-else"))
    assert wrong_id.status_code == 400

    post(client, patient("56", name=[{"family": "Twin"}]))
    post(client, patient("57", name=[{"family": "Twin"}]))
    assert put(client, "Patient?family=Twin", patient("58")).status_code == 412
    assert put(client, "Patient", patient("58")).status_code == 400  # no criteria


def test_conditional_delete(client: TestClient) -> None:
    pid = post(client, patient("91")).json()["id"]
    deleted = client.delete("/fhir/Patient?identifier=http://hospital.example/mrn|91")
    assert deleted.status_code == 204
    assert client.get(f"/fhir/Patient/{pid}").status_code == 410
    nothing = client.delete("/fhir/Patient?identifier=http://hospital.example/mrn|91")
    assert nothing.status_code == 204
    post(client, patient("92", name=[{"family": "Same"}]))
    post(client, patient("93", name=[{"family": "Same"}]))
    assert client.delete("/fhir/Patient?family=Same").status_code == 412


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_is_an_operation_outcome_with_the_right_status(client: TestClient) -> None:
    broken = client.post("/fhir/Patient", content=b'{"resourceType": "Patient",', headers=FHIR)
    assert broken.status_code == 400
    assert outcome(broken)["issue"][0]["code"] == "structure"

    wrong_type = client.post(
        "/fhir/Patient", content=b'{"resourceType":"Observation"}', headers=FHIR
    )
    assert wrong_type.status_code == 400
    assert "URL names Patient" in outcome(wrong_type)["issue"][0]["diagnostics"]

    pid = post(client, patient()).json()["id"]
    mismatch = put(client, f"Patient/{pid}", patient(id="another"))
    assert mismatch.status_code == 400
    no_id = put(client, f"Patient/{pid}", patient())
    assert no_id.status_code == 400

    invalid = post(client, patient(gender="sometimes", birthDate="1970-13-45", colour="blue"))
    assert invalid.status_code == 422
    found = {i["expression"][0]: i["code"] for i in outcome(invalid)["issue"]}
    assert found == {"Patient.birthDate": "value", "Patient.colour": "structure"}
    bad_code = post(client, patient(gender="sometimes"))
    assert bad_code.status_code == 422
    assert outcome(bad_code)["issue"][0]["expression"] == ["Patient.gender"]
    missing = post(client, {"resourceType": "Observation", "status": "final"})
    assert missing.status_code == 422
    assert outcome(missing)["issue"][0]["expression"] == ["Observation.code"]
    empty = post(client, patient(name=[{}]))
    assert empty.status_code == 422

    xml = client.post(
        "/fhir/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}
    )
    assert xml.status_code == 415
    outcome(xml)
    assert client.get(f"/fhir/Patient/{pid}", params={"_format": "xml"}).status_code == 406
    assert client.get(f"/fhir/Patient/{pid}", params={"_format": "json"}).status_code == 200
    plain_json = client.get(f"/fhir/Patient/{pid}", headers={"Accept": "application/json"})
    assert plain_json.headers["content-type"].startswith("application/json")

    bad_id = put(client, "Patient/bad_id!", patient(id="bad_id!"))
    assert bad_id.status_code == 400
    assert client.get("/fhir/Patient/" + "x" * 65).status_code == 400
    assert client.get("/fhir/Unicorn/1").status_code == 404
    assert client.get("/fhir/Patient/nobody").status_code == 404
    not_allowed = client.post(f"/fhir/Patient/{pid}", content=b"{}", headers=FHIR)
    assert not_allowed.status_code == 405
    assert {"PUT", "PATCH"} <= {m.strip() for m in not_allowed.headers["allow"].split(",")}
    outcome(not_allowed)


def test_capability_statement(client: TestClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert "json" in statement["format"]
    rest = statement["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    resources = {r["type"]: r for r in rest["resource"]}
    for name in ("Patient", "Observation", "ImagingStudy", "Consent", "Group", "AuditEvent"):
        assert name in resources
    patient_caps = resources["Patient"]
    assert {i["code"] for i in patient_caps["interaction"]} >= {"read", "vread", "create"}
    assert patient_caps["conditionalDelete"] == "single"
    assert patient_caps["versioning"] == "versioned-update"
    params = {p["name"]: p["type"] for p in patient_caps["searchParam"]}
    assert params["identifier"] == "token"
    assert params["birthdate"] == "date"


# --- concurrency ---------------------------------------------------------------------------


def test_concurrent_updates_never_share_a_version(archive: Archive) -> None:
    created = store.create_resource(archive, patient())
    rid = created.id
    start = threading.Barrier(6)

    def update(n: int) -> int:
        start.wait()
        stored = store.update_resource(archive, "Patient", rid, patient(id=rid, active=n % 2 == 0))
        return stored.version_id

    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(update, range(6)))
    assert sorted(versions) == [2, 3, 4, 5, 6, 7]
    page = store.history(archive, resource_type="Patient", resource_id=rid)
    assert sorted(v.version_id for v in page.entries) == [1, 2, 3, 4, 5, 6, 7]


def test_concurrent_updates_with_if_match_one_wins(archive: Archive) -> None:
    rid = store.create_resource(archive, patient()).id
    start = threading.Barrier(4)

    def update(n: int) -> str:
        start.wait()
        try:
            store.update_resource(archive, "Patient", rid, patient(id=rid), if_match=1)
        except PreconditionFailed:
            return "412"
        return "ok"

    with ThreadPoolExecutor(4) as pool:
        results = sorted(pool.map(update, range(4)))
    assert results == ["412", "412", "412", "ok"]
    assert store.read_resource(archive, "Patient", rid).version_id == 2


def test_concurrent_update_as_create_of_one_new_id(archive: Archive) -> None:
    start = threading.Barrier(4)

    def update(_n: int) -> int:
        start.wait()
        return store.update_resource(archive, "Patient", "shared", patient(id="shared")).version_id

    with ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(update, range(4)))
    assert versions == [1, 2, 3, 4]


def test_search_routes(client: TestClient) -> None:
    pid = post(client, patient("s1")).json()["id"]
    post(client, patient("s2", name=[{"family": "Other"}]))
    found = client.get("/fhir/Patient", params={"family": "Doe"})
    assert found.status_code == 200
    assert found.json()["type"] == "searchset"
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [pid]
    by_post = client.post(
        "/fhir/Patient/_search",
        content=b"identifier=http://hospital.example/mrn|s1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert by_post.status_code == 200
    assert [e["resource"]["id"] for e in by_post.json()["entry"]] == [pid]
    lenient = client.get("/fhir/Patient", params={"shoe-size": "42"})
    assert lenient.status_code == 200
    strict = client.get(
        "/fhir/Patient", params={"shoe-size": "42"}, headers={"Prefer": "handling=strict"}
    )
    assert strict.status_code == 400
    outcome(strict)


def test_concurrent_conditional_creates_make_one_resource(archive: Archive) -> None:
    start = threading.Barrier(4)

    def create(_n: int) -> tuple[str, str]:
        start.wait()
        stored = store.create_resource(
            archive, patient("once"), if_none_exist="identifier=http://hospital.example/mrn|once"
        )
        return stored.id, stored.outcome

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(create, range(4)))
    assert len({rid for rid, _ in results}) == 1
    assert sorted(outcome for _, outcome in results) == ["created"] + ["unchanged"] * 3


JSON_PATCH = {"Content-Type": "application/json-patch+json", "Accept": "application/fhir+json"}


def patch(client: TestClient, url: str, document: Any, **headers: str) -> httpx.Response:
    body = document if isinstance(document, str) else json.dumps(document)
    return client.patch(f"/fhir/{url}", content=body, headers=JSON_PATCH | headers)


def test_patch_applies_a_json_patch_as_a_new_version(client: TestClient) -> None:
    pid = post(client, patient(gender="male")).json()["id"]
    changed = patch(
        client,
        f"Patient/{pid}",
        [
            {"op": "test", "path": "/gender", "value": "male"},
            {"op": "replace", "path": "/gender", "value": "female"},
            {"op": "add", "path": "/birthDate", "value": "1970-01-01"},
        ],
        **{"If-Match": 'W/"1"'},
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["gender"], body["birthDate"], body["meta"]["versionId"]) == (
        "female", "1970-01-01", "2",
    )  # fmt: skip
    assert changed.headers["etag"] == 'W/"2"'
    assert client.get(f"/fhir/Patient/{pid}").json() == body
    found = client.get("/fhir/Patient", params={"birthdate": "1970-01-01"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [pid]  # re-indexed
    history = client.get(f"/fhir/Patient/{pid}/_history").json()
    assert history["entry"][0]["request"] == {"method": "PATCH", "url": f"Patient/{pid}"}
    capability = client.get("/fhir/metadata").json()
    patient_type = next(r for r in capability["rest"][0]["resource"] if r["type"] == "Patient")
    assert {"code": "patch"} in patient_type["interaction"]


@pytest.mark.parametrize(
    ("document", "headers", "status", "words"),
    [
        ([{"op": "test", "path": "/gender", "value": "female"}], {}, 422, "cannot be applied"),
        ([{"op": "remove", "path": "/deceasedBoolean"}], {}, 422, "cannot be applied"),
        ([{"op": "replace", "path": "/gender", "value": "robot"}], {}, 422, "gender"),
        ([{"op": "replace", "path": "/id", "value": "other"}], {}, 400, "id"),
        ([{"op": "replace", "path": "/resourceType", "value": "Group"}], {}, 400, "Group"),
        ({"op": "replace", "path": "/gender", "value": "female"}, {}, 400, "array"),
        ([], {}, 400, "array"),
        ([{"op": "frobnicate", "path": "/gender"}], {}, 400, "frobnicate"),
        ([{"op": "add", "path": "gender", "value": "x"}], {}, 400, "JSON Patch"),
        ("[{", {}, 400, ""),
        ([{"op": "replace", "path": "/gender", "value": "female"}], {"If-Match": 'W/"9"'}, 412,
         "version"),
        ([{"op": "replace", "path": "/gender", "value": "female"}],
         {"Content-Type": "application/fhir+json"}, 415, "application/json-patch+json"),
    ],
)  # fmt: skip
def test_a_patch_that_cannot_apply_writes_nothing(
    client: TestClient, document: Any, headers: dict[str, str], status: int, words: str
) -> None:
    pid = post(client, patient(gender="male")).json()["id"]
    response = patch(client, f"Patient/{pid}", document, **headers)
    assert response.status_code == status, response.text
    assert outcome(response)["resourceType"] == "OperationOutcome"
    assert words in response.text
    current = client.get(f"/fhir/Patient/{pid}").json()
    assert (current["meta"]["versionId"], current["gender"]) == ("1", "male")


def test_patch_of_a_missing_or_deleted_resource(client: TestClient) -> None:
    replace = [{"op": "replace", "path": "/gender", "value": "female"}]
    assert patch(client, "Patient/no-such", replace).status_code == 404
    pid = post(client, patient()).json()["id"]
    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204
    assert patch(client, f"Patient/{pid}", replace).status_code == 410
