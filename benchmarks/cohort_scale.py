#!/usr/bin/env python3
"""Cohort query latency at scale: N patients with studies, series, instances, Conditions
and Observations, then the example cohort query and a few others.

    .venv/bin/python benchmarks/cohort_scale.py --patients 100000 --db both \
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--runs 10] [--out FILE]
        [--sqlite-file PATH] [--pg-database NAME] [--queries NAME,NAME] [--explain]

Per backend (SQLite in a temp folder; PostgreSQL in a fresh database
``medlake_cohort_<random>``, dropped at the end). ``--sqlite-file`` / ``--pg-database``
name a database to keep instead: built there when it holds no studies yet, reused
as it is (no build, no ANALYZE, ``--patients`` ignored) on later runs, so a change to
the queries is timed without the 3-4 minutes per database a build takes on 2 cores:

1. opens a real :class:`medlake.ingest.archive.Archive` (the migrations run, as in the
   server);
2. writes, with bulk INSERTs (PostgreSQL: COPY), deterministic synthetic data: N
   patients (FHIR Patient + patient key + identifier + record), N studies (each of a
   random patient, so some have none and some several), 1-3 series per study, 5
   instances per series on average (1M instances for 100k patients), 0-4 Conditions and
   0-8 Observations (HbA1c, glucose, creatinine) per patient. Search values come from
   :func:`medlake.clinical.search_index.extract_values` on each resource: exactly the
   rows the FHIR store writes. The ``fhir_search_values`` indexes are built after the
   load, then :func:`medlake.index.statistics.refresh_statistics` runs, as the server
   does once the index has grown (ANALYZE; VACUUM too on a PostgreSQL without
   autovacuum);
3. times :func:`medlake.clinical.cohort.find_cohort` (counts + first page of 100, what
   ``POST /cohorts`` answers) for each query: median and p90 of ``--runs`` after one
   warm-up; the full CSV export of the example query is timed too. ``--explain``
   prints each query's plan with its row counts and times (EXPLAIN ANALYZE on
   PostgreSQL, EXPLAIN QUERY PLAN on SQLite) as comment lines.

Output lines: ``<figure> <value> <unit>  # details``; comment lines start with ``#``.
"""

# The synthetic rows are written one per line, as the table columns read; wrapping them
# would make them harder to compare with the schema than long lines do.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import datetime as dt
import io
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy
from sqlalchemy import Table, insert, text
from sqlalchemy.engine import make_url

from medlake.clinical.cohort import find_cohort
from medlake.clinical.search_index import extract_values
from medlake.config import Settings
from medlake.index.schema import (
    fhir_resource_versions,
    fhir_resources,
    fhir_search_values,
    instances,
    patient_identifiers,
    patient_records,
    patients,
    series,
    studies,
    study_patients,
)
from medlake.index.statistics import refresh_statistics
from medlake.ingest.archive import Archive

LOINC, SNOMED, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org"
SYSTEM = "urn:medlake:default:patient-id"
DIABETES, HYPERTENSION = "44054006", "38341003"
OTHER_CONDITIONS = ["195967001", "13645005", "49436004", "399211009", "414916001", "35489007"]
LABS = [("4548-4", "%", 6.4, 1.3), ("2345-7", "mg/dL", 105, 25), ("2160-0", "mg/dL", 1.0, 0.3)]
MODALITIES = [("CT", 0.4), ("MR", 0.3), ("CR", 0.15), ("US", 0.1), ("PT", 0.05)]
BODY_PARTS = [("CHEST", 0.3), ("HEAD", 0.25), ("ABDOMEN", 0.25), ("PELVIS", 0.1), ("KNEE", 0.1)]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EPOCH = dt.date(2020, 1, 1)
CHUNK = 20_000

EXAMPLE = {
    "level": "studies",
    "limit": 100,
    "where": {
        "all": [
            {"series": {"modality": "CT", "bodyPart": "CHEST"}},
            {"resource": "Condition", "code": f"{SNOMED}|{DIABETES}"},
            {
                "resource": "Observation",
                "code": f"{LOINC}|4548-4",
                "value": {"gt": 7, "unit": "%"},
                "within": {"days": 90, "before": "study"},
            },
        ]
    },
}
QUERIES: dict[str, dict[str, Any]] = {
    "example_studies": EXAMPLE,
    "example_patients": {**EXAMPLE, "level": "patients"},
    "example_series": {**EXAMPLE, "level": "series"},
    "clinical_only_patients": {
        "level": "patients",
        "limit": 100,
        "where": {
            "all": [
                {"resource": "Condition", "code": f"{SNOMED}|{DIABETES}"},
                {"patient": {"gender": "female", "age": {"ge": 40, "lt": 65}}},
            ]
        },
    },
    "imaging_only_mr_head_2023": {
        "limit": 100,
        "where": {
            "all": [
                {"series": {"modality": "MR", "bodyPart": "HEAD"}},
                {"study": {"date": {"ge": "2023-01-01", "lt": "2024-01-01"}}},
            ]
        },
    },
    "ct_chest_not_hypertension": {
        "limit": 100,
        "where": {
            "all": [
                {"series": {"modality": "CT", "bodyPart": "CHEST"}},
                {"not": {"resource": "Condition", "code": f"{SNOMED}|{HYPERTENSION}"}},
            ]
        },
    },
    "any_glucose_or_hba1c_high_near_mr": {
        "limit": 100,
        "where": {
            "all": [
                {"series": {"modality": "MR"}},
                {
                    "any": [
                        {
                            "resource": "Observation",
                            "code": "4548-4",
                            "value": {"gt": 8},
                            "within": {"days": 30, "around": "study"},
                        },
                        {
                            "resource": "Observation",
                            "code": "2345-7",
                            "value": {"gt": 180},
                            "within": {"days": 30, "around": "study"},
                        },
                    ]
                },
            ]
        },
    },
}


def pick(rng: random.Random, weighted: list[tuple[str, float]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


# --- backends -----------------------------------------------------------------------------


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'index.sqlite'}"


def pg_database(admin_url: str, keep: str | None) -> tuple[str, Callable[[], None]]:
    """The URL of the database to use and how to drop it (a no-op for a kept one)."""
    import psycopg

    name = keep or f"medlake_cohort_{secrets.token_hex(4)}"
    admin = make_url(admin_url).set(drivername="postgresql")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(drivername="postgresql+psycopg", database=name)
    if keep:
        return url.render_as_string(hide_password=False), lambda: None

    def drop() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url.render_as_string(hide_password=False), drop


def bulk_insert(engine: sqlalchemy.Engine, table: Table, rows: Iterable[dict[str, Any]]) -> int:
    """Insert ``rows`` (dicts with every column of ``table``) in chunks; PostgreSQL: COPY."""
    columns = [c.name for c in table.columns]
    count = 0
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        if not chunk:
            return
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                with raw.cursor().copy(
                    f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
                ) as copy:
                    for row in chunk:
                        copy.write_row([row.get(c) for c in columns])
        else:
            with engine.begin() as conn:
                conn.execute(insert(table), [{c: row.get(c) for c in columns} for row in chunk])
        chunk.clear()

    for row in rows:
        chunk.append(row)
        count += 1
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return count


# --- the synthetic archive ------------------------------------------------------------------


def build(
    engine: sqlalchemy.Engine, n_patients: int, seed: int, log: Callable[[str], None]
) -> dict[str, int]:
    rng = random.Random(seed)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    counts: dict[str, int] = {}
    with engine.begin() as conn:
        partition_pk = conn.execute(
            text("SELECT id FROM partitions WHERE name = 'default'")
        ).scalar_one()
        for index in fhir_search_values.indexes:
            index.drop(conn)

    # patients: FHIR Patient, key, identifier, record
    people = []
    for n in range(n_patients):
        born = EPOCH - dt.timedelta(days=rng.randrange(18 * 365, 90 * 365))
        people.append((str(uuid.UUID(int=rng.getrandbits(128))), f"MRN{n:07d}",
                       rng.choice(("male", "female")), born))  # fmt: skip

    resources: list[tuple[str, str, dict[str, Any]]] = []  # (type, id, resource)
    for fhir_id, mrn, gender, born in people:
        resources.append(("Patient", fhir_id, {
            "resourceType": "Patient", "id": fhir_id,
            "identifier": [{"system": SYSTEM, "value": mrn}],
            "name": [{"family": f"FAMILY{mrn[-4:]}", "given": ["GIVEN"]}],
            "gender": gender, "birthDate": born.isoformat(),
        }))  # fmt: skip

    # studies, each of a random patient, at a random date of 2020-2025
    study_rows, series_rows, instance_rows, links = [], [], [], []
    study_days: dict[int, list[dt.date]] = {}
    series_pk = instance_pk = 0
    for study_pk in range(1, n_patients + 1):
        owner = rng.randrange(n_patients)
        day = EPOCH + dt.timedelta(days=rng.randrange(6 * 365))
        study_days.setdefault(owner, []).append(day)
        n_series = rng.choice((1, 2, 2, 3))
        modalities = []
        study_uid = f"2.25.{rng.getrandbits(100)}"
        n_inst_study = 0
        for s in range(n_series):
            series_pk += 1
            modality = pick(rng, MODALITIES)
            modalities.append(modality)
            n_inst = max(1, round(rng.expovariate(1 / 5))) if s else rng.randrange(1, 10)
            n_inst_study += n_inst
            series_rows.append({
                "id": series_pk, "partition_id": partition_pk, "study_id": study_pk,
                "series_uid": f"{study_uid}.{s + 1}", "modality": modality,
                "series_description": f"{modality} series", "body_part_examined": pick(rng, BODY_PARTS),
                "series_number": s + 1, "num_instances": n_inst, "extra": "{}",
                "metadata_stale": False, "created_at": now, "updated_at": now,
            })  # fmt: skip
            for i in range(n_inst):
                instance_pk += 1
                instance_rows.append({
                    "id": instance_pk, "partition_id": partition_pk, "study_id": study_pk,
                    "series_id": series_pk, "sop_uid": f"{study_uid}.{s + 1}.{i + 1}",
                    "sop_class_uid": CT_IMAGE, "instance_number": i + 1,
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1", "blob_key": "synthetic",
                    "size": 0, "sha256": "0" * 64, "encapsulated": False, "tier": "hot",
                    "last_accessed_at": now, "created_at": now,
                })  # fmt: skip
        fhir_id, mrn, gender, born = people[owner]
        study_rows.append({
            "id": study_pk, "partition_id": partition_pk, "study_uid": study_uid,
            "study_date": day.strftime("%Y%m%d"), "study_time": "101500",
            "accession_number": f"ACC{study_pk}", "study_description": f"{modalities[0]} study",
            "patient_name": f"FAMILY{mrn[-4:]}^GIVEN", "patient_id": mrn,
            "patient_birth_date": born.strftime("%Y%m%d"), "patient_sex": gender[0].upper(),
            "modalities_in_study": "\\".join(sorted(set(modalities))), "num_series": n_series,
            "num_instances": n_inst_study, "extra": "{}", "created_at": now, "updated_at": now,
        })  # fmt: skip
        links.append({"study_id": study_pk, "partition_id": partition_pk, "patient_id": owner + 1,
                      "study_date": dt.datetime.combine(day, dt.time(), dt.UTC), "linked_at": now})  # fmt: skip

    # conditions and lab observations, dated around the patient's studies (or anywhere)
    for owner, (fhir_id, _mrn, _gender, _born) in enumerate(people):
        days = study_days.get(owner) or [EPOCH + dt.timedelta(days=rng.randrange(6 * 365))]
        codes = []
        if rng.random() < 0.12:
            codes.append(DIABETES)
        if rng.random() < 0.25:
            codes.append(HYPERTENSION)
        codes += rng.sample(OTHER_CONDITIONS, rng.randrange(0, 3))
        for code in codes:
            onset = min(days) - dt.timedelta(days=rng.randrange(0, 3 * 365))
            resources.append(("Condition", str(uuid.UUID(int=rng.getrandbits(128))), {
                "resourceType": "Condition",
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": SNOMED, "code": code}]},
                "subject": {"reference": f"Patient/{fhir_id}"},
                "onsetDateTime": onset.isoformat(),
            }))  # fmt: skip
        diabetic = DIABETES in codes
        for _ in range(rng.randrange(0, 9)):
            code, unit, mean, sd = rng.choice(LABS)
            if diabetic and code == "4548-4":
                mean += 1.5
            when = rng.choice(days) - dt.timedelta(days=rng.randrange(-60, 200))
            value = round(max(0.1, rng.gauss(mean, sd)), 1)
            resources.append(("Observation", str(uuid.UUID(int=rng.getrandbits(128))), {
                "resourceType": "Observation", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/{fhir_id}"},
                "effectiveDateTime": f"{when.isoformat()}T08:00:00Z",
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            }))  # fmt: skip

    log(f"# generated {len(resources)} FHIR resources, {len(study_rows)} studies, "
        f"{len(series_rows)} series, {len(instance_rows)} instances")  # fmt: skip
    counts["studies"] = bulk_insert(engine, studies, study_rows)
    counts["series"] = bulk_insert(engine, series, series_rows)
    counts["instances"] = bulk_insert(engine, instances, instance_rows)
    counts["patients"] = bulk_insert(engine, patients, (
        {"id": n + 1, "partition_id": partition_pk, "fhir_id": p[0], "merged_into": None,
         "created_at": now, "updated_at": now} for n, p in enumerate(people)))  # fmt: skip
    bulk_insert(engine, patient_identifiers, (
        {"id": n + 1, "partition_id": partition_pk, "system": SYSTEM, "value": p[1],
         "patient_id": n + 1, "created_at": now} for n, p in enumerate(people)))  # fmt: skip
    bulk_insert(engine, patient_records, (
        {"partition_id": partition_pk, "fhir_id": p[0], "patient_id": n + 1, "version_id": 1}
        for n, p in enumerate(people)))  # fmt: skip
    bulk_insert(engine, study_patients, links)

    def resource_rows() -> Iterator[dict[str, Any]]:
        for pk, (kind, logical_id, resource) in enumerate(resources, start=1):
            body = orjson.dumps({**resource, "id": logical_id,
                                 "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00.000+00:00"}}).decode()  # fmt: skip
            yield {"id": pk, "partition_id": partition_pk, "resource_type": kind,
                   "logical_id": logical_id, "version_id": 1, "last_updated": now,
                   "deleted": False, "content": body}  # fmt: skip

    counts["fhir_resources"] = bulk_insert(engine, fhir_resources, resource_rows())
    bulk_insert(engine, fhir_resource_versions, (
        {"id": pk, "resource_id": pk, "version_id": 1, "last_updated": now, "method": "PUT",
         "content": None} for pk in range(1, len(resources) + 1)))  # fmt: skip

    def value_rows() -> Iterator[dict[str, Any]]:
        value_pk = 0
        for pk, (_kind, logical_id, resource) in enumerate(resources, start=1):
            for row in extract_values({**resource, "id": logical_id}):
                value_pk += 1
                row["id"], row["resource_id"] = value_pk, pk
                yield row

    counts["fhir_search_values"] = bulk_insert(engine, fhir_search_values, value_rows())
    with engine.begin() as conn:
        for index in fhir_search_values.indexes:
            index.create(conn)
        if engine.dialect.name == "postgresql":
            # Rows were written with their ids: later inserts must not reuse them.
            for table in (
                "studies",
                "series",
                "instances",
                "patients",
                "patient_identifiers",
                "fhir_resources",
                "fhir_resource_versions",
                "fhir_search_values",
            ):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT max(id) FROM {table}))"))  # fmt: skip
    # What the server does once the index has grown: ANALYZE (PostgreSQL without
    # autovacuum, as here: VACUUM too, which sets the visibility map).
    if not refresh_statistics(engine):
        raise SystemExit("the planner statistics were not refreshed after the load")
    return counts


# --- timing -------------------------------------------------------------------------------


def pctl(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    result = fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return times, result


def explain(archive: Archive, query: dict[str, Any], out: Callable[[str], None]) -> None:
    """Print the plan of every statement ``find_cohort`` runs for ``query`` (executed)."""
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    engine = archive.engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", record)
    try:
        find_cohort(archive, query)
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", record)
    prefix = (
        "EXPLAIN (ANALYZE, BUFFERS) "
        if engine.dialect.name == "postgresql"
        else "EXPLAIN QUERY PLAN "
    )
    with engine.connect() as conn:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            start = time.perf_counter()
            plan = conn.exec_driver_sql(prefix + statement, parameters).all()
            took = (time.perf_counter() - start) * 1000
            out(f"# --- {took:.1f} ms: {' '.join(statement.split())[:160]}")
            for row in plan:
                out("#   " + " ".join(str(v) for v in row))


def run_backend(
    name: str, url: str, data: Path, args: argparse.Namespace, out: Callable[[str], None]
) -> None:
    settings = Settings(data=data, database_url=url, insecure_no_auth=True)
    archive = Archive.open(settings)
    try:
        with archive.engine.connect() as conn:
            built = conn.execute(text("SELECT count(*) FROM studies")).scalar_one()
        if built:
            out(f"# reusing the database as it is ({built} studies)")
        else:
            start = time.perf_counter()
            counts = build(archive.engine, args.patients, args.seed, out)
            load_s = time.perf_counter() - start
            out(
                f"cohort.{name}.load_s {load_s:.1f} s  # "
                + " ".join(f"{k}={v}" for k, v in counts.items())
            )
        chosen = args.queries.split(",") if args.queries else [*QUERIES, "example_csv_all_rows"]
        for query_name in chosen:
            if query_name == "example_csv_all_rows":
                continue
            query = QUERIES[query_name]
            if args.explain:
                explain(archive, query, out)
            times, result = timed(lambda q=query: find_cohort(archive, q), args.runs)
            c = result.counts
            out(f"cohort.{name}.{query_name}.median_ms {statistics.median(times):.1f} ms  # "
                f"p90 {pctl(times, 0.9):.1f} ms; {c.patients} patients, {c.studies} studies, "
                f"{c.series} series, {c.instances} instances; {len(result.rows)} rows returned")  # fmt: skip
        if "example_csv_all_rows" in chosen:
            full = {k: v for k, v in EXAMPLE.items() if k != "limit"}
            times, result = timed(
                lambda: find_cohort(archive, full).to_csv(), max(3, args.runs // 3)
            )
            out(f"cohort.{name}.example_csv_all_rows.median_ms {statistics.median(times):.1f} ms  # "
                f"p90 {pctl(times, 0.9):.1f} ms; {len(result.splitlines()) - 1} rows")  # fmt: skip
    finally:
        archive.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--sqlite-file", type=Path, help="SQLite index file to build once and keep (reused)"
    )
    parser.add_argument("--pg-database", help="PostgreSQL database to build once and keep (reused)")
    parser.add_argument(
        "--queries",
        help=f"comma-separated queries to time (default all): {', '.join(QUERIES)}, "
        "example_csv_all_rows",
    )
    parser.add_argument("--explain", action="store_true", help="print each query's plans")
    args = parser.parse_args()
    unknown = set((args.queries or "").split(",")) - {"", *QUERIES, "example_csv_all_rows"}
    if unknown:
        parser.error(f"unknown queries: {', '.join(sorted(unknown))}")
    sink = io.StringIO()

    def out(line: str) -> None:
        print(line, flush=True)
        sink.write(line + "\n")

    out(f"# cohort_scale {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} "
        f"patients={args.patients} runs={args.runs} seed={args.seed} python={sys.version.split()[0]}")  # fmt: skip
    if args.db in ("sqlite", "both"):
        folder = Path(tempfile.mkdtemp(prefix="medlake-cohort-"))
        try:
            import sqlite3

            out(f"# SQLite {sqlite3.sqlite_version}")
            if args.sqlite_file:
                args.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
                url = f"sqlite:///{args.sqlite_file.resolve()}"
            else:
                url = sqlite_url(folder)
            run_backend("sqlite", url, folder, args, out)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.db in ("postgresql", "both"):
        url, drop = pg_database(args.pg_url, args.pg_database)
        folder = Path(tempfile.mkdtemp(prefix="medlake-cohort-pg-"))
        try:
            out("# PostgreSQL " + url.split("@")[-1])
            run_backend("postgresql", url, folder, args, out)
        finally:
            drop()
            shutil.rmtree(folder, ignore_errors=True)
    if args.out:
        args.out.write_text(sink.getvalue())


if __name__ == "__main__":
    main()
