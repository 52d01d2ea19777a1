"""Extended query tags: add / list / get / delete over HTTP, background re-indexing of
stored instances, values indexed at ingest, and QIDO-RS matching on the tags."""

from __future__ import annotations

import datetime as dt
import io
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select, update
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids

from medlake.dicom.attributes import BY_TAG
from medlake.dicomweb import extended_tags
from medlake.index.extended_values import SUPPORTED_VRS, IndexedTag, extract_values
from medlake.index.schema import extended_query_tag_values, operations
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive

CT_STUDY_AGE = "045Y"
MR_STUDY_AGE = "062Y"
HOUR = dt.timedelta(hours=1)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


@pytest.fixture
def files(samples: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """CT and MR instances with distinct PatientAge values (pydicom's have 000Y / none)."""
    return {
        "ct": copy_with_uids(samples["CT_small.dcm"], tmp_path / "ct.dcm", PatientAge=CT_STUDY_AGE),
        "mr": copy_with_uids(samples["MR_small.dcm"], tmp_path / "mr.dcm", PatientAge=MR_STUDY_AGE),
    }


@pytest.fixture
def stored(stow: StowCall, files: dict[str, Path]) -> dict[str, Path]:
    response = stow(list(files.values()))
    assert response.status_code == 200, response.text
    return files


def wait_for(client: Any, href: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll an operation until it has finished; returns its last state."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(href)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def add(client: Any, *tags: dict[str, str]) -> dict[str, Any]:
    """POST tags, expect 202, wait for the re-index; returns the finished operation."""
    response = client.post("/extendedquerytags", json=list(tags))
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["href"]
    assert body["href"].endswith(f"/operations/{body['id']}")
    operation = wait_for(client, body["href"])
    assert operation["status"] == "succeeded", operation
    return operation


def matches(client: Any, level: str, query: str) -> list[str]:
    """UIDs of the level's QIDO-RS matches."""
    response = client.get(f"/dicomweb/{level}?{query}")
    if response.status_code == 204:
        return []
    assert response.status_code == 200, response.text
    key = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[level]
    return [ds[key]["Value"][0] for ds in response.json()]


# --- adding and searching -----------------------------------------------------------------


def test_added_tags_reindex_stored_instances_and_become_searchable(
    client, stored: dict[str, Path]
) -> None:
    ct_study, _, ct_sop = uids(stored["ct"])
    mr_study, _, mr_sop = uids(stored["mr"])

    operation = add(
        client,
        {"path": "PatientAge", "level": "Study"},
        {"path": "00180050", "vr": "DS", "level": "Instance"},  # SliceThickness
    )

    assert operation["percentComplete"] == 100
    assert operation["type"] == "reindex"
    assert [r.rsplit("/", 1)[1] for r in operation["resources"]] == ["00101010", "00180050"]
    listed = client.get("/extendedquerytags").json()
    assert [(t["path"], t["vr"], t["level"], t["status"], t["queryStatus"]) for t in listed] == [
        ("00101010", "AS", "Study", "Ready", "Enabled"),
        ("00180050", "DS", "Instance", "Ready", "Enabled"),
    ]
    assert matches(client, "studies", f"PatientAge={CT_STUDY_AGE}") == [ct_study]
    assert matches(client, "studies", f"00101010={MR_STUDY_AGE}") == [mr_study]
    assert matches(client, "studies", "PatientAge=099Y") == []
    assert matches(client, "instances", "SliceThickness=5") == [ct_sop]
    assert matches(client, "instances", "SliceThickness=0.8") == [mr_sop]
    assert matches(client, "instances", f"SliceThickness=5&PatientAge={MR_STUDY_AGE}") == []


def test_instances_stored_after_the_tag_exists_are_indexed_at_ingest(
    client, stow: StowCall, files: dict[str, Path]
) -> None:
    add(client, {"path": "PatientAge", "level": "Study"})  # nothing stored yet

    response = stow([files["ct"]])

    assert response.status_code == 200, response.text
    assert matches(client, "studies", f"PatientAge={CT_STUDY_AGE}") == [uids(files["ct"])[0]]


def test_replaced_instance_is_indexed_with_its_new_value(
    client, stow: StowCall, stored: dict[str, Path], tmp_path: Path
) -> None:
    add(client, {"path": "PatientAge", "level": "Study"})
    study, series, sop = uids(stored["ct"])
    newer = copy_with_uids(
        stored["ct"], tmp_path / "ct2.dcm", study_uid=study, series_uid=series, sop_uid=sop,
        PatientAge="046Y",
    )  # fmt: skip

    assert stow([newer], method="PUT").status_code == 200

    assert matches(client, "studies", f"PatientAge={CT_STUDY_AGE}") == []
    assert matches(client, "studies", "PatientAge=046Y") == [study]


def test_tag_being_added_is_listed_but_not_yet_searchable(
    client, archive: Archive, stored: dict[str, Path]
) -> None:
    # The service, not the route: no worker starts, so the tag stays Adding.
    operation = extended_tags.add_tags(archive, [extended_tags.TagRequest("PatientAge", "Study")])

    tag = client.get("/extendedquerytags/PatientAge").json()
    assert (tag["status"], tag["queryStatus"]) == ("Adding", "Disabled")
    assert tag["operation"]["href"].endswith(f"/operations/{operation.id}")
    state = client.get(f"/operations/{operation.id}").json()
    assert (state["status"], state["percentComplete"]) == ("notStarted", 0)
    response = client.get(f"/dicomweb/studies?PatientAge={CT_STUDY_AGE}")
    assert response.status_code == 400
    assert "PatientAge" in response.json()["message"]

    finished = extended_tags.reindex(archive, operation.id, batch_size=1)

    assert (finished.status, finished.percent_complete) == ("succeeded", 100)
    assert client.get("/extendedquerytags/00101010").json()["status"] == "Ready"
    assert matches(client, "studies", f"PatientAge={CT_STUDY_AGE}") == [uids(stored["ct"])[0]]


def test_private_tag_with_vr_and_private_creator(client, stored: dict[str, Path]) -> None:
    add(client, {"path": "00091002", "vr": "SH", "privateCreator": "GEMS_IDEN_01",
                 "level": "Series"})  # fmt: skip

    tag = client.get("/extendedquerytags/00091002").json()
    assert (tag["vr"], tag["privateCreator"], tag["level"]) == ("SH", "GEMS_IDEN_01", "Series")
    assert matches(client, "series", "00091002=CT01") == [uids(stored["ct"])[1]]


def test_multi_valued_attribute_is_reported_as_an_error_not_dropped(
    client, stored: dict[str, Path]
) -> None:
    add(client, {"path": "ImageType", "level": "Instance"})

    tag = client.get("/extendedquerytags/ImageType").json()
    assert tag["errors"]["count"] == 2
    errors = client.get(tag["errors"]["href"]).json()
    assert sorted(e["sopInstanceUid"] for e in errors) == sorted(
        uids(p)[2] for p in stored.values()
    )
    assert all("ImageType" in e["errorMessage"] and "3 values" in e["errorMessage"] for e in errors)


def test_instance_level_tag_cannot_be_matched_in_a_study_search(
    client, stored: dict[str, Path]
) -> None:
    add(client, {"path": "SliceThickness", "level": "Instance"})

    response = client.get("/dicomweb/studies?SliceThickness=5")

    assert response.status_code == 400
    assert "SliceThickness" in response.json()["message"]


# --- rejected requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ([{"path": "PatientName", "level": "Study"}], 400, ["PatientName", "already searchable"]),
        ([{"path": "StudyDate", "level": "Study"}], 400, ["StudyDate", "already searchable"]),
        ([{"path": "00091002", "level": "Series"}], 400, ["00091002", "vr"]),
        ([{"path": "00091002", "vr": "SH", "level": "Series"}], 400,
         ["00091002", "privateCreator"]),
        ([{"path": "ReferencedImageSequence", "level": "Instance"}], 400,
         ["ReferencedImageSequence", "SQ"]),
        ([{"path": "ImageComments", "level": "Instance"}], 400, ["ImageComments", "VR LT"]),
        ([{"path": "PixelData", "level": "Instance"}], 400, ["PixelData", "7FE0"]),
        ([{"path": "PatientAge", "vr": "LO", "level": "Study"}], 400, ["PatientAge", "AS"]),
        ([{"path": "PatientAge", "level": "Patient"}], 400, ["'Patient'"]),
        ([{"path": "PatientAge"}], 400, ["PatientAge", "level"]),
        ([{"path": "NoSuchKeyword", "level": "Study"}], 400, ["NoSuchKeyword"]),
        ([{"path": "00400275.00321060", "level": "Study"}], 400, ["sequence"]),
        ([{"path": "PatientAge", "level": "Study", "colour": "red"}], 400, ["colour"]),
        ([{"path": "PatientAge", "level": "Study"}, {"path": "00101010", "level": "Study"}], 400,
         ["PatientAge", "more than once"]),
        ([], 400, ["no extended query tags"]),
        ({"path": "PatientAge"}, 400, ["array"]),
    ],
)  # fmt: skip
def test_invalid_tags_are_rejected_naming_the_problem(
    client, body: Any, status: int, words: list[str]
) -> None:
    response = client.post("/extendedquerytags", json=body)

    assert response.status_code == status, response.text
    message = response.json()["message"]
    for word in words:
        assert word in message
    assert client.get("/extendedquerytags").json() == []  # nothing half-added


def test_body_that_is_not_json_is_a_400(client) -> None:
    response = client.post("/extendedquerytags", content=b"PatientAge")

    assert response.status_code == 400
    assert "JSON" in response.json()["message"]


def test_adding_an_existing_tag_is_a_conflict(client) -> None:
    add(client, {"path": "PatientAge", "level": "Study"})

    response = client.post(
        "/extendedquerytags",
        json=[{"path": "PatientWeight", "level": "Study"}, {"path": "00101010", "level": "Study"}],
    )

    assert response.status_code == 409
    assert "PatientAge (00101010) already exists" in response.json()["message"]
    assert [t["path"] for t in client.get("/extendedquerytags").json()] == ["00101010"]


def _indexable_tags(count: int) -> list[str]:
    """``count`` standard, single-valued tags of supported VRs that QIDO does not index."""
    found = []
    for tag, (vr, vm, _name, retired, keyword) in sorted(DicomDictionary.items()):
        if (vr in SUPPORTED_VRS and vm == "1" and not retired and keyword
                and tag not in BY_TAG and tag >> 16 not in (0x0000, 0x0002, 0x0004)):  # fmt: skip
            found.append(f"{tag:08X}")
        if len(found) == count:
            return found
    raise AssertionError("the dictionary ran out of tags")


def test_at_most_128_tags(client) -> None:
    paths = _indexable_tags(129)

    too_many = client.post(
        "/extendedquerytags", json=[{"path": p, "level": "Instance"} for p in paths]
    )
    assert too_many.status_code == 409
    assert "limit of 128" in too_many.json()["message"]
    assert client.get("/extendedquerytags").json() == []

    add(client, *({"path": p, "level": "Instance"} for p in paths[:128]))
    one_more = client.post("/extendedquerytags", json=[{"path": paths[128], "level": "Instance"}])
    assert one_more.status_code == 409
    assert "128" in one_more.json()["message"]
    listed = client.get("/extendedquerytags?limit=200").json()
    assert len(listed) == 128


# --- get, delete, operations ------------------------------------------------------------------


def test_delete_removes_the_tag_and_its_values(client, archive: Archive, stored) -> None:
    add(client, {"path": "PatientAge", "level": "Study"})

    response = client.delete("/extendedquerytags/PatientAge")

    assert response.status_code == 204
    missing = client.get("/extendedquerytags/00101010")
    assert missing.status_code == 404
    assert "PatientAge (00101010)" in missing.json()["message"]
    assert client.get("/extendedquerytags").json() == []
    searched = client.get(f"/dicomweb/studies?PatientAge={CT_STUDY_AGE}")
    assert searched.status_code == 400
    assert "PatientAge" in searched.json()["message"]
    with archive.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(extended_query_tag_values)).scalar()
    assert left == 0
    assert client.delete("/extendedquerytags/PatientAge").status_code == 404


def test_deleting_a_tag_while_it_is_being_added_cancels_its_reindex(
    client, archive: Archive, stored
) -> None:
    operation = extended_tags.add_tags(archive, [extended_tags.TagRequest("PatientAge", "Study")])
    assert client.delete("/extendedquerytags/PatientAge").status_code == 204

    finished = extended_tags.reindex(archive, operation.id)

    assert finished.status == "failed"
    assert finished.message is not None and "deleted" in finished.message
    assert client.get("/extendedquerytags").json() == []


def test_reindex_interrupted_by_a_stopped_process_is_resumed(
    client, archive: Archive, stored: dict[str, Path]
) -> None:
    operation = extended_tags.add_tags(archive, [extended_tags.TagRequest("PatientAge", "Study")])
    with archive.engine.begin() as conn:  # as if its process died an hour ago
        conn.execute(
            update(operations)
            .where(operations.c.id == operation.id)
            .values(status="running", percent_complete=50, updated_at=utcnow() - HOUR)
        )

    assert extended_tags.resume_interrupted(archive) == [operation.id]

    assert wait_for(client, f"/operations/{operation.id}")["status"] == "succeeded"
    assert matches(client, "studies", f"PatientAge={CT_STUDY_AGE}") == [uids(stored["ct"])[0]]
    assert extended_tags.resume_interrupted(archive) == []


def test_unknown_tag_and_operation_are_404(client) -> None:
    assert client.get("/extendedquerytags/PatientAge").status_code == 404
    assert client.delete("/extendedquerytags/00101010").status_code == 404
    response = client.get("/operations/0123456789abcdef")
    assert response.status_code == 404
    assert "0123456789abcdef" in response.json()["message"]


def test_paging_parameters_are_checked(client) -> None:
    assert client.get("/extendedquerytags?limit=0").status_code == 400
    assert client.get("/extendedquerytags?limit=201").status_code == 400
    assert client.get("/extendedquerytags?offset=-1").status_code == 400


# --- value extraction (no archive) ------------------------------------------------------------


def _implicit_vr_roundtrip(ds: Dataset) -> Dataset:
    """Write ``ds`` in Implicit VR Little Endian and read it back: private elements
    come back as UN (their VR is not in the file)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_private_values_of_implicit_vr_files_are_decoded_with_the_tag_vr() -> None:
    ds = Dataset()
    block = ds.private_block(0x0011, "MEDLAKE TEST", create=True)
    block.add_new(0x01, "SL", -42)
    block.add_new(0x02, "LO", "ACME")
    read = _implicit_vr_roundtrip(ds)
    assert read[0x00111001].VR == "UN"

    values = extract_values(
        read,
        [IndexedTag(1, 0x00111001, "SL", "", "MEDLAKE TEST"),
         IndexedTag(2, 0x00111002, "LO", "", "MEDLAKE TEST")],
    )  # fmt: skip

    assert [(v.tag_id, v.number, v.text, v.error) for v in values] == [
        (1, -42.0, None, None),
        (2, None, "ACME", None),
    ]


def test_malformed_values_become_errors_naming_the_value() -> None:
    ds = Dataset()
    # As read from a file: pydicom decodes raw values only when they are accessed.
    ds[0x00100030] = RawDataElement(Tag(0x00100030), "DA", 10, b"2020-01-01", 0, False, True)
    ds[0x00180050] = RawDataElement(Tag(0x00180050), "DS", 6, b"thick ", 0, False, True)
    tags = [
        IndexedTag(1, 0x00100030, "DA", "PatientBirthDate"),
        IndexedTag(2, 0x00180050, "DS", "SliceThickness"),
        IndexedTag(3, 0x00101010, "AS", "PatientAge"),  # absent: no value, no error
    ]

    values = extract_values(ds, tags)

    assert [v.tag_id for v in values] == [1, 2]
    assert "PatientBirthDate" in (values[0].error or "") and "2020-01-01" in (values[0].error or "")
    assert "SliceThickness" in (values[1].error or "") and "thick" in (values[1].error or "")
