"""Cohort queries: patients, studies and series found by clinical and imaging criteria
together, through the Python API, ``POST|GET /cohorts`` and ``medlake cohort``; CSV and
Parquet downloads read by pandas, pyarrow and DuckDB.

The fixture holds patients who each miss the example query by one criterion:
"CT chest studies of patients with diabetes (SNOMED 44054006) and an HbA1c > 7 %
observed within 90 days before the study"."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from tests.cohort_support import (
    DIABETES,
    HBA1C,
    HYPERTENSION,
    LOINC,
    SNOMED,
    condition,
    dicom_study,
    observation,
    patient,
    study_uid_of,
)
from tests.conftest import StowCall
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.clinical.cohort import find_cohort
from medlake.clinical.imaging_study import sync_imaging_studies
from medlake.clinical.store import create_resource
from medlake.config import Settings
from medlake.ingest.archive import Archive

SYSTEM = "urn:medlake:default:patient-id"
EXAMPLE: dict[str, Any] = {
    "level": "studies",
    "where": {
        "all": [
            {"series": {"modality": "CT", "bodyPart": "CHEST"}},
            {"resource": "Condition", "code": f"{SNOMED}|{DIABETES}"},
            {
                "resource": "Observation",
                "code": f"{LOINC}|{HBA1C}",
                "value": {"gt": 7, "unit": "%"},
                "within": {"days": 90, "before": "study"},
            },
        ]
    },
}


@dataclass
class Cohort:
    """Study UIDs by name, and the FHIR Patient id of each patient."""

    studies: dict[str, str]
    patients: dict[str, str]

    def uids(self, *names: str) -> set[str]:
        return {self.studies[n] for n in names}


#: name -> (study date, modality, body part, condition code, (HbA1c value, unit, date) or None)
PEOPLE: dict[str, list[tuple[str, str, str, str, tuple[float, str, str] | None]]] = {
    "match": [("20240601", "CT", "CHEST", DIABETES, (8.1, "%", "2024-05-02"))],
    "not_above_7": [("20240601", "CT", "CHEST", DIABETES, (7.0, "%", "2024-05-02"))],
    "91_days": [("20240601", "CT", "CHEST", DIABETES, (8.0, "%", "2024-03-02"))],
    "90_days": [("20240601", "CT", "CHEST", DIABETES, (7.5, "%", "2024-03-03"))],
    "mr": [("20240601", "MR", "CHEST", DIABETES, (8.1, "%", "2024-05-02"))],
    "hypertension": [("20240601", "CT", "CHEST", HYPERTENSION, (8.1, "%", "2024-05-02"))],
    "after_study": [("20240601", "CT", "CHEST", DIABETES, (9.0, "%", "2024-06-06"))],
    "head": [("20240601", "CT", "HEAD", DIABETES, (8.1, "%", "2024-05-02"))],
    "other_unit": [("20240601", "CT", "CHEST", DIABETES, (64.0, "mmol/mol", "2024-05-02"))],
    # Two studies a year apart: the HbA1c is near the first only.
    "twice": [
        ("20240601", "CT", "CHEST", DIABETES, (8.0, "%", "2024-05-12")),
        ("20250601", "CT", "CHEST", DIABETES, None),
    ],
}


@pytest.fixture
def cohort(archive: Archive, stow: StowCall, tmp_path: Path) -> Cohort:
    files: list[Path] = []
    studies: dict[str, str] = {}
    patients: dict[str, str] = {}
    for n, (name, visits) in enumerate(PEOPLE.items()):
        mrn = f"MRN-{n:03d}"
        born = "1950-01-01" if n % 2 else "1990-01-01"
        gender = "male" if n % 2 else "female"
        made = create_resource(archive, patient((SYSTEM, mrn), gender=gender, birthDate=born))
        patients[name] = made.id
        for v, (date, modality, body_part, code, hba1c) in enumerate(visits):
            create_resource(archive, condition(made.id, code))
            if hba1c is not None:
                value, unit, when = hba1c
                create_resource(archive, observation(made.id, HBA1C, value, unit, when))
            study = dicom_study(
                tmp_path / name / str(v), patient_id=mrn, study_date=date, modality=modality,
                body_part=body_part, description=f"{modality} {body_part}",
            )  # fmt: skip
            studies[name if v == 0 else f"{name}_{v}"] = study_uid_of(study)
            files += study
    assert stow(files).status_code == 200
    report = sync_imaging_studies(archive)
    assert report.failed == [] and report.patients_created == 0
    return Cohort(studies, patients)


EXPECTED = ("match", "90_days", "twice")


def test_the_example_query_returns_exactly_the_right_studies(
    archive: Archive, cohort: Cohort
) -> None:
    result = find_cohort(archive, EXAMPLE)

    assert {row["study_uid"] for row in result.rows} == cohort.uids(*EXPECTED)
    assert (result.counts.patients, result.counts.studies) == (3, 3)
    assert (result.counts.series, result.counts.instances) == (3, 6)
    row = next(r for r in result.rows if r["study_uid"] == cohort.studies["match"])
    assert row["patient"] == cohort.patients["match"]
    assert row["patient_id"] == "MRN-000"
    assert row["modalities"] == ["CT"]
    assert row["imaging_study"] == f"ImagingStudy/{cohort.studies['match']}"
    assert row["dicomweb_url"] == (
        f"{archive.settings.resolved_public_base_url}/dicomweb/studies/{cohort.studies['match']}"
    )


def test_each_level_counts_and_pages(archive: Archive, cohort: Cohort) -> None:
    series = find_cohort(archive, {**EXAMPLE, "level": "series"})
    assert {r["study_uid"] for r in series.rows} == cohort.uids(*EXPECTED)
    assert all(r["dicomweb_url"].endswith(f"/series/{r['series_uid']}") for r in series.rows)
    assert {r["body_part"] for r in series.rows} == {"CHEST"}

    people = find_cohort(archive, {**EXAMPLE, "level": "patients"})
    assert {r["patient"] for r in people.rows} == {cohort.patients[n] for n in EXPECTED}
    assert all(r["studies"] == 1 for r in people.rows)  # "twice": only its first study
    assert people.counts.studies == 3

    page = find_cohort(archive, {**EXAMPLE, "limit": 2, "offset": 1, "fields": ["study_uid"]})
    assert len(page.rows) == 2 and page.total == 3
    assert page.rows[0].keys() == {"study_uid"}


def test_boolean_combinations_and_demographics(archive: Archive, cohort: Cohort) -> None:
    def found(where: dict[str, Any], level: str = "studies") -> set[str]:
        result = find_cohort(archive, {"level": level, "where": where})
        key = "study_uid" if level == "studies" else "patient"
        return {row[key] for row in result.rows}

    diabetes = {"resource": "Condition", "code": DIABETES}  # code without system
    everyone_but = set(cohort.studies) - {"hypertension"}
    assert found(diabetes) == cohort.uids(*everyone_but)
    assert found({"all": [diabetes, {"not": {"series": {"modality": "CT"}}}]}) == cohort.uids("mr")
    assert found({"any": [{"series": {"bodyPart": "HEAD"}}, {"series": {"modality": "MR"}}]}) == (
        cohort.uids("head", "mr")
    )
    assert found({"study": {"date": {"ge": "2025"}}}) == cohort.uids("twice_1")
    assert found({"study": {"description": "ct head"}}) == cohort.uids("head")
    # Without imaging criteria, patients are found per patient (no study needed).
    high = {"resource": "Observation", "code": HBA1C, "value": {"ge": 9, "unit": "%"}}
    assert found(high, "patients") == {cohort.patients["after_study"]}
    # Odd-numbered people are men born in 1950; even-numbered, women born in 1990.
    men = {n for i, n in enumerate(PEOPLE) if i % 2}
    assert found({"patient": {"gender": "male"}}, "patients") == {cohort.patients[n] for n in men}
    old_at_study = {"patient": {"age": {"ge": 70, "at": "study"}}}
    assert found(old_at_study) == cohort.uids(*men, *(["twice_1"] if "twice" in men else []))
    young = {"patient": {"age": {"lt": 40}}}
    assert found(young, "patients") == {cohort.patients[n] for n in set(PEOPLE) - men}


def _found(archive: Archive, where: dict[str, Any], level: str = "studies") -> set[str]:
    result = find_cohort(archive, {"level": level, "where": where})
    return {row["study_uid" if level == "studies" else "patient"] for row in result.rows}


HIGH_HBA1C_BEFORE = EXAMPLE["where"]["all"][2]


def test_a_time_window_holds_for_the_same_studies_alone_combined_or_negated(
    archive: Archive, cohort: Cohort
) -> None:
    # Alone, under "any" or "not" a window is a set of studies; next to a criterion that
    # narrows the rows it is checked per remaining row: the same studies either way.
    near = {"match", "90_days", "mr", "hypertension", "head", "twice"}
    assert _found(archive, HIGH_HBA1C_BEFORE) == cohort.uids(*near)
    ct = {"series": {"modality": "CT"}}
    assert _found(archive, {"all": [ct, HIGH_HBA1C_BEFORE]}) == cohort.uids(*near - {"mr"})
    later = {"study": {"date": {"ge": "2025"}}}
    assert _found(archive, {"any": [HIGH_HBA1C_BEFORE, later]}) == cohort.uids(*near, "twice_1")
    assert _found(archive, {"not": HIGH_HBA1C_BEFORE}) == set(cohort.studies.values()) - (
        cohort.uids(*near)
    )
    # after_study's HbA1c is 5 days after its study: the study day counts as day 0.
    after = {"resource": "Observation", "code": HBA1C, "within": {"days": 5, "after": "study"}}
    assert _found(archive, after) == cohort.uids("after_study")
    assert _found(archive, {"all": [ct, after]}) == cohort.uids("after_study")
    assert _found(archive, {**after, "within": {"days": 4, "after": "study"}}) == set()
    assert _found(archive, {"all": [ct, {**after, "within": {"days": 4, "around": "study"}}]}) == (
        set()
    )


def test_codes_and_values_follow_fhir_search_semantics(archive: Archive, cohort: Cohort) -> None:
    def people(where: dict[str, Any]) -> set[str]:
        return _found(archive, where, "patients")

    def named(*names: str) -> set[str]:
        return {cohort.patients[n] for n in names}

    # Any of the codes, every comparison, the unit by UCUM code: 8 < HbA1c < 8.5 %.
    between = {"resource": "Observation", "code": [f"{LOINC}|{HBA1C}", f"{LOINC}|17856-6"],
               "value": {"gt": 8, "lt": 8.5, "unit": "%"}}  # fmt: skip
    assert people(between) == named("match", "mr", "hypertension", "head")
    assert people({**between, "search": "status=final"}) == people(between)
    assert people({**between, "search": "status=amended"}) == set()
    # "gt 8" does not match 8.0; a value without a code; the unit decides.
    assert people({"resource": "Observation", "value": {"gt": 60}}) == named("other_unit")
    assert people({"resource": "Observation", "value": {"ge": 9, "unit": "%"}}) == (
        named("after_study")
    )
    assert people({"resource": "Observation", "value": {"ge": 9, "unit": "mg/dL"}}) == set()
    # A token "|code" names a code without a system; a code of another system is another code.
    assert people({"resource": "Observation", "code": f"|{HBA1C}"}) == set()
    assert people({"resource": "Observation", "code": f"http://example.org|{HBA1C}"}) == set()
    # Demographics next to a clinical criterion (checked per remaining patient).
    men = {n for i, n in enumerate(PEOPLE) if i % 2}
    diabetic_men = {"all": [{"resource": "Condition", "code": f"{SNOMED}|{DIABETES}"},
                            {"patient": {"gender": "male"}}]}  # fmt: skip
    assert people(diabetic_men) == named(*men - {"hypertension"})


def test_post_and_get_cohorts_answer_json_csv_and_parquet(client: Any, cohort: Cohort) -> None:
    expected = cohort.uids(*EXPECTED)
    posted = client.post("/cohorts", json=EXAMPLE)
    assert posted.status_code == 200, posted.text
    assert {r["study_uid"] for r in posted.json()["rows"]} == expected
    assert posted.json()["counts"] == {"patients": 3, "studies": 3, "series": 3, "instances": 6}
    assert posted.headers["x-total-count"] == "3"

    fetched = client.get(f"/cohorts?q={quote(json.dumps(EXAMPLE))}")
    assert fetched.status_code == 200
    assert fetched.json()["rows"] == posted.json()["rows"]

    as_csv = client.post("/cohorts?format=csv", json=EXAMPLE)
    assert as_csv.headers["content-type"].startswith("text/csv")
    frame = pd.read_csv(io.BytesIO(as_csv.content))
    assert set(frame["study_uid"]) == expected
    assert set(frame["study_date"]) == {"2024-06-01"}

    as_parquet = client.get(
        f"/cohorts?q={quote(json.dumps(EXAMPLE))}",
        headers={"Accept": "application/vnd.apache.parquet"},
    )
    assert as_parquet.status_code == 200
    table = pq.read_table(io.BytesIO(as_parquet.content))
    assert set(table.column("study_uid").to_pylist()) == expected
    assert str(table.schema.field("study_date").type) == "date32[day]"
    assert table.column("instance_count").to_pylist() == [2, 2, 2]
    path = Path(cohort_file := "cohort.parquet")
    try:
        path.write_bytes(as_parquet.content)
        rows = duckdb.sql(
            f"SELECT study_uid, dicomweb_url FROM '{cohort_file}' ORDER BY study_uid"
        ).fetchall()
    finally:
        path.unlink(missing_ok=True)
    assert {uid for uid, _ in rows} == expected
    assert all(url.endswith(f"/dicomweb/studies/{uid}") for uid, url in rows)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"level": "visits"}, "level: must be one of patients, studies, series"),
        ({"where": {"resource": "Observation", "code": "x", "value": {"gt": "7%"}}},
         "where.value.gt: must be a number"),
        ({"where": {"all": [{"series": {"modality": "CT"}}, {"resource": "Conditio"}]}},
         "where.all[1].resource: 'Conditio' is not a FHIR R4 resource type"),
        ({"where": {"resource": "Condition", "within": {"days": 30, "before": "visit"}}},
         'where.within.before: must be "study"'),
        ({"where": {"resource": "Observation", "search": "colour=red"}},
         "where.search: unknown search parameter 'colour' for Observation"),
        ({"where": {"series": {"modality": "CT"}, "study": {}}}, "needs exactly one of"),
        ({"fields": ["study_uid", "shoe_size"]}, "fields: 'shoe_size' is not a studies field"),
        ({"where": {"patient": {"age": {"ge": -1}}}}, "where.patient.age.ge: must be a whole"),
    ],
)  # fmt: skip
def test_a_bad_query_is_400_naming_the_problem(client: Any, query: Any, message: str) -> None:
    body = query if isinstance(query, str) else json.dumps(query)
    response = client.post("/cohorts", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_an_unknown_partition_is_404_and_the_body_cannot_name_another(client: Any) -> None:
    response = client.post("/cohorts?partition=nowhere", json={"level": "studies"})
    assert response.status_code == 404
    assert "nowhere" in response.json()["message"]
    # Access is checked for the partition of the URL; the body may not switch to another.
    other = client.post("/cohorts", json={"partition": "research"})
    assert other.status_code == 400
    assert "give the partition as the partition parameter" in other.json()["message"]


def test_cli_writes_csv_and_parquet(
    cohort: Cohort, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    query = tmp_path / "query.json"
    query.write_text(json.dumps(EXAMPLE))
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    out = tmp_path / "cohort.parquet"
    args = ["cohort", str(query), "--data", str(settings.data), "--format", "parquet"]
    done = runner.invoke(cli, [*args, "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "3 patients, 3 studies" in done.output
    assert set(pd.read_parquet(out)["study_uid"]) == cohort.uids(*EXPECTED)

    as_csv = runner.invoke(cli, ["cohort", str(query), "--data", str(settings.data),
                                 "--format", "csv"])  # fmt: skip
    assert as_csv.exit_code == 0, as_csv.output
    frame = pd.read_csv(io.StringIO(as_csv.stdout))  # the counts line goes to stderr
    assert list(frame.columns[:4]) == ["patient_key", "patient", "patient_id", "study_uid"]
    assert set(frame["study_uid"]) == cohort.uids(*EXPECTED)

    bad = tmp_path / "bad.json"
    bad.write_text('{"level": "visits"}')
    failed = runner.invoke(cli, ["cohort", str(bad), "--data", str(settings.data)])
    assert failed.exit_code == 1
    assert "level: must be one of" in failed.output
