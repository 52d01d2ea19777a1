"""Planner statistics follow the index as it grows (see benchmarks/scale_index.py)."""

from __future__ import annotations

from sqlalchemy import text

from medlake.index.database import open_index
from medlake.index.statistics import MIN_ROWS, refresh_statistics
from medlake.index.writes import InstanceRow, write_instances


def _rows(count: int, start: int = 0) -> list[InstanceRow]:
    return [
        InstanceRow(
            study_uid=f"1.2.3.{(start + i) // 100}",
            series_uid=f"1.2.3.{(start + i) // 100}.1",
            sop_uid=f"1.2.3.{(start + i) // 100}.1.{start + i}",
            values={"transfer_syntax_uid": "1.2.840.10008.1.2.1", "modality": "CT"},
            blob_key=f"k/{start + i}.dcm",
            size=1,
            sha256="0" * 64,
            encapsulated=False,
            frames=None,
        )
        for i in range(count)
    ]


def test_small_index_is_not_analysed_large_one_is_once(db_url: str) -> None:
    engine = open_index(db_url)
    with engine.begin() as conn:
        write_instances(conn, "default", _rows(MIN_ROWS - 1), {})
    assert refresh_statistics(engine) is False
    with engine.begin() as conn:
        write_instances(conn, "default", _rows(10, start=MIN_ROWS), {})
    assert refresh_statistics(engine) is True
    assert refresh_statistics(engine) is False  # statistics now match the size
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            stat = conn.execute(
                text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'instances' LIMIT 1")
            ).scalar()
        assert stat is not None and int(str(stat).split()[0]) >= MIN_ROWS
    engine.dispose()
