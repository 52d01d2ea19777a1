"""One patient across imaging and clinical data: DICOM PatientID (+ IssuerOfPatientID)
and FHIR Patient.identifier resolve to one patient key, in either order; a merge
(``Patient/$merge`` or ADT^A40) moves imaging and clinical data together."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hl7.client import MLLPClient
from tests.cohort_support import (
    DIABETES,
    SNOMED,
    condition,
    dicom_study,
    patient,
    study_uid_of,
)
from tests.conftest import StowCall
from tests.hl7_support import MllpServer, a40, adt, running_listener

from medlake.clinical.cohort import find_cohort
from medlake.clinical.imaging_study import sync_imaging_studies
from medlake.clinical.patient_identity import identifier_system
from medlake.config import Settings
from medlake.ingest.archive import Archive

MRN = "http://hospital-a.example/mrn"
DIABETIC_CT = {
    "where": {
        "all": [
            {"resource": "Condition", "code": f"{SNOMED}|{DIABETES}"},
            {"series": {"modality": "CT"}},
        ]
    }
}


def subject_of(client: Any, study_uid: str) -> str:
    response = client.get(f"/fhir/ImagingStudy/{study_uid}")
    assert response.status_code == 200, response.text
    reference: str = response.json()["subject"]["reference"]
    return reference


def test_a_fhir_patient_first_then_a_dicom_study_with_its_identifier_are_one_patient(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    archive.settings.patient_id_issuers = {"HOSP_A": MRN}
    created = client.post("/fhir/Patient", json=patient((MRN, "MRN-1"), gender="female"))
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    client.post("/fhir/Condition", json=condition(patient_id, DIABETES))

    files = dicom_study(tmp_path / "s", patient_id="MRN-1", issuer="HOSP_A", study_date="20240301")
    assert stow(files).status_code == 200
    report = sync_imaging_studies(archive)

    assert report.patients_created == 0  # the FHIR Patient was found by its identifier
    assert subject_of(client, study_uid_of(files)) == f"Patient/{patient_id}"
    result = find_cohort(archive, DIABETIC_CT)
    assert [row["study_uid"] for row in result.rows] == [study_uid_of(files)]
    assert result.rows[0]["patient"] == patient_id


def test_a_dicom_study_first_then_a_fhir_patient_with_its_identifier_are_one_patient(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    files = dicom_study(tmp_path / "s", patient_id="MRN-2", study_date="20240301")
    assert stow(files).status_code == 200
    assert sync_imaging_studies(archive).patients_created == 1
    made_from_dicom = subject_of(client, study_uid_of(files))

    # The same person registered again by a client that did not look first.
    system = "urn:medlake:default:patient-id"  # patient_id_default_system, no issuer
    again = client.post("/fhir/Patient", json=patient((system, "MRN-2"))).json()["id"]
    assert f"Patient/{again}" != made_from_dicom
    client.post("/fhir/Condition", json=condition(again, DIABETES))
    sync_imaging_studies(archive)  # the background worker does this every few seconds

    result = find_cohort(archive, DIABETIC_CT)
    assert [row["study_uid"] for row in result.rows] == [study_uid_of(files)]
    assert result.counts.patients == 1
    everyone = find_cohort(archive, {"level": "patients"})
    assert everyone.counts.patients == 1  # one patient key for both Patient records
    assert everyone.rows[0]["identifiers"] == [f"{system}|MRN-2"]


def test_a_conditional_update_by_identifier_updates_the_patient_made_from_dicom(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    files = dicom_study(tmp_path / "s", patient_id="MRN-3", study_date="20240301")
    stow(files)
    sync_imaging_studies(archive)
    subject = subject_of(client, study_uid_of(files))

    system = "urn:medlake:default:patient-id"
    updated = client.put(
        f"/fhir/Patient?identifier={system}|MRN-3",
        json=patient((system, "MRN-3"), name=[{"family": "Doe", "given": ["Jane"]}]),
    )
    assert updated.status_code == 200, updated.text
    assert f"Patient/{updated.json()['id']}" == subject
    assert client.get("/fhir/Patient").json()["total"] == 1


def test_issuer_of_patient_id_names_the_identifier_system(settings: Settings) -> None:
    settings.patient_id_issuers = {"HOSP_A": MRN}
    assert identifier_system(settings, "default", None) == "urn:medlake:default:patient-id"
    assert identifier_system(settings, "research", "") == "urn:medlake:research:patient-id"
    assert identifier_system(settings, "default", "HOSP_A") == MRN
    assert identifier_system(settings, "default", "1.2.840.99") == "urn:oid:1.2.840.99"
    assert identifier_system(settings, "default", "http://x.example/id") == "http://x.example/id"
    # As HL7 v2 reads a namespace ID, so both feeds of one hospital agree.
    assert identifier_system(settings, "default", "HOSP B") == (
        "urn:medlake:hl7v2:authority:HOSP%20B"
    )


def test_patient_merge_operation_moves_studies_and_clinical_data(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    old = dicom_study(tmp_path / "a", patient_id="MRN-OLD", study_date="20240301")
    new = dicom_study(tmp_path / "b", patient_id="MRN-NEW", study_date="20240401", modality="MR")
    stow(old)
    stow(new)
    sync_imaging_studies(archive)
    source = subject_of(client, study_uid_of(old)).split("/")[1]
    target = subject_of(client, study_uid_of(new)).split("/")[1]
    client.post("/fhir/Condition", json=condition(source, DIABETES))
    system = "urn:medlake:default:patient-id"

    response = client.post(
        "/fhir/Patient/$merge",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "source-patient-identifier",
                 "valueIdentifier": {"system": system, "value": "MRN-OLD"}},
                {"name": "target-patient", "valueReference": {"reference": f"Patient/{target}"}},
            ],
        },
    )  # fmt: skip
    assert response.status_code == 200, response.text
    out = {p["name"]: p["resource"] for p in response.json()["parameter"]}
    assert out["outcome"]["issue"][0]["severity"] == "information"
    assert {"other": {"reference": f"Patient/{source}"}, "type": "replaces"} in out["result"][
        "link"
    ]

    # Imaging side: the old study now belongs to the surviving patient.
    assert subject_of(client, study_uid_of(old)) == f"Patient/{target}"
    mine = find_cohort(archive, {"where": {"resource": "Condition", "code": DIABETES}})
    assert sorted(r["study_uid"] for r in mine.rows) == sorted(
        [study_uid_of(old), study_uid_of(new)]
    )
    assert {r["patient"] for r in mine.rows} == {target}
    # A study arriving later under the old PatientID goes to the surviving patient too.
    later = dicom_study(tmp_path / "c", patient_id="MRN-OLD", study_date="20240501")
    stow(later)
    sync_imaging_studies(archive)
    assert subject_of(client, study_uid_of(later)) == f"Patient/{target}"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ([{"name": "target-patient", "valueReference": {"reference": "Patient/x"}}],
         "give source-patient or source-patient-identifier"),
        ([{"name": "source-patient-identifier", "valueIdentifier": {"value": "NOBODY"}},
          {"name": "target-patient", "valueReference": {"reference": "Patient/x"}}],
         "source-patient-identifier names no Patient"),
        ([{"name": "surviving", "valueString": "x"}], "has no parameter 'surviving'"),
    ],
)  # fmt: skip
def test_a_bad_merge_request_is_400_saying_why(
    client: Any, parameters: list[dict[str, Any]], message: str
) -> None:
    response = client.post(
        "/fhir/Patient/$merge", json={"resourceType": "Parameters", "parameter": parameters}
    )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert message in response.json()["issue"][0]["diagnostics"]


@pytest.fixture
def mllp(archive: Archive) -> Iterator[MllpServer]:
    with running_listener(archive) as server:
        yield server


def test_adt_a40_moves_the_prior_patients_studies_to_the_surviving_patient(
    archive: Archive, client: Any, stow: StowCall, mllp: MllpServer, tmp_path: Path
) -> None:
    with MLLPClient("127.0.0.1", mllp.port) as hl7:
        hl7.send_message(adt("A01", "P-1", patient="111", visit="V1"))
        hl7.send_message(adt("A01", "P-2", patient="222", visit="V2"))
    mllp.mapper.run_pending()
    # The modality sends the hospital's MRN with the same assigning authority as PID-3.
    first = dicom_study(tmp_path / "a", patient_id="111", issuer="HOSP", study_date="20240301")
    second = dicom_study(tmp_path / "b", patient_id="222", issuer="HOSP", study_date="20240302")
    stow(first)
    stow(second)
    assert sync_imaging_studies(archive).patients_created == 0  # both came from ADT
    surviving = subject_of(client, study_uid_of(first))
    prior = subject_of(client, study_uid_of(second))
    assert surviving != prior

    with MLLPClient("127.0.0.1", mllp.port) as hl7:
        hl7.send_message(a40("P-3", surviving="111", prior="222"))
    mllp.mapper.run_pending()

    assert subject_of(client, study_uid_of(second)) == surviving
    patients = find_cohort(
        archive, {"level": "patients", "where": {"study": {"date": {"ge": "2024"}}}}
    )
    assert [row["patient"] for row in patients.rows] == [surviving.split("/")[1]]
    assert patients.rows[0]["studies"] == 2
