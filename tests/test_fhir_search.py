"""FHIR R4 search: every parameter type, modifier and prefix, chains, includes, paging,
result parameters and unknown-parameter handling, on SQLite and PostgreSQL.

Resources are written through the REST store (so their search values are indexed in
the write transaction, as in production) and searched through ``search_bundle``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fhirclient import client as smart_client
from fhirclient.models.fhirsearch import FHIRSearch
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from sqlalchemy import delete, func, select
from starlette.testclient import TestClient
from tests.conftest import LiveServer

from medlake.clinical._search_values import date_range, fold, split_escaped
from medlake.clinical.search import (
    InvalidSearchValue,
    UnknownSearchParameter,
    matching_resources,
    search_bundle,
)
from medlake.clinical.search_index import extract_values, reindex_all
from medlake.clinical.search_params import SEARCH_PARAMETERS, ElementPath
from medlake.clinical.store import delete_resource, now_ms, update_resource
from medlake.errors import InvalidInput
from medlake.index.schema import fhir_search_values
from medlake.index.writes import partition_id
from medlake.ingest.archive import Archive

BASE = "http://testserver/fhir"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _quantity(value: float, code: str, unit: str | None = None) -> dict[str, Any]:
    return {"value": value, "unit": unit or code, "system": UCUM, "code": code}


PATIENTS = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {
            "tag": [{"system": "urn:tags", "code": "vip"}],
            "profile": ["http://example.org/StructureDefinition/pat"],
            "security": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
            ],
        },
        "identifier": [
            {"system": "urn:mrn", "value": "123", "type": _coding(V2_0203, "MR")},
        ],
        "active": True,
        "name": [{"family": "Müller", "given": ["Eve"]}],
        "telecom": [
            {"system": "phone", "value": "555-1234"},
            {"system": "email", "value": "eve@example.org"},
        ],
        "gender": "female",
        "birthDate": "1980-05-03",
        "address": [{"city": "Zürich", "country": "CH"}],
        "generalPractitioner": [{"reference": "Practitioner/dr1"}],
        "managingOrganization": {"reference": "Organization/org1"},
    },
    {
        "resourceType": "Patient",
        "id": "p2",
        "identifier": [{"system": "urn:mrn", "value": "456"}],
        "active": False,
        "name": [{"family": "Smith", "given": ["Adam"]}],
        "gender": "male",
        "birthDate": "1975",
        "address": [{"city": "Bern"}],
    },
    {
        "resourceType": "Patient",
        "id": "p3",
        "name": [{"family": "Dupont", "given": ["Évelyne"]}],
        "gender": "female",
        "birthDate": "1992-11-30",
    },
]

OTHERS = [
    {
        "resourceType": "Practitioner",
        "id": "dr1",
        "identifier": [{"system": "urn:npi", "value": "999"}],
        "name": [{"family": "House", "given": ["Gregory"]}],
    },
    {"resourceType": "Organization", "id": "org1", "name": "General Hospital"},
    {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2020-03-04T08:00:00Z", "end": "2020-03-04T12:00:00Z"},
    },
    {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "category": [
            _coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")
        ],
        "code": _coding(LOINC, "8480-6", "Systolic blood pressure"),
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "effectiveDateTime": "2020-03-04T10:00:00+01:00",
        "valueQuantity": _quantity(120, "mm[Hg]", "mmHg"),
    },
    {
        "resourceType": "Observation",
        "id": "o2",
        "status": "preliminary",
        "code": _coding(LOINC, "2339-0", "Glucose [Mass/volume] in Blood"),
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2020-03-01", "end": "2020-03-10"},
        "valueQuantity": _quantity(5.4, "mmol/L"),
    },
    {
        "resourceType": "Observation",
        "id": "o3",
        "status": "final",
        "code": _coding(LOINC, "85354-9", "Blood pressure panel"),
        "subject": {"reference": "Patient/p2"},
        "effectiveDateTime": "2021-01-15",
        "component": [
            {"code": _coding(LOINC, "8480-6"), "valueQuantity": _quantity(150, "mm[Hg]")},
            {"code": _coding(LOINC, "8462-4"), "valueQuantity": _quantity(95, "mm[Hg]")},
        ],
    },
    {
        "resourceType": "Observation",
        "id": "o4",
        "status": "final",
        "code": _coding(LOINC, "94500-6"),
        "subject": {"reference": "Patient/p2"},
        "effectiveDateTime": "2021",
        "valueCodeableConcept": _coding(SNOMED, "260385009", "Negative"),
    },
    {
        "resourceType": "Observation",
        "id": "o5",
        "status": "final",
        "code": {"text": "Free text note"},
        "subject": {"identifier": {"system": "urn:mrn", "value": "789"}},
        "valueString": "Patient feels well",
    },
    {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": _coding(
            "http://terminology.hl7.org/CodeSystem/condition-clinical", "active"
        ),
        "code": _coding(SNOMED, "44054006", "Diabetes mellitus type 2"),
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": "2015-06",
    },
    {
        "resourceType": "Condition",
        "id": "c2",
        "clinicalStatus": _coding(
            "http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved"
        ),
        "code": _coding(SNOMED, "38341003", "Hypertension"),
        "subject": {"reference": "Patient/p2"},
        "onsetPeriod": {"start": "2019-01-01"},
    },
    {
        "resourceType": "Provenance",
        "id": "prov1",
        "target": [{"reference": "Observation/o1"}],
        "recorded": "2020-03-05T00:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/dr1"}}],
    },
    {
        "resourceType": "ImagingStudy",
        "id": "is1",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "started": "2020-03-04T09:30:00Z",
        "identifier": [{"system": "urn:dietf:rfc:3986", "value": "urn:oid:1.2.840.1"}],
        "endpoint": [{"reference": "Endpoint/ep1"}],
        "series": [
            {
                "uid": "1.2.840.1.1",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "DX",
                },
            }
        ],
    },
    {
        "resourceType": "DocumentReference",
        "id": "doc1",
        "status": "current",
        "subject": {"reference": "http://other.example/fhir/Patient/99"},
        "description": "Discharge summary",
        "content": [{"attachment": {"contentType": "application/pdf"}}],
    },
]


Search = Callable[..., list[str]]


@pytest.fixture
def loaded(archive: Archive) -> Archive:
    """The archive with the resources above stored through the REST store, each in a
    later millisecond than the one before (``_lastUpdated`` has millisecond precision,
    and two stores can fall in the same one: the ``_lastUpdated`` sort needs an order)."""
    for resource in [*PATIENTS, *OTHERS]:
        stored = now_ms()
        while now_ms() == stored:
            pass
        update_resource(archive, resource["resourceType"], resource["id"], resource)
    return archive


def _bundle(
    archive: Archive,
    resource_type: str | None,
    query: list[tuple[str, str]],
    *,
    strict: bool = False,
) -> dict[str, Any]:
    with archive.engine.connect() as conn:
        pid = partition_id(conn, "default", create=False)
        return search_bundle(conn, pid, resource_type, query, base_url=BASE, strict=strict)


def _refs(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        e["fullUrl"].removeprefix(BASE + "/")
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    ]


@pytest.fixture
def search(loaded: Archive) -> Search:
    """``search("Patient", "name=eve&gender=female")``: sorted ids of the matches."""

    def run(resource_type: str, query: str) -> list[str]:
        pairs = parse_qsl(query, keep_blank_values=True)
        return sorted(ref.split("/")[1] for ref in _refs(_bundle(loaded, resource_type, pairs)))

    return run


# --- token ---------------------------------------------------------------------------------------


def test_token_system_and_code_forms(search: Search) -> None:
    assert search("Patient", "identifier=urn:mrn|123") == ["p1"]
    assert search("Patient", "identifier=123") == ["p1"]
    assert search("Patient", "identifier=urn:mrn|") == ["p1", "p2"]
    assert search("Patient", "identifier=|123") == []  # "no system" does not match one with
    assert search("Patient", "identifier=urn:other|123") == []
    assert search("Observation", f"code={LOINC}|8480-6") == ["o1"]
    assert search("Encounter", "class=AMB") == ["e1"]
    assert search("ImagingStudy", "modality=DX") == ["is1"]
    assert search("ImagingStudy", "series=1.2.840.1.1") == ["is1"]


def test_token_on_booleans_codes_and_contact_points(search: Search) -> None:
    assert search("Patient", "active=true") == ["p1"]
    assert search("Patient", "active=false") == ["p2"]
    assert search("Patient", "gender=female") == ["p1", "p3"]
    assert search("Patient", "phone=555-1234") == ["p1"]
    assert search("Patient", "email=555-1234") == []
    assert search("Patient", "email=eve@example.org") == ["p1"]
    assert search("Patient", "telecom=phone|555-1234") == ["p1"]


def test_token_modifiers(search: Search) -> None:
    assert search("Patient", "gender:not=female") == ["p2"]
    # :not also matches resources without any value.
    assert search("Observation", "category:not=vital-signs") == ["o2", "o3", "o4", "o5"]
    assert search("Observation", "code:text=glucose") == ["o2"]
    assert search("Observation", "code:text=blood") == ["o1", "o2", "o3"]
    assert search("Observation", "code:text=free text") == ["o5"]
    assert search("Patient", f"identifier:of-type={V2_0203}|MR|123") == ["p1"]
    assert search("Patient", f"identifier:of-type={V2_0203}|MR|456") == []


def test_common_parameters(search: Search) -> None:
    assert search("Patient", "_id=p1,p3") == ["p1", "p3"]
    assert search("Patient", "_tag=urn:tags|vip") == ["p1"]
    assert search("Patient", "_profile=http://example.org/StructureDefinition/pat") == ["p1"]
    assert search("Patient", "_profile:below=http://example.org/") == ["p1"]
    assert search("Patient", "_profile=http://example.org/") == []
    assert search("Patient", "_profile:above=http://example.org/StructureDefinition/pat/v2") == [
        "p1"
    ]
    assert search(
        "Patient", "_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R"
    ) == ["p1"]
    assert search("Patient", "_lastUpdated=gt2000-01-01") == ["p1", "p2", "p3"]
    assert search("Patient", "_lastUpdated=lt2000") == []
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
    assert search("Patient", f"_lastUpdated=ge{tomorrow}") == []
    assert search("Patient", f"_lastUpdated=le{tomorrow}") == ["p1", "p2", "p3"]


# --- string --------------------------------------------------------------------------------------


def test_string_matching_is_prefix_case_and_accent_insensitive(search: Search) -> None:
    assert search("Patient", "name=MUL") == ["p1"]
    assert search("Patient", "family=muller") == ["p1"]
    assert search("Patient", "name=ller") == []
    assert search("Patient", "given=eve") == ["p1", "p3"]  # Eve, Évelyne
    assert search("Patient", "address-city=zur") == ["p1"]
    assert search("Patient", "address=ch") == ["p1"]  # the country part
    assert search("DocumentReference", "description=discharge") == ["doc1"]


def test_string_modifiers(search: Search) -> None:
    assert search("Patient", "name:contains=ller") == ["p1"]
    assert search("Patient", "family:exact=Müller") == ["p1"]
    assert search("Patient", "family:exact=muller") == []
    assert search("Patient", "family:exact=Mül") == []
    assert search("Observation", "value-string=patient feels") == ["o5"]
    # LIKE wildcards in a value are literal characters.
    assert search("Patient", "name=%") == []
    assert search("Patient", "name:contains=_") == []


# --- date ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("1980", True),
        ("1980-05", True),
        ("1980-05-03", True),
        ("1980-05-03T10:00:00Z", False),  # a second does not contain the whole day
        ("eq1980-05-03", True),
        ("ne1980-05-03", False),
        ("ne1981", True),
        ("gt1980-05-02", True),
        ("gt1980-05-03", False),
        ("ge1980-05-03", True),
        ("ge1980-05-04", False),
        ("lt1980-05-04", True),
        ("lt1980-05-03", False),
        ("le1980-05-03", True),
        ("le1980-05-02", False),
        ("sa1980-05-02", True),
        ("sa1980-05-03", False),
        ("eb1980-05-04", True),
        ("eb1980-05-03", False),
        ("ap1980-05-03", True),
    ],
)
def test_date_prefixes_against_a_day(search: Search, value: str, matches: bool) -> None:
    assert ("p1" in search("Patient", f"birthdate={value}")) is matches


def test_date_partial_values_and_precision(search: Search) -> None:
    assert search("Patient", "birthdate=1975") == ["p2"]
    assert search("Patient", "birthdate=1975-06") == []  # a year is not within one month
    assert search("Patient", "birthdate=ge1975-06") == ["p1", "p2", "p3"]  # 1975 ends after
    assert search("Patient", "birthdate=ap1980-05-03") == ["p1", "p2"]  # 10% of ~46 years
    assert search("Observation", "date=2020-03") == ["o1", "o2"]
    assert search("Observation", "date=2020-03-04") == ["o1"]  # o2's period is longer
    assert search("Observation", "date=2021") == ["o3", "o4"]


def test_date_time_zones(search: Search) -> None:
    # o1 was taken at 10:00+01:00, which is 09:00 UTC.
    assert search("Observation", "date=2020-03-04T09:00:00Z") == ["o1"]
    assert search("Observation", "date=2020-03-04T10:00:00%2B01:00") == ["o1"]
    # A "+" left unencoded by the client arrives as a space; it still means the zone.
    assert search("Observation", "date=2020-03-04T10:00:00+01:00") == ["o1"]
    assert search("Observation", "date=2020-03-04T04:00:00-05:00") == ["o1"]
    assert search("Observation", "date=2020-03-04T10:00:00Z") == []
    assert search("Observation", "date=2020-03-04T09:00") == ["o1"]  # minute precision
    # o1 is that very second, not after it; o2's period reaches past it on both sides.
    assert search("Observation", "date=gt2020-03-04T09:00:00Z&date=lt2020-03-05") == ["o2"]
    assert search("Encounter", "date=ge2020-03-04T11:00:00Z") == ["e1"]  # ends after


def test_date_periods_with_open_ends(search: Search) -> None:
    # c2 started 2019-01-01 and has no end.
    assert search("Condition", "onset-date=ge2099") == ["c2"]
    assert search("Condition", "onset-date=lt2018") == ["c1"]  # c2 starts in 2019
    assert search("Condition", "onset-date=sa2018-12-31") == ["c2"]
    assert search("Condition", "onset-date=2015") == ["c1"]
    assert search("Condition", "onset-date=eb2016") == ["c1"]


# --- number / quantity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("5.4", True),
        ("5.40", True),
        ("5", True),  # 5 means [4.5, 5.5)
        ("5.0", False),  # [4.95, 5.05)
        ("5.35", False),
        ("54e-1", True),
        ("gt5", True),
        ("gt5.4", False),
        ("ge5.4", True),
        ("lt5.4", False),
        ("lt6", True),
        ("le5.4", True),
        ("ne5.4", False),
        ("ne6", True),
        ("ap5", True),  # within 10%
        ("ap6.5", False),
        ("sa5", True),
        ("eb5", False),
        (f"5.4|{UCUM}|mmol/L", True),
        (f"5.4|{UCUM}|mg/dL", False),
        ("5.4||mmol/L", True),
        ("5.4|http://other.example|mmol/L", False),
    ],
)
def test_quantity_prefixes_and_precision(search: Search, value: str, matches: bool) -> None:
    assert ("o2" in search("Observation", f"value-quantity={value}")) is matches


def test_quantity_unit_text_and_exponent(search: Search) -> None:
    assert search("Observation", "value-quantity=120||mmHg") == ["o1"]  # the human unit
    assert search("Observation", "value-quantity=1.2e2") == ["o1"]  # [115, 125)
    assert search("Observation", "value-quantity=1.20e2") == ["o1"]
    assert search("Observation", "value-quantity=1.3e2") == []
    assert search("Observation", "component-value-quantity=gt100") == ["o3"]
    assert search("Observation", "combo-value-quantity=ge120") == ["o1", "o3"]


# --- reference, chains ---------------------------------------------------------------------------


def test_reference_forms(search: Search) -> None:
    assert search("Observation", "subject=Patient/p1") == ["o1", "o2"]
    assert search("Observation", "subject=p1") == ["o1", "o2"]
    assert search("Observation", "patient=p2") == ["o3", "o4"]
    assert search("Observation", "subject:Patient=p1") == ["o1", "o2"]
    assert search("Observation", "subject:Group=p1") == []
    assert search("Observation", f"subject={BASE}/Patient/p1") == ["o1", "o2"]
    assert search("Observation", "subject=Patient/p1/_history/1") == ["o1", "o2"]
    assert search("Observation", "subject:identifier=urn:mrn|789") == ["o5"]
    assert search("DocumentReference", "subject=http://other.example/fhir/Patient/99") == ["doc1"]
    assert search("DocumentReference", "subject=Patient/99") == []
    assert search("Patient", "general-practitioner=dr1") == ["p1"]
    assert search("ImagingStudy", "endpoint=Endpoint/ep1") == ["is1"]
    assert search("Provenance", "target=Observation/o1") == ["prov1"]


def test_missing_modifier(search: Search) -> None:
    assert search("Observation", "encounter:missing=false") == ["o1"]
    assert search("Observation", "encounter:missing=true") == ["o2", "o3", "o4", "o5"]
    assert search("Patient", "birthdate:missing=true") == []
    assert search("Patient", "identifier:missing=true") == ["p3"]


def test_chained_parameters(search: Search) -> None:
    assert search("Observation", "subject:Patient.name=eve") == ["o1", "o2"]
    assert search("Observation", "patient.identifier=urn:mrn|456") == ["o3", "o4"]
    assert search("Observation", "subject.family:exact=Smith") == ["o3", "o4"]
    assert search("Observation", "patient.general-practitioner.name=house") == ["o1", "o2"]
    assert search("Observation", "encounter.status=finished") == ["o1"]
    assert search("Observation", "patient.name=nobody") == []


def test_reverse_chaining(search: Search) -> None:
    assert search("Patient", "_has:Observation:patient:code=8480-6") == ["p1"]
    assert search("Patient", "_has:Observation:patient:component-code=8480-6") == ["p2"]
    assert search("Patient", "_has:Condition:subject:clinical-status=resolved") == ["p2"]
    assert search("Observation", "_has:Provenance:target:agent=Practitioner/dr1") == ["o1"]


def test_composite_parameters(search: Search) -> None:
    assert search("Observation", f"code-value-quantity={LOINC}|8480-6$gt100") == ["o1"]
    assert search("Observation", f"code-value-quantity={LOINC}|8480-6$lt100") == []
    assert search("Observation", "code-value-quantity=8480-6$120") == ["o1"]
    # The code and the value must come from the same component.
    assert search("Observation", f"component-code-value-quantity={LOINC}|8462-4$gt90") == ["o3"]
    assert search("Observation", f"component-code-value-quantity={LOINC}|8462-4$gt100") == []
    assert search("Observation", f"combo-code-value-quantity={LOINC}|8480-6$ge120") == [
        "o1",
        "o3",
    ]
    assert search("Observation", f"code-value-concept=94500-6${SNOMED}|260385009") == ["o4"]


def test_or_within_a_value_and_across_repeats(search: Search) -> None:
    assert search("Patient", "gender=male,female") == ["p1", "p2", "p3"]
    assert search("Patient", "name=adam,dupont") == ["p2", "p3"]
    assert search("Patient", "given=eve&family=dupont") == ["p3"]
    assert search("Patient", "name=eve&name=muller") == ["p1"]
    assert search("Observation", "status=final&code=8480-6,94500-6") == ["o1", "o4"]
    # An escaped comma is part of the value, not an OR.
    assert search("Patient", "family=a\\,b") == []


# --- sorting and paging --------------------------------------------------------------------------


def _order(archive: Archive, resource_type: str, query: str) -> list[str]:
    bundle = _bundle(archive, resource_type, parse_qsl(query))
    return [ref.split("/")[1] for ref in _refs(bundle)]


def test_sort_keys_directions_and_ties(loaded: Archive) -> None:
    assert _order(loaded, "Patient", "_sort=birthdate") == ["p2", "p1", "p3"]
    assert _order(loaded, "Patient", "_sort=-birthdate") == ["p3", "p1", "p2"]
    assert _order(loaded, "Patient", "_sort=family") == ["p3", "p1", "p2"]
    assert _order(loaded, "Patient", "_sort=gender,-birthdate") == ["p3", "p1", "p2"]
    assert _order(loaded, "Patient", "_sort=-_id") == ["p3", "p2", "p1"]
    assert _order(loaded, "Observation", "_sort=status,_id") == ["o1", "o3", "o4", "o5", "o2"]
    # Resources without a value come last in both directions.
    assert _order(loaded, "Observation", "_sort=date")[-1] == "o5"
    assert _order(loaded, "Observation", "_sort=-date")[-1] == "o5"
    assert _order(loaded, "Observation", "_sort=-_lastUpdated")[0] == "o5"
    assert _order(loaded, "Observation", "_sort=subject,-_id") == ["o2", "o1", "o4", "o3", "o5"]


def test_paging_links_walk_every_match_once(loaded: Archive) -> None:
    for number in range(7):
        update_resource(
            loaded,
            "Observation",
            f"lab{number}",
            {
                "resourceType": "Observation",
                "id": f"lab{number}",
                "status": "final",
                "code": _coding(LOINC, "2339-0"),
                "subject": {"reference": "Patient/p3"},
            },
        )
    query = [("patient", "Patient/p3"), ("_count", "3"), ("_sort", "-_id")]
    bundle = _bundle(loaded, "Observation", query)
    assert bundle["total"] == 7
    seen: list[str] = []
    pages = 0
    while True:
        pages += 1
        seen.extend(_refs(bundle))
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert links["self"].startswith(f"{BASE}/Observation?")
        if pages > 1:
            assert "previous" in links
        if "next" not in links:
            break
        url = urlsplit(links["next"])
        bundle = _bundle(loaded, "Observation", parse_qsl(url.query))
    assert pages == 3
    assert seen == [f"Observation/lab{n}" for n in range(6, -1, -1)]
    assert "_offset=6" in links["last"]


def test_count_limits(loaded: Archive) -> None:
    bundle = _bundle(loaded, "Patient", [("_count", "1")])
    assert len(_refs(bundle)) == 1 and bundle["total"] == 3
    bundle = _bundle(loaded, "Patient", [("_count", "100000")])
    assert "_count=1000" in bundle["link"][0]["url"]
    with pytest.raises(InvalidSearchValue):
        _bundle(loaded, "Patient", [("_count", "-1")])


# --- includes ------------------------------------------------------------------------------------


def test_include_and_revinclude(loaded: Archive) -> None:
    bundle = _bundle(loaded, "Observation", [("_id", "o1"), ("_include", "Observation:subject")])
    assert _refs(bundle) == ["Observation/o1"]
    assert _refs(bundle, "include") == ["Patient/p1"]
    assert bundle["total"] == 1  # included resources are not counted

    bundle = _bundle(
        loaded, "Observation", [("_id", "o1"), ("_include", "Observation:subject:Practitioner")]
    )
    assert _refs(bundle, "include") == []

    bundle = _bundle(loaded, "Observation", [("_id", "o1"), ("_include", "Observation:*")])
    assert sorted(_refs(bundle, "include")) == ["Encounter/e1", "Patient/p1"]

    bundle = _bundle(loaded, "Patient", [("_id", "p1"), ("_revinclude", "Observation:patient")])
    assert sorted(_refs(bundle, "include")) == ["Observation/o1", "Observation/o2"]


def test_iterated_includes(loaded: Archive) -> None:
    bundle = _bundle(
        loaded,
        "Observation",
        [
            ("_id", "o1"),
            ("_include", "Observation:subject"),
            ("_include:iterate", "Patient:general-practitioner"),
        ],
    )
    assert _refs(bundle, "include") == ["Patient/p1", "Practitioner/dr1"]

    bundle = _bundle(
        loaded,
        "Patient",
        [
            ("_id", "p1"),
            ("_revinclude", "Observation:subject"),
            ("_revinclude:iterate", "Provenance:target"),
        ],
    )
    assert sorted(_refs(bundle, "include")) == [
        "Observation/o1",
        "Observation/o2",
        "Provenance/prov1",
    ]
    # Without :iterate the Provenance (which points at an included resource) stays out.
    bundle = _bundle(
        loaded,
        "Patient",
        [
            ("_id", "p1"),
            ("_revinclude", "Observation:subject"),
            ("_revinclude", "Provenance:target"),
        ],
    )
    assert "Provenance/prov1" not in _refs(bundle, "include")


def test_include_of_an_unknown_parameter_is_an_error(loaded: Archive) -> None:
    with pytest.raises(InvalidSearchValue, match="no reference parameter"):
        _bundle(loaded, "Observation", [("_include", "Observation:status")])


# --- result parameters ---------------------------------------------------------------------------


def test_summary_count_total_and_elements(loaded: Archive) -> None:
    bundle = _bundle(loaded, "Patient", [("gender", "female"), ("_summary", "count")])
    assert bundle["total"] == 2
    assert "entry" not in bundle

    bundle = _bundle(loaded, "Patient", [("_total", "none")])
    assert "total" not in bundle and len(_refs(bundle)) == 3

    bundle = _bundle(loaded, "Patient", [("_id", "p1"), ("_elements", "gender,birthDate")])
    resource = bundle["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "gender", "birthDate"}
    assert any(tag["code"] == "SUBSETTED" for tag in resource["meta"]["tag"])
    assert any(tag["code"] == "vip" for tag in resource["meta"]["tag"])

    bundle = _bundle(loaded, "Patient", [("_id", "p1"), ("_summary", "true")])
    resource = bundle["entry"][0]["resource"]
    assert resource["name"] == PATIENTS[0]["name"]
    assert "generalPractitioner" not in resource  # not a summary element
    assert any(tag["code"] == "SUBSETTED" for tag in resource["meta"]["tag"])


def test_bundle_shape(loaded: Archive) -> None:
    bundle = _bundle(loaded, "Patient", [("_id", "p1")])
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    entry = bundle["entry"][0]
    assert entry["fullUrl"] == f"{BASE}/Patient/p1"
    assert entry["resource"]["id"] == "p1"
    assert entry["search"] == {"mode": "match"}


def test_search_across_all_types(loaded: Archive) -> None:
    bundle = _bundle(loaded, None, [("_id", "p1,o1,e1"), ("_type", "Patient,Observation")])
    assert sorted(_refs(bundle)) == ["Observation/o1", "Patient/p1"]
    bundle = _bundle(loaded, None, [("_tag", "urn:tags|vip")])
    assert _refs(bundle) == ["Patient/p1"]


# --- unknown parameters and bad values -----------------------------------------------------------


def test_unknown_parameter_lenient_is_reported_and_ignored(loaded: Archive) -> None:
    bundle = _bundle(loaded, "Patient", [("gender", "male"), ("shoe-size", "44")])
    assert _refs(bundle) == ["Patient/p2"]
    outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcomes) == 1
    issue = outcomes[0]["resource"]["issue"][0]
    assert issue["severity"] == "warning" and "shoe-size" in issue["diagnostics"]


def test_unknown_parameter_strict_is_an_error(loaded: Archive) -> None:
    with pytest.raises(UnknownSearchParameter, match="shoe-size") as caught:
        _bundle(loaded, "Patient", [("shoe-size", "44")], strict=True)
    assert isinstance(caught.value, InvalidInput) and caught.value.http_status == 400
    with pytest.raises(UnknownSearchParameter):
        _bundle(loaded, "Observation", [("subject.shoe-size", "44")], strict=True)
    with pytest.raises(UnknownSearchParameter):
        _bundle(loaded, "Patient", [("_sort", "shoe-size")], strict=True)


@pytest.mark.parametrize(
    ("resource_type", "key", "value"),
    [
        ("Patient", "birthdate", "yesterday"),
        ("Patient", "birthdate", "1980-13"),
        ("Observation", "value-quantity", "lots"),
        ("Patient", "name:below", "x"),  # unsupported modifier: an error even when lenient
        ("Patient", "gender:missing", "maybe"),
        ("Observation", "subject:Medication", "x"),  # not a target
        ("Observation", "code-value-quantity", "8480-6"),  # composite needs both parts
        ("Patient", "_summary", "everything"),
        ("Observation", "status.name", "x"),  # only references chain
    ],
)
def test_malformed_values_are_400(
    loaded: Archive, resource_type: str, key: str, value: str
) -> None:
    with pytest.raises(InvalidSearchValue) as caught:
        _bundle(loaded, resource_type, [(key, value)])
    assert caught.value.http_status == 400


# --- conditional matching, index lifecycle -------------------------------------------------------


def test_matching_resources(loaded: Archive) -> None:
    with loaded.engine.connect() as conn:
        pid = partition_id(conn, "default", create=False)
        found = matching_resources(conn, pid, "Patient", [("identifier", "urn:mrn|123")])
        both = matching_resources(conn, pid, "Patient", [("gender", "female"), ("_count", "1")])
        none = matching_resources(conn, pid, "Patient", [("identifier", "urn:mrn|000")])
        with pytest.raises(UnknownSearchParameter):
            matching_resources(conn, pid, "Patient", [("shoe-size", "44")])
    assert len(found) == 1 and len(both) == 2 and none == []


def test_values_follow_updates_and_deletes(loaded: Archive, search: Search) -> None:
    renamed = {**PATIENTS[0], "name": [{"family": "Schmidt", "given": ["Eva"]}]}
    update_resource(loaded, "Patient", "p1", renamed)
    assert search("Patient", "family=muller") == []
    assert search("Patient", "family=schmidt") == ["p1"]
    delete_resource(loaded, "Observation", "o1")
    assert search("Observation", "code=8480-6") == []
    assert search("Patient", "_has:Observation:patient:code=8480-6") == []


def test_reindex_all_rebuilds_the_values(loaded: Archive, search: Search) -> None:
    with loaded.engine.begin() as conn:
        before = conn.execute(select(func.count()).select_from(fhir_search_values)).scalar_one()
        conn.execute(delete(fhir_search_values))
    assert search("Patient", "family=muller") == []
    indexed = reindex_all(loaded.engine, batch_size=4)
    assert indexed == len(PATIENTS) + len(OTHERS)
    with loaded.engine.connect() as conn:
        after = conn.execute(select(func.count()).select_from(fhir_search_values)).scalar_one()
    assert after == before
    assert search("Patient", "family=muller") == ["p1"]


# --- building blocks (no database) ---------------------------------------------------------------


def test_date_ranges_follow_precision_and_zone() -> None:
    utc = dt.UTC
    assert date_range("2020") == (
        dt.datetime(2020, 1, 1, tzinfo=utc),
        dt.datetime(2021, 1, 1, tzinfo=utc),
    )
    assert date_range("2020-12") == (
        dt.datetime(2020, 12, 1, tzinfo=utc),
        dt.datetime(2021, 1, 1, tzinfo=utc),
    )
    assert date_range("2020-02-28T23:30:00.5-01:00") == (
        dt.datetime(2020, 2, 29, 0, 30, 0, 500000, tzinfo=utc),
        dt.datetime(2020, 2, 29, 0, 30, 0, 600000, tzinfo=utc),
    )
    assert date_range("2020-02-30") is None
    assert date_range("20200101") is None


def test_folding_and_escapes() -> None:
    assert fold("  Évelyne   MÜLLER ") == "evelyne muller"
    assert split_escaped("a\\,b,c", ",") == ["a,b", "c"]
    assert split_escaped("x|y\\|z", "|") == ["x", "y|z"]
    assert split_escaped("a\\$b$c", ",") == ["a\\$b$c"]


def test_element_paths_and_parameter_table() -> None:
    path = ElementPath.parse("Patient.telecom(system=email)")
    resource = {"telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "e"}]}
    assert path.evaluate(resource) == [{"system": "email", "value": "e"}]
    for resource_type in (
        "Patient", "Encounter", "Observation", "Condition", "Procedure", "MedicationRequest",
        "DiagnosticReport", "ImagingStudy", "DocumentReference", "AuditEvent", "Provenance",
        "Consent", "ServiceRequest", "Group",
    ):  # fmt: skip
        table = SEARCH_PARAMETERS[resource_type]
        assert {"_id", "_lastUpdated", "_tag", "_profile", "_security"} <= set(table)
    patient = SEARCH_PARAMETERS["Patient"]
    assert patient["general-practitioner"].targets == (
        "Practitioner",
        "Organization",
        "PractitionerRole",
    )
    assert SEARCH_PARAMETERS["Observation"]["code-value-quantity"].type == "composite"
    assert SEARCH_PARAMETERS["ImagingStudy"]["started"].type == "date"


def test_patient_parameter_only_keeps_patient_references() -> None:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Group/g1"},
    }
    params = {row["param"] for row in extract_values(observation)}
    assert "subject" in params and "patient" not in params


# --- over HTTP -----------------------------------------------------------------------------------


def test_http_search_with_chain_include_and_paging(loaded: Archive, client: TestClient) -> None:
    response = client.get(
        "/fhir/Observation",
        params=[
            ("subject:Patient.name", "eve"),
            ("_include", "Observation:subject"),
            ("_sort", "_id"),
            ("_count", "1"),
        ],
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    assert bundle["total"] == 2
    assert _refs(bundle) == ["Observation/o1"]
    assert _refs(bundle, "include") == ["Patient/p1"]
    next_url = {link["relation"]: link["url"] for link in bundle["link"]}["next"]
    second = client.get(next_url).json()
    assert _refs(second) == ["Observation/o2"]
    assert "next" not in {link["relation"] for link in second["link"]}


def test_http_unknown_parameter_handling(loaded: Archive, client: TestClient) -> None:
    lenient = client.get("/fhir/Patient?shoe-size=44&gender=male")
    assert lenient.status_code == 200
    assert _refs(lenient.json()) == ["Patient/p2"]
    assert _refs(lenient.json(), "outcome")  # the warning entry
    strict = client.get("/fhir/Patient?shoe-size=44", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    outcome = strict.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "shoe-size" in outcome["issue"][0]["diagnostics"]
    bad_date = client.get("/fhir/Patient?birthdate=someday")
    assert bad_date.status_code == 400
    assert bad_date.json()["resourceType"] == "OperationOutcome"


def test_http_search_by_post(loaded: Archive, client: TestClient) -> None:
    response = client.post(
        "/fhir/Patient/_search",
        data={"family": "müller"},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert _refs(response.json()) == ["Patient/p1"]


def test_fhirclient_follows_the_paging_links(loaded: Archive, live_server: LiveServer) -> None:
    server = smart_client.FHIRClient(
        settings={"app_id": "medlake-tests", "api_base": f"{live_server.url}/fhir/"}
    ).server
    search = FHIRSearch(Patient, {"_count": "1", "_sort": "birthdate"})
    pages = list(search.perform_iter(server))
    assert len(pages) == 3
    names = [entry.resource.name[0].family for page in pages for entry in page.entry]
    assert names == ["Smith", "Müller", "Dupont"]
    found = FHIRSearch(Observation, {"patient.identifier": "urn:mrn|456"}).perform_resources_iter(
        server
    )
    assert sorted(observation.id for observation in found) == ["o3", "o4"]


def test_http_search_keeps_decimals_as_written(client: TestClient) -> None:
    """A decimal is served by search exactly as it was written (FHIR decimals carry
    their precision), the same as a read serves it."""
    body = (
        '{"resourceType": "Observation", "status": "final",'
        ' "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},'
        ' "valueQuantity": {"value": 72.50, "unit": "kg"}}'
    )
    created = client.post(
        "/fhir/Observation", content=body, headers={"Content-Type": "application/fhir+json"}
    )
    assert created.status_code == 201, created.text
    found = client.get("/fhir/Observation?code=http://loinc.org|29463-7")
    assert found.status_code == 200
    assert '"value":72.50' in found.text.replace(" ", "")
