"""The audit log: one hash chain however many writers, tampering named by `medlake audit
verify`, every PHI access over HTTP recorded before its response, FHIR AuditEvent export."""

from __future__ import annotations

import io
import json
import threading
import warnings
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.exc import DBAPIError
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.security_support import bearer, issue
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.index.schema import audit_log
from medlake.ingest.archive import Archive
from medlake.security import (
    Anchor,
    AuditRecord,
    export_audit_events,
    record_audit,
    verify_chain,
)
from medlake.security.audit import AUDITED_ACTIONS, audit_event
from medlake.security.policy import Action

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def _record(n: int, actor: str = "alice") -> AuditRecord:
    return AuditRecord(
        event=AUDITED_ACTIONS[Action.DICOM_READ],
        operation="dicom.read",
        actor=actor,
        actor_kind="token",
        partition="default",
        entity={"study": f"1.2.3.{n}"},
        request=f"GET /dicomweb/studies/1.2.3.{n}",
    )


def _drop_append_only_triggers(engine: Engine) -> None:
    """What someone with the database's owner rights could do before tampering."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
            conn.execute(text("DROP TRIGGER audit_log_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER audit_log_append_only ON audit_log"))


def test_chain_appends_and_verifies(secure_archive: Archive) -> None:
    engine = secure_archive.engine
    stored = [record_audit(engine, _record(n)) for n in range(5)]
    assert [s.seq for s in stored] == [1, 2, 3, 4, 5]
    result = verify_chain(engine)
    assert result.ok and result.checked == 5 and result.head_hash == stored[-1].hash
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.seq)).all()
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]


def test_concurrent_writers_keep_one_chain(secure_archive: Archive) -> None:
    engine = secure_archive.engine
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for n in range(20):
                record_audit(engine, _record(n, actor=f"writer-{worker}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    result = verify_chain(engine)
    assert result.ok, result.reason
    assert result.checked == 100


def test_the_database_refuses_changes(secure_archive: Archive) -> None:
    engine = secure_archive.engine
    record_audit(engine, _record(1))
    for statement in (
        update(audit_log).values(actor="mallory"),
        delete(audit_log),
    ):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    assert verify_chain(engine).ok


def test_tampering_is_named_by_verify(
    secure_archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = secure_archive.engine
    for n in range(8):
        record_audit(engine, _record(n))
    _drop_append_only_triggers(engine)
    with engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 5).values(actor="someone-else"))
    result = verify_chain(engine)
    assert (result.first_broken, result.checked) == (5, 4)
    assert "record 5 was changed" in (result.reason or "")

    settings = secure_archive.settings
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    verified = CliRunner().invoke(cli, ["audit", "verify", "--data", str(settings.data)])
    assert verified.exit_code == 1
    assert "BROKEN at record 5" in verified.output

    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq.in_([5, 6])))
    result = verify_chain(engine)
    assert result.first_broken == 5 and "missing" in (result.reason or "")


def test_records_cut_from_the_end_are_caught_by_an_anchor(
    secure_archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = secure_archive.engine
    for n in range(6):
        record_audit(engine, _record(n))
    settings = secure_archive.settings
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    verified = CliRunner().invoke(cli, ["audit", "verify", "--data", str(settings.data)])
    assert verified.exit_code == 0, verified.output
    kept = verified.output.split("--anchor next time): ")[1].split()[0]  # SEQ:HASH of the head
    seq = int(kept.split(":")[0])
    record_audit(engine, _record(99))  # the chain grows past the anchor: still fine
    assert verify_chain(engine, Anchor.parse(kept)).ok

    _drop_append_only_triggers(engine)
    with engine.begin() as conn:  # the newest records go, the rest still chains
        conn.execute(delete(audit_log).where(audit_log.c.seq >= seq - 1))
    assert verify_chain(engine).ok  # without the anchor, nothing shows
    result = verify_chain(engine, Anchor.parse(kept))
    assert not result.ok and "removed from its end" in (result.reason or "")
    again = CliRunner().invoke(
        cli, ["audit", "verify", "--anchor", kept, "--data", str(settings.data)]
    )
    assert again.exit_code == 1
    assert "BROKEN" in again.output

    bad = CliRunner().invoke(cli, ["audit", "verify", "--anchor", "7:nothex", "--data", "x"])
    assert bad.exit_code == 2 and "SEQ:HASH" in bad.output


def _stow(client: TestClient, token: str, files: list[Path]) -> None:
    boundary = new_boundary()
    response = client.post(
        "/dicomweb/studies",
        content=multipart_body(files, boundary),
        headers={**stow_headers(boundary), **bearer(token)},
    )
    assert response.status_code == 200, response.text


def test_phi_access_over_http_is_recorded(
    secure_archive: Archive, secure_client: TestClient, samples: dict[str, Path]
) -> None:
    admin = issue(secure_archive, "admin-1", "admin")
    reader = issue(secure_archive, "reader-1", "reader@default")
    _stow(secure_client, admin, [samples["CT_small.dcm"]])
    study = secure_client.get("/dicomweb/studies", headers=bearer(reader)).json()[0]
    uid = study["0020000D"]["Value"][0]
    assert (
        secure_client.get(f"/dicomweb/studies/{uid}/metadata", headers=bearer(reader)).status_code
        == 200
    )
    assert (
        secure_client.get("/dicomweb/partitions/other/studies", headers=bearer(reader)).status_code
        == 403
    )
    assert secure_client.get("/healthz").status_code == 200  # no PHI: not recorded
    with secure_archive.engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.seq)).all()
    summary = [(r.actor, r.event_type, r.action, r.outcome, r.operation) for r in rows]
    assert summary == [
        ("admin-1", "110104", "C", 0, "dicom.store"),
        ("reader-1", "110112", "E", 0, "dicom.search"),
        ("reader-1", "110104", "R", 0, "dicom.read"),
        ("reader-1", "110113", "E", 4, "dicom.search"),
    ]
    read = rows[2]
    assert json.loads(read.entity) == {"study": uid}
    assert read.source_address == "testclient" and read.partition == "default"
    assert verify_chain(secure_archive.engine).ok


def test_a_failed_audit_write_fails_the_request(
    secure_archive: Archive, secure_client: TestClient, samples: dict[str, Path]
) -> None:
    admin = issue(secure_archive, "admin-1", "admin")
    _stow(secure_client, admin, [samples["MR_small.dcm"]])
    with secure_archive.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER audit_log_full BEFORE INSERT ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION audit_log_full() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER audit_log_full BEFORE INSERT ON audit_log "
                    "FOR EACH ROW EXECUTE FUNCTION audit_log_full()"
                )
            )
    response = secure_client.get("/dicomweb/studies", headers=bearer(admin))
    assert response.status_code == 503
    assert "audit" in response.json()["message"]
    assert "x-total-count" not in response.headers
    assert "0020000D" not in response.text


def test_export_is_valid_fhir_audit_event_ndjson(
    secure_archive: Archive,
    secure_client: TestClient,
    samples: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    admin = issue(secure_archive, "admin-1", "admin")
    _stow(secure_client, admin, [samples["CT_small.dcm"]])
    uid = secure_client.get("/dicomweb/studies", headers=bearer(admin)).json()[0]["0020000D"][
        "Value"
    ][0]
    secure_client.get(f"/dicomweb/studies/{uid}/series", headers=bearer(admin))
    secure_client.get("/dicomweb/studies?PatientID=X*")  # no token: 401, recorded
    secure_client.delete(f"/dicomweb/studies/{uid}", headers=bearer(admin))
    secure_client.post("/partitions/research", headers=bearer(admin))

    out = io.BytesIO()
    count = export_audit_events(secure_archive.engine, out)
    lines = out.getvalue().decode().splitlines()
    assert count == len(lines) == 6
    events = [AuditEvent.model_validate(orjson.loads(line)) for line in lines]
    types = [
        (e.type.code, e.subtype[0].code if e.subtype else None, e.action, e.outcome) for e in events
    ]
    assert types == [
        ("110104", None, "C", "0"),  # STOW-RS
        ("110112", None, "E", "0"),  # QIDO-RS
        ("110112", None, "E", "0"),
        ("110114", "110122", "E", "4"),  # no credentials
        ("110105", None, "D", "0"),  # study deleted
        ("110113", "110131", "C", "0"),  # partition created
    ]
    assert all(e.type.system == "http://dicom.nema.org/resources/ontology/DCM" for e in events)
    study_entities = [
        entity
        for e in events
        for entity in (e.entity or [])
        if entity.what and entity.what.identifier
    ]
    assert {x.what.identifier.value for x in study_entities} == {f"urn:oid:{uid}"}
    assert study_entities[0].what.identifier.type.coding[0].code == "110180"
    requestor = events[0].agent[0]
    assert requestor.requestor is True and requestor.who.identifier.value == "admin-1"
    assert requestor.network.address == "testclient"

    settings = secure_archive.settings
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    target = tmp_path / "audit.ndjson"
    exported = CliRunner().invoke(
        cli, ["audit", "export", "--out", str(target), "--data", str(settings.data)]
    )
    assert exported.exit_code == 0, exported.output
    assert target.read_text().splitlines() == lines
    # the export itself is recorded (110101 Audit Log Used)
    with secure_archive.engine.connect() as conn:
        last = conn.execute(select(audit_log).order_by(audit_log.c.seq.desc()).limit(1)).one()
    assert audit_event(dict(last._mapping))["type"]["code"] == "110101"
