"""Hostile requests against a real server (uvicorn configured as ``medlake serve`` runs it),
with authentication on and an admin token: path traversal in UIDs, resource ids and
partition names; oversized request heads; unknown partitions.

Requests with traversal sequences are written to the socket byte for byte: HTTP client
libraries remove ``..`` segments before sending, which is exactly what an attacker's
client does not do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.monitoring_support import raw_request, served
from tests.security_support import bearer, issue

from medlake.api import create_app
from medlake.config import Settings
from medlake.ingest.archive import Archive

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

SECRET = "TOP-SECRET-NOT-IN-THE-LAKE"

#: What goes where a UID, an id or a partition name belongs.
TRAVERSALS = [
    "..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fsecret.txt",
    "..%2f..%2f..%2fsecret.txt",
    "..%5c..%5csecret.txt",
    "..\\..\\secret.txt",
    "1.2.3%00",
    "%00",
    "a%2Fb",
    "..%00",
    "p" * 100,  # longer than any name column (PostgreSQL refuses it, SQLite does not)
    "%E1%B9%B0%CC%BA%CC%95o%CD%9E",  # combining characters
]

#: (method, path with {x} where the hostile value goes); a body is sent with POST / PUT.
ROUTES = [
    ("GET", "/dicomweb/studies/{x}"),
    ("GET", "/dicomweb/studies/{x}/metadata"),
    ("GET", "/dicomweb/studies/{x}/series/{x}/instances/{x}"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.3.4/instances/{x}/frames/1"),
    ("GET", "/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/bulkdata/{x}"),
    ("GET", "/dicomweb/studies/{x}/thumbnail"),
    ("GET", "/dicomweb/partitions/{x}/studies"),
    ("GET", "/dicomweb/partitions/{x}/studies/{x}/metadata"),
    ("POST", "/dicomweb/partitions/{x}/studies"),
    ("POST", "/dicomweb/studies/{x}"),
    ("PUT", "/dicomweb/partitions/{x}/studies/{x}"),
    ("DELETE", "/dicomweb/studies/{x}"),
    ("DELETE", "/dicomweb/partitions/{x}/studies/{x}"),
    ("GET", "/wado?requestType=WADO&studyUID={x}&seriesUID={x}&objectUID={x}"),
    ("POST", "/partitions/{x}"),
    ("GET", "/changefeed?partition={x}"),
    ("GET", "/fhir/Patient/{x}"),
    ("PUT", "/fhir/Patient/{x}"),
    ("DELETE", "/fhir/Patient/{x}"),
    ("GET", "/fhir/Patient/{x}/_history/{x}"),
    ("GET", "/fhir/{x}/1"),
    ("GET", "/fhir/partitions/{x}/$export"),
    ("GET", "/fhir/$bulk-status/{x}"),
    ("GET", "/fhir/$bulk-file/{x}/{x}"),
    ("GET", "/fhir/$bulk-file/0f8fad5b-d9cb-469f-a165-70867728950e/{x}"),
    ("GET", "/hl7/messages/{x}"),
    ("GET", "/batches/{x}"),
    ("GET", "/extendedquerytags/{x}"),
    ("GET", "/application-entities/{x}"),
]


@dataclass
class Target:
    """The server under test, its data folder and an admin token."""

    url: str
    data: Path
    token: str


@pytest.fixture
def hardened_settings(secure_settings: Settings) -> Settings:
    """Authentication on, and a small request-head limit (so a request over it is sent
    whole in one segment and the refusal is read back reliably)."""
    return secure_settings.model_copy(update={"http_max_header_bytes": 4096})


@pytest.fixture
def hardened_archive(hardened_settings: Settings) -> Iterator[Archive]:
    opened = Archive.open(hardened_settings)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def hardened_app(hardened_archive: Archive) -> FastAPI:
    return create_app(hardened_archive, background=False)


@pytest.fixture
def target(
    hardened_app: FastAPI, hardened_archive: Archive, hardened_settings: Settings
) -> Iterator[Target]:
    token = issue(hardened_archive, "hardening-admin", "admin")
    with served(hardened_app, hardened_settings) as url:
        yield Target(url, hardened_settings.data, token)


def files_under(root: Path) -> dict[Path, bytes]:
    """Every file below ``root`` with its bytes (the index files left out: they change
    with every request)."""
    return {
        p: p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("index.sqlite")
    }


def send(target: Target, method: str, path: str, instance: Path) -> tuple[int, bytes]:
    """One request, written as is; (status, whole response). POST and PUT carry a valid
    body: ``instance`` in a STOW-RS request, a Patient elsewhere."""
    content_type, body = "application/json", b""
    if method in ("POST", "PUT") and path.startswith("/dicomweb"):
        boundary = new_boundary()
        content_type = stow_headers(boundary)["Content-Type"]
        body = multipart_body([instance], boundary)
    elif method in ("POST", "PUT"):
        body = b'{"resourceType": "Patient"}'
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Authorization: Bearer {target.token}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    response = raw_request(target.url, head + body)
    status_line = response.split(b"\r\n", 1)[0].split()
    return int(status_line[1]), response


def test_traversal_in_uids_ids_and_partitions_is_refused_and_touches_no_file(
    target: Target, tmp_path: Path, samples: dict[str, Path]
) -> None:
    # something worth stealing next to the lake, and a study in it
    for place in (tmp_path, target.data, target.data / "lake"):
        (place / "secret.txt").write_text(SECRET)
    admin = bearer(target.token)
    boundary = new_boundary()
    stored = httpx.post(
        f"{target.url}/dicomweb/studies",
        content=multipart_body([samples["CT_small.dcm"]], boundary),
        headers={**stow_headers(boundary), **admin},
    )
    assert stored.status_code == 200, stored.text
    before = files_under(tmp_path)
    partitions = httpx.get(f"{target.url}/partitions", headers=admin).json()

    wrong = []
    for value in TRAVERSALS:
        for method, template in ROUTES:
            path = template.replace("{x}", value)
            status, response = send(target, method, path, samples["MR_small.dcm"])
            # (FHIR ids may contain dots: deleting a resource that is not there is 204)
            fhir_delete = method == "DELETE" and path.startswith("/fhir/Patient/")
            if status not in ((400, 404, 204) if fhir_delete else (400, 404)):
                wrong.append(f"{method} {path}: {response[:300]!r}")
            if SECRET.encode() in response:
                wrong.append(f"{method} {path}: {response[:300]!r}")
    assert not wrong, "\n".join(wrong)

    after = files_under(tmp_path)
    assert after == before, sorted(set(after) ^ set(before))
    assert httpx.get(f"{target.url}/partitions", headers=admin).json() == partitions


def test_an_unknown_partition_is_404_and_shows_nothing(
    target: Target, samples: dict[str, Path]
) -> None:
    admin = bearer(target.token)
    boundary = new_boundary()
    stored = httpx.post(
        f"{target.url}/dicomweb/studies",
        content=multipart_body([samples["CT_small.dcm"]], boundary),
        headers={**stow_headers(boundary), **admin},
    )
    assert stored.status_code == 200, stored.text
    study = httpx.get(f"{target.url}/dicomweb/studies", headers=admin).json()[0]
    uid = study["0020000D"]["Value"][0]
    series = httpx.get(f"{target.url}/dicomweb/studies/{uid}/series", headers=admin).json()
    # what a caller who only knows the study UID must not learn from another partition
    stored = [study["00100020"]["Value"][0], series[0]["0020000E"]["Value"][0]]
    root = f"{target.url}/dicomweb/partitions/nosuch"

    for url in (
        f"{root}/studies",
        f"{root}/series",
        f"{root}/instances",
        f"{root}/studies/{uid}",
        f"{root}/studies/{uid}/metadata",
        f"{root}/studies/{uid}/series",
        f"{root}/studies/{uid}/thumbnail",
    ):
        response = httpx.get(url, headers=admin)
        assert response.status_code == 404, (url, response.status_code)
        assert not [v for v in stored if v in response.text], response.text
        assert "x-total-count" not in response.headers
    listed = httpx.get(f"{target.url}/partitions", headers=admin).json()
    assert "nosuch" not in str(listed)  # looking did not create it


def test_oversized_request_heads_are_refused_by_the_server(target: Target) -> None:
    health = f"{target.url}/healthz"

    one_big = httpx.get(health, headers={"X-Padding": "a" * 8192})
    many = httpx.get(health, headers={f"X-Pad-{i}": "b" * 60 for i in range(100)})
    long_url = httpx.get(f"{health}?pad={'c' * 8192}")
    fits = httpx.get(health, headers={"X-Padding": "d" * 2048})

    assert one_big.status_code == 431 and "limit is 4096 bytes" in one_big.text
    assert many.status_code == 431
    assert long_url.status_code == 414
    assert fits.status_code == 200
    # the connection of a refused request is closed, the server goes on serving
    assert httpx.get(health).status_code == 200


def test_the_app_refuses_oversized_heads_behind_any_server(hardened_app: FastAPI) -> None:
    with TestClient(hardened_app) as client:
        refused = client.get("/healthz", headers={"X-Padding": "a" * 8192})
        fine = client.get("/healthz")

    assert refused.status_code == 431
    assert refused.json()["message"] == "the request's header lines exceed 4096 bytes"
    assert "x-request-id" in refused.headers
    assert fine.status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "/hl7/messages/²",
        "/hl7/messages/¹/raw",
        "/hl7/messages?limit=³",
        "/batches?limit=²",
        "/changefeed?offset=²",
        "/extendedquerytags?limit=²",
        "/dicomweb/studies?limit=²",
        "/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/frames/²/rendered",
        "/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/rendered?quality=²",
        "/fhir/Patient?_count=²",
        "/fhir/Patient/p1/_history/²",
        "/fhir/_history?_cursor=²",
    ],
)
def test_digits_that_are_not_ascii_are_a_client_error(
    hardened_app: FastAPI, hardened_archive: Archive, url: str
) -> None:
    # str.isdigit() accepts "²", int() does not: a check with isdigit alone ended in a 500
    admin = bearer(issue(hardened_archive, "digits-admin", "admin"))
    with TestClient(hardened_app) as client:
        response = client.get(url, headers=admin)

    assert response.status_code in (400, 404), (url, response.status_code, response.text)
    assert response.headers.get("warning", "").isascii()
