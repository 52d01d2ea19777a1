"""FHIR bulk data: $export (system, Patient, Group) through the async request pattern,
and $import of NDJSON with good and bad lines, over HTTP against the real app."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from medlake.clinical import bulk_import
from medlake.clinical.bulk_jobs import JobContext, JobStatus, _claim, _run, get_job, run_job_here
from medlake.clinical.store import update_resource
from medlake.config import Settings
from medlake.index.schema import ingest_errors
from medlake.ingest.archive import Archive
from medlake.ingest.batches import get_batch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

KICKOFF = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The suite's settings with an import root and small export files (3 resources)."""
    (tmp_path / "imports").mkdir()
    return settings.model_copy(
        update={"fhir_import_root": tmp_path / "imports", "fhir_export_file_resources": 3}
    )


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def put(client: TestClient, resource: dict[str, Any]) -> None:
    url = f"/fhir/{resource['resourceType']}/{resource['id']}"
    response = client.put(url, content=json.dumps(resource), headers=FHIR_JSON)
    assert response.status_code in (200, 201), response.text


def patient(pid: str, mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": "urn:mrn", "value": mrn}],
        "name": [{"family": f"Family-{pid}"}],
    }


def observation(oid: str, pid: str | None, value: float = 5.5) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "valueQuantity": {"value": value, "unit": "mmol/L"},
    }
    if pid is not None:
        resource["subject"] = {"reference": f"Patient/{pid}"}
    return resource


@pytest.fixture
def populated(client: TestClient) -> None:
    """Patients p1..p4, two observations each (o-p1-1, o-p1-2, ...), one observation
    without a subject, a Practitioner, and Group g1 of p1 and p2 (p3 inactive)."""
    for n in range(1, 5):
        put(client, patient(f"p{n}", f"MRN{n}"))
        for k in (1, 2):
            put(client, observation(f"o-p{n}-{k}", f"p{n}"))
    put(client, observation("o-none", None))
    put(client, {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "House"}]})
    put(
        client,
        {
            "resourceType": "Group",
            "id": "g1",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": "Patient/p1"}},
                {"entity": {"reference": "Patient/p2"}},
                {"entity": {"reference": "Patient/p3"}, "inactive": True},
            ],
        },
    )


def kick_off(client: TestClient, url: str, **kwargs: Any) -> str:
    method = kwargs.pop("method", "GET")
    headers = {**KICKOFF, **kwargs.pop("headers", {})}
    response = client.request(method, url, headers=headers, **kwargs)
    assert response.status_code == 202, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    location = response.headers["content-location"]
    assert location.startswith("http://testserver/fhir/")
    assert "/$bulk-status/" in location
    return location


def wait_done(client: TestClient, location: str) -> httpx.Response:
    for _ in range(600):
        response = client.get(location, headers={"Accept": "application/json"})
        if response.status_code != 202:
            return response
        assert response.headers["x-progress"]
        time.sleep(0.05)
    raise AssertionError(f"{location} still running")


def download(client: TestClient, item: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.get(item["url"], headers={"Accept": "application/fhir+ndjson"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == item["count"]
    return lines


def exported(client: TestClient, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        resources = download(client, item)
        assert {r["resourceType"] for r in resources} == {item["type"]}
        out.setdefault(item["type"], []).extend(resources)
    return out


def ids(resources: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in resources}


# --- $export -------------------------------------------------------------------------------


def test_system_export_round_trip(client: TestClient, populated: None) -> None:
    location = kick_off(client, "/fhir/$export")

    done = wait_done(client, location)

    assert done.status_code == 200
    assert done.headers["content-type"].startswith("application/json")
    manifest = done.json()
    assert manifest["request"] == "http://testserver/fhir/$export"
    assert manifest["requiresAccessToken"] is False
    assert manifest["error"] == []
    assert manifest["transactionTime"].startswith("20")
    files = exported(client, manifest)
    assert ids(files["Patient"]) == {"p1", "p2", "p3", "p4"}
    assert len(files["Observation"]) == 9
    assert ids(files["Practitioner"]) == {"dr1"}
    assert ids(files["Group"]) == {"g1"}
    # Files hold at most 3 resources (fhir_export_file_resources): 9 observations, 3 files.
    observation_files = [o for o in manifest["output"] if o["type"] == "Observation"]
    assert [o["count"] for o in observation_files] == [3, 3, 3]
    # Each line is the resource as the REST API serves it.
    served = client.get("/fhir/Observation/o-p2-1").json()
    assert next(o for o in files["Observation"] if o["id"] == "o-p2-1") == served


def test_kickoff_needs_respond_async_and_known_parameters(
    client: TestClient, populated: None
) -> None:
    missing_prefer = client.get("/fhir/$export", headers={"Accept": "application/fhir+json"})
    assert missing_prefer.status_code == 400
    assert missing_prefer.json()["resourceType"] == "OperationOutcome"
    assert "respond-async" in missing_prefer.json()["issue"][0]["diagnostics"]

    for query in ("_outputFormat=text/csv", "_type=Nonsense", "_since=yesterday", "_elements=id"):
        response = client.get(f"/fhir/$export?{query}", headers=KICKOFF)
        assert response.status_code == 400, query
        assert response.json()["resourceType"] == "OperationOutcome"

    wrong_accept = client.get("/fhir/$export", headers={**KICKOFF, "Accept": "text/html"})
    assert wrong_accept.status_code == 400


def test_lenient_handling_reports_what_it_ignored(client: TestClient, populated: None) -> None:
    location = kick_off(
        client,
        "/fhir/$export?_type=Patient,Nonsense&_outputFormat=ndjson",
        headers={"Prefer": "respond-async, handling=lenient"},
    )

    manifest = wait_done(client, location).json()

    assert ids(exported(client, manifest)["Patient"]) == {"p1", "p2", "p3", "p4"}
    [error_file] = manifest["error"]
    assert error_file["type"] == "OperationOutcome"
    [outcome] = download(client, error_file)
    assert "Nonsense" in outcome["issue"][0]["diagnostics"]
    assert outcome["issue"][0]["severity"] == "warning"


def test_type_and_since_select_resources(client: TestClient, populated: None) -> None:
    first = wait_done(client, kick_off(client, "/fhir/$export?_type=Observation")).json()
    assert set(exported(client, first)) == {"Observation"}

    time.sleep(0.01)
    put(client, {**patient("p2", "MRN2"), "name": [{"family": "Renamed"}]})
    put(client, observation("o-new", "p4"))
    since = first["transactionTime"]

    later = wait_done(client, kick_off(client, "/fhir/$export", params={"_since": since})).json()

    files = exported(client, later)
    assert {t: ids(r) for t, r in files.items()} == {"Patient": {"p2"}, "Observation": {"o-new"}}
    assert files["Patient"][0]["name"][0]["family"] == "Renamed"


def test_type_filter_narrows_a_type(client: TestClient, populated: None) -> None:
    location = kick_off(
        client,
        "/fhir/$export",
        params={"_type": "Patient,Observation", "_typeFilter": "Patient?identifier=urn:mrn|MRN3"},
    )

    files = exported(client, wait_done(client, location).json())

    assert ids(files["Patient"]) == {"p3"}
    assert len(files["Observation"]) == 9


def test_patient_export_is_the_patient_compartments(client: TestClient, populated: None) -> None:
    files = exported(client, wait_done(client, kick_off(client, "/fhir/Patient/$export")).json())

    assert ids(files["Patient"]) == {"p1", "p2", "p3", "p4"}
    # Observations about a patient; the one without a subject is in no compartment.
    assert "o-none" not in ids(files["Observation"])
    assert len(files["Observation"]) == 8
    assert "Practitioner" not in files


def test_group_export_is_the_members_compartments(client: TestClient, populated: None) -> None:
    files = exported(client, wait_done(client, kick_off(client, "/fhir/Group/g1/$export")).json())

    assert ids(files["Patient"]) == {"p1", "p2"}  # p3 is an inactive member
    assert ids(files["Observation"]) == {"o-p1-1", "o-p1-2", "o-p2-1", "o-p2-2"}


def test_group_export_by_post_with_a_patient_list(client: TestClient, populated: None) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient,Observation"},
            {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
        ],
    }
    location = kick_off(
        client, "/fhir/Group/g1/$export", method="POST", content=json.dumps(body), headers=FHIR_JSON
    )

    files = exported(client, wait_done(client, location).json())

    assert {t: ids(r) for t, r in files.items()} == {
        "Patient": {"p2"},
        "Observation": {"o-p2-1", "o-p2-2"},
    }
    not_a_member = {
        "resourceType": "Parameters",
        "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/p4"}}],
    }
    refused = client.post(
        "/fhir/Group/g1/$export", content=json.dumps(not_a_member), headers={**KICKOFF, **FHIR_JSON}
    )
    assert refused.status_code == 400


def test_group_that_does_not_exist_is_404(client: TestClient, populated: None) -> None:
    response = client.get("/fhir/Group/nope/$export", headers=KICKOFF)

    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


def test_delete_cancels_and_removes_the_files(
    client: TestClient, populated: None, archive: Archive
) -> None:
    location = kick_off(client, "/fhir/$export")
    manifest = wait_done(client, location).json()
    job_id = location.rsplit("/", 1)[1]
    prefix = archive.layout.bulk_job_prefix("default", "export", job_id)
    assert list(archive.blobs.list(prefix))

    deleted = client.delete(location)

    assert deleted.status_code == 202
    assert client.get(location).status_code == 404
    assert client.get(manifest["output"][0]["url"]).status_code == 404
    assert list(archive.blobs.list(prefix)) == []
    assert client.delete(location).status_code == 404


def test_export_in_another_partition_sees_only_its_resources(
    client: TestClient, archive: Archive
) -> None:
    update_resource(archive, "Patient", "a1", patient("a1", "A1"), partition="research")
    put(client, patient("d1", "D1"))

    location = kick_off(client, "/fhir/partitions/research/$export")

    assert "/fhir/partitions/research/$bulk-status/" in location
    files = exported(client, wait_done(client, location).json())
    assert {t: ids(r) for t, r in files.items()} == {"Patient": {"a1"}}
    job_id = location.rsplit("/", 1)[1]
    assert client.get(f"/fhir/$bulk-status/{job_id}").status_code == 404


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


class _Crash(BaseException):
    """The process dies (nothing in the job catches it)."""


class _CrashAfterFirstFile(JobContext):
    def checkpoint(self, conn: Any = None, *, progress: str | None = None, **values: Any) -> None:
        super().checkpoint(conn, progress=progress, **values)
        if values.get("output"):
            raise _Crash


def test_an_interrupted_export_resumes_where_it_stopped(
    archive: Archive, populated: None, client: TestClient
) -> None:
    client.app.state.bulk_jobs.stop()  # type: ignore[attr-defined]  # run by hand below
    location = kick_off(client, "/fhir/$export?_type=Observation")
    job_id = location.rsplit("/", 1)[1]
    owner = f"{socket.gethostname()[:40]}:{_dead_pid()}:gone"
    job = _claim(archive, owner, job_id)
    assert job is not None
    with pytest.raises(_Crash):  # dies once its first file of 3 is in the lake
        _run(_CrashAfterFirstFile(archive, job, owner))
    assert client.get(location).status_code == 202
    first = archive.layout.bulk_job_file_key("default", "export", job_id, "Observation-1.ndjson")
    marked = archive.blobs.read_bytes(first).replace(b'"final"', b'"amended"')
    archive.blobs.put_bytes(first, marked)

    done = run_job_here(archive, job_id)  # its owner's process is gone: taken over

    assert done.status == JobStatus.COMPLETED
    assert [f.name for f in done.output] == [
        "Observation-1.ndjson", "Observation-2.ndjson", "Observation-3.ndjson",
    ]  # fmt: skip
    files = exported(client, wait_done(client, location).json())
    assert len(ids(files["Observation"])) == 9
    # The first file was not written again: the job went on after it.
    assert [o["status"] for o in files["Observation"]].count("amended") == 3


# --- $import -------------------------------------------------------------------------------


def import_body(*inputs: tuple[str, str]) -> str:
    return json.dumps(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "inputFormat", "valueString": "application/fhir+ndjson"},
                *(
                    {
                        "name": "input",
                        "part": [
                            {"name": "type", "valueString": kind},
                            {"name": "url", "valueUrl": url},
                        ],
                    }
                    for kind, url in inputs
                ),
            ],
        }
    )


def run_import(client: TestClient, body: str, root: str = "/fhir") -> dict[str, Any]:
    location = kick_off(client, f"{root}/$import", method="POST", content=body, headers=FHIR_JSON)
    done = wait_done(client, location)
    assert done.status_code == 200, done.text
    manifest: dict[str, Any] = done.json()
    return manifest


def write_ndjson(path: Path, lines: list[Any]) -> str:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path.as_uri()


GOOD_AND_BAD = [
    patient("i1", "I1"),
    "{not json",
    {"resourceType": "Observation", "id": "bad-obs", "code": {"text": "no status"}},
    "",
    patient("i2", "I2"),
    {"resourceType": "Patient", "id": "i3", "gender": "sometimes"},
    {"resourceType": "Patient", "id": "i4", "birthDate": "1990-02-03"},
]


@pytest.mark.parametrize("checker", ["in-process", "worker-process"])
def test_import_stores_good_lines_and_reports_bad_ones(
    client: TestClient,
    settings: Settings,
    archive: Archive,
    checker: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if checker == "worker-process":  # as for a large input: lines checked by a second process
        monkeypatch.setattr(bulk_import, "CHECKER_PROCESS_BYTES", 0)
    assert settings.fhir_import_root is not None
    url = write_ndjson(settings.fhir_import_root / "patients.ndjson", GOOD_AND_BAD)

    manifest = run_import(client, import_body(("Patient", url)))

    assert manifest["output"] == [{"type": "Patient", "count": 3, "inputUrl": url}]
    [error_file] = manifest["error"]
    assert error_file["count"] == 3 and error_file["inputUrl"] == url
    outcomes = download(client, error_file)
    diagnostics = [o["issue"][0]["diagnostics"] for o in outcomes]
    assert [d.split(":")[0] for d in diagnostics] == ["line 2", "line 3", "line 6"]
    assert "not valid JSON" in diagnostics[0]
    assert "Observation in an input of type Patient" in diagnostics[1]
    assert "sometimes" in json.dumps(outcomes[2])
    for pid in ("i1", "i2", "i4"):
        assert client.get(f"/fhir/Patient/{pid}").status_code == 200
    assert client.get("/fhir/Patient/i3").status_code == 404
    # The batch: every line accounted for, one error row per rejected line.
    batch_id = manifest["extension"]["batch"]
    with archive.engine.connect() as conn:
        batch = get_batch(conn, batch_id)
        sources = conn.execute(
            select(ingest_errors.c.source, ingest_errors.c.message)
            .where(ingest_errors.c.batch_id == batch_id)
            .order_by(ingest_errors.c.id)
        ).all()
    assert (batch.seen, batch.stored, batch.duplicates, batch.rejected) == (6, 3, 0, 3)
    assert batch.verdict == "balanced" and batch.status == "completed"
    assert [s.source for s in sources] == [f"{url} line {n}" for n in (2, 3, 6)]
    assert all(json.loads(s.message)["resourceType"] == "OperationOutcome" for s in sources)


def test_import_again_changes_nothing(client: TestClient, settings: Settings) -> None:
    assert settings.fhir_import_root is not None
    url = write_ndjson(settings.fhir_import_root / "again.ndjson", GOOD_AND_BAD)
    run_import(client, import_body(("Patient", url)))
    version = client.get("/fhir/Patient/i1").json()["meta"]["versionId"]

    manifest = run_import(client, import_body(("Patient", url)))

    assert manifest["output"][0]["count"] == 3
    assert client.get("/fhir/Patient/i1").json()["meta"]["versionId"] == version
    batch = client.get(f"/batches/{manifest['extension']['batch']}").json()
    assert (batch["seen"], batch["stored"], batch["duplicates"], batch["rejected"]) == (6, 0, 3, 3)
    history = client.get("/fhir/Patient/i1/_history").json()
    assert history["total"] == 1


def test_export_output_imports_only_into_its_own_partition(
    client: TestClient, populated: None, archive: Archive
) -> None:
    """An export's files import back into their partition; another partition's
    $import cannot read them (a job id would otherwise open one partition's data to
    anyone who may import into another)."""
    export = wait_done(client, kick_off(client, "/fhir/$export?_type=Patient,Observation")).json()
    inputs = [(item["type"], item["url"]) for item in export["output"]]

    elsewhere = client.post(
        "/fhir/partitions/copy/$import",
        content=import_body(*inputs),
        headers={**KICKOFF, **FHIR_JSON},
    )
    assert elsewhere.status_code == 400
    assert "no such bulk data job" in elsewhere.text
    assert client.get("/fhir/partitions/copy/Observation/o-p3-2").status_code == 404

    manifest = run_import(client, import_body(*inputs))
    assert sum(item["count"] for item in manifest["output"]) == 13
    assert manifest["error"] == []


def test_import_refuses_inputs_it_may_not_read(
    client: TestClient, tmp_path: Path, settings: Settings
) -> None:
    outside = tmp_path / "elsewhere.ndjson"
    outside.write_text(json.dumps(patient("x", "X")) + "\n")
    for url in (outside.as_uri(), "https://example.org/data.ndjson"):
        response = client.post(
            "/fhir/$import",
            content=import_body(("Patient", url)),
            headers={**KICKOFF, **FHIR_JSON},
        )
        assert response.status_code == 400, url
        assert response.json()["resourceType"] == "OperationOutcome"
    no_prefer = client.post(
        "/fhir/$import", content=import_body(("Patient", outside.as_uri())), headers=FHIR_JSON
    )
    assert no_prefer.status_code == 400


def test_a_failed_job_reports_a_server_error(
    client: TestClient, settings: Settings, archive: Archive
) -> None:
    assert settings.fhir_import_root is not None
    path = settings.fhir_import_root / "vanishing.ndjson"
    url = write_ndjson(path, [patient("v1", "V1")])
    client.app.state.bulk_jobs.stop()  # type: ignore[attr-defined]
    location = kick_off(
        client, "/fhir/$import", method="POST", content=import_body(("Patient", url)),
        headers=FHIR_JSON,
    )  # fmt: skip
    path.unlink()  # gone before the job reads it

    job = run_job_here(archive, location.rsplit("/", 1)[1])

    assert job.status == JobStatus.FAILED
    response = client.get(location)
    assert response.status_code == 500
    assert "vanishing.ndjson" in response.json()["issue"][0]["diagnostics"]
    assert get_job(archive, job.id).error_message
    assert job.batch_id is not None
    with archive.engine.connect() as conn:
        batch = get_batch(conn, job.batch_id)
    assert batch.status == "failed"
    assert "vanishing.ndjson" in batch.detail["differences"][0]
