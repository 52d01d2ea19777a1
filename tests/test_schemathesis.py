"""Schemathesis against the app's OpenAPI schema, served as ``medlake serve`` serves it,
with authentication on and an admin token, over an archive holding the demo studies.

``st run`` generates requests for every operation (boundary values of each parameter,
random ones, and call sequences following the schema's links) and checks that no answer
is a 5xx. It also refuses an invalid schema (a path parameter the schema does not
declare), so the schema is checked too. Bounded and repeatable: a few examples per
operation, generated deterministically.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.monitoring_support import served
from tests.security_support import bearer, issue

from medlake.api import create_app
from medlake.config import Settings
from medlake.ingest.archive import Archive

pytest_plugins = ["tests.security_fixtures"]

#: Examples per operation and phase: 10 did not reach `int("²")` behind an isdigit() check.
EXAMPLES = 50


@pytest.fixture
def app(secure_archive: Archive) -> FastAPI:
    return create_app(secure_archive, background=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_no_operation_answers_a_server_error(
    app: FastAPI,
    secure_archive: Archive,
    secure_settings: Settings,
    demo_files: list[Path],
    tmp_path: Path,
) -> None:
    token = issue(secure_archive, "schemathesis-admin", "admin")
    with served(app, secure_settings) as url:
        boundary = new_boundary()
        stored = httpx.post(
            f"{url}/dicomweb/studies",
            content=multipart_body(demo_files, boundary),
            headers={**stow_headers(boundary), **bearer(token)},
            timeout=120,
        )
        assert stored.status_code == 200, stored.text
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json",
                "--header", f"Authorization: Bearer {token}",
                "--checks", "not_a_server_error",
                "--max-examples", str(EXAMPLES),
                "--generation-deterministic",
                "--workers", "1",
            ],
            cwd=tmp_path,  # hypothesis keeps its files there
            env={**os.environ, "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=1500,
        )  # fmt: skip

    output = run.stdout + run.stderr
    failures = output[output.find("FAILURES") :] if "FAILURES" in output else output[-6000:]
    assert run.returncode == 0, failures[:20000]
    tested = re.search(r"Tested: (\d+)", output)
    assert tested and int(tested.group(1)) > 100, output[-3000:]  # the whole API
    assert re.search(r"\d+ generated, \d+ passed", output), output[-3000:]
