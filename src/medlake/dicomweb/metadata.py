"""WADO-RS metadata: precomputed DICOM JSON per series, kept in the lake.

Each series has ``series-metadata.json.gz`` beside its instances: a JSON array
of the DICOM JSON of every instance (headers only; bulk data as BulkDataURI
relative to the study URL). Ingest marks a series stale; the file is rebuilt
once per series (on the next read or by the background refresher), never per
instance and never on a read of an up-to-date series.
"""

from __future__ import annotations

import datetime as dt
import gzip
import threading
from typing import Any

import orjson
import pydicom
from sqlalchemy import select, update

from medlake.dicom.parse import BULK_DATA_THRESHOLD
from medlake.dicomweb.locate import StoredInstance, find_instances
from medlake.errors import NotFound
from medlake.index.schema import partitions, series, studies
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.types import check_uid

_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = "00020010"
_BUILD_LOCK = threading.Lock()


def _nested_paths(dataset: pydicom.Dataset, prefix: str = "") -> dict[int, str]:
    """``sequence tag/item index/.../tag`` of every element inside a sequence item,
    keyed by ``id(element)`` (the bulk-data handler of ``to_json_dict`` only sees the
    element, and one tag can occur in many items, e.g. WaveformData)."""
    paths: dict[int, str] = {}
    for element in dataset:
        if element.VR != "SQ":
            if prefix:
                paths[id(element)] = f"{prefix}{element.tag:08x}"
            continue
        for index, item in enumerate(element.value or []):
            paths.update(_nested_paths(item, f"{prefix}{element.tag:08x}/{index}/"))
    return paths


def instance_json(stored: StoredInstance, dataset: pydicom.Dataset) -> dict[str, Any]:
    """DICOM JSON of one instance header, with bulk data as study-relative URIs
    (``.../bulkdata/{tag}``, or ``.../bulkdata/{sequence tag}/{item}/.../{tag}`` inside
    sequences; see :func:`medlake.dicomweb.retrieve.parse_bulkdata_path`)."""
    prefix = f"series/{stored.series_uid}/instances/{stored.sop_uid}"
    nested = _nested_paths(dataset)

    def bulk_uri(element: pydicom.DataElement) -> str:
        return f"{prefix}/bulkdata/{nested.get(id(element), f'{element.tag:08x}')}"

    out: dict[str, Any] = dataset.to_json_dict(BULK_DATA_THRESHOLD, bulk_uri)
    out[_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [stored.transfer_syntax_uid]}
    if stored.frames is not None or stored.number_of_frames:
        out[f"{_PIXEL_DATA:08X}"] = {
            "vr": "OB" if stored.encapsulated else "OW",
            "BulkDataURI": f"{prefix}/bulkdata/{_PIXEL_DATA:08x}",
        }
    return dict(sorted(out.items()))


def build_series_metadata(
    archive: Archive, partition: str, study_uid: str, series_uid: str
) -> bytes:
    """Re-read the headers of a series, write its metadata file, return the JSON."""
    with archive.engine.connect() as conn:
        found = find_instances(conn, partition, study_uid, series_uid)
        seen = conn.execute(
            select(series.c.id, series.c.updated_at).where(
                series.c.series_uid == series_uid,
                series.c.partition_id
                == select(partitions.c.id).where(partitions.c.name == partition).scalar_subquery(),
            )
        ).one()
    items = []
    for stored in found:
        with archive.blobs.open(stored.blob_key) as fh:
            dataset = pydicom.dcmread(fh, stop_before_pixels=True)
        items.append(instance_json(stored, dataset))
    body = orjson.dumps(items)
    archive.blobs.put_bytes(
        archive.layout.series_metadata_key(partition, study_uid, series_uid),
        gzip.compress(body, compresslevel=1),
    )
    with archive.engine.begin() as conn:
        # Only clear the flag if nothing was stored into the series meanwhile.
        conn.execute(
            update(series)
            .where(series.c.id == seen.id, series.c.updated_at == seen.updated_at)
            .values(metadata_stale=False)
        )
    return body


def series_metadata(archive: Archive, partition: str, study_uid: str, series_uid: str) -> bytes:
    """The JSON array of the series' instance metadata (rebuilt first if stale)."""
    with archive.engine.connect() as conn:
        stale = _stale_flags(conn, partition, study_uid, series_uid)
    return _series_json(archive, partition, study_uid, series_uid, stale[series_uid])


def study_metadata(archive: Archive, partition: str, study_uid: str) -> bytes:
    """The JSON array of every instance of a study: the series arrays concatenated."""
    with archive.engine.connect() as conn:
        stale = _stale_flags(conn, partition, study_uid, None)
    parts = [
        _series_json(archive, partition, study_uid, uid, is_stale)[1:-1]
        for uid, is_stale in stale.items()
    ]
    return b"[" + b",".join(p for p in parts if p) + b"]"


def _series_json(
    archive: Archive, partition: str, study_uid: str, series_uid: str, stale: bool
) -> bytes:
    key = archive.layout.series_metadata_key(partition, study_uid, series_uid)
    if not stale:
        try:
            return gzip.decompress(archive.blobs.read_bytes(key))
        except NotFound:
            pass
    with _BUILD_LOCK:
        return build_series_metadata(archive, partition, study_uid, series_uid)


def _stale_flags(
    conn: Any, partition: str, study_uid: str, series_uid: str | None
) -> dict[str, bool]:
    check_uid(study_uid, "StudyInstanceUID")
    query = (
        select(series.c.series_uid, series.c.metadata_stale)
        .join(studies, studies.c.id == series.c.study_id)
        .join(partitions, partitions.c.id == series.c.partition_id)
        .where(partitions.c.name == partition, studies.c.study_uid == study_uid)
        .order_by(series.c.series_number, series.c.id)
    )
    if series_uid is not None:
        check_uid(series_uid, "SeriesInstanceUID")
        query = query.where(series.c.series_uid == series_uid)
    flags = {row.series_uid: bool(row.metadata_stale) for row in conn.execute(query)}
    if not flags:
        what = f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
        raise NotFound(f"{what} is not stored in partition {partition!r}")
    return flags


def stale_series(
    archive: Archive, quiet_seconds: float = 0.0, limit: int = 50
) -> list[tuple[str, str, str]]:
    """(partition, study, series) of stale series that received nothing for ``quiet_seconds``."""
    quiet_since = utcnow() - dt.timedelta(seconds=quiet_seconds)
    with archive.engine.connect() as conn:
        rows = conn.execute(
            select(partitions.c.name, studies.c.study_uid, series.c.series_uid)
            .join(studies, studies.c.id == series.c.study_id)
            .join(partitions, partitions.c.id == series.c.partition_id)
            .where(series.c.metadata_stale.is_(True), series.c.updated_at <= quiet_since)
            .limit(limit)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]
