"""Clinical files through the same pipeline: CSV (and NDJSON) staged by patient identifier,
kept byte for byte in the lake, checked against their table's schema, reconciled."""

from __future__ import annotations

from pathlib import Path

import orjson
from sqlalchemy import select
from tests.ingest_files import errors_of, make_instances
from tests.lake_inspection import LakeInspection

from medlake.config import Settings
from medlake.index.schema import clinical_files, clinical_rows
from medlake.ingest.archive import Archive
from medlake.ingest.pipeline import ingest
from medlake.ingest.reconcile import reconcile_batch

LABS = "patient_id,test,value,unit\nP001,HB,13.1,g/dL\nP002,HB,11.9,g/dL\nP001,CRP,4,mg/L\n"


def _rows(archive: Archive) -> list[tuple[str, str, int, str]]:
    with archive.engine.connect() as conn:
        return [
            (r.table_name, r.patient_id, r.row_number, r.data)
            for r in conn.execute(
                select(clinical_files.c.table_name, clinical_rows)
                .join(clinical_files, clinical_files.c.id == clinical_rows.c.file_id)
                .order_by(clinical_rows.c.id)
            )
        ]


def test_csv_rows_are_staged_by_patient(
    archive: Archive, lake: LakeInspection, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "labs.csv").write_text(LABS)
    make_instances(tmp_path / "src" / "images", 2, PatientID="P001")

    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (3, 3, 0, "balanced")
    rows = _rows(archive)
    assert [(t, p, n) for t, p, n, _ in rows] == [
        ("labs", "P001", 2), ("labs", "P002", 3), ("labs", "P001", 4),
    ]  # fmt: skip
    assert orjson.loads(rows[0][3]) == {"patient_id": "P001", "test": "HB", "value": "13.1",
                                        "unit": "g/dL"}  # fmt: skip
    kept = [p for p in lake.files() if "/clinical/imports/labs/" in str(p)]
    assert [p.read_text() for p in kept] == [LABS]  # byte for byte, named by SHA-256
    result = reconcile_batch(archive, batch.id)
    assert result.figures["clinical_files"] == 1 and result.figures["clinical_rows"] == 3


def test_the_same_csv_twice_is_a_duplicate(archive: Archive, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "labs.csv").write_text(LABS)

    ingest(archive, str(tmp_path / "a"), "default", workers=0)
    again = ingest(archive, str(tmp_path / "a"), "default", workers=0)

    assert (again.seen, again.stored, again.duplicates) == (1, 0, 1)
    assert len(_rows(archive)) == 3


def test_csv_that_does_not_match_its_schema_is_rejected_whole(
    archive: Archive, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "vitals.csv").write_text("name,pulse\nDOE,70\n")  # no patient column
    (src / "labs.csv").write_text("patient_id,test\nP1,HB\nP2\n")  # ragged line 3
    (src / "meds.csv").write_text("mrn,drug\nM1,aspirin\n,ibuprofen\n")  # empty id, line 3
    (src / "notes.csv").write_bytes(b"patient_id,text\nP1,caf\xe9\n")  # not UTF-8
    (src / "ok.csv").write_text("PatientID,score\nP9,3\n")  # column names match any case

    batch = ingest(archive, str(src), "default", workers=0)

    errors = {Path(e.source).name: e for e in errors_of(archive, batch.id)}
    assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (5, 1, 4, "balanced")
    assert set(errors) == {"vitals.csv", "labs.csv", "meds.csv", "notes.csv"}
    assert {e.rule for e in errors.values()} == {"clinical_schema"}
    assert "no patient identifier column" in errors["vitals.csv"].message
    assert "line 3: 1 fields, the header has 2" in errors["labs.csv"].message
    assert "line 3: the patient identifier (mrn) is empty" in errors["meds.csv"].message
    assert "not UTF-8" in errors["notes.csv"].message
    assert all(Path(e.kept_at or "").is_file() for e in errors.values())
    assert [(t, p) for t, p, _, _ in _rows(archive)] == [("ok", "P9")]


def test_required_columns_per_table(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "labs.csv").write_text("patient_id,test\nP1,HB\n")
    archive = Archive.open(
        settings.model_copy(update={"clinical_required_columns": {"labs": ["test", "value"]}})
    )
    try:
        batch = ingest(archive, str(src), "default", workers=0)
        [error] = errors_of(archive, batch.id)
    finally:
        archive.close()
    assert batch.rejected == 1
    assert "table labs requires the columns ['value']" in error.message


def test_schema_rule_can_warn_instead(settings: Settings, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "labs.csv").write_text("patient_id,test\nP1,HB\n,CRP\n")
    warn = {"ingest_rules": {"clinical_schema": "warn"}}
    archive = Archive.open(settings.model_copy(update=warn))
    try:
        batch = ingest(archive, str(src), "default", workers=0)
        [warning] = errors_of(archive, batch.id)
        rows = _rows(archive)
    finally:
        archive.close()
    assert (batch.stored, batch.rejected) == (1, 0)
    assert warning.severity == "warn" and "line 3" in warning.message
    assert [p for _, p, _, _ in rows] == ["P1", ""]  # staged as is, nothing dropped


def test_ndjson_resources_link_to_their_patient(archive: Archive, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [
        {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/P7"}},
        {"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/P8"}},
    ]
    (src / "observations.ndjson").write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    (src / "mixed.ndjson").write_bytes(
        orjson.dumps(lines[0]) + b"\n" + orjson.dumps({"resourceType": "Patient", "id": "P7"})
    )

    batch = ingest(archive, str(src), "default", workers=0)

    [error] = errors_of(archive, batch.id)
    assert (batch.stored, batch.rejected, batch.verdict) == (1, 1, "balanced")
    assert "resourceType Patient in a file of Observation resources" in error.message
    assert [(t, p) for t, p, _, _ in _rows(archive)] == [("Observation", "P7"),
                                                         ("Observation", "P8")]  # fmt: skip
