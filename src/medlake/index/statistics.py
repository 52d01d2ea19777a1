"""Keeping the query planner's statistics in step with the index's size.

Without statistics SQLite assumes ``partition_id = ?`` is selective and walks a
whole partition for a series lookup: 7.6 s instead of 5 ms at one million
instances (benchmarks/results/scale-1m-2026-11-24.txt). PostgreSQL has
autovacuum for this, which some servers run without; the same check covers it
(with VACUUM there, which autovacuum would otherwise run).

The imaging hierarchy is not the only table that grows on its own: a FHIR bulk
import adds millions of search values, and the patient tables follow both sides.
Cohort queries join all of them, so each is watched (see docs/cohorts.md).
"""

from __future__ import annotations

from sqlalchemy import Column, Connection, Engine, Table, func, select, text

from medlake.index.schema import (
    fhir_resources,
    fhir_search_values,
    instances,
    patients,
    study_patients,
)

#: Re-analyse when a watched table has grown this much since the last analysis.
GROWTH_FACTOR = 2.0
#: Below this many rows a table's plans do not matter: no analysis for its growth.
MIN_ROWS = 1000
#: The tables whose growth calls for a new analysis, each with an integer key column
#: whose largest value bounds the row count (one index lookup instead of a count).
WATCHED: tuple[tuple[Table, Column[int]], ...] = (
    (instances, instances.c.id),
    (fhir_resources, fhir_resources.c.id),
    (fhir_search_values, fhir_search_values.c.id),
    (patients, patients.c.id),
    (study_patients, study_patients.c.study_id),
)


def _analysed_rows(conn: Connection) -> dict[str, float]:
    """The row count of each table when it was last analysed (absent: never)."""
    names = [table.name for table, _ in WATCHED]
    if conn.dialect.name == "sqlite":
        has_stats = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'")
        ).first()
        if has_stats is None:
            return {}
        found: dict[str, float] = {}
        for table, stat in conn.execute(text("SELECT tbl, stat FROM sqlite_stat1")):
            if table in names and stat:
                # A partial index counts only its own rows: the table has the most.
                found[table] = max(found.get(table, 0.0), float(str(stat).split()[0]))
        return found
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            text(
                "SELECT c.relname, c.reltuples FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname = current_schema() "
                "AND c.relname = ANY(:names)"
            ),
            {"names": names},
        )
        # reltuples is -1 (or 0 before PostgreSQL 14) for a table never analysed.
        return {name: float(tuples) for name, tuples in rows if tuples > 0}
    return {}


def _outgrown(conn: Connection) -> bool:
    """Whether some watched table holds MIN_ROWS rows and GROWTH_FACTOR times what
    the planner's statistics say."""
    analysed = _analysed_rows(conn)
    for table, key in WATCHED:
        limit = max(MIN_ROWS - 1, analysed.get(table.name, 0.0) * GROWTH_FACTOR)
        # The largest key bounds the count; most calls stop at this lookup.
        if (conn.execute(select(func.max(key))).scalar() or 0) <= limit:
            continue
        if conn.execute(select(func.count()).select_from(table)).scalar_one() > limit:
            return True
    return False


def refresh_statistics(engine: Engine) -> bool:
    """ANALYZE the index when one of its large tables has grown past the statistics
    the planner has; returns whether it did. Cheap to call often (one lookup per
    watched table)."""
    with engine.connect() as conn:
        if not _outgrown(conn):
            return False
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text(_refresh_statement(conn)))
    return True


def _refresh_statement(conn: Connection) -> str:
    if conn.dialect.name != "postgresql":
        return "ANALYZE"
    # Index-only scans (the cohort queries' partition check, for one) only skip the
    # table for pages the visibility map marks all-visible, and only VACUUM marks
    # them: without autovacuum, a bulk-loaded table would be read row by row forever.
    autovacuum = conn.execute(text("SELECT current_setting('autovacuum')")).scalar()
    return "VACUUM (ANALYZE)" if autovacuum == "off" else "ANALYZE"
