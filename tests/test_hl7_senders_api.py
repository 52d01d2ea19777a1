"""The HL7 senders over HTTP (``/hl7/senders``), as ``medlake hl7 senders`` manages them:
an access list, so for admins only, and every change is audited."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient
from tests.security_support import bearer, issue

from medlake.clinical.hl7 import list_senders
from medlake.index.schema import audit_log
from medlake.ingest.archive import Archive

pytest_plugins = ["tests.security_fixtures"]

LAB = {"name": "lab-1", "host": "10.1.2.3", "partition": "default", "sendingApplication": "LAB"}


@pytest.fixture
def admin(secure_archive: Archive) -> dict[str, str]:
    return bearer(issue(secure_archive, "admin-user", "admin"))


def test_add_list_replace_and_remove(
    secure_client: TestClient, secure_archive: Archive, admin: dict[str, str]
) -> None:
    added = secure_client.post("/hl7/senders", json=LAB, headers=admin)
    assert added.status_code == 201, added.text
    assert {k: added.json()[k] for k in LAB} == LAB
    assert [s.name for s in list_senders(secure_archive.engine)] == ["lab-1"]  # the listener's
    taken = secure_client.post("/hl7/senders", json=LAB, headers=admin)
    assert taken.status_code == 409 and "already registered" in taken.text
    replaced = secure_client.put(
        "/hl7/senders/lab-1", json={**LAB, "host": "10.1.2.4"}, headers=admin
    )
    assert (replaced.status_code, replaced.json()["host"]) == (200, "10.1.2.4")
    new = secure_client.put(
        "/hl7/senders/ward", json={"host": "*", "partition": "default",
                                   "tlsSubject": "CN=ward"}, headers=admin,
    )  # fmt: skip
    assert (new.status_code, new.json()["name"]) == (201, "ward")
    listed = secure_client.get("/hl7/senders", headers=admin).json()
    assert [(s["name"], s["host"]) for s in listed] == [("lab-1", "10.1.2.4"), ("ward", "*")]
    assert secure_client.get("/hl7/senders/ward", headers=admin).json()["tlsSubject"] == "CN=ward"
    assert secure_client.delete("/hl7/senders/ward", headers=admin).status_code == 204
    assert secure_client.delete("/hl7/senders/ward", headers=admin).status_code == 404
    assert secure_client.get("/hl7/senders/ward", headers=admin).status_code == 404
    with secure_archive.engine.connect() as conn:
        audited = [
            (r.request.split()[0], r.action, r.outcome)
            for r in conn.execute(select(audit_log).order_by(audit_log.c.seq))
            if "/hl7/senders" in (r.request or "") and r.operation == "security.manage"
        ]
    assert audited == [
        ("POST", "C", 0), ("POST", "C", 4), ("PUT", "U", 0), ("PUT", "U", 0),
        ("GET", "R", 0), ("GET", "R", 0), ("DELETE", "D", 0), ("DELETE", "D", 4),
        ("GET", "R", 4),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([LAB], "JSON object"),
        ({**LAB, "colour": "red"}, "unknown member"),
        ({**LAB, "host": 7}, "must be a string"),
        ({"host": "10.1.2.3", "partition": "default"}, "needs name"),
        ({**LAB, "host": "*"}, "needs a TLS subject"),
        ({**LAB, "name": "bad name!"}, "is invalid"),
        ({**LAB, "partition": "no such!"}, "partition"),
        ({**LAB, "tlsSubject": "lab-1"}, "ATTRIBUTE=value"),
    ],
)
def test_a_bad_sender_is_400_and_nothing_is_registered(
    secure_client: TestClient,
    secure_archive: Archive,
    admin: dict[str, str],
    body: Any,
    words: str,
) -> None:
    response = secure_client.post("/hl7/senders", json=body, headers=admin)
    assert response.status_code == 400, response.text
    assert words in response.text
    assert list_senders(secure_archive.engine) == []


def test_the_url_names_the_sender(secure_client: TestClient, admin: dict[str, str]) -> None:
    other = secure_client.put("/hl7/senders/lab-2", json=LAB, headers=admin)
    assert other.status_code == 400 and "the URL 'lab-2'" in other.text
    broken = secure_client.post(
        "/hl7/senders", content=b"{", headers={**admin, "Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.text


def test_only_admins_see_or_change_the_senders(
    secure_client: TestClient, secure_archive: Archive
) -> None:
    reader = bearer(issue(secure_archive, "reader-user", "reader"))
    ingest = bearer(issue(secure_archive, "feed", "ingest"))
    for who in (reader, ingest):
        assert secure_client.get("/hl7/senders", headers=who).status_code == 403
        assert secure_client.post("/hl7/senders", json=LAB, headers=who).status_code == 403
    assert secure_client.get("/hl7/senders").status_code == 401
    assert list_senders(secure_archive.engine) == []
