"""The de-identified views over HTTP, authentication on, as a researcher uses them: no
identifier of the original (names, IDs, birth date, UIDs, FHIR ids) in any response
body, pseudonyms that work in later requests, no probing with real values, and every
read audited as deid.read."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select
from tests.dicomweb_payloads import multipart_body, new_boundary, stow_headers
from tests.security_support import bearer, issue

from medlake.index.schema import audit_log
from medlake.ingest.archive import Archive

pytest_plugins = ["tests.security_fixtures"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

DW = "/deid/dicomweb"
FHIR = "/deid/fhir"
FHIR_JSON = {"Content-Type": "application/fhir+json"}

#: What must never appear in a de-identified answer.
NAME, PATIENT_ID, BIRTH = "DOE^JANE", "MRN-4711", "19750314"


@pytest.fixture
def original(tmp_path: Path) -> pydicom.Dataset:
    """pydicom's CT_small with identifiers a researcher must not see, new UIDs."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
    ds.AccessionNumber, ds.OtherPatientIDs = "ACC-98765", "OLD-123"
    ds.StudyDescription = "CT chest DOE follow-up"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "ct.dcm")
    ds.filename = str(tmp_path / "ct.dcm")
    return ds


@pytest.fixture
def tokens(secure_archive: Archive) -> dict[str, str]:
    return {
        "admin": issue(secure_archive, "user-admin", "admin"),
        "reader": issue(secure_archive, "user-reader", "reader@default"),
        "researcher": issue(secure_archive, "user-researcher", "researcher@default"),
    }


@pytest.fixture
def loaded(
    secure_client: TestClient, tokens: dict[str, str], original: pydicom.Dataset
) -> dict[str, Any]:
    """The CT stored, a Patient and an Observation of it created (as the admin)."""
    admin = bearer(tokens["admin"])
    boundary = new_boundary()
    stored = secure_client.post(
        "/dicomweb/studies",
        content=multipart_body([Path(original.filename)], boundary),
        headers={**stow_headers(boundary), **admin},
    )
    assert stored.status_code == 200, stored.text
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": PATIENT_ID}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "birthDate": "1975-03-14",
        "gender": "female",
    }
    made = secure_client.post("/fhir/Patient", json=patient, headers={**FHIR_JSON, **admin})
    assert made.status_code == 201, made.text
    patient_id = made.json()["id"]
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient_id}", "display": "Jane Doe"},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    made = secure_client.post("/fhir/Observation", json=observation, headers={**FHIR_JSON, **admin})
    assert made.status_code == 201, made.text
    return {"patient": patient_id, "observation": made.json()["id"]}


def _secrets(original: pydicom.Dataset, loaded: dict[str, Any]) -> list[bytes]:
    values = [
        "DOE", "Jane", PATIENT_ID, BIRTH, "1975-03-14", "ACC-98765", "OLD-123", "555-0100",
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID,
        loaded["patient"], loaded["observation"],
    ]  # fmt: skip
    return [v.encode() for v in values]


def _assert_clean(body: bytes, original: pydicom.Dataset, loaded: dict[str, Any]) -> None:
    leaked = [s for s in _secrets(original, loaded) if s.lower() in body.lower()]
    assert not leaked, leaked


def _researcher(tokens: dict[str, str]) -> dict[str, str]:
    return bearer(tokens["researcher"])


def _study(client: TestClient, tokens: dict[str, str]) -> dict[str, Any]:
    found = client.get(f"{DW}/studies", headers=_researcher(tokens))
    assert found.status_code == 200, found.text
    studies: list[dict[str, Any]] = found.json()
    assert len(studies) == 1
    return studies[0]


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def test_qido_answers_pseudonyms_and_no_identifier(
    secure_client: TestClient, tokens: dict[str, str], original: pydicom.Dataset,
    loaded: dict[str, Any],
) -> None:  # fmt: skip
    response = secure_client.get(f"{DW}/studies", headers=_researcher(tokens))
    assert response.status_code == 200
    _assert_clean(response.content, original, loaded)
    study = response.json()[0]
    uid = _value(study, "0020000D")
    assert uid.startswith("2.25.")
    assert "Value" not in study["00100010"]  # PatientName: zero length
    assert _value(study, "00120062") == "YES"  # PatientIdentityRemoved
    assert _value(study, "00081190").endswith(f"{DW}/studies/{uid}")  # RetrieveURL
    # the same study, the same pseudonym, on every call
    assert _value(_study(secure_client, tokens), "0020000D") == uid
    for url in (
        f"{DW}/series",
        f"{DW}/instances",
        f"{DW}/studies/{uid}/series",
        f"{DW}/studies/{uid}/instances",
        f"{DW}/partitions/default/studies",
    ):
        answer = secure_client.get(url, headers=_researcher(tokens))
        assert answer.status_code == 200, (url, answer.text)
        _assert_clean(answer.content, original, loaded)


def test_pseudonyms_lead_to_metadata_and_the_instance(
    secure_client: TestClient, tokens: dict[str, str], original: pydicom.Dataset,
    loaded: dict[str, Any],
) -> None:  # fmt: skip
    headers = _researcher(tokens)
    study = _value(_study(secure_client, tokens), "0020000D")
    series_list = secure_client.get(f"{DW}/studies/{study}/series", headers=headers).json()
    series = _value(series_list[0], "0020000E")
    instances = secure_client.get(
        f"{DW}/studies/{study}/series/{series}/instances", headers=headers
    ).json()
    sop = _value(instances[0], "00080018")
    for url in (
        f"{DW}/studies/{study}/metadata",
        f"{DW}/studies/{study}/series/{series}/metadata",
        f"{DW}/studies/{study}/series/{series}/instances/{sop}/metadata",
    ):
        answer = secure_client.get(url, headers=headers)
        assert answer.status_code == 200, (url, answer.text)
        _assert_clean(answer.content, original, loaded)
        [item] = answer.json()
        assert _value(item, "00080018") == sop
        assert "BulkDataURI" not in answer.text
    retrieved = secure_client.get(
        f"{DW}/studies/{study}/series/{series}/instances/{sop}",
        headers={**headers, "Accept": "application/dicom"},
    )
    assert retrieved.status_code == 200
    assert retrieved.headers["content-type"] == "application/dicom"
    _assert_clean(retrieved.content, original, loaded)
    ds = pydicom.dcmread(io.BytesIO(retrieved.content))
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (study, series, sop)
    assert ds.PatientIdentityRemoved == "YES" and not ds.PatientName
    assert ds.StudyDescription == "CT chest follow-up"  # cleaned of the patient's name
    assert ds.PixelData == pydicom.dcmread(original.filename).PixelData  # only the header
    multipart = secure_client.get(
        f"{DW}/studies/{study}/series/{series}/instances/{sop}", headers=headers
    )
    assert multipart.status_code == 200
    assert multipart.headers["content-type"].startswith("multipart/related")
    _assert_clean(multipart.content, original, loaded)


def test_the_patient_pseudonym_finds_the_patients_studies(
    secure_client: TestClient, tokens: dict[str, str], loaded: dict[str, Any]
) -> None:
    patient = _value(_study(secure_client, tokens), "00100020")
    assert patient != PATIENT_ID
    found = secure_client.get(f"{DW}/studies?PatientID={patient}", headers=_researcher(tokens))
    assert found.status_code == 200 and found.headers["x-total-count"] == "1"
    modality = secure_client.get(f"{DW}/studies?ModalitiesInStudy=CT", headers=_researcher(tokens))
    assert modality.status_code == 200


def test_real_values_cannot_be_matched_or_probed(
    secure_client: TestClient, tokens: dict[str, str], original: pydicom.Dataset,
    loaded: dict[str, Any],
) -> None:  # fmt: skip
    headers = _researcher(tokens)
    for query in (f"PatientName={NAME}", f"PatientBirthDate={BIRTH}", "AccessionNumber=ACC*"):
        refused = secure_client.get(f"{DW}/studies?{query}", headers=headers)
        assert refused.status_code == 400, query
        assert "cannot be matched in a de-identified view" in refused.json()["message"]
    # a real UID or Patient ID given as if it were a pseudonym matches nothing
    real_uid = secure_client.get(
        f"{DW}/studies?StudyInstanceUID={original.StudyInstanceUID}", headers=headers
    )
    assert real_uid.status_code == 204
    real_id = secure_client.get(f"{DW}/studies?PatientID={PATIENT_ID}", headers=headers)
    assert real_id.status_code == 204
    in_path = secure_client.get(
        f"{DW}/studies/{original.StudyInstanceUID}/metadata", headers=headers
    )
    assert in_path.status_code == 404
    assert "is not a de-identified UID" in in_path.json()["message"]
    bad_uid = secure_client.get(f"{DW}/studies/not-a-uid/series", headers=headers)
    assert bad_uid.status_code == 400
    missing = secure_client.get(f"{DW}/partitions/nosuch/studies", headers=bearer(tokens["admin"]))
    assert missing.status_code == 404


def test_fhir_search_and_read_are_de_identified(
    secure_client: TestClient, tokens: dict[str, str], original: pydicom.Dataset,
    loaded: dict[str, Any],
) -> None:  # fmt: skip
    headers = _researcher(tokens)
    patients = secure_client.get(f"{FHIR}/Patient", headers=headers)
    assert patients.status_code == 200, patients.text
    assert patients.headers["content-type"].startswith("application/fhir+json")
    _assert_clean(patients.content, original, loaded)
    [entry] = patients.json()["entry"]
    patient = entry["resource"]
    assert patient["birthDate"] == "1975" and patient["gender"] == "female"
    assert entry["fullUrl"].endswith(f"{FHIR}/Patient/{patient['id']}")
    read = secure_client.get(f"{FHIR}/Patient/{patient['id']}", headers=headers)
    assert read.status_code == 200 and read.json()["id"] == patient["id"]
    _assert_clean(read.content, original, loaded)
    # the pseudonymous reference finds the patient's observations
    observations = secure_client.get(
        f"{FHIR}/Observation?subject=Patient/{patient['id']}", headers=headers
    )
    assert observations.status_code == 200
    _assert_clean(observations.content, original, loaded)
    [found] = observations.json()["entry"]
    assert found["resource"]["subject"] == {"reference": f"Patient/{patient['id']}"}
    for link in observations.json()["link"]:
        assert f"Patient/{patient['id']}" in link["url"].replace("%2F", "/")
    partitioned = secure_client.get(f"{FHIR}/partitions/default/Observation", headers=headers)
    assert partitioned.status_code == 200
    _assert_clean(partitioned.content, original, loaded)


def test_fhir_refuses_identifying_searches_and_real_ids(
    secure_client: TestClient, tokens: dict[str, str], loaded: dict[str, Any]
) -> None:
    headers = _researcher(tokens)
    for query in ("name=Doe", "birthdate=1975-03-14", "identifier=MRN-4711", "_sort=name"):
        refused = secure_client.get(f"{FHIR}/Patient?{query}", headers=headers)
        assert refused.status_code == 400, query
        assert refused.json()["resourceType"] == "OperationOutcome"
    by_identifier = secure_client.get(
        f"{FHIR}/Observation?subject:identifier=urn:mrn|{PATIENT_ID}", headers=headers
    )
    assert by_identifier.status_code == 400
    missing = secure_client.get(f"{FHIR}/Observation?subject:missing=false", headers=headers)
    assert missing.status_code == 200 and missing.json()["total"] == 1
    chained = secure_client.get(f"{FHIR}/Observation?subject.name=Doe", headers=headers)
    assert chained.status_code == 400
    assert "chained" in chained.json()["issue"][0]["diagnostics"]
    real = secure_client.get(f"{FHIR}/Patient/{loaded['patient']}", headers=headers)
    assert real.status_code == 404
    by_real_id = secure_client.get(
        f"{FHIR}/Observation?subject=Patient/{loaded['patient']}", headers=headers
    )
    assert by_real_id.status_code == 200 and by_real_id.json()["total"] == 0
    assert "entry" not in by_real_id.json()
    unknown = secure_client.get(f"{FHIR}/NoSuchType", headers=headers)
    assert unknown.status_code == 404


def test_who_may_use_the_views(
    secure_client: TestClient, tokens: dict[str, str], loaded: dict[str, Any]
) -> None:
    researcher = _researcher(tokens)
    # the researcher reaches no identified data ...
    assert secure_client.get("/dicomweb/studies", headers=researcher).status_code == 403
    assert secure_client.get("/fhir/Patient", headers=researcher).status_code == 403
    # ... nor another partition's de-identified data
    other = secure_client.get(f"{DW}/partitions/other/studies", headers=researcher)
    assert other.status_code == 403
    # a reader reads identified data, not the views; the admin may do both
    assert secure_client.get(f"{DW}/studies", headers=bearer(tokens["reader"])).status_code == 403
    refused = secure_client.get(f"{FHIR}/Patient", headers=bearer(tokens["reader"]))
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert secure_client.get(f"{DW}/studies", headers=bearer(tokens["admin"])).status_code == 200
    assert secure_client.get(f"{DW}/studies").status_code == 401


def test_every_de_identified_read_is_audited(
    secure_client: TestClient, secure_archive: Archive, tokens: dict[str, str],
    loaded: dict[str, Any],
) -> None:  # fmt: skip
    headers = _researcher(tokens)
    study = _value(_study(secure_client, tokens), "0020000D")
    secure_client.get(f"{DW}/studies/{study}/metadata", headers=headers)
    secure_client.get(f"{FHIR}/Patient", headers=headers)
    with secure_archive.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.operation, audit_log.c.request).where(
                audit_log.c.actor == "user-researcher"
            )
        ).all()
    requests = [r.request for r in rows if r.operation == "deid.read"]
    assert f"GET {DW}/studies" in requests
    assert f"GET {DW}/studies/{study}/metadata" in requests
    assert f"GET {FHIR}/Patient" in requests


def test_errors_name_pseudonyms_not_the_originals(
    secure_client: TestClient, tokens: dict[str, str], original: pydicom.Dataset,
    loaded: dict[str, Any],
) -> None:  # fmt: skip
    headers, admin = _researcher(tokens), bearer(tokens["admin"])
    study = _value(_study(secure_client, tokens), "0020000D")
    patient = secure_client.get(f"{FHIR}/Patient", headers=headers).json()["entry"][0]
    # deleted after their pseudonyms were handed out
    deleted = secure_client.delete(f"/dicomweb/studies/{original.StudyInstanceUID}", headers=admin)
    assert deleted.status_code == 204
    gone = secure_client.delete(f"/fhir/Patient/{loaded['patient']}", headers=admin)
    assert gone.status_code in (200, 204)
    missing = secure_client.get(f"{DW}/studies/{study}/metadata", headers=headers)
    assert missing.status_code == 404
    assert study in missing.json()["message"]
    _assert_clean(missing.content, original, loaded)
    read = secure_client.get(f"{FHIR}/Patient/{patient['resource']['id']}", headers=headers)
    assert read.status_code == 410
    _assert_clean(read.content, original, loaded)
