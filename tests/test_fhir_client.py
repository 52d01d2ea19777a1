"""A real FHIR client against a running server: SMART on FHIR's ``fhirclient`` (whose
models are generated from FHIR R4 4.0.1) creates, reads, searches, updates and deletes
a Patient and an Observation through medlake's /fhir over HTTP."""

from __future__ import annotations

import pytest
from fhirclient import client as smart_client
from fhirclient.models.capabilitystatement import CapabilityStatement
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException
from requests import HTTPError
from tests.conftest import LiveServer

MRN = "http://hospital.example/mrn"


def connect(live_server: LiveServer) -> smart_client.FHIRClient:
    return smart_client.FHIRClient(
        settings={"app_id": "medlake-tests", "api_base": f"{live_server.url}/fhir/"}
    )


def test_capability_statement_parses_as_r4(live_server: LiveServer) -> None:
    smart = connect(live_server)
    smart.prepare()  # reads /metadata into the client's R4 CapabilityStatement model
    statement = smart.server.capabilityStatement
    assert isinstance(statement, CapabilityStatement)
    assert statement.fhirVersion == "4.0.1"
    types = {resource.type for resource in statement.rest[0].resource}
    assert {"Patient", "Observation", "Encounter", "ImagingStudy"} <= types


def test_patient_and_observation_through_fhirclient(live_server: LiveServer) -> None:
    server = connect(live_server).server
    new_patient = Patient(
        {
            "resourceType": "Patient",
            "identifier": [{"system": MRN, "value": "fc-1"}],
            "name": [{"family": "Nakamura", "given": ["Yui"]}],
            "gender": "female",
            "birthDate": "1990-07-21",
        }
    )
    created = new_patient.create(server)
    assert created is not None
    pid = created["id"]

    read_back = Patient.read(pid, server)
    assert read_back.name[0].family == "Nakamura"
    assert read_back.birthDate.isostring == "1990-07-21"
    assert read_back.meta.versionId == "1"

    new_obs = Observation(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": "2024-03-01T08:00:00Z",
            "valueQuantity": {
                "value": 61.5,
                "unit": "kg",
                "system": "http://unitsofmeasure.org",
                "code": "kg",
            },
        }
    )
    obs_id = new_obs.create(server)["id"]

    found = list(Patient.where({"identifier": f"{MRN}|fc-1"}).perform_resources_iter(server))
    assert [p.id for p in found] == [pid]
    by_subject = list(
        Observation.where({"subject": f"Patient/{pid}"}).perform_resources_iter(server)
    )
    assert [o.id for o in by_subject] == [obs_id]
    assert by_subject[0].valueQuantity.value == 61.5

    read_back.gender = "other"
    updated = read_back.update(server)
    assert updated["meta"]["versionId"] == "2"
    assert Patient.read(pid, server).gender == "other"

    obs = Observation.read(obs_id, server)
    obs.status = "amended"
    obs.update(server)
    assert Observation.read(obs_id, server).status == "amended"

    obs.delete(server)
    with pytest.raises(HTTPError) as gone:
        Observation.read(obs_id, server)
    assert gone.value.response.status_code == 410
    with pytest.raises(FHIRNotFoundException):
        Patient.read("does-not-exist", server)
