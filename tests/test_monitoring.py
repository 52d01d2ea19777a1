"""Monitoring: ``/readyz`` (index and lake checks), Prometheus ``/metrics`` (read with
prometheus_client's own parser), request ids and the access log, and JSON log lines
of ``medlake serve``."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from hl7.client import MLLPClient
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from sqlalchemy import create_engine
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.hl7_support import adt, running_listener
from tests.monitoring_support import free_port
from tests.security_support import bearer, issue

from medlake.api import create_app
from medlake.api.metrics import metrics_of
from medlake.api.request_log import RequestIdFilter
from medlake.cli.log_setup import log_formatter
from medlake.config import Settings
from medlake.dimse.scp import DimseServer
from medlake.ingest.archive import Archive
from medlake.storage.health import HealthStatus

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

VERIFICATION = "1.2.840.10008.1.1"


def samples_of(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value, parsed as Prometheus would."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:  # fmt: skip
    return samples.get((name, frozenset(labels.items())))


def stow(client: TestClient, parts: list[Path] | list[bytes], headers: dict[str, str]) -> int:
    boundary = new_boundary()
    response = client.post(
        "/dicomweb/studies",
        content=multipart_body(parts, boundary),
        headers={**stow_headers(boundary), **headers},
    )
    return response.status_code


# --- /readyz ---------------------------------------------------------------------------------


def test_readyz_checks_the_index_and_the_lake_and_needs_no_token(
    secure_client: TestClient,
) -> None:
    response = secure_client.get("/readyz")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["failing"] == []
    assert body["checks"]["database"]["status"] == "ok"
    assert "SELECT 1 answered" in body["checks"]["database"]["detail"]
    assert body["checks"]["lake"]["status"] == "ok"
    assert "healthCheck/" in body["checks"]["lake"]["detail"]
    assert secure_client.get("/healthz").status_code == 200


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung database)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:  # the hung check now fails and its thread ends
            conn.close()
        listener.close()


def test_readyz_is_503_naming_the_database_when_it_does_not_answer(
    secure_archive: Archive, silent_server: int
) -> None:
    secure_archive.settings = secure_archive.settings.model_copy(update={"readiness_timeout": 0.5})
    app = create_app(secure_archive, background=False)
    with TestClient(app) as client:
        hung_database = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/x"
        app.state.readiness.engine = create_engine(hung_database)
        first = client.get("/readyz")
        second = client.get("/readyz")  # the first check still hangs: it is waited for again

    for response in (first, second):
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "not ready" and body["failing"] == ["database"]
        assert body["checks"]["database"]["detail"] == "no answer to SELECT 1 within 0.5 s"
        assert body["checks"]["lake"]["status"] == "ok"


def test_readyz_is_503_naming_the_database_when_it_refuses_connections(
    secure_app: FastAPI, secure_client: TestClient
) -> None:
    nobody = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
    secure_app.state.readiness.engine = create_engine(nobody)

    refused = secure_client.get("/readyz")

    assert refused.status_code == 503 and refused.json()["failing"] == ["database"]
    detail = refused.json()["checks"]["database"]["detail"]
    assert detail.startswith("SELECT 1 failed: OperationalError: connection"), detail


def test_readyz_is_503_naming_the_lake_when_the_health_check_fails_or_stops(
    secure_app: FastAPI, secure_client: TestClient, secure_archive: Archive
) -> None:
    health = secure_app.state.health
    folder = secure_archive.blobs.local_path(secure_archive.layout.health_check_prefix)
    assert folder is not None and folder.is_dir()
    # the health-check folder cannot be written (here: a file took its name)
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    folder.write_text("not a folder")
    health.check_once()
    failing = secure_client.get("/readyz")
    folder.unlink()
    health.check_once()
    recovered = secure_client.get("/readyz")
    # the health-check thread stopped writing an hour ago
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    health.status = HealthStatus(True, "wrote an hour ago", an_hour_ago)
    stale = secure_client.get("/readyz")

    assert failing.status_code == 503 and failing.json()["failing"] == ["lake"]
    assert "cannot write" in failing.json()["checks"]["lake"]["detail"]
    assert failing.json()["checks"]["database"]["status"] == "ok"
    assert recovered.status_code == 200, recovered.text
    assert stale.status_code == 503 and stale.json()["failing"] == ["lake"]
    assert "the health check has stopped" in stale.json()["checks"]["lake"]["detail"]


# --- /metrics --------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template_and_stored_instances(
    secure_archive: Archive, secure_client: TestClient, samples: dict[str, Path]
) -> None:
    admin = bearer(issue(secure_archive, "admin-1", "admin"))
    files = [samples["CT_small.dcm"], samples["MR_small.dcm"]]
    assert stow(secure_client, files, admin) == 200
    assert stow(secure_client, [b"this is not DICOM"], admin) == 400
    study = secure_client.get("/dicomweb/studies", headers=admin).json()[0]["0020000D"]["Value"][0]
    assert secure_client.get(f"/dicomweb/studies/{study}/metadata", headers=admin).is_success
    missing = "1.2.826.0.1.3680043.99.424242"
    assert (
        secure_client.get(f"/dicomweb/studies/{missing}/metadata", headers=admin).status_code == 404
    )
    assert secure_client.get(f"/no/such/{missing}", headers=admin).status_code == 404

    scrape = secure_client.get("/metrics", headers=admin)

    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples_of(scrape.text)
    requests = "medlake_http_requests_total"
    assert value(found, requests, method="POST", route="/dicomweb/studies", status="200") == 1
    assert value(found, requests, method="POST", route="/dicomweb/studies", status="400") == 1
    metadata = "/dicomweb/studies/{study}/metadata"
    assert value(found, requests, method="GET", route=metadata, status="200") == 1
    assert value(found, requests, method="GET", route=metadata, status="404") == 1
    assert value(found, requests, method="GET", route="unmatched", status="404") == 1
    duration = "medlake_http_request_duration_seconds_count"
    assert value(found, duration, method="POST", route="/dicomweb/studies") == 2
    stored = "medlake_instances_stored_total"
    assert value(found, stored, partition="default", route="stow") == 2
    errors = "medlake_ingest_errors_total"
    assert value(found, errors, severity="reject", rule="dicom_part10") == 1
    assert value(found, "medlake_work_queue_depth", status="pending") == 0
    assert value(found, "medlake_work_queue_depth", status="claimed") == 0
    # no concrete path, and so no UID, ever becomes a label
    assert study not in scrape.text and missing not in scrape.text
    assert "/no/such" not in scrape.text

    again = samples_of(secure_client.get("/metrics", headers=admin).text)
    assert value(again, errors, severity="reject", rule="dicom_part10") == 1  # not twice
    assert value(again, stored, partition="default", route="stow") == 2
    assert value(again, requests, method="GET", route="/metrics", status="200") == 1


def test_only_admin_and_auditor_may_scrape_unless_metrics_are_public(
    secure_archive: Archive, secure_client: TestClient
) -> None:
    tokens = {
        role: issue(secure_archive, f"user-{role}", grant)
        for role, grant in [("admin", "admin"), ("auditor", "auditor"), ("reader", "reader")]
    }
    assert secure_client.get("/metrics").status_code == 401
    assert secure_client.get("/metrics", headers=bearer(tokens["reader"])).status_code == 403
    assert secure_client.get("/metrics", headers=bearer(tokens["auditor"])).status_code == 200
    assert secure_client.get("/metrics", headers=bearer(tokens["admin"])).status_code == 200

    secure_archive.settings = secure_archive.settings.model_copy(update={"metrics_public": True})
    with TestClient(create_app(secure_archive, background=False)) as public:
        scrape = public.get("/metrics")
        assert scrape.status_code == 200
        assert "medlake_http_requests_total" in scrape.text
        assert public.get("/batches").status_code == 401  # nothing else opens


def test_hl7_message_gauges_follow_the_messages_through_mapping(
    archive: Archive, app: FastAPI, client: TestClient
) -> None:
    with running_listener(archive) as mllp:
        with MLLPClient("127.0.0.1", mllp.port) as sender:
            sender.send_message(adt("A01", "M-1"))
            sender.send_message(adt("A01", "M-2", patient="777"))
        received = samples_of(client.get("/metrics").text)
        mllp.mapper.run_pending()
    mapped = samples_of(client.get("/metrics").text)

    gauge = "medlake_hl7_messages_total"
    assert value(received, gauge, status="received") == 2
    assert value(received, gauge, status="mapped") == 0
    assert value(mapped, gauge, status="received") == 0
    assert value(mapped, gauge, status="mapped") == 2


def test_dimse_associations_are_counted_accepted_and_rejected(
    archive: Archive, app: FastAPI, client: TestClient
) -> None:
    server = DimseServer(archive, host="127.0.0.1", port=0).start()
    try:
        metrics_of(app).observe_dimse(server)
        for _ in range(2):
            ae = AE(ae_title="ECHOER")
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
            assert assoc.is_established
            assoc.send_c_echo()
            assoc.release()
        archive.settings = archive.settings.model_copy(update={"dimse_require_known_ae": True})
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(VERIFICATION)
        assert stranger.associate("127.0.0.1", server.port, ae_title=server.ae_title).is_rejected
    finally:
        server.stop()

    found = samples_of(client.get("/metrics").text)
    assert value(found, "medlake_dimse_associations_total", result="accepted") == 2
    assert value(found, "medlake_dimse_associations_total", result="rejected") == 1


# --- request ids and the access log ------------------------------------------------------------


def test_every_record_of_a_request_carries_its_id_and_the_access_line_has_no_path(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    probe = logging.getLogger("medlake.test.probe")

    def handler() -> dict[str, str]:  # a plain def: runs in the thread pool
        probe.warning("inside the handler")
        return {"ok": "yes"}

    app.add_api_route("/probe/{thing}", handler, methods=["GET"])
    caplog.handler.addFilter(RequestIdFilter())  # as on the CLI's handler
    with TestClient(app) as client, caplog.at_level(logging.INFO):
        given = client.get("/probe/1.2.3?PatientName=DOE", headers={"X-Request-ID": "req-42.a:b"})
        bad_id = client.get("/probe/1.2.3", headers={"X-Request-ID": "two words\x7f"})
        long_id = client.get("/probe/1.2.3", headers={"X-Request-ID": "x" * 129})
        nothing = client.get("/dicomweb/studies/1.2.3/metadata")

    assert given.headers["X-Request-ID"] == "req-42.a:b"
    for response in (bad_id, long_id, nothing):
        generated = response.headers["X-Request-ID"]
        assert len(generated) == 32 and int(generated, 16) >= 0
    ids = {r.headers["X-Request-ID"] for r in (given, bad_id, long_id, nothing)}
    assert len(ids) == 4
    inside = [r for r in caplog.records if r.name == "medlake.test.probe"]
    assert [r.request_id for r in inside] == [  # type: ignore[attr-defined]
        "req-42.a:b",
        bad_id.headers["X-Request-ID"],
        long_id.headers["X-Request-ID"],
    ]
    access = [r for r in caplog.records if r.name == "medlake.access"]
    assert len(access) == 4
    first = json.loads(log_formatter("json").format(access[0]))
    assert first["request_id"] == "req-42.a:b"
    assert first["http_method"] == "GET" and first["route"] == "/probe/{thing}"
    assert first["status"] == 200 and first["duration_ms"] >= 0
    assert first["principal"] == "anonymous"  # authentication is off in this app
    last = json.loads(log_formatter("json").format(access[-1]))
    assert last["route"] == "/dicomweb/studies/{study}/metadata" and last["status"] == 404
    text = "\n".join(log_formatter(k).format(r) for r in access for k in ("json", "text"))
    assert "1.2.3" not in text and "PatientName" not in text and "DOE" not in text
    assert "[req-42.a:b]" in log_formatter("text").format(access[0])


def test_a_server_error_still_answers_with_the_request_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken, methods=["GET"])
    caplog.handler.addFilter(RequestIdFilter())
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.INFO):
        response = client.get("/broken", headers={"X-Request-ID": "bug-1"})

    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "bug-1"
    assert response.json() == {"status": 500, "message": "internal server error"}
    (access,) = [r for r in caplog.records if r.name == "medlake.access"]
    assert access.status == 500 and access.request_id == "bug-1"  # type: ignore[attr-defined]


def test_medlake_serve_writes_json_log_lines_with_request_ids(settings: Settings) -> None:
    port = free_port()
    env = dict(
        os.environ,
        MEDLAKE_DATABASE_URL=settings.resolved_database_url,
        MEDLAKE_LOG_FORMAT="json",
        MEDLAKE_DIMSE_PORT="0",
        MEDLAKE_MLLP_PORT="0",
    )
    script = Path(sys.executable).with_name("medlake")
    server = subprocess.Popen(
        [str(script), "serve", "--data", str(settings.data), "--http-port", str(port),
         "--insecure-no-auth"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[1].decode()
            try:
                ready = httpx.get(
                    f"http://127.0.0.1:{port}/readyz", headers={"X-Request-ID": "probe-1"}
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "medlake serve did not answer"
                time.sleep(0.2)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.send_signal(signal.SIGTERM)
        stderr = server.communicate(timeout=60)[1].decode()

    assert ready.status_code == 200 and ready.headers["X-Request-ID"] == "probe-1"
    assert 'route="/readyz"' in metrics.text
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    assert {"timestamp", "level", "logger", "message", "request_id"} <= set(lines[0])
    (access,) = [line for line in lines if line.get("request_id") == "probe-1"]
    assert access["logger"] == "medlake.access" and access["route"] == "/readyz"
    assert access["status"] == 200 and access["level"] == "INFO"
