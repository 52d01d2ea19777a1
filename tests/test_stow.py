"""STOW-RS: storing instances, the response dataset, idempotency and upsert."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
from tests.conftest import LiveServer, StowCall
from tests.dicomweb_payloads import copy_with_uids, multipart_body, new_boundary, stow_headers
from tests.lake_inspection import LakeInspection

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
SOP_INSTANCE_UID = "00081155"
SOP_CLASS_UID = "00081150"
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _referenced(body: dict) -> list[str]:
    return [
        i[SOP_INSTANCE_UID]["Value"][0]
        for i in body.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    ]


def _changed_copy(path: Path, folder: Path) -> Path:
    """The same instance (same UIDs) with other bytes: another PatientName."""
    study, series, sop = _uids(path)
    return copy_with_uids(
        path,
        folder / "changed.dcm",
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        PatientName="CHANGED^NAME",
    )


def _failed(body: dict) -> dict[str, int]:
    return {
        i[SOP_INSTANCE_UID].get("Value", ["?"])[0]: i[FAILURE_REASON]["Value"][0]
        for i in body.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    }


def test_stored_instance_is_in_the_lake_byte_identical(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = _uids(ct)

    response = stow([ct])

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert FAILED_SOP_SEQUENCE not in body
    [item] = body[REFERENCED_SOP_SEQUENCE]["Value"]
    assert item[SOP_INSTANCE_UID]["Value"] == [sop]
    assert item[SOP_CLASS_UID]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert item[RETRIEVE_URL]["Value"][0].endswith(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    )
    assert body[RETRIEVE_URL]["Value"][0].endswith(f"/dicomweb/studies/{study}")
    stored = lake.instance_path(study, series, sop)
    assert stored.read_bytes() == ct.read_bytes()
    assert lake.dicom_files() == [stored]
    assert lake.staging_files() == []


def test_every_codec_is_stored_as_sent(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    files = list(samples.values())

    response = stow(files)

    assert response.status_code == 200, response.text
    assert sorted(_referenced(response.json())) == sorted(_uids(f)[2] for f in files)
    for path in files:
        assert lake.instance_path(*_uids(path)).read_bytes() == path.read_bytes(), path.name
    assert lake.row_counts()["instances"] == len(files)


def test_many_instances_of_several_studies_in_one_request(
    stow: StowCall, demo_files: list[Path], lake: LakeInspection
) -> None:
    response = stow(demo_files)

    assert response.status_code == 200, response.text
    body = response.json()
    assert len(_referenced(body)) == len(demo_files) == 37
    assert RETRIEVE_URL not in body  # several studies: no single study URL
    counts = lake.row_counts()
    assert (counts["studies"], counts["series"], counts["instances"]) == (4, 7, 37)
    assert len(lake.dicom_files()) == 37


def test_store_into_the_study_of_the_url(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    mr = samples["MR_small.dcm"]
    study, series, sop = _uids(mr)

    response = stow([mr], study=study)

    assert response.status_code == 200, response.text
    assert _referenced(response.json()) == [sop]
    assert lake.instance_path(study, series, sop).read_bytes() == mr.read_bytes()


def test_single_part_application_dicom_body(
    client, samples: dict[str, Path], lake: LakeInspection
) -> None:
    ct = samples["CT_small.dcm"]

    response = client.post(
        "/dicomweb/studies", content=ct.read_bytes(), headers={"Content-Type": "application/dicom"}
    )

    assert response.status_code == 200, response.text
    assert lake.instance_path(*_uids(ct)).read_bytes() == ct.read_bytes()


def test_chunked_upload_is_stored(client, samples: dict[str, Path], lake: LakeInspection) -> None:
    """A body sent without Content-Length, in small chunks, arrives whole."""
    rtdose = samples["rtdose.dcm"]
    boundary = new_boundary()
    data = rtdose.read_bytes()

    def chunks():
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        for start in range(0, len(data), 333):
            yield data[start : start + 333]
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/dicomweb/studies",
        content=chunks(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"'
        },
    )

    assert response.status_code == 200, response.text
    assert lake.instance_path(*_uids(rtdose)).read_bytes() == data


def test_same_instance_twice_with_same_bytes_is_idempotent(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, client
) -> None:
    ct = samples["CT_small.dcm"]
    first = stow([ct])
    before = lake.row_counts()

    again = stow([ct])
    twice_in_one = stow([ct, ct])

    for response in (first, again, twice_in_one):
        assert response.status_code == 200, response.text
        assert FAILED_SOP_SEQUENCE not in response.json()
    assert lake.row_counts() == before  # no new rows, no new change-feed entries
    assert len(lake.dicom_files()) == 1
    assert len(client.get("/changefeed").json()) == 1


def test_same_instance_with_other_bytes_is_a_conflict(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = _uids(ct)
    changed = _changed_copy(ct, tmp_path)
    assert stow([ct]).status_code == 200

    response = stow([changed])

    assert response.status_code == 409, response.text
    body = response.json()
    assert _failed(body) == {sop: 0x0111}  # Duplicate SOP Instance
    assert REFERENCED_SOP_SEQUENCE not in body
    assert sop in response.headers["warning"]
    assert "PUT" in response.headers["warning"]
    assert lake.instance_path(study, series, sop).read_bytes() == ct.read_bytes()


def test_same_instance_with_other_bytes_twice_in_one_request(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = _uids(ct)
    changed = _changed_copy(ct, tmp_path)

    response = stow([ct, changed])

    assert response.status_code == 202, response.text
    body = response.json()
    assert _referenced(body) == [sop]
    assert _failed(body) == {sop: 0x0111}
    assert lake.instance_path(study, series, sop).read_bytes() == ct.read_bytes()


def test_put_replaces_an_instance(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path, client
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = _uids(ct)
    changed = _changed_copy(ct, tmp_path)
    assert stow([ct]).status_code == 200

    response = stow([changed], method="PUT")

    assert response.status_code == 200, response.text
    assert _referenced(response.json()) == [sop]
    assert lake.instance_path(study, series, sop).read_bytes() == changed.read_bytes()
    assert len(lake.dicom_files()) == 1
    counts = lake.row_counts()
    assert (counts["studies"], counts["series"], counts["instances"]) == (1, 1, 1)
    feed = client.get("/changefeed").json()
    assert [(e["Action"], e["State"]) for e in feed] == [
        ("create", "replaced"),
        ("update", "current"),
    ]
    found = client.get("/dicomweb/studies", params={"PatientName": "CHANGED^NAME"})
    assert found.status_code == 200
    # The QIDO study attributes follow the new instance.
    assert found.json()[0]["0020000D"]["Value"] == [study]


def test_put_into_study_url_stores_new_instances_too(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    mr = samples["MR_small.dcm"]
    study, series, sop = _uids(mr)

    response = stow([mr], study=study, method="PUT")

    assert response.status_code == 200, response.text
    assert lake.instance_path(study, series, sop).read_bytes() == mr.read_bytes()


def test_put_cannot_move_an_instance_to_another_study(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = _uids(ct)
    moved = copy_with_uids(ct, tmp_path / "moved.dcm", sop_uid=sop)
    assert stow([ct]).status_code == 200

    response = stow([moved], method="PUT")

    assert response.status_code == 409, response.text
    assert _failed(response.json()) == {sop: 0x0111}
    assert study in response.headers["warning"]
    assert lake.dicom_files() == [lake.instance_path(study, series, sop)]


def test_partial_success_lists_each_instance(
    stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    ct = samples["CT_small.dcm"]

    response = stow([ct, b"this is not DICOM at all" * 10])

    assert response.status_code == 202, response.text
    body = response.json()
    assert _referenced(body) == [_uids(ct)[2]]
    [failure] = body[FAILED_SOP_SEQUENCE]["Value"]
    assert failure[FAILURE_REASON]["Value"] == [0xC000]  # Cannot understand
    assert "DICOM" in response.headers["warning"]
    assert lake.dicom_files() == [lake.instance_path(*_uids(ct))]
    assert lake.staging_files() == []


def test_concurrent_stores_of_the_same_instance_are_idempotent(
    live_server: LiveServer, samples: dict[str, Path], lake: LakeInspection
) -> None:
    """Clients retrying an upload in parallel: every request succeeds and the file stays."""
    ct = samples["CT_small.dcm"]
    boundary = new_boundary()
    body = multipart_body([ct], boundary)
    start = threading.Barrier(6)

    def store() -> int:
        start.wait()
        response = httpx.post(
            f"{live_server.dicomweb}/studies",
            content=body,
            headers=stow_headers(boundary),
            timeout=60,
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda _: store(), range(6)))

    assert statuses == [200] * 6
    assert lake.instance_path(*_uids(ct)).read_bytes() == ct.read_bytes()
    counts = lake.row_counts()
    assert (counts["instances"], counts["change_feed"]) == (1, 1)
    retrieved = httpx.get(
        f"{live_server.dicomweb}/studies/{_uids(ct)[0]}/series/{_uids(ct)[1]}/instances/{_uids(ct)[2]}",
        headers={"Accept": "application/dicom"},
    )
    assert retrieved.content == ct.read_bytes()
