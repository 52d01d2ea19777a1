"""Every route of the app, called with no token and with a token of each role: the set
of callers let through is exactly the expected one. A route added without an access rule
(or without an expectation here) fails this test."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.security_support import bearer, issue

from medlake.ingest.archive import Archive
from medlake.web import create_web_app

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

EVERYONE = frozenset({"anonymous", "admin", "ingest", "reader", "researcher", "auditor"})
ROLES = EVERYONE - {"anonymous"}
ADMIN = frozenset({"admin"})

#: The grants of each caller's token.
GRANTS = {
    "admin": ["admin"],
    "ingest": ["ingest@default"],
    "reader": ["reader@default"],
    "researcher": ["researcher@default"],
    "auditor": ["auditor"],
}

#: Who may call each route (besides the DICOMweb routes, below).
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("/openapi.json", "GET"): EVERYONE,
    ("/docs", "GET"): EVERYONE,
    ("/docs/oauth2-redirect", "GET"): EVERYONE,
    ("/redoc", "GET"): EVERYONE,
    ("/healthz", "GET"): EVERYONE,
    ("/readyz", "GET"): EVERYONE,
    ("/metrics", "GET"): frozenset({"admin", "auditor"}),  # unless metrics_public
    ("/login", "GET"): EVERYONE,  # the sign-in form; a login link checks itself
    ("/login", "POST"): EVERYONE,  # signs in with the token in the form
    ("/logout", "POST"): EVERYONE,
    ("/ohif", "GET"): EVERYONE,
    ("/ohif/{rest:path}", "GET"): EVERYONE,
    ("/partitions", "GET"): ROLES,
    ("/dicomweb/partitions", "GET"): ROLES,
    ("/partitions/{name}", "POST"): ADMIN,
    ("/changefeed", "GET"): ADMIN,  # every partition: only a grant on all of them
    ("/changefeed/latest", "GET"): ADMIN,
    ("/extendedquerytags", "GET"): ROLES,
    ("/extendedquerytags/{path}", "GET"): ROLES,
    ("/extendedquerytags", "POST"): ADMIN,
    ("/extendedquerytags/{path}", "DELETE"): ADMIN,
    ("/extendedquerytags/{path}/errors", "GET"): ADMIN,
    ("/operations/{operation_id}", "GET"): ADMIN,
    ("/batches", "GET"): frozenset({"admin", "auditor"}),
    ("/batches/{batch_id}", "GET"): frozenset({"admin", "auditor"}),
    ("/batches/{batch_id}/errors", "GET"): frozenset({"admin", "auditor"}),
    ("/batches/{batch_id}/resume", "POST"): ADMIN,
    ("/batches/{batch_id}/reconcile", "POST"): ADMIN,
    ("/reconciliation", "GET"): frozenset({"admin", "auditor", "ingest"}),  # default partition
    ("/application-entities", "GET"): ADMIN,
    ("/application-entities", "POST"): ADMIN,
    ("/application-entities/{ae_title}", "GET"): ADMIN,
    ("/application-entities/{ae_title}", "PUT"): ADMIN,
    ("/application-entities/{ae_title}", "DELETE"): ADMIN,
    ("/application-entities/{ae_title}/echo", "POST"): ADMIN,
    ("/cohorts", "GET"): frozenset({"admin", "reader"}),
    ("/cohorts", "POST"): frozenset({"admin", "reader"}),
    ("/hl7/messages", "GET"): ADMIN,  # every partition, unless ?partition= is given
    ("/hl7/messages/{message_id}", "GET"): ADMIN,
    ("/hl7/messages/{message_id}/raw", "GET"): ADMIN,
    ("/hl7/senders", "GET"): ADMIN,
    ("/hl7/senders", "POST"): ADMIN,
    ("/hl7/senders/{name}", "GET"): ADMIN,
    ("/hl7/senders/{name}", "PUT"): ADMIN,
    ("/hl7/senders/{name}", "DELETE"): ADMIN,
    ("/fhir/metadata", "GET"): EVERYONE,
    ("/fhir", "POST"): frozenset({"admin", "ingest"}),
    ("/fhir/_history", "GET"): frozenset({"admin", "reader"}),
    ("/fhir/{resource_type}/_search", "POST"): frozenset({"admin", "reader"}),
    ("/fhir/{resource_type}", "POST"): frozenset({"admin", "ingest"}),
    ("/fhir/{resource_type}", "PUT"): frozenset({"admin", "ingest"}),
    ("/fhir/{resource_type}/{logical_id}", "PUT"): frozenset({"admin", "ingest"}),
    ("/fhir/{resource_type}/{logical_id}", "PATCH"): frozenset({"admin", "ingest"}),
    ("/fhir/{resource_type}", "DELETE"): ADMIN,
    ("/fhir/{resource_type}/{logical_id}", "DELETE"): ADMIN,
    **{
        ("/fhir/{rest:path}", m): EVERYONE
        for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    },
}
for _root in ("/fhir", "/fhir/partitions/{partition}"):
    for _kick_off in ("/$export", "/Patient/$export", "/Group/{group_id}/$export"):
        for _method in ("GET", "POST"):
            EXPECTED[(_root + _kick_off, _method)] = frozenset({"admin", "reader"})
    EXPECTED[(f"{_root}/$bulk-file/{{job_id}}/{{name}}", "GET")] = frozenset({"admin", "reader"})
    EXPECTED[(f"{_root}/$import", "POST")] = frozenset({"admin", "ingest"})
    EXPECTED[(f"{_root}/Patient/$merge", "POST")] = frozenset({"admin", "ingest"})
    for _method in ("GET", "DELETE"):
        EXPECTED[(f"{_root}/$bulk-status/{{job_id}}", _method)] = frozenset(
            {"admin", "reader", "ingest"}
        )

#: FHIR reads, searches and histories.
_FHIR_READ = re.compile(
    r"^/fhir/\{resource_type\}(/\{logical_id\})?(/_history(/\{version_id\})?)?$"
)

_DICOMWEB = re.compile(r"^/dicomweb(/partitions/\{partition\})?/(studies|series|instances|wado)")
_DICOMWEB_BY_METHOD = {
    "GET": frozenset({"admin", "reader"}),
    "POST": frozenset({"admin", "ingest"}),
    "PUT": frozenset({"admin", "ingest"}),
    "DELETE": ADMIN,
}

#: The de-identified views (DICOMweb and FHIR, reads only): deid.read, which the researcher
#: role has and the reader role has not.
_DEID = re.compile(r"^/deid/(dicomweb|fhir)/")
_DEID_READERS = frozenset({"admin", "researcher"})

#: A value for each path parameter (the routes' own checks may then say 404 or 400).
PARAMS = {
    "partition": "default",
    "study": "1.2.3",
    "series": "1.2.3.4",
    "instance": "1.2.3.4.5",
    "frame_list": "1",
    "frame": "1",
    "tag": "7FE00010",
    "name": "made-by-test",
    "path": "00101030",
    "operation_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "batch_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "ae_title": "NOSUCHAE",
    "rest": "index.html",
    "resource_type": "Observation",
    "logical_id": "obs-1",
    "version_id": "1",
    "message_id": "1",
    "group_id": "cohort-1",
    "job_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
}


def expected_callers(path: str, method: str) -> frozenset[str] | None:
    if (path, method) in EXPECTED:
        return EXPECTED[(path, method)]
    if method == "GET" and _FHIR_READ.match(path):
        return frozenset({"admin", "reader"})
    if _DICOMWEB.match(path):
        return _DICOMWEB_BY_METHOD.get(method)
    if _DEID.match(path) and method == "GET":
        return _DEID_READERS
    return None


def concrete(path: str) -> str:
    """A URL of the route ``path`` that no route before it takes."""
    if path.startswith("/fhir/{rest:path}"):
        return "/fhir/no/such/interaction/here"  # shorter ones are FHIR type or id URLs
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PARAMS[m.group(1)], path)


@pytest.fixture
def web_app(secure_archive: Archive, tmp_path: Path) -> FastAPI:
    dist = tmp_path / "ohif-dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html><head></head><body></body></html>")
    (dist / "app-config.js").write_text("window.config = {};")
    return create_web_app(secure_archive, dist, background=False)


@pytest.fixture
def tokens(secure_archive: Archive) -> dict[str, str]:
    return {name: issue(secure_archive, f"user-{name}", *grants) for name, grants in GRANTS.items()}


def every_route(app: FastAPI) -> Iterator[tuple[str, str]]:
    for route in iter_route_contexts(app.routes):
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                yield str(route.path), method


def test_every_route_lets_exactly_the_expected_callers_through(
    web_app: FastAPI, tokens: dict[str, str]
) -> None:
    routes = sorted(set(every_route(web_app)))
    assert len(routes) > 60, routes
    missing = [r for r in routes if expected_callers(*r) is None]
    assert not missing, f"routes without an expected access rule: {missing}"
    wrong: list[str] = []
    with TestClient(web_app) as client:
        for path, method in routes:
            url = concrete(path)
            allowed = expected_callers(path, method)
            assert allowed is not None
            for caller in sorted(EVERYONE):
                headers = bearer(tokens[caller]) if caller != "anonymous" else {}
                status = client.request(
                    method, url, headers=headers, follow_redirects=False
                ).status_code
                if caller in allowed:
                    ok = status not in (401, 403)
                else:
                    ok = status == (401 if caller == "anonymous" else 403)
                if not ok:
                    wrong.append(f"{method} {path} as {caller}: {status}")
    assert not wrong, "\n".join(wrong)


def test_a_route_without_a_rule_is_refused(web_app: FastAPI, tokens: dict[str, str]) -> None:
    async def unguarded() -> dict[str, str]:
        return {"secret": "PHI"}

    web_app.add_api_route("/surprise", unguarded, methods=["GET"])
    with TestClient(web_app) as client:
        anonymous = client.get("/surprise")
        admin = client.get("/surprise", headers=bearer(tokens["admin"]))
    assert anonymous.status_code == 401
    assert admin.status_code == 403
    assert "no access rule for GET /surprise" in admin.json()["message"]
    assert "PHI" not in anonymous.text + admin.text


def test_a_partition_grant_reaches_no_other_partition(
    web_app: FastAPI, tokens: dict[str, str], samples: dict[str, Path]
) -> None:
    dicomweb = [
        (p, m)
        for p, m in set(every_route(web_app))
        if p.startswith("/dicomweb/partitions/{partition}/")
    ]
    with TestClient(web_app) as client:
        boundary = new_boundary()
        stored = client.post(
            "/dicomweb/partitions/other/studies",
            content=multipart_body([samples["CT_small.dcm"]], boundary),
            headers={**stow_headers(boundary), **bearer(tokens["admin"])},
        )
        assert stored.status_code == 200, stored.text
        for caller in ("reader", "ingest", "researcher"):
            for path, method in dicomweb:
                url = concrete(path.replace("{partition}", "other"))
                response = client.request(method, url, headers=bearer(tokens[caller]))
                assert response.status_code == 403, (caller, method, path, response.status_code)
                assert "x-total-count" not in response.headers
                assert "2.25." not in response.text  # no UID of the other partition leaks
        reader = bearer(tokens["reader"])
        assert client.get("/changefeed?partition=other", headers=reader).status_code == 403
        assert client.get("/changefeed", headers=reader).status_code == 403
        mine = client.get("/changefeed?partition=default", headers=reader)
        assert mine.status_code == 200 and mine.json() == []
        assert (
            client.get(
                "/reconciliation?partition=other", headers=bearer(tokens["ingest"])
            ).status_code
            == 403
        )
        # the admin sees the study that is there
        admin = client.get("/dicomweb/partitions/other/studies", headers=bearer(tokens["admin"]))
        assert admin.status_code == 200 and admin.headers["x-total-count"] == "1"
