"""Planner statistics follow the clinical tables too: a FHIR import that adds search
values without a single new instance still gets them analysed (cohort queries join
``fhir_search_values``; see docs/cohorts.md, Performance)."""

from __future__ import annotations

from sqlalchemy import func, select, text
from tests.cohort_support import HBA1C, observation

from medlake.clinical.store import create_resource
from medlake.index.schema import fhir_search_values
from medlake.index.statistics import MIN_ROWS, refresh_statistics
from medlake.ingest.archive import Archive


def _analysed_search_values(archive: Archive) -> float:
    with archive.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            if (
                conn.execute(
                    text("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")
                ).first()
                is None
            ):
                return 0.0
            stats = conn.execute(
                text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'fhir_search_values'")
            ).scalars()
            return max((float(str(stat).split()[0]) for stat in stats), default=0.0)
        tuples = conn.execute(
            text(
                "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relname = 'fhir_search_values' AND n.nspname = current_schema()"
            )
        ).scalar()
        return max(float(tuples or 0), 0.0)


def test_search_values_growing_without_instances_are_analysed(archive: Archive) -> None:
    if archive.engine.dialect.name == "postgresql":
        with archive.engine.begin() as conn:  # autovacuum must not analyse it first
            conn.execute(text("ALTER TABLE fhir_search_values SET (autovacuum_enabled = off)"))
    assert refresh_statistics(archive.engine) is False  # nothing large yet
    day = 1
    while True:
        create_resource(archive, observation("p1", HBA1C, 6.5, "%", f"2024-01-{day % 28 + 1:02d}"))
        day += 1
        with archive.engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(fhir_search_values)).scalar_one()
        if rows >= MIN_ROWS:
            break
    assert _analysed_search_values(archive) < MIN_ROWS

    assert refresh_statistics(archive.engine) is True
    assert _analysed_search_values(archive) >= MIN_ROWS
    assert refresh_statistics(archive.engine) is False  # the statistics match the size now
