"""Every stored DICOM study gets a FHIR ImagingStudy (subject: its Patient; endpoint: the
DICOMweb service), kept up to date from the change feed by a background worker, and by
``medlake fhir sync-imaging`` for what was stored while no server ran."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from tests.cohort_support import dicom_study, study_uid_of
from tests.conftest import LiveServer, StowCall
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.clinical.imaging_study import ImagingStudySync, sync_imaging_studies
from medlake.ingest.archive import Archive

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def imaging_study(http: Any, study_uid: str) -> dict[str, Any] | None:
    """The ImagingStudy of a study found by its identifier through FHIR search."""
    response = http.get(
        "/fhir/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}
    )
    assert response.status_code == 200, response.text
    entries = response.json().get("entry") or []
    assert len(entries) <= 1
    return entries[0]["resource"] if entries else None


def wait_for(http: Any, study_uid: str, *, versions: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + 60  # a generous bound for a loaded machine, not a target
    while time.monotonic() < deadline:
        found = imaging_study(http, study_uid)
        if found is not None and int(found["meta"]["versionId"]) >= versions:
            return found
        time.sleep(0.1)
    pytest.fail(f"no ImagingStudy (version {versions}) for study {study_uid}")


@pytest.fixture
def worker(archive: Archive) -> Iterator[ImagingStudySync]:
    archive.settings.imaging_study_quiet_seconds = 0.2
    sync = ImagingStudySync(archive, poll_seconds=0.2).start()
    yield sync
    sync.stop()


def test_imaging_study_appears_after_stow_with_endpoint_and_subject(
    archive: Archive, live_server: LiveServer, worker: ImagingStudySync, tmp_path: Path
) -> None:
    archive.settings.public_base_url = live_server.url
    files = dicom_study(tmp_path / "s", patient_id="MRN-7", study_date="20240105",
                        series_count=2, instances=2, name="DOE^JANE^Q")  # fmt: skip
    uid = study_uid_of(files)
    client = DICOMwebClient(live_server.dicomweb)
    client.store_instances([pydicom.dcmread(f) for f in files])

    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        study = wait_for(http, uid)
        assert study["status"] == "available"
        assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}
        # StudyDate + StudyTime with the template's TimezoneOffsetFromUTC (-0500)
        assert study["started"] == "2024-01-05T10:15:00-05:00"
        assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 4
        assert [s["modality"]["code"] for s in study["series"]] == ["CT", "CT"]
        assert study["series"][0]["bodySite"] == {"display": "CHEST"}
        instance = study["series"][0]["instance"][0]
        assert instance["sopClass"] == {
            "system": "urn:ietf:rfc:3986",
            "code": f"urn:oid:{CT_IMAGE_STORAGE}",
        }

        subject = http.get(f"/fhir/{study['subject']['reference']}").json()
        assert subject["identifier"] == [
            {"system": "urn:medlake:default:patient-id", "value": "MRN-7"}
        ]
        assert subject["name"][0]["family"] == "DOE"
        assert subject["name"][0]["given"] == ["JANE", "Q"]
        assert subject["gender"] == "female" and subject["birthDate"] == "1960-01-01"

        endpoint = http.get(f"/fhir/{study['endpoint'][0]['reference']}").json()
        assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
        assert endpoint["address"] == live_server.dicomweb

    # The endpoint is a working DICOMweb service for the study.
    metadata = DICOMwebClient(endpoint["address"]).retrieve_study_metadata(uid)
    assert len(metadata) == 4


def test_more_instances_update_the_imaging_study_and_a_quiet_resync_changes_nothing(
    archive: Archive, client: Any, stow: StowCall, worker: ImagingStudySync, tmp_path: Path
) -> None:
    files = dicom_study(tmp_path / "a", patient_id="MRN-8", study_date="20240105", instances=2)
    uid = study_uid_of(files)
    assert stow(files).status_code == 200
    first = wait_for(client, uid)
    assert first["numberOfInstances"] == 2
    more = dicom_study(tmp_path / "b", patient_id="MRN-8", study_date="20240105",
                       instances=3, study_uid=uid)  # fmt: skip
    assert stow(more).status_code == 200
    second = wait_for(client, uid, versions=2)
    assert second["numberOfInstances"] == 5 and second["numberOfSeries"] == 2
    assert second["subject"] == first["subject"]  # same PatientID, same Patient

    worker.stop()
    report = sync_imaging_studies(archive, full=True)
    assert report.studies >= 1 and report.written == 0 and not report.failed
    assert imaging_study(client, uid)["meta"]["versionId"] == "2"


def test_a_quiet_study_waits_while_another_study_is_still_arriving(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    quiet = 0.5
    first = dicom_study(tmp_path / "a", patient_id="MRN-10", study_date="20240105")
    second = dicom_study(tmp_path / "b", patient_id="MRN-11", study_date="20240105")
    sync = ImagingStudySync(archive)
    assert stow(first).status_code == 200
    time.sleep(quiet + 0.1)  # the first study is quiet now ...
    assert stow(second).status_code == 200  # ... but the archive is receiving

    report = sync.run_once(quiet=quiet)
    assert report.written == 0 and report.pending == 2
    assert imaging_study(client, study_uid_of(first)) is None

    time.sleep(quiet + 0.1)  # the whole archive is quiet: both are written
    assert sync.run_once(quiet=quiet).written == 2
    assert imaging_study(client, study_uid_of(first)) is not None
    assert imaging_study(client, study_uid_of(second)) is not None


def test_a_deleted_study_loses_its_imaging_study(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    files = dicom_study(tmp_path / "s", patient_id="MRN-9", study_date="20240105")
    uid = study_uid_of(files)
    assert stow(files).status_code == 200
    assert sync_imaging_studies(archive).written == 1
    assert client.get(f"/fhir/ImagingStudy/{uid}").status_code == 200

    assert client.delete(f"/dicomweb/studies/{uid}").status_code == 204
    report = sync_imaging_studies(archive)
    assert report.deleted == 1
    assert client.get(f"/fhir/ImagingStudy/{uid}").status_code == 410
    assert imaging_study(client, uid) is None


def test_sync_command_catches_up_on_studies_stored_while_no_server_ran(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path, settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    stored = [
        dicom_study(tmp_path / str(n), patient_id=f"MRN-{n}", study_date="20240105")
        for n in range(3)
    ]
    for files in stored:
        assert stow(files).status_code == 200
    assert all(imaging_study(client, study_uid_of(f)) is None for f in stored)

    monkeypatch.setenv("MEDLAKE_DATABASE_URL", settings.resolved_database_url)
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    result = runner.invoke(cli, ["fhir", "sync-imaging", "--data", str(settings.data)])
    assert result.exit_code == 0, result.output
    assert "3 ImagingStudy written" in result.output
    assert "3 Patients made from DICOM" in result.output
    for files in stored:
        assert imaging_study(client, study_uid_of(files)) is not None


def test_a_huge_study_lists_some_instances_and_counts_all(
    archive: Archive, client: Any, stow: StowCall, tmp_path: Path
) -> None:
    archive.settings.imaging_study_max_instances = 3
    files = dicom_study(tmp_path / "s", patient_id="MRN-10", study_date="20240105",
                        series_count=2, instances=4)  # fmt: skip
    assert stow(files).status_code == 200
    sync_imaging_studies(archive)
    study = imaging_study(client, study_uid_of(files))
    assert study is not None
    assert study["numberOfInstances"] == 8
    assert [s["numberOfInstances"] for s in study["series"]] == [4, 4]
    listed = [len(s.get("instance", [])) for s in study["series"]]
    assert listed == [1, 1]  # each series gets its share of the 3 listed instances
