"""Keeping the query planner's statistics in step with the index's size.

Without statistics SQLite assumes ``partition_id = ?`` is selective and walks a
whole partition for a series lookup: 7.6 s instead of 5 ms at one million
instances (benchmarks/results/scale-1m-2026-11-24.txt). PostgreSQL has
autovacuum for this, which some servers run without; the same check covers it.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, func, select, text

from medlake.index.schema import instances

#: Re-analyse when the instance count has grown this much since the last analysis.
GROWTH_FACTOR = 2.0
#: Below this many instances plans do not matter: no analysis.
MIN_ROWS = 1000


def _analysed_rows(conn: Connection) -> float | None:
    if conn.dialect.name == "sqlite":
        has_stats = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'")
        ).first()
        if has_stats is None:
            return None
        stat = conn.execute(
            text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'instances' LIMIT 1")
        ).scalar()
        return float(str(stat).split()[0]) if stat else None
    if conn.dialect.name == "postgresql":
        tuples = conn.execute(
            text("SELECT reltuples FROM pg_class WHERE relname = 'instances' AND relkind = 'r'")
        ).scalar()
        return float(tuples) if tuples is not None and tuples >= 0 else None
    return None


def refresh_statistics(engine: Engine) -> bool:
    """ANALYZE the index when it has grown past the statistics the planner has;
    returns whether it did. Cheap to call often (one count)."""
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(instances)).scalar_one()
        if rows < MIN_ROWS:
            return False
        analysed = _analysed_rows(conn)
        if analysed is not None and rows <= analysed * GROWTH_FACTOR:
            return False
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    return True
