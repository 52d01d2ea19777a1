"""Aggregate: the flat per-instance table (``instance_metadata``) and the study / series /
instance hierarchy agree at the end of every batch.

The store writes both in the same transaction and recomputes the counts of every
series and study it touched once per transaction (not per instance); this stage
checks the result for the instances of a batch, so a batch whose aggregates
disagree fails its reconciliation instead of passing silently.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from medlake.index.schema import instance_metadata, instances, series, studies


def check_hierarchy(conn: Connection, batch_id: str) -> list[str]:
    """Differences between the hierarchy and the flat table for a batch's instances."""
    differences: list[str] = []
    without_flat = conn.execute(
        select(func.count())
        .select_from(instances)
        .outerjoin(instance_metadata, instance_metadata.c.instance_id == instances.c.id)
        .where(instances.c.batch_id == batch_id, instance_metadata.c.instance_id.is_(None))
    ).scalar_one()
    if without_flat:
        differences.append(f"{without_flat} instances of the batch have no instance_metadata row")
    touched_series = select(instances.c.series_id).where(instances.c.batch_id == batch_id)
    actual = (
        select(func.count())
        .where(instances.c.series_id == series.c.id)
        .correlate(series)
        .scalar_subquery()
    )
    wrong_series = conn.execute(
        select(series.c.series_uid, series.c.num_instances, actual).where(
            series.c.id.in_(touched_series.distinct()), series.c.num_instances != actual
        )
    ).all()
    for uid, recorded, counted in wrong_series[:20]:
        differences.append(f"series {uid} records {recorded} instances but has {counted}")
    touched_studies = select(instances.c.study_id).where(instances.c.batch_id == batch_id)
    in_study = (
        select(func.count())
        .where(instances.c.study_id == studies.c.id)
        .correlate(studies)
        .scalar_subquery()
    )
    wrong_studies = conn.execute(
        select(studies.c.study_uid, studies.c.num_instances, in_study).where(
            studies.c.id.in_(touched_studies.distinct()), studies.c.num_instances != in_study
        )
    ).all()
    for uid, recorded, counted in wrong_studies[:20]:
        differences.append(f"study {uid} records {recorded} instances but has {counted}")
    return differences


__all__ = ["check_hierarchy"]
