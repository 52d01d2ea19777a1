"""De-identified DICOMweb for the researcher role: QIDO-RS, WADO-RS metadata and instances.

Each function answers like its identified counterpart (:func:`run_search`,
:mod:`medlake.dicomweb.metadata`, :func:`medlake.dicomweb.retrieve.retrieve`), which it
calls, and passes every header through :func:`medlake.dicom.deidentify.deidentify`
before it leaves. UIDs in requests are the pseudonyms of earlier answers: they are
mapped back through the index (an unknown pseudonym is a 404, never a search on the
value given, so a caller cannot probe for a real UID). Matching is limited to the
attributes in :data:`MATCHABLE` (and pseudonymous UIDs and Patient IDs): matching on a
removed attribute (a name, a birth date) would tell who is in the archive even when the
answer shows nothing.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import orjson
import pydicom
from pydicom import Dataset

from medlake.dicom.attributes import Level, lookup
from medlake.dicom.deidentify import Pseudonyms, deidentify
from medlake.dicomweb import metadata as metadata_service
from medlake.dicomweb import retrieve as retrieve_service
from medlake.dicomweb.search import SearchResult, run_search
from medlake.errors import InvalidInput, NotFound
from medlake.ingest.archive import Archive
from medlake.security.pseudonyms import (
    UnknownPseudonym,
    originals,
    partition_pseudonyms,
    pseudonymous_errors,
    remember_issued,
)
from medlake.types import check_uid

__all__ = ["MATCHABLE", "deidentified_instance", "deidentified_metadata", "deidentified_search"]

#: Attributes a de-identified QIDO-RS request may match on (none identifies a person).
MATCHABLE = frozenset(
    {
        "Modality",
        "ModalitiesInStudy",
        "SOPClassUID",
        "BodyPartExamined",
        "SeriesNumber",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    }
)
#: Attributes matched on pseudonyms, mapped back to what they replaced (kind, keyword).
_PSEUDONYMOUS = {
    "StudyInstanceUID": "uid",
    "SeriesInstanceUID": "uid",
    "SOPInstanceUID": "uid",
    "PatientID": "patient",
}
_RESERVED = frozenset({"limit", "offset", "fuzzymatching", "includefield"})
_RETRIEVE_URL = "00081190"


def _originals_of_path(
    archive: Archive, part: int, partition: str, given: list[tuple[str, str | None]]
) -> list[str | None]:
    """The UIDs the pseudonyms of a URL stand for (404 for one never handed out)."""
    wanted = [(name, uid) for name, uid in given if uid is not None]
    for name, uid in wanted:
        check_uid(uid, name)
    with archive.engine.connect() as conn:
        found = originals(conn, part, [("uid", uid) for _, uid in wanted])
    out: list[str | None] = []
    for name, value in given:
        if value is None:
            out.append(None)
            continue
        original = found.get(("uid", value))
        if original is None:
            raise NotFound(f"{name} {value} is not a de-identified UID of partition {partition!r}")
        out.append(original)
    return out


def _known(named: dict[str | None, str | None]) -> dict[str, str]:
    return {k: v for k, v in named.items() if k is not None and v is not None}


def _query(
    archive: Archive,
    part: int,
    params: Iterable[tuple[str, str]],
    named: dict[str | None, str | None],
) -> list[tuple[str, str]]:
    """The QIDO-RS parameters with pseudonyms mapped back (each original added to
    ``named`` with its pseudonym); 400 for a forbidden match."""
    kept: list[tuple[str, str]] = []
    mapped: list[tuple[str, str, list[str]]] = []
    for name, value in params:
        if name in _RESERVED:
            kept.append((name, value))
            continue
        found = lookup(name)
        keyword = found[1] if found else name
        if keyword in MATCHABLE:
            kept.append((name, value))
        elif keyword in _PSEUDONYMOUS:
            values = [v for v in value.replace("\\", ",").split(",") if v]
            mapped.append((keyword, _PSEUDONYMOUS[keyword], values))
        else:
            raise InvalidInput(
                f"{keyword} cannot be matched in a de-identified view; match on "
                f"{', '.join(sorted(MATCHABLE | set(_PSEUDONYMOUS)))}"
            )
    with archive.engine.connect() as conn:
        found_originals = originals(conn, part, [(k, v) for _, k, vs in mapped for v in vs])
    for keyword, kind, values in mapped:
        known = {found_originals[(kind, v)]: v for v in values if (kind, v) in found_originals}
        named.update(known)
        real = list(known)
        if not real:
            raise UnknownPseudonym(keyword)
        kept.append((keyword, ",".join(real) if kind == "uid" else real[0]))
    return kept


def _without_bulk_data(item: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON without BulkDataURI elements (their URIs name the original UIDs; the
    de-identified view serves no bulk data apart from whole instances)."""
    out: dict[str, Any] = {}
    for tag, element in item.items():
        if "BulkDataURI" in element:
            continue
        if element.get("vr") == "SQ" and element.get("Value"):
            element = {**element, "Value": [_without_bulk_data(i) for i in element["Value"]]}
        out[tag] = element
    return out


def _deidentified_json(
    item: dict[str, Any], pseudonyms: Pseudonyms
) -> tuple[dict[str, Any], Dataset]:
    dataset = Dataset.from_json(_without_bulk_data(item))
    deidentify(dataset, pseudonyms)
    return dict(sorted(dataset.to_json_dict().items())), dataset


def _retrieve_url(dataset: Dataset, level: Level, base_url: str) -> str:
    url = f"{base_url}/studies/{dataset.get('StudyInstanceUID', '')}"
    if level is not Level.STUDY:
        url += f"/series/{dataset.get('SeriesInstanceUID', '')}"
    if level is Level.INSTANCE:
        url += f"/instances/{dataset.get('SOPInstanceUID', '')}"
    return url


def deidentified_search(
    archive: Archive,
    level: Level,
    partition: str,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    base_url: str = "",
) -> SearchResult:
    """QIDO-RS over de-identified results; ``study_uid``/``series_uid`` are pseudonyms."""
    part, pseudonyms = partition_pseudonyms(archive.engine, partition)
    study, series = _originals_of_path(
        archive,
        part,
        partition,
        [("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)],
    )
    named = {study: study_uid, series: series_uid}
    try:
        query = _query(archive, part, params, named)
    except UnknownPseudonym:
        return SearchResult([], 0)
    with pseudonymous_errors(_known(named)):
        result = run_search(archive, level, partition, query, study_uid=study, series_uid=series)
    datasets = []
    for item in result.datasets:
        item.pop(_RETRIEVE_URL, None)
        out, dataset = _deidentified_json(item, pseudonyms)
        if base_url:
            out[_RETRIEVE_URL] = {"vr": "UR", "Value": [_retrieve_url(dataset, level, base_url)]}
        datasets.append(dict(sorted(out.items())))
    remember_issued(archive.engine, part, pseudonyms)
    return SearchResult(datasets, result.total, result.warning)


def deidentified_metadata(
    archive: Archive,
    partition: str,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> bytes:
    """WADO-RS metadata (DICOM JSON array) of a study, series or instance, de-identified."""
    part, pseudonyms = partition_pseudonyms(archive.engine, partition)
    study, series, sop = _originals_of_path(
        archive, part, partition,
        [("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
         ("SOPInstanceUID", sop_uid)],
    )  # fmt: skip
    assert study is not None
    with pseudonymous_errors(_known({study: study_uid, series: series_uid})):
        if series is None:
            body = metadata_service.study_metadata(archive, partition, study)
        else:
            body = metadata_service.series_metadata(archive, partition, study, series)
    items: list[dict[str, Any]] = orjson.loads(body)
    if sop is not None:
        items = [i for i in items if i.get("00080018", {}).get("Value") == [sop]]
        if not items:
            # The index knows the instance but the metadata file does not (yet): 404 names
            # the pseudonyms, as the identified route would name the UIDs.
            raise NotFound(f"instance {sop_uid} of series {series_uid} is not stored")
    out = [_deidentified_json(item, pseudonyms)[0] for item in items]
    remember_issued(archive.engine, part, pseudonyms)
    return orjson.dumps(out)


def deidentified_instance(
    archive: Archive, partition: str, study_uid: str, series_uid: str, sop_uid: str
) -> bytes:
    """One instance as a Part-10 file with a de-identified header (pixel data as stored,
    in its stored transfer syntax). Read whole into memory: the header is rewritten."""
    part, pseudonyms = partition_pseudonyms(archive.engine, partition)
    study, series, sop = _originals_of_path(
        archive, part, partition,
        [("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
         ("SOPInstanceUID", sop_uid)],
    )  # fmt: skip
    assert study is not None and series is not None and sop is not None
    with pseudonymous_errors({study: study_uid, series: series_uid, sop: sop_uid}):
        stored = retrieve_service.retrieve(archive, partition, study, series, sop)[0]
        with archive.blobs.open(stored.blob_key) as fh:
            dataset = pydicom.dcmread(fh)
    deidentify(dataset, pseudonyms)
    out = io.BytesIO()
    dataset.save_as(out)
    remember_issued(archive.engine, part, pseudonyms)
    return out.getvalue()
