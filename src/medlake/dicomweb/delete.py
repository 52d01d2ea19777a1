"""Deleting studies, series and instances: index rows, lake files, change feed."""

from __future__ import annotations

from medlake.errors import NotFound, StorageError
from medlake.index.writes import DeletedInstance, delete_instances
from medlake.ingest.archive import Archive
from medlake.types import check_uid


def delete(
    archive: Archive,
    partition: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[DeletedInstance]:
    """Remove a study / series / instance; raises NotFound when nothing matches.

    Rows go first (in one transaction, with ``delete`` change-feed entries), then
    the files: a crash in between leaves files without rows, which reconciliation
    finds, never rows pointing at missing files.
    """
    check_uid(study_uid, "StudyInstanceUID")
    for value, name in ((series_uid, "SeriesInstanceUID"), (sop_uid, "SOPInstanceUID")):
        if value is not None:
            check_uid(value, name)
    with archive.engine.begin() as conn:
        removed = delete_instances(conn, partition, study_uid, series_uid, sop_uid)
    if not removed:
        what = sop_uid or series_uid or study_uid
        raise NotFound(f"{what} is not stored in partition {partition!r}")
    touched = {(d.study_uid, d.series_uid) for d in removed}
    for item in removed:
        try:
            archive.blobs.delete(item.blob_key)
        except StorageError:
            continue
    for study, series in touched:
        # The series file is rebuilt on next read if the series still has instances.
        try:
            archive.blobs.delete(archive.layout.series_metadata_key(partition, study, series))
        except StorageError:
            continue
    return removed
