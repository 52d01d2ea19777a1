"""Partitions (independent namespaces of one archive) and the lake health check."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from starlette.testclient import TestClient
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids
from tests.lake_inspection import LakeInspection

from medlake.api import create_app
from medlake.ingest.archive import Archive


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def partition_names(client) -> list[str]:
    response = client.get("/partitions")
    assert response.status_code == 200
    return [p["partitionName"] for p in response.json()]


def test_empty_archive_has_an_empty_default_partition(client) -> None:
    response = client.get("/dicomweb/studies")

    assert response.status_code == 204
    assert response.headers["x-total-count"] == "0"
    assert partition_names(client) == ["default"]


def test_first_stow_creates_the_partition(
    client, stow: StowCall, samples: dict[str, Path], lake: LakeInspection
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = uids(ct)
    assert "alpha" not in partition_names(client)

    response = stow([ct], partition="alpha")

    assert response.status_code == 200, response.text
    url = response.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert f"/dicomweb/partitions/alpha/studies/{study}/series/{series}/instances/{sop}" in url
    assert "alpha" in partition_names(client)
    assert client.get("/dicomweb/partitions").json() == client.get("/partitions").json()
    assert lake.instance_path(study, series, sop, partition="alpha").read_bytes() == ct.read_bytes()
    assert lake.dicom_files() == [lake.instance_path(study, series, sop, partition="alpha")]
    instance = f"/dicomweb/partitions/alpha/studies/{study}/series/{series}/instances/{sop}"
    retrieved = client.get(instance, headers={"Accept": "application/dicom"})
    assert retrieved.content == ct.read_bytes()
    assert client.get(f"{instance}/rendered").headers["content-type"] == "image/jpeg"
    [metadata] = client.get(f"{instance}/metadata").json()
    assert f"/dicomweb/partitions/alpha/studies/{study}/" in metadata["7FE00010"]["BulkDataURI"]
    [found] = client.get("/dicomweb/partitions/alpha/instances").json()
    assert found["00081190"]["Value"][0].endswith(instance)


def test_data_of_one_partition_is_invisible_from_another(
    client, stow: StowCall, samples: dict[str, Path]
) -> None:
    ct, mr = samples["CT_small.dcm"], samples["MR_small.dcm"]
    assert stow([ct], partition="alpha").status_code == 200
    assert stow([mr], partition="beta").status_code == 200
    study, series, sop = uids(ct)

    alpha = client.get("/dicomweb/partitions/alpha/studies").json()
    beta = client.get("/dicomweb/partitions/beta/studies").json()

    assert [s["0020000D"]["Value"][0] for s in alpha] == [study]
    assert [s["0020000D"]["Value"][0] for s in beta] == [uids(mr)[0]]
    for root in ("/dicomweb/partitions/beta", "/dicomweb"):
        assert client.get(f"{root}/studies", params={"StudyInstanceUID": study}).status_code == 204
        for path in (
            f"/studies/{study}",
            f"/studies/{study}/metadata",
            f"/studies/{study}/series/{series}/instances/{sop}",
            f"/studies/{study}/series/{series}/instances/{sop}/frames/1",
            f"/studies/{study}/series/{series}/instances/{sop}/rendered",
        ):
            assert client.get(f"{root}{path}").status_code == 404, f"{root}{path}"
        assert client.delete(f"{root}/studies/{study}").status_code == 404
    # Still there, where it belongs.
    assert client.get(f"/dicomweb/partitions/alpha/studies/{study}/metadata").status_code == 200


def test_same_instance_in_two_partitions(
    client, stow: StowCall, samples: dict[str, Path], lake: LakeInspection, tmp_path: Path
) -> None:
    ct = samples["CT_small.dcm"]
    study, series, sop = uids(ct)
    other = copy_with_uids(
        ct,
        tmp_path / "other.dcm",
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        PatientName="OTHER^BYTES",
    )

    assert stow([ct], partition="alpha").status_code == 200
    assert stow([other], partition="beta").status_code == 200  # no conflict across partitions

    assert lake.instance_path(study, series, sop, "alpha").read_bytes() == ct.read_bytes()
    assert lake.instance_path(study, series, sop, "beta").read_bytes() == other.read_bytes()
    assert client.delete(f"/dicomweb/partitions/alpha/studies/{study}").status_code == 204
    assert lake.instance_path(study, series, sop, "beta").exists()
    beta = client.get(
        f"/dicomweb/partitions/beta/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": "application/dicom"},
    )
    assert beta.content == other.read_bytes()


def test_change_feed_names_the_partition(client, stow: StowCall, samples: dict[str, Path]) -> None:
    assert stow([samples["CT_small.dcm"]], partition="alpha").status_code == 200
    assert stow([samples["MR_small.dcm"]]).status_code == 200

    everything = client.get("/changefeed").json()
    alpha = client.get("/changefeed", params={"partition": "alpha"}).json()

    assert [e["PartitionName"] for e in everything] == ["alpha", "default"]
    assert [e["SOPInstanceUID"] for e in alpha] == [uids(samples["CT_small.dcm"])[2]]


@pytest.mark.parametrize(
    "path",
    [
        "/studies",
        "/series",
        "/instances",
        "/studies/1.2.3",
        "/studies/1.2.3/metadata",
        "/studies/1.2.3/series/1.2.4/metadata",
        "/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1",
        "/studies/1.2.3/series/1.2.4/instances/1.2.5/rendered",
    ],
)
def test_reading_an_unknown_partition_is_404(client, path: str) -> None:
    response = client.get(f"/dicomweb/partitions/nowhere{path}")

    assert response.status_code == 404
    assert "nowhere" in response.json()["message"]


def test_create_partition_explicitly(client) -> None:
    created = client.post("/partitions/gamma")
    again = client.post("/partitions/gamma")

    assert created.status_code == 201
    assert created.json()["partitionName"] == "gamma"
    assert again.status_code == 409
    assert "gamma" in again.json()["message"]
    assert client.get("/dicomweb/partitions/gamma/studies").status_code == 204


@pytest.mark.parametrize("name", ["bad.name", "-dash-first", "x" * 65])
def test_invalid_partition_names_are_400(
    client, stow: StowCall, samples: dict[str, Path], name: str
) -> None:
    stored = stow([samples["CT_small.dcm"]], partition=name)
    read = client.get(f"/dicomweb/partitions/{name}/studies")

    for response in (stored, read):
        assert response.status_code == 400
        assert name in response.json()["message"]
    assert "bad.name" not in partition_names(client)


# --- health --------------------------------------------------------------------------------


def test_healthz_reports_a_writable_lake(client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checkedAt"]


def test_healthz_is_503_when_the_health_check_write_fails(
    archive: Archive, lake: LakeInspection
) -> None:
    folder = lake.dicom_root / "healthCheck"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("a regular file where the healthCheck folder should be")

    with TestClient(create_app(archive, background=False)) as broken:
        response = broken.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failing"
    assert "healthCheck" in body["lake"]
    assert "cannot write" in body["lake"]


def test_healthz_recovers_when_the_lake_is_writable_again(
    archive: Archive, lake: LakeInspection
) -> None:
    folder = lake.dicom_root / "healthCheck"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("blocked")
    app = create_app(archive, background=False)

    with TestClient(app) as test_client:
        assert test_client.get("/healthz").status_code == 503
        folder.unlink()
        app.state.health.check_once()  # what the background thread does every interval
        assert test_client.get("/healthz").status_code == 200
