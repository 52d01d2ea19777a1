"""DELETE of studies, series and instances, and the change feed that records every change."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids
from tests.lake_inspection import LakeInspection

STUDY, SERIES_A, SERIES_B = (
    "1.2.826.0.1.3680043.10.1.1",
    "1.2.826.0.1.3680043.10.1.2",
    "1.2.826.0.1.3680043.10.1.3",
)


@pytest.fixture
def study_files(stow: StowCall, samples: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """One study, series A with instances a1..a3 (CT) and series B with b1 (MR), stored."""
    files = {
        f"a{i}": copy_with_uids(
            samples["CT_small.dcm"],
            tmp_path / f"a{i}.dcm",
            study_uid=STUDY,
            series_uid=SERIES_A,
            sop_uid=f"1.2.826.0.1.3680043.10.2.{i}",
            InstanceNumber=i,
        )
        for i in (1, 2, 3)
    }
    files["b1"] = copy_with_uids(
        samples["MR_small.dcm"],
        tmp_path / "b1.dcm",
        study_uid=STUDY,
        series_uid=SERIES_B,
        sop_uid="1.2.826.0.1.3680043.10.3.1",
    )
    response = stow(list(files.values()))
    assert response.status_code == 200, response.text
    return files


def sop(name: str) -> str:
    return {
        "a1": "1.2.826.0.1.3680043.10.2.1",
        "a2": "1.2.826.0.1.3680043.10.2.2",
        "a3": "1.2.826.0.1.3680043.10.2.3",
        "b1": "1.2.826.0.1.3680043.10.3.1",
    }[name]


def instance_count(client, url: str) -> int:
    response = client.get(url)
    assert response.status_code in (200, 204), response.text
    return int(response.headers["x-total-count"])


def feed(client, **params: str) -> list[dict]:
    response = client.get("/changefeed", params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.usefixtures("study_files")
def test_delete_instance(client, lake: LakeInspection) -> None:
    url = f"/dicomweb/studies/{STUDY}/series/{SERIES_A}/instances/{sop('a2')}"
    assert client.get(f"{url}/metadata").status_code == 200  # builds the series metadata file

    response = client.delete(url)

    assert response.status_code == 204
    assert not lake.instance_path(STUDY, SERIES_A, sop("a2")).exists()
    assert lake.instance_path(STUDY, SERIES_A, sop("a1")).exists()
    assert client.get(url).status_code == 404
    assert instance_count(client, f"/dicomweb/studies/{STUDY}/series/{SERIES_A}/instances") == 2
    [study] = client.get("/dicomweb/studies").json()
    assert study["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
    metadata = client.get(f"/dicomweb/studies/{STUDY}/series/{SERIES_A}/metadata").json()
    assert {i["00080018"]["Value"][0] for i in metadata} == {sop("a1"), sop("a3")}
    assert lake.row_counts()["instances"] == 3
    assert lake.row_counts()["instance_metadata"] == 3


@pytest.mark.usefixtures("study_files")
def test_delete_series(client, lake: LakeInspection) -> None:
    assert client.get(f"/dicomweb/studies/{STUDY}/series/{SERIES_A}/metadata").status_code == 200
    series_folder = lake.dicom_root / "default" / STUDY / SERIES_A

    response = client.delete(f"/dicomweb/studies/{STUDY}/series/{SERIES_A}")

    assert response.status_code == 204
    assert not series_folder.exists()  # instances and series-metadata.json.gz are gone
    assert lake.instance_path(STUDY, SERIES_B, sop("b1")).exists()
    series = client.get(f"/dicomweb/studies/{STUDY}/series").json()
    assert [s["0020000E"]["Value"][0] for s in series] == [SERIES_B]
    [study] = client.get("/dicomweb/studies").json()
    assert study["00201206"]["Value"] == [1]
    assert study["00080061"]["Value"] == ["MR"]  # ModalitiesInStudy follows
    assert client.get(f"/dicomweb/studies/{STUDY}/series/{SERIES_A}").status_code == 404


@pytest.mark.usefixtures("study_files")
def test_delete_study(client, lake: LakeInspection) -> None:
    response = client.delete(f"/dicomweb/studies/{STUDY}")

    assert response.status_code == 204
    assert lake.dicom_files() == []
    assert not (lake.dicom_root / "default" / STUDY).exists()
    counts = lake.row_counts()
    assert (
        counts["studies"],
        counts["series"],
        counts["instances"],
        counts["instance_metadata"],
    ) == (0, 0, 0, 0)
    assert client.get("/dicomweb/studies").status_code == 204
    assert client.get(f"/dicomweb/studies/{STUDY}").status_code == 404
    assert client.get(f"/dicomweb/studies/{STUDY}/metadata").status_code == 404
    entries = feed(client)
    assert [e["Action"] for e in entries] == ["create"] * 4 + ["delete"] * 4
    assert {e["State"] for e in entries} == {"deleted"}


@pytest.mark.usefixtures("study_files")
def test_store_again_after_delete(
    client, stow: StowCall, study_files: dict[str, Path], lake: LakeInspection
) -> None:
    assert client.delete(f"/dicomweb/studies/{STUDY}").status_code == 204

    response = stow([study_files["a1"]])

    assert response.status_code == 200, response.text
    assert (
        lake.instance_path(STUDY, SERIES_A, sop("a1")).read_bytes()
        == study_files["a1"].read_bytes()
    )
    assert feed(client)[-1]["Action"] == "create"


@pytest.mark.usefixtures("study_files")
def test_delete_what_is_not_there_is_404(client) -> None:
    for url, named in (
        ("/dicomweb/studies/1.2.3.999", "1.2.3.999"),
        (f"/dicomweb/studies/{STUDY}/series/1.2.3.998", "1.2.3.998"),
        (f"/dicomweb/studies/{STUDY}/series/{SERIES_A}/instances/1.2.3.997", "1.2.3.997"),
    ):
        response = client.delete(url)
        assert response.status_code == 404, url
        assert named in response.json()["message"]
    response = client.delete("/dicomweb/studies/1.2.abc")
    assert response.status_code == 400
    assert "1.2.abc" in response.json()["message"]
    assert len(feed(client)) == 4  # nothing was recorded


@pytest.mark.usefixtures("study_files")
def test_change_feed_entries_and_states(client) -> None:
    assert (
        client.delete(
            f"/dicomweb/studies/{STUDY}/series/{SERIES_A}/instances/{sop('a3')}"
        ).status_code
        == 204
    )

    entries = feed(client)

    assert [e["Sequence"] for e in entries] == sorted(e["Sequence"] for e in entries)
    assert len({e["Sequence"] for e in entries}) == 5
    by_action = {(e["Action"], e["SOPInstanceUID"]): e for e in entries}
    assert by_action[("create", sop("a3"))]["State"] == "deleted"
    assert by_action[("create", sop("a1"))]["State"] == "current"
    deleted = by_action[("delete", sop("a3"))]
    assert (deleted["StudyInstanceUID"], deleted["SeriesInstanceUID"]) == (STUDY, SERIES_A)
    assert deleted["PartitionName"] == "default"
    assert dt.datetime.fromisoformat(deleted["Timestamp"]).tzinfo is not None
    assert client.get("/changefeed/latest").json() == entries[-1]


@pytest.mark.usefixtures("study_files")
def test_change_feed_paging_by_offset_and_limit(client) -> None:
    whole = feed(client)
    pages, offset = [], 0
    while page := feed(client, offset=str(offset), limit="3"):
        assert len(page) <= 3
        pages.extend(page)
        offset = page[-1]["Sequence"]

    assert pages == whole
    assert len(pages) == 4


def test_change_feed_time_window(client, stow: StowCall, samples: dict[str, Path]) -> None:
    assert stow([samples["CT_small.dcm"]]).status_code == 200
    first = feed(client)[-1]
    assert stow([samples["MR_small.dcm"]]).status_code == 200
    second = feed(client)[-1]
    assert second["Timestamp"] > first["Timestamp"]

    assert feed(client, endTime=second["Timestamp"]) == [first]
    assert feed(client, startTime=second["Timestamp"]) == [second]
    assert feed(client, startTime=first["Timestamp"], endTime="2999-01-01T00:00:00Z") == [
        first,
        second,
    ]
    assert feed(client, startTime="2999-01-01T00:00:00") == []


def test_latest_of_an_empty_feed_is_204(client) -> None:
    response = client.get("/changefeed/latest")

    assert response.status_code == 204
    assert feed(client) == []


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"startTime": "yesterday"}, "yesterday"),
        ({"endTime": "2024-13-01"}, "2024-13-01"),
        ({"limit": "0"}, "0"),
        ({"limit": "abc"}, "abc"),
        ({"offset": "-4"}, "-4"),
        ({"startTime": "2024-02-01", "endTime": "2024-01-01"}, "startTime"),
    ],
)
def test_bad_change_feed_parameters_are_400(client, params: dict[str, str], named: str) -> None:
    response = client.get("/changefeed", params=params)

    assert response.status_code == 400
    assert named in response.json()["message"]
