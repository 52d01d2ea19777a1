"""HL7 v2 -> FHIR mapping as a transaction Bundle, the validation rules behind AA/AE/AR
and the ACK's ERR segments (pure functions, no database)."""

from __future__ import annotations

from typing import Any

import pytest
from tests.hl7_support import a40, adt, msh, omi, orm, oru

from medlake.clinical.hl7 import ParsedMessage, decode_message, map_message, validate
from medlake.clinical.hl7.ack import build_ack
from medlake.clinical.hl7.errors import ErrorCode, Hl7Issue, acknowledgment_code


def parse(message: str) -> ParsedMessage:
    parsed, issues = validate(decode_message(message.encode()))
    assert issues == []
    assert parsed is not None
    return parsed


def entries(message: str, kind: str) -> list[dict[str, Any]]:
    bundle = map_message(parse(message)).bundle
    assert bundle["type"] == "transaction"
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_adt_patient_is_a_conditional_update_on_pid_3() -> None:
    (entry,) = entries(adt("A01", "X-1"), "Patient")
    assert entry["request"] == {
        "method": "PUT",
        "url": "Patient?identifier=urn:medlake:hl7v2:authority:HOSP|12345",
    }
    patient = entry["resource"]
    assert patient["identifier"][0] == {
        "type": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
        },
        "system": "urn:medlake:hl7v2:authority:HOSP",
        "value": "12345",
    }
    assert patient["identifier"][1]["system"] == "urn:oid:2.16.840.1.113883.4.1"
    assert patient["name"] == [{"family": "DOE", "given": ["JOHN", "A"]}]
    assert patient["birthDate"] == "1980-01-01"
    assert patient["gender"] == "male"
    assert patient["address"][0]["city"] == "TOWN"
    assert patient["telecom"] == [{"system": "phone", "value": "555-1234", "use": "home"}]


def test_adt_encounter_references_the_patient_entry() -> None:
    (patient,) = entries(adt("A01", "X-2"), "Patient")
    (entry,) = entries(adt("A01", "X-2"), "Encounter")
    encounter = entry["resource"]
    assert encounter["subject"] == {"reference": patient["fullUrl"]}
    assert encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "IMP"
    assert encounter["identifier"][0]["value"] == "V123"
    assert encounter["period"] == {"start": "2024-01-01T11:00:00+01:00"}  # MSH-7's offset
    assert entry["request"]["url"] == "Encounter?identifier=urn:medlake:hl7v2:authority:HOSP|V123"
    (a04,) = entries(adt("A04", "X-3"), "Encounter")
    assert a04["resource"]["status"] == "arrived"


def test_oru_values_by_type_and_a_report_of_them() -> None:
    message = oru("X-4")
    observations = [e["resource"] for e in entries(message, "Observation")]
    assert [o["code"]["coding"][0]["code"] for o in observations] == ["2093-3", "8251-1", "882-1"]
    numeric, text, coded = observations
    assert numeric["valueQuantity"]["value"] == 182
    assert numeric["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert numeric["referenceRange"] == [
        {"high": {"value": 200, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                  "code": "mg/dL"}, "text": "<200"}
    ]  # fmt: skip
    assert numeric["interpretation"][0]["coding"][0]["code"] == "N"
    assert numeric["effectiveDateTime"] == "2024-01-02T08:00:00+01:00"  # MSH-7's offset
    assert text["valueString"] == "fasting sample"
    assert coded["valueCodeableConcept"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "278149003",
        "display": "Blood group A Rh(D) positive",
    }
    (report,) = entries(message, "DiagnosticReport")
    urls = [e["fullUrl"] for e in entries(message, "Observation")]
    assert [r["reference"] for r in report["resource"]["result"]] == urls
    (patient,) = entries(message, "Patient")
    # a result message creates its patient only when unknown: it never overwrites ADT data
    assert patient["request"]["ifNoneExist"] == "identifier=urn:medlake:hl7v2:authority:HOSP|12345"


def test_orders_become_service_requests() -> None:
    (entry,) = entries(orm("X-5"), "ServiceRequest")
    request = entry["resource"]
    assert (request["status"], request["intent"]) == ("active", "order")
    assert request["code"]["coding"][0] == {
        "system": "http://www.ama-assn.org/go/cpt",
        "code": "71045",
        "display": "Chest X-ray",
    }
    assert request["identifier"][0]["value"] == "ORD777"
    assert request["authoredOn"] == "2024-01-03T09:00:00+01:00"
    assert request["requester"]["display"] == "BOB JONES"
    (imaging,) = entries(omi("X-6"), "ServiceRequest")
    identifiers = imaging["resource"]["identifier"]
    assert {
        "system": "urn:dicom:uid",
        "value": "urn:oid:1.2.826.0.1.3680043.2.1125.1",
    } in identifiers
    assert any(i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN" for i in identifiers)
    assert imaging["resource"]["priority"] == "routine"


def test_a40_names_the_merge() -> None:
    plan = map_message(parse(a40("X-7", surviving="111", prior="222")))
    (merge,) = plan.merges
    assert (merge.prior.value, merge.surviving.value) == ("222", "111")
    assert merge.prior.system == "urn:medlake:hl7v2:authority:HOSP"


def test_mapping_twice_gives_the_same_bundle() -> None:
    assert map_message(parse(oru("X-8"))).bundle == map_message(parse(oru("X-8"))).bundle


@pytest.mark.parametrize(
    ("message", "ack", "codes"),
    [
        (adt("A01", "V-1"), "AA", []),
        ("NOT HL7 AT ALL", "AR", [100]),
        ("MSH|^~\\&|A|B|C|D|2024||ADT^A01|V-2|P|2.5.1\r", "AE", [100]),  # EVN, PID, PV1 missing
        (msh("ADT^A01", "V-3").replace("^~\\&", "^~\\"), "AR", [102]),
        (msh("ADT^A01", "V-4").replace("^~\\&", "^^\\&"), "AR", [102]),
        (msh("ADT", "V-5") + "EVN|A01|2024\r", "AR", [201]),
        (msh("QRY^A19", "V-6"), "AR", [200]),
        (msh("ADT^A01", "V-7", charset="KLINGON") + "EVN|A01|2024\r", "AE", [103]),
    ],
)
def test_acknowledgement_codes(message: str, ack: str, codes: list[int]) -> None:
    _parsed, issues = validate(decode_message(message.encode()))
    assert acknowledgment_code(issues) == ack
    assert [int(i.code) for i in issues][: len(codes)] == codes


def test_err_segments_escape_the_text_with_the_message_separators() -> None:
    decoded = decode_message(msh("ADT^A01", "E-1").encode())
    issue = Hl7Issue(ErrorCode.TABLE_VALUE_NOT_FOUND, "value 'a|b^c' unknown", "PID", 1, 8)
    ack = build_ack(decoded.header, "AE", "ACK9", [issue]).decode()
    err = ack.split("\r")[2]
    assert err == (
        "ERR||PID^1^8^1|103^Table value not found^HL70357|E||||value 'a\\F\\b\\S\\c' unknown"
    )


def test_err_for_versions_before_2_5_uses_err_1() -> None:
    message = msh("ADT^A01", "E-2", version="2.3.1") + "EVN|A01|2024\rPID|1||||DOE\rPV1|1|I\r"
    decoded = decode_message(message.encode())
    _parsed, issues = validate(decoded)
    ack = build_ack(decoded.header, acknowledgment_code(issues), "ACK1", issues).decode()
    msa, err = ack.split("\r")[1:3]
    assert msa.startswith("MSA|AE|E-2|PID-3 patient identifier list is empty")
    assert err == "ERR|PID^1^3^101&Required field missing&HL70357"
