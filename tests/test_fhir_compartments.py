"""FHIR access limited to Patient compartments (a grant on ``Patient/p1``, or SMART
``patient/`` scopes with a launch patient), with authentication on: the caller sees,
counts, includes, exports and writes only what lies in p1's compartment; anything else
reads as absent (404) or is refused (403) and nothing is stored."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from tests.security_support import bearer, issue

from medlake.api.auth import AccessControl
from medlake.ingest.archive import Archive
from medlake.security import Grant
from medlake.security.principals import Principal, PrincipalKind, Role

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

pytest_plugins = ["tests.security_fixtures"]

FHIR_JSON = {"Content-Type": "application/fhir+json"}
KICKOFF = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


def observation(oid: str, subject: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": subject},
        **extra,
    }


#: p1's compartment: p1, o1a, o1b, o-derived (derived from p2's o2), e1, g1 (p1 is a
#: member). Outside: p2, o2, o-focus (p2's, with focus on p1), org1.
RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}]},
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]},
    {"resourceType": "Organization", "id": "org1", "name": "General Hospital"},
    observation("o1a", "Patient/p1"),
    observation("o1b", "Patient/p1"),
    observation("o2", "Patient/p2"),
    observation("o-derived", "Patient/p1", derivedFrom=[{"reference": "Observation/o2"}]),
    observation("o-focus", "Patient/p2", focus=[{"reference": "Patient/p1"}]),
    {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/p1"},
    },
    {
        "resourceType": "Group",
        "id": "g1",
        "type": "person",
        "actual": True,
        "member": [
            {"entity": {"reference": "Patient/p1"}},
            {"entity": {"reference": "Patient/p2"}},
        ],
    },
]
OWN_OBSERVATIONS = {"o1a", "o1b", "o-derived"}


@pytest.fixture
def client(secure_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(secure_app) as test_client:
        yield test_client


@pytest.fixture
def admin(secure_archive: Archive) -> dict[str, str]:
    return bearer(issue(secure_archive, "admin-user", "admin"))


@pytest.fixture
def nurse(secure_archive: Archive) -> dict[str, str]:
    """A reader limited to p1's compartment."""
    return bearer(issue(secure_archive, "nurse", "reader@default:Patient/p1"))


@pytest.fixture
def writer(secure_archive: Archive) -> dict[str, str]:
    """An ingest role limited to p1's compartment (create, update, transactions)."""
    return bearer(issue(secure_archive, "p1-app", "ingest@default:Patient/p1"))


@pytest.fixture
def populated(client: TestClient, admin: dict[str, str]) -> None:
    for resource in RESOURCES:
        url = f"/fhir/{resource['resourceType']}/{resource['id']}"
        response = client.put(url, content=json.dumps(resource), headers={**FHIR_JSON, **admin})
        assert response.status_code == 201, response.text


def ids(bundle: dict[str, Any], mode: str | None = None) -> set[str]:
    return {
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if mode is None or e["search"]["mode"] == mode
    }


def everything(client: TestClient, admin: dict[str, str]) -> dict[str, Any]:
    """Every current resource as the unlimited admin sees it (to prove nothing changed)."""
    found = {}
    for resource_type in ("Patient", "Observation", "Encounter", "Group", "Organization"):
        bundle = client.get(f"/fhir/{resource_type}?_count=100", headers=admin).json()
        for entry in bundle.get("entry", []):
            found[f"{resource_type}/{entry['resource']['id']}"] = entry["resource"]
    return found


def forbidden(response: Any, *words: str) -> None:
    assert response.status_code == 403, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "forbidden"
    for word in words:
        assert word in outcome["issue"][0]["diagnostics"]


# --- reads ----------------------------------------------------------------------------------


def test_reads_inside_the_compartment_answer_and_outside_are_404(
    client: TestClient, populated: None, nurse: dict[str, str]
) -> None:
    for url in ("/fhir/Observation/o1a", "/fhir/Patient/p1", "/fhir/Encounter/e1"):
        assert client.get(url, headers=nurse).status_code == 200, url
    assert client.get("/fhir/Observation/o1a/_history/1", headers=nurse).status_code == 200
    hidden = client.get("/fhir/Observation/o2", headers=nurse)
    unknown = client.get("/fhir/Observation/no-such", headers=nurse)
    assert hidden.status_code == unknown.status_code == 404
    # the answer does not tell "not yours" from "not there"
    assert hidden.json()["issue"][0]["diagnostics"] == "Observation/o2 does not exist"
    for url in (
        "/fhir/Patient/p2",
        "/fhir/Organization/org1",
        "/fhir/Observation/o-focus",
        "/fhir/Observation/o2/_history/1",
        "/fhir/Observation/o2/_history",
    ):
        response = client.get(url, headers=nurse)
        assert response.status_code == 404, (url, response.text)
        assert "Two" not in response.text


def test_history_lists_only_the_compartment(
    client: TestClient, populated: None, nurse: dict[str, str]
) -> None:
    typed = client.get("/fhir/Observation/_history", headers=nurse).json()
    assert {e["resource"]["id"] for e in typed["entry"]} == OWN_OBSERVATIONS
    assert typed["total"] == 3
    system = client.get("/fhir/_history", headers=nurse).json()
    assert {e["fullUrl"].split("/fhir/")[1] for e in system["entry"]} == {
        "Patient/p1", "Observation/o1a", "Observation/o1b", "Observation/o-derived",
        "Encounter/e1", "Group/g1",
    }  # fmt: skip


def test_history_does_not_count_versions_from_another_patients_compartment(
    client: TestClient, populated: None, nurse: dict[str, str], admin: dict[str, str]
) -> None:
    # o2 was p2's, then was moved to p1: its first version is p2's data, which p1's
    # reader neither sees nor may learn the existence of (not even through the total).
    moved = observation("o2", "Patient/p1")
    response = client.put(
        "/fhir/Observation/o2", content=json.dumps(moved), headers={**FHIR_JSON, **admin}
    )
    assert response.status_code == 200, response.text
    for url in ("/fhir/Observation/o2/_history", "/fhir/Observation/_history", "/fhir/_history"):
        bundle = client.get(url, headers=nurse).json()
        o2 = [
            e["resource"]["meta"]["versionId"]
            for e in bundle["entry"]
            if e["fullUrl"].endswith("/Observation/o2")
        ]
        assert o2 == ["2"], url
        assert bundle["total"] == len(bundle["entry"]), url
    assert client.get("/fhir/Observation/o2/_history", headers=admin).json()["total"] == 2


def test_a_deleted_resource_of_the_compartment_reads_410(
    client: TestClient, populated: None, secure_archive: Archive
) -> None:
    limited_admin = bearer(issue(secure_archive, "p1-admin", "admin@default:Patient/p1"))
    assert client.delete("/fhir/Observation/o1b", headers=limited_admin).status_code == 204
    assert client.get("/fhir/Observation/o1b", headers=limited_admin).status_code == 410


# --- search ---------------------------------------------------------------------------------


def test_search_and_counts_cover_only_the_compartment(
    client: TestClient, populated: None, nurse: dict[str, str], admin: dict[str, str]
) -> None:
    everyone = client.get("/fhir/Observation", headers=admin).json()
    assert everyone["total"] == 5  # the unlimited path is unchanged
    mine = client.get("/fhir/Observation", headers=nurse).json()
    assert ids(mine) == OWN_OBSERVATIONS and mine["total"] == 3
    count = client.get("/fhir/Observation?_summary=count", headers=nurse).json()
    assert count["total"] == 3 and "entry" not in count
    patients = client.get("/fhir/Patient", headers=nurse).json()
    assert ids(patients) == {"p1"} and patients["total"] == 1
    # criteria naming another patient find nothing
    other = client.get("/fhir/Observation?subject=Patient/p2", headers=nurse).json()
    assert other["total"] == 0 and "entry" not in other
    # types outside the Patient compartment are empty
    assert client.get("/fhir/Organization", headers=nurse).json()["total"] == 0
    # POST _search is limited the same way
    posted = client.post(
        "/fhir/Observation/_search",
        content="status=final",
        headers={**nurse, "Content-Type": "application/x-www-form-urlencoded"},
    ).json()
    assert ids(posted) == OWN_OBSERVATIONS


def test_paging_walks_only_the_compartment(
    client: TestClient, populated: None, nurse: dict[str, str]
) -> None:
    seen: list[str] = []
    url: str | None = "/fhir/Observation?_count=2&_sort=_id"
    while url:
        page = client.get(url, headers=nurse).json()
        assert page["total"] == 3
        seen.extend(e["resource"]["id"] for e in page.get("entry", []))
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert sorted(seen) == sorted(OWN_OBSERVATIONS)


def test_include_and_revinclude_pull_in_nothing_outside(
    client: TestClient, populated: None, nurse: dict[str, str], admin: dict[str, str]
) -> None:
    query = "/fhir/Observation?_id=o-derived&_include=Observation:derived-from"
    assert "o2" in ids(client.get(query, headers=admin).json(), "include")
    limited = client.get(query, headers=nurse).json()
    assert ids(limited, "match") == {"o-derived"} and ids(limited, "include") == set()
    wildcard = client.get("/fhir/Observation?_include=*", headers=nurse).json()
    assert ids(wildcard, "include") == {"p1"}
    rev = "/fhir/Patient?_revinclude=Observation:focus&_revinclude=Observation:subject"
    assert "o-focus" in ids(client.get(rev, headers=admin).json(), "include")
    limited_rev = client.get(rev, headers=nurse).json()
    assert ids(limited_rev, "match") == {"p1"}
    assert ids(limited_rev, "include") == {"o1a", "o1b", "o-derived"}


# --- writes ---------------------------------------------------------------------------------


def test_create_inside_succeeds_and_outside_is_403(
    client: TestClient, populated: None, writer: dict[str, str], admin: dict[str, str]
) -> None:
    headers = {**FHIR_JSON, **writer}
    created = client.post(
        "/fhir/Observation", content=json.dumps(observation("x", "Patient/p1")), headers=headers
    )
    assert created.status_code == 201, created.text
    before = everything(client, admin)
    for body in (
        observation("x", "Patient/p2"),
        observation("x", "Patient/p1") | {"subject": {"display": "someone"}},
        {"resourceType": "Organization", "name": "Mine now"},
        {"resourceType": "Patient", "name": [{"family": "New"}]},  # a new id: not p1
    ):
        response = client.post(
            f"/fhir/{body['resourceType']}", content=json.dumps(body), headers=headers
        )
        forbidden(response, "outside the compartments", "Patient/p1")
    assert everything(client, admin) == before


def test_a_patch_cannot_reach_or_leave_the_compartment(
    client: TestClient,
    populated: None,
    writer: dict[str, str],
    nurse: dict[str, str],
    admin: dict[str, str],
) -> None:
    patch_headers = {"Content-Type": "application/json-patch+json"}
    before = everything(client, admin)

    def patch(url: str, document: list[dict[str, Any]], who: dict[str, str]) -> Any:
        return client.patch(url, content=json.dumps(document), headers={**patch_headers, **who})

    to_p2 = [{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]
    forbidden(patch("/fhir/Observation/o1a", to_p2, writer), "Observation/o1a")
    hidden = patch("/fhir/Observation/o2", [{"op": "remove", "path": "/code"}], writer)
    assert hidden.status_code == 404 and "Two" not in hidden.text
    assert patch("/fhir/Observation/o1a", to_p2, nurse).status_code == 403  # a reader
    assert everything(client, admin) == before
    final = [{"op": "replace", "path": "/status", "value": "amended"}]
    assert patch("/fhir/Observation/o1a", final, writer).status_code == 200


def test_updates_and_deletes_cannot_reach_or_leave_the_compartment(
    client: TestClient, populated: None, secure_archive: Archive, admin: dict[str, str]
) -> None:
    limited_admin = bearer(issue(secure_archive, "p1-admin", "admin@default:Patient/p1"))
    headers = {**FHIR_JSON, **limited_admin}
    before = everything(client, admin)
    # moving one's own resource to another patient
    moved = client.put(
        "/fhir/Observation/o1a",
        content=json.dumps(observation("o1a", "Patient/p2")),
        headers=headers,
    )
    forbidden(moved, "Observation/o1a")
    # taking over another patient's resource
    taken = client.put(
        "/fhir/Observation/o2", content=json.dumps(observation("o2", "Patient/p1")), headers=headers
    )
    forbidden(taken, "Observation/o2")
    forbidden(client.delete("/fhir/Observation/o2", headers=limited_admin))
    # conditional interactions match only inside: p2's Observation is not found
    conditional = client.delete("/fhir/Observation?subject=Patient/p2", headers=limited_admin)
    assert conditional.status_code == 204
    assert everything(client, admin) == before
    # one's own resource can be changed and deleted
    changed = observation("o1a", "Patient/p1", status="amended")
    ok = client.put("/fhir/Observation/o1a", content=json.dumps(changed), headers=headers)
    assert ok.status_code == 200, ok.text
    assert client.delete("/fhir/Observation/o1b", headers=limited_admin).status_code == 204


def test_conditional_create_does_not_see_another_patients_match(
    client: TestClient, populated: None, writer: dict[str, str], admin: dict[str, str]
) -> None:
    body = observation("x", "Patient/p1")
    response = client.post(
        "/fhir/Observation",
        content=json.dumps(body),
        headers={**FHIR_JSON, **writer, "If-None-Exist": "_id=o2"},
    )
    # o2 exists but is not p1's: no match, so a new Observation is created
    assert response.status_code == 201, response.text
    assert response.json()["id"] != "o2"


def test_a_transaction_with_one_entry_outside_is_refused_whole(
    client: TestClient, populated: None, writer: dict[str, str], admin: dict[str, str]
) -> None:
    before = everything(client, admin)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation("a", "Patient/p1"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": observation("b", "Patient/p2"),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = client.post("/fhir", content=json.dumps(bundle), headers={**FHIR_JSON, **writer})
    forbidden(response, "Bundle.entry[1]", "outside the compartments")
    assert everything(client, admin) == before
    bundle["entry"] = bundle["entry"][:1]
    accepted = client.post("/fhir", content=json.dumps(bundle), headers={**FHIR_JSON, **writer})
    assert accepted.status_code == 200, accepted.text


def test_batch_reads_are_limited_entry_by_entry(
    client: TestClient, populated: None, secure_archive: Archive
) -> None:
    limited_admin = bearer(issue(secure_archive, "p1-admin", "admin@default:Patient/p1"))
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Observation/o1a"}},
            {"request": {"method": "GET", "url": "Observation/o2"}},
            {"request": {"method": "GET", "url": "Observation?status=final"}},
        ],
    }
    response = client.post(
        "/fhir", content=json.dumps(bundle), headers={**FHIR_JSON, **limited_admin}
    )
    assert response.status_code == 200, response.text
    own, other, search = response.json()["entry"]
    assert own["response"]["status"].startswith("200")
    assert other["response"]["status"] == "404"
    assert ids(search["resource"]) == OWN_OBSERVATIONS


# --- bulk export ----------------------------------------------------------------------------


def wait_done(client: TestClient, location: str, headers: dict[str, str]) -> dict[str, Any]:
    for _ in range(600):
        response = client.get(location, headers={**headers, "Accept": "application/json"})
        if response.status_code != 202:
            assert response.status_code == 200, response.text
            manifest: dict[str, Any] = response.json()
            return manifest
        time.sleep(0.05)
    raise AssertionError(f"{location} still running")


def exported(client: TestClient, manifest: dict[str, Any], headers: dict[str, str]) -> set[str]:
    found = set()
    for item in manifest["output"]:
        response = client.get(item["url"], headers=headers)
        assert response.status_code == 200
        for line in response.text.splitlines():
            resource = json.loads(line)
            found.add(f"{resource['resourceType']}/{resource['id']}")
    return found


def test_patient_export_is_limited_to_the_compartment(
    client: TestClient, populated: None, nurse: dict[str, str], admin: dict[str, str]
) -> None:
    kicked = client.get("/fhir/Patient/$export", headers={**KICKOFF, **nurse})
    assert kicked.status_code == 202, kicked.text
    location = kicked.headers["content-location"]
    manifest = wait_done(client, location, nurse)
    assert exported(client, manifest, nurse) == {
        "Patient/p1", "Observation/o1a", "Observation/o1b", "Observation/o-derived",
        "Encounter/e1", "Group/g1",
    }  # fmt: skip
    # the Group export covers only the compartment's members
    group = client.get("/fhir/Group/g1/$export?_type=Patient", headers={**KICKOFF, **nurse})
    assert group.status_code == 202, group.text
    group_manifest = wait_done(client, group.headers["content-location"], nurse)
    assert exported(client, group_manifest, nurse) == {"Patient/p1"}
    # an unlimited export is not the nurse's to see
    full = client.get("/fhir/Patient/$export", headers={**KICKOFF, **admin})
    full_location = full.headers["content-location"]
    wait_done(client, full_location, admin)
    assert client.get(full_location, headers=nurse).status_code == 404
    job_id = full_location.rsplit("/", 1)[1]
    file_url = f"/fhir/$bulk-file/{job_id}/Patient-1.ndjson"
    assert client.get(file_url, headers=nurse).status_code == 404
    assert client.get(file_url, headers=admin).status_code == 200


def test_exports_beyond_the_compartment_are_refused(
    client: TestClient, populated: None, nurse: dict[str, str]
) -> None:
    forbidden(client.get("/fhir/$export", headers={**KICKOFF, **nurse}), "system-level $export")
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/p2"}}],
    }
    response = client.post(
        "/fhir/Patient/$export",
        content=json.dumps(parameters),
        headers={**KICKOFF, **FHIR_JSON, **nurse},
    )
    forbidden(response, "outside the compartments")


# --- what stays refused ---------------------------------------------------------------------


def test_non_fhir_and_unlimited_routes_stay_refused(
    client: TestClient, populated: None, secure_archive: Archive, nurse: dict[str, str]
) -> None:
    limited_admin = bearer(issue(secure_archive, "p1-admin", "admin@default:Patient/p1"))
    for method, url in (
        ("GET", "/dicomweb/studies"),
        ("GET", "/changefeed?partition=default"),
        ("POST", "/fhir/Patient/$merge"),
        ("POST", "/fhir/$import"),
        ("GET", "/batches"),
    ):
        response = client.request(method, url, headers=limited_admin)
        assert response.status_code == 403, (method, url, response.text)
    assert client.get("/dicomweb/studies", headers=nurse).status_code == 403


def test_other_compartment_kinds_are_refused_with_a_reason(
    client: TestClient, populated: None, secure_archive: Archive
) -> None:
    encounter_only = bearer(issue(secure_archive, "enc", "reader@default:Encounter/e1"))
    forbidden(
        client.get("/fhir/Observation", headers=encounter_only),
        "Encounter/e1 compartment is not supported",
    )
    forbidden(client.get("/fhir/Encounter/e1", headers=encounter_only), "Patient compartments")


def test_smart_patient_scopes_limit_to_the_launch_patient(
    client: TestClient, populated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_user = Principal(
        subject="smart-app",
        kind=PrincipalKind.USER,
        grants=frozenset({Grant(Role.READER, "default")}),
        scopes=frozenset({"patient/*.read"}),
        patient="p1",
    )
    # a JWT from an identity provider would yield this principal (tests/test_security_jwt)
    monkeypatch.setattr(AccessControl, "_authenticate", lambda self, credential: app_user)
    headers = {"Authorization": "Bearer any-jwt"}
    assert client.get("/fhir/Observation/o1a", headers=headers).status_code == 200
    assert client.get("/fhir/Observation/o2", headers=headers).status_code == 404
    assert ids(client.get("/fhir/Observation", headers=headers).json()) == OWN_OBSERVATIONS
    # patient/*.read allows no write
    response = client.post(
        "/fhir/Observation",
        content=json.dumps(observation("x", "Patient/p1")),
        headers={**headers, **FHIR_JSON},
    )
    assert response.status_code == 403
