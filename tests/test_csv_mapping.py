"""CSV mapping files: patients, labs and diagnoses CSVs into FHIR resources through
``medlake ingest --mapping``, bad rows recorded with their line and reason."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from medlake.cli.main import app
from medlake.clinical.csv_mapping import load_mapping, map_rows, parse_mapping, shipped_mappings
from medlake.clinical.resources import dump_resource
from medlake.clinical.store import read_resource
from medlake.config import Settings
from medlake.errors import InvalidInput
from medlake.index.schema import batches, fhir_resources, ingest_errors
from medlake.ingest.archive import Archive

SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "csv"


@pytest.fixture
def opened(data: Path, db_url: str) -> Iterator[Callable[[], Archive]]:
    archives: list[Archive] = []

    def open_archive() -> Archive:
        archives.append(Archive.open(Settings(data=data, database_url=db_url)))
        return archives[-1]

    yield open_archive
    for archive in archives:
        archive.close()


def ingest(runner: CliRunner, data: Path, mapping: str, csv_file: Path) -> Any:
    return runner.invoke(app, ["ingest", "--data", str(data), "--mapping", mapping, str(csv_file)])


def load_samples(runner: CliRunner, data: Path) -> None:
    for name in ("patients", "labs", "diagnoses"):
        result = ingest(runner, data, name, SAMPLES / f"{name}.csv")
        assert result.exit_code == 0, result.output
        assert "reconciliation: balanced" in result.output


def resources(archive: Archive, resource_type: str) -> list[dict[str, Any]]:
    with archive.engine.connect() as conn:
        rows = conn.execute(
            select(fhir_resources.c.content).where(fhir_resources.c.resource_type == resource_type)
        ).scalars()
        return [json.loads(row) for row in rows]


def by_code(items: list[dict[str, Any]], code: str) -> dict[str, Any]:
    return next(r for r in items if r["code"]["coding"][0]["code"] == code)


def test_the_three_shapes_become_fhir_resources(
    runner: CliRunner, data: Path, opened: Callable[[], Archive]
) -> None:
    load_samples(runner, data)

    archive = opened()
    john = read_resource(archive, "Patient", "pat-002").resource() or {}
    assert john["gender"] == "male"
    assert john["birthDate"] == "1985-07-12"  # 12/07/1985, day first
    assert john["identifier"][0]["value"] == "MRN0002"
    maria = read_resource(archive, "Patient", "pat-003").resource() or {}
    assert maria["name"][0] == {"use": "official", "family": "García", "given": ["María", "José"]}
    assert maria["telecom"] == [{"system": "phone", "value": "+34-600-000-000"}]
    assert "telecom" not in john  # no phone, no email: no half-filled telecom

    labs = resources(archive, "Observation")
    assert len(labs) == 5
    glucose = by_code(labs, "2345-7")
    assert glucose["subject"] == {"reference": "Patient/pat-001"}  # found by MRN
    assert glucose["effectiveDateTime"] == "2024-01-15T08:30:00Z"
    assert glucose["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    creatinine = by_code(labs, "2160-0")
    assert creatinine["effectiveDateTime"] == "2024-02-01T10:00:00+01:00"
    assert by_code(labs, "4548-4")["effectiveDateTime"] == "2024-03-10"
    stored = read_resource(archive, "Observation", by_code(labs, "718-7")["id"])
    assert b'"value":13.50' in (stored.content or b"")  # the written precision is kept

    conditions = resources(archive, "Condition")
    diabetes = by_code(conditions, "E11.9")
    assert diabetes["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10"
    assert by_code(conditions, "195967001")["code"]["coding"][0]["system"] == (
        "http://snomed.info/sct"
    )
    assert by_code(conditions, "N18.3")["onsetDateTime"] == "2023-02-01"
    assert diabetes["subject"] == {"reference": "Patient/pat-001"}


def test_rows_that_cannot_be_mapped_are_error_rows(
    runner: CliRunner, data: Path, tmp_path: Path, opened: Callable[[], Archive]
) -> None:
    result = ingest(runner, data, "patients", SAMPLES / "patients.csv")
    assert result.exit_code == 0, result.output
    labs = tmp_path / "labs-bad.csv"
    labs.write_text(
        "mrn,loinc,test_name,value,unit,effective\n"
        "MRN0001,2345-7,Glucose,96,mg/dL,2024-04-01 09:00\n"
        "MRN0001,2345-7,Glucose,ninety,mg/dL,2024-04-02 09:00\n"
        "MRN0002,2345-7,Glucose,101,mg/dL,04.04.2024\n"
        "MRN0404,2345-7,Glucose,88,mg/dL,2024-04-05 09:00\n"
        "MRN0003,,Glucose,77,mg/dL,2024-04-06 09:00\n"
        "MRN0003,2345-7,Glucose,77,mg/dL\n"
    )

    result = ingest(runner, data, "labs", labs)

    assert result.exit_code == 1
    archive = opened()
    with archive.engine.connect() as conn:
        batch = conn.execute(select(batches).order_by(batches.c.started_at.desc())).first()
        assert batch is not None
        errors = conn.execute(
            select(ingest_errors.c.source, ingest_errors.c.rule, ingest_errors.c.message)
            .where(ingest_errors.c.batch_id == batch.id)
            .order_by(ingest_errors.c.id)
        ).all()
    assert (batch.seen, batch.stored, batch.duplicates, batch.rejected) == (6, 1, 0, 5)
    assert batch.verdict == "balanced"
    assert [e.source for e in errors] == [f"{labs} line {n}" for n in (3, 4, 5, 6, 7)]
    reasons = [json.loads(e.message)["issue"][0]["diagnostics"] for e in errors]
    assert "'ninety' is not a decimal number" in reasons[0]
    assert "'04.04.2024' does not match the date format" in reasons[1]
    assert "MRN0404" in reasons[2] and "no resource matches" in reasons[2]
    assert "column 'loinc' is empty" in reasons[3]
    assert "6 fields, the header has" not in reasons[4] and "5 fields" in reasons[4]
    assert [e.rule for e in errors] == ["csv_mapping", "csv_mapping", "fhir_resource",
                                        "csv_mapping", "csv_mapping"]  # fmt: skip
    assert "line 3" in result.output and "not a decimal number" in result.output
    assert len(resources(archive, "Observation")) == 1


def test_a_missing_required_column_rejects_every_row(
    runner: CliRunner, data: Path, tmp_path: Path, opened: Callable[[], Archive]
) -> None:
    diagnoses = tmp_path / "diagnoses-no-code.csv"
    diagnoses.write_text("mrn,code_system,onset\nMRN0001,icd10,2020-01-01\nMRN0002,icd10,\n")

    result = ingest(runner, data, "diagnoses", diagnoses)

    assert result.exit_code == 1
    archive = opened()
    with archive.engine.connect() as conn:
        messages = conn.execute(select(ingest_errors.c.message)).scalars().all()
    assert len(messages) == 2
    assert all("column 'code' is missing from the CSV header" in m for m in messages)


def test_importing_the_same_file_again_changes_nothing(
    runner: CliRunner, data: Path, opened: Callable[[], Archive]
) -> None:
    load_samples(runner, data)

    again = ingest(runner, data, "labs", SAMPLES / "labs.csv")

    assert again.exit_code == 0, again.output
    assert "5 seen, 0 stored, 5 duplicate, 0" in again.output.replace("\n", " ")
    archive = opened()
    assert len(resources(archive, "Observation")) == 5
    assert all(r["meta"]["versionId"] == "1" for r in resources(archive, "Observation"))


def test_a_mapping_file_of_your_own(
    runner: CliRunner, data: Path, tmp_path: Path, opened: Callable[[], Archive]
) -> None:
    mapping = tmp_path / "vitals.yaml"
    mapping.write_text(
        "resourceType: Observation\n"
        "id: 'hr-{pid}-{when}'\n"
        "csv: {delimiter: ';'}\n"
        "fields:\n"
        "  - {path: status, value: final}\n"
        "  - {path: 'code.coding[0]', value: {system: 'http://loinc.org', code: 8867-4}}\n"
        "  - {path: subject.reference, template: 'Patient/{pid}'}\n"
        "  - {path: effectiveDateTime, column: when, transform: datetime,\n"
        "     formats: ['%d.%m.%Y %H:%M'], timezone: Europe/Berlin}\n"
        "  - {path: valueQuantity.value, column: bpm, transform: integer, required: true}\n"
        "  - {path: valueQuantity.unit, value: /min}\n"
        "  - {path: 'interpretation[0].coding[0].code', column: flag,\n"
        "     map: {high: H, low: L}, default: N}\n"
    )
    vitals = tmp_path / "vitals.csv"
    vitals.write_text("pid;when;bpm;flag\np9;01.07.2024 10:15;72;\np9;01.07.2024 11:15;130;HIGH\n")

    result = ingest(runner, data, str(mapping), vitals)

    assert result.exit_code == 0, result.output
    archive = opened()
    observations = sorted(resources(archive, "Observation"), key=lambda r: r["effectiveDateTime"])
    assert [o["effectiveDateTime"] for o in observations] == [
        "2024-07-01T10:15:00+02:00",
        "2024-07-01T11:15:00+02:00",
    ]
    assert [o["valueQuantity"]["value"] for o in observations] == [72, 130]
    assert [o["interpretation"][0]["coding"][0]["code"] for o in observations] == ["N", "H"]


def test_a_broken_mapping_file_says_what_is_wrong(
    runner: CliRunner, data: Path, tmp_path: Path
) -> None:
    mapping = tmp_path / "broken.yaml"
    mapping.write_text(
        "resourceType: Observation\n"
        "fields:\n"
        "  - {path: status, value: final, column: status}\n"
        "  - {path: 'code..coding', column: code}\n"
        "  - {path: effectiveDateTime, colunm: when}\n"
    )
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("status,code\nfinal,1\n")

    result = ingest(runner, data, str(mapping), csv_file)

    assert result.exit_code == 2
    output = result.output.replace("\n", " ")
    assert "give exactly one of column, value, template" in output
    assert "colunm" in output
    with pytest.raises(InvalidInput, match="neither a file nor a shipped mapping"):
        load_mapping("no-such-mapping")


# --- the mapping engine itself ----------------------------------------------------------------


def mapped(mapping: dict[str, Any], csv_text: str) -> list[Any]:
    return [value for _line, value in map_rows(parse_mapping(mapping), io.StringIO(csv_text))]


def test_shipped_mappings_are_listed() -> None:
    assert {"patients", "labs", "diagnoses"} <= set(shipped_mappings())


def test_values_keep_their_precision_and_lists_have_no_gaps() -> None:
    mapping = {
        "resourceType": "Observation",
        "fields": [
            {"path": "valueQuantity.value", "column": "v", "transform": "decimal"},
            {"path": "code.coding[0].code", "column": "a"},
            {"path": "code.coding[1].code", "column": "b"},
            {"path": "code.coding[1].system", "value": "http://snomed.info/sct", "when": "b"},
        ],
    }

    [first, second] = mapped(mapping, "v,a,b\n5.40,,123\n1e2,x,\n")

    assert dump_resource(first).decode() == (
        '{"resourceType":"Observation","valueQuantity":{"value":5.40},'
        '"code":{"coding":[{"code":"123","system":"http://snomed.info/sct"}]}}'
    )
    assert second["code"]["coding"] == [{"code": "x"}]
    assert dump_resource(second["valueQuantity"]) == b'{"value":1e2}'


def test_ids_are_stable_and_valid() -> None:
    mapping = {
        "resourceType": "Basic",
        "id": "b-{k}",
        "fields": [{"path": "code.text", "column": "k"}],
    }

    first = mapped(mapping, "k\nA 1\nA2\n")
    again = mapped(mapping, "k\nA 1\nA2\n")

    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert first[1]["id"] == "b-A2"
    assert len(first[0]["id"]) == 36  # "b-A 1" is no FHIR id: a UUID made from it


def test_row_errors_name_the_value() -> None:
    mapping = {
        "resourceType": "Patient",
        "fields": [
            {"path": "gender", "column": "sex", "map": {"M": "male", "F": "female"}},
            {"path": "active", "column": "active", "transform": "boolean"},
        ],
    }

    rows = mapped(mapping, "sex,active\nf,yes\nX,no\nM,maybe\n")

    assert rows[0] == {"resourceType": "Patient", "gender": "female", "active": True}
    assert "sex 'X' is not one of M, F" in str(rows[1])
    assert "'maybe' is not a boolean" in str(rows[2])


def test_ndjson_files_go_to_the_fhir_store_with_fhir(
    runner: CliRunner, data: Path, tmp_path: Path, opened: Callable[[], Archive]
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    good = {"resourceType": "Patient", "id": "n1", "gender": "female"}
    (folder / "a.ndjson").write_text(json.dumps(good) + "\n" + '{"resourceType": "Patient"\n')
    (folder / "b.jsonl").write_text(json.dumps({**good, "id": "n2"}) + "\n")
    (folder / "notes.txt").write_text("not imported\n")

    first = runner.invoke(app, ["ingest", "--data", str(data), "--fhir", str(folder)])
    again = runner.invoke(app, ["ingest", "--data", str(data), "--fhir", str(folder)])

    assert first.exit_code == 1  # one line rejected
    assert "3 seen, 2 stored, 0 duplicate, 1" in first.output.replace("\n", " ")
    assert "a.ndjson line 2" in first.output
    assert "3 seen, 0 stored, 2 duplicate, 1" in again.output.replace("\n", " ")
    archive = opened()
    assert (read_resource(archive, "Patient", "n2").resource() or {})["gender"] == "female"
    with archive.engine.connect() as conn:
        staged = conn.execute(select(batches.c.source).order_by(batches.c.started_at)).scalars()
        assert all(source.startswith("fhir-import:") for source in staged)
