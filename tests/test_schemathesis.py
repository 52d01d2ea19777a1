"""Property-based requests to every operation of the app's OpenAPI schema (schemathesis),
with authentication on and an admin token, over an archive holding the demo studies:
whatever the generated path parameters, query and body, no answer is a 5xx.

Bounded and repeatable: a few examples per operation, derandomized (the same cases on
every run), no example database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.security_support import bearer, issue

from medlake.api import create_app
from medlake.ingest.archive import Archive

pytest_plugins = ["tests.security_fixtures"]

#: Examples per operation: enough to hit each parameter's edge cases schemathesis knows.
EXAMPLES = 8


@pytest.fixture
def admin_headers(secure_archive: Archive) -> dict[str, str]:
    return bearer(issue(secure_archive, "schemathesis-admin", "admin"))


@pytest.fixture
def seeded_app(
    secure_archive: Archive, admin_headers: dict[str, str], demo_files: list[Path]
) -> Iterator[FastAPI]:
    """The app with authentication on, the demo studies stored."""
    app = create_app(secure_archive, background=False)
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        boundary = new_boundary()
        stored = client.post(
            "/dicomweb/studies",
            content=multipart_body(demo_files, boundary),
            headers={**stow_headers(boundary), **admin_headers},
        )
        assert stored.status_code == 200, stored.text
        yield app


def operations(app: FastAPI) -> list[Any]:
    """Every operation of the app's own OpenAPI schema, called in process (ASGI)."""
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in loaded.get_all_operations()]


@pytest.mark.slow
def test_no_operation_answers_a_server_error(
    seeded_app: FastAPI, admin_headers: dict[str, str]
) -> None:
    failures: list[str] = []
    found = operations(seeded_app)
    assert len(found) > 60, [op.label for op in found]  # the whole API, not a fragment
    for operation in found:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Any) -> None:
            case.call_and_validate(headers=dict(admin_headers), checks=[not_a_server_error])

        try:
            call()
        except Exception as exc:  # every operation's failure is reported, not the first
            failures.append(f"{operation.label}: {exc}")
    print("STATUSES", sorted({(s.labels["status"]) for m in seeded_app.state.metrics.registry.collect() if m.name == "medlake_http_requests" for s in m.samples if s.name.endswith("_total")}))
    assert not failures, "\n\n".join(failures)
