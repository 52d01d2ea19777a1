"""No patient name or patient id in the server's logs, at DEBUG, whatever a client does.

The demo studies are stored under a distinctive patient (name and id found nowhere
else), the same patient is created in FHIR and admitted over HL7 v2 (MLLP), and then
every kind of request is made through a real uvicorn server, with authentication on:
STOW-RS, QIDO-RS searching by name and id, WADO-RS, FHIR create / read / search,
the HL7 message API, and error paths (a rejected file, an invalid resource, malformed
searches, 404 on UIDs and ids, a refused request). Every log record of the process is
captured at DEBUG and rendered by both of medlake's formatters; neither the name nor
the id may appear in any of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pydicom
import pytest
from fastapi import FastAPI
from hl7.client import MLLPClient
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.hl7_support import adt, msh, running_listener
from tests.monitoring_support import served
from tests.security_support import bearer, issue

from medlake.api import create_app
from medlake.cli.log_setup import log_formatter
from medlake.clinical.hl7 import Hl7Sender, add_sender
from medlake.config import Settings
from medlake.ingest.archive import Archive

pytest_plugins = ["tests.security_fixtures"]

FAMILY = "Quxworthy"
GIVEN = "Zebulon"
PATIENT_NAME = f"{FAMILY}^{GIVEN}"
PATIENT_ID = "MRNQ7Z388142"
#: Loggers of the test's own clients (they log the URLs they call; the server does not).
CLIENT_LOGGERS = ("httpx", "httpcore", "hl7")


@pytest.fixture
def patient_files(demo_files: list[Path], tmp_path: Path) -> list[Path]:
    """The demo studies, all of one distinctive patient."""
    folder = tmp_path / "patient"
    folder.mkdir()
    out = []
    for source in demo_files:
        ds = pydicom.dcmread(source)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        target = folder / source.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


@pytest.fixture
def app(secure_archive: Archive) -> FastAPI:
    return create_app(secure_archive, background=False)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of every logger at DEBUG, while the test runs."""
    with caplog.at_level(logging.DEBUG):
        yield caplog


def patient_resource() -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "http://hospital.example/mrn", "value": PATIENT_ID}],
        "name": [{"family": FAMILY, "given": [GIVEN]}],
        "gender": "male",
        "birthDate": "1970-01-01",
    }


def exercise_dicomweb(http: httpx.Client, files: list[Path]) -> None:
    boundary = new_boundary()
    stored = http.post(
        "/dicomweb/studies",
        content=multipart_body(files, boundary),
        headers=stow_headers(boundary),
    )
    assert stored.status_code == 200, stored.text
    # a part that is not DICOM, and one without its SOP Instance UID but with the patient
    broken = pydicom.dcmread(files[0])
    del broken.SOPInstanceUID
    target = files[0].with_name("broken.dcm")
    broken.save_as(target, enforce_file_format=False)
    boundary = new_boundary()
    rejected = http.post(
        "/dicomweb/studies",
        content=multipart_body([f"not DICOM: {PATIENT_NAME}".encode(), target], boundary),
        headers=stow_headers(boundary),
    )
    assert rejected.status_code in (400, 409), rejected.text

    studies = http.get(f"/dicomweb/studies?PatientName={FAMILY}*&PatientID={PATIENT_ID}")
    assert studies.status_code == 200 and studies.json(), studies.text
    study = studies.json()[0]["0020000D"]["Value"][0]
    assert http.get(f"/dicomweb/instances?PatientID={PATIENT_ID}").status_code == 200
    assert http.get(f"/dicomweb/studies?PatientName={GIVEN}&fuzzymatching=true").status_code == 200
    assert http.get(f"/dicomweb/studies?PatientWeight={PATIENT_ID}").status_code == 400
    assert http.get(f"/dicomweb/studies?StudyDate={PATIENT_ID}").status_code == 400
    metadata = http.get(f"/dicomweb/studies/{study}/metadata")
    assert metadata.status_code == 200 and PATIENT_ID in metadata.text
    first = metadata.json()[0]
    series, instance = first["0020000E"]["Value"][0], first["00080018"]["Value"][0]
    instance_url = f"/dicomweb/studies/{study}/series/{series}/instances/{instance}"
    assert http.get(instance_url).status_code == 200
    assert http.get(f"{instance_url}/rendered").status_code == 200
    assert http.get(f"/dicomweb/studies/{study}/series/{series}/metadata").status_code == 200
    assert http.get("/dicomweb/studies/1.2.3.999/metadata").status_code == 404
    assert http.get(f"/dicomweb/partitions/nowhere/studies/{study}").status_code == 404
    assert http.get(f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}").is_error


def exercise_fhir(http: httpx.Client) -> None:
    fhir = {"Content-Type": "application/fhir+json"}
    created = http.post("/fhir/Patient", json=patient_resource(), headers=fhir)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    again = http.post(
        "/fhir/Patient",
        json=patient_resource(),
        headers={**fhir, "If-None-Exist": f"identifier=http://hospital.example/mrn|{PATIENT_ID}"},
    )
    assert again.status_code == 200, again.text
    assert http.get(f"/fhir/Patient/{patient_id}").status_code == 200
    found = http.get(f"/fhir/Patient?family={FAMILY}&identifier={PATIENT_ID}")
    assert found.status_code == 200 and found.json()["total"] == 1, found.text
    assert http.post("/fhir/Patient/_search", data={"name": GIVEN}).status_code == 200
    invalid = {**patient_resource(), "gender": f"{FAMILY}-{PATIENT_ID}"}
    assert http.post("/fhir/Patient", json=invalid, headers=fhir).status_code == 422
    not_json = http.post("/fhir/Patient", content=f"{{{PATIENT_NAME}", headers=fhir)
    assert not_json.status_code == 400
    assert http.get(f"/fhir/Patient?birthdate={PATIENT_ID}").status_code == 400
    assert http.get(f"/fhir/Patient/{PATIENT_ID}").status_code == 404
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": f"note on {FAMILY}"},
        "subject": {"reference": f"Patient/{patient_id}", "display": PATIENT_NAME},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": observation, "request": {"method": "POST", "url": "Observation"}},
            {
                "resource": {**observation, "subject": {"reference": f"Patient/{PATIENT_ID}"}},
                "request": {"method": "PUT", "url": f"Observation/{PATIENT_ID}"},
            },
        ],
    }
    assert http.post("/fhir", json=bundle, headers=fhir).status_code in (200, 400, 404, 422)


def exercise_hl7(http: httpx.Client, archive: Archive) -> None:
    # Authentication is on: only a registered sender's messages are stored.
    add_sender(archive.engine, Hl7Sender("phi-test", "127.0.0.1", "default", "SENDAPP"))
    with running_listener(archive) as mllp:
        with MLLPClient("127.0.0.1", mllp.port) as client:
            client.send_message(adt("A01", "PHI-1", patient=PATIENT_ID, family=FAMILY))
            # an unregistered sender: refused (AR), and its refusal logged
            stranger = msh("ADT^A01", "PHI-0", sender="OTHER|FAC")
            client.send_message(f"{stranger}PID|1||{PATIENT_ID}^^^HOSP^MR||{PATIENT_NAME}\r")
            # PID-3 missing: rejected (AE), with the name still in PID-5
            client.send_message(
                msh("ADT^A01", "PHI-2") + f"EVN|A01|2024\rPID|1||||{PATIENT_NAME}\rPV1|1|I\r"
            )
            # the id where a code of HL7 table 0001 belongs (sex), and a line that is no
            # segment but a name: errors that quote the value they found
            pid = f"PID|1||{PATIENT_ID}^^^HOSP^MR||{PATIENT_NAME}||19800101|{PATIENT_ID}\r"
            client.send_message(msh("ADT^A01", "PHI-3") + "EVN|A01|2024\r" + pid + "PV1|1|I\r")
            client.send_message(
                msh("ADT^A01", "PHI-4") + f"EVN|A01|2024\r{PATIENT_NAME}|x\r{pid}PV1|1|I\r"
            )
        mllp.mapper.run_pending()
    listed = http.get("/hl7/messages?control_id=PHI-1&partition=default")
    assert listed.status_code == 200 and len(listed.json()) == 1, listed.text
    for message in http.get("/hl7/messages").json():
        assert http.get(f"/hl7/messages/{message['id']}").status_code == 200
        assert http.get(f"/hl7/messages/{message['id']}/raw").status_code == 200


def test_no_patient_name_or_id_in_any_log_line(
    app: FastAPI,
    secure_archive: Archive,
    secure_settings: Settings,
    patient_files: list[Path],
    captured: pytest.LogCaptureFixture,
) -> None:
    admin = bearer(issue(secure_archive, "phi-test-admin", "admin"))
    with served(app, secure_settings) as url:
        with httpx.Client(base_url=url, headers=admin, timeout=60) as http:
            exercise_dicomweb(http, patient_files)
            exercise_fhir(http)
            exercise_hl7(http, secure_archive)
        anonymous = httpx.get(f"{url}/dicomweb/studies?PatientName={quote(PATIENT_NAME)}")
        assert anonymous.status_code == 401

    records = [r for r in captured.records if not r.name.startswith(CLIENT_LOGGERS)]
    assert any(r.name == "medlake.access" for r in records)  # the capture did see the server
    assert len({r.name for r in records}) > 1
    rendered = [log_formatter(kind).format(r) for r in records for kind in ("json", "text")]
    needles = [FAMILY, GIVEN, PATIENT_ID]
    leaks = [line for line in rendered if any(n.lower() in line.lower() for n in needles)]
    assert not leaks, "\n".join(leaks[:20])
