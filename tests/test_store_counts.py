"""What QIDO-RS reports about studies and series as instances are stored one request at
a time, several at once, replaced and deleted: the instance and series counts, the
ModalitiesInStudy list, and the one study a series belongs to. Concurrent writers into
the same new series must each be counted."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select
from tests.conftest import StowCall
from tests.dicomweb_payloads import copy_with_uids

from medlake.config import Settings
from medlake.index.schema import series, studies
from medlake.ingest.archive import Archive
from medlake.ingest.reconcile import reconcile_partition
from medlake.ingest.store import Outcome, ReceivedFile, store_instances

SERIES_INSTANCES, STUDY_SERIES, STUDY_INSTANCES = "00201209", "00201206", "00201208"
MODALITIES_IN_STUDY = "00080061"
CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def _instance(source: str | None, folder: Path, study: str, series_uid: str, **attrs: Any) -> Path:
    assert source is not None
    name = f"{generate_uid()}.dcm"
    return copy_with_uids(
        Path(source), folder / name, study_uid=study, series_uid=series_uid, **attrs
    )


def _study(client: Any, study: str) -> dict[str, Any]:
    found = client.get(
        "/dicomweb/studies",
        params={"StudyInstanceUID": study, "includefield": "00080061,00201206,00201208"},
    ).json()
    assert len(found) == 1
    result: dict[str, Any] = found[0]
    return result


def _absent(client: Any, study: str) -> bool:
    """Whether QIDO-RS finds no such study (204 No Content)."""
    return bool(
        client.get("/dicomweb/studies", params={"StudyInstanceUID": study}).status_code == 204
    )


def _series_count(client: Any, study: str, series_uid: str) -> int:
    found = client.get(
        f"/dicomweb/studies/{study}/series",
        params={"SeriesInstanceUID": series_uid, "includefield": "00201209"},
    ).json()
    count: int = found[0][SERIES_INSTANCES]["Value"][0]
    return count


def test_counts_and_modalities_follow_every_store_replace_and_delete(
    stow: StowCall, client: Any, tmp_path: Path
) -> None:
    study, ct_series, mr_series = generate_uid(), generate_uid(), generate_uid()
    first = [_instance(CT, tmp_path, study, ct_series) for _ in range(2)]
    assert stow(first).status_code == 200
    assert _study(client, study)[MODALITIES_IN_STUDY]["Value"] == ["CT"]

    # One instance per request, as a C-STORE association sends them.
    assert stow([_instance(MR, tmp_path, study, mr_series)]).status_code == 200
    assert stow([_instance(CT, tmp_path, study, ct_series)]).status_code == 200

    found = _study(client, study)
    assert found[MODALITIES_IN_STUDY]["Value"] == ["CT", "MR"]
    assert found[STUDY_SERIES]["Value"] == [2]
    assert found[STUDY_INSTANCES]["Value"] == [4]
    assert _series_count(client, study, ct_series) == 3

    ds = pydicom.dcmread(first[0])
    replacement = copy_with_uids(
        first[0], tmp_path / "replacement.dcm", study_uid=study, series_uid=ct_series,
        sop_uid=ds.SOPInstanceUID, PatientName="REPLACED^NAME",
    )  # fmt: skip
    assert stow([replacement], method="PUT").status_code == 200
    assert _study(client, study)[STUDY_INSTANCES]["Value"] == [4]
    assert _series_count(client, study, ct_series) == 3

    assert client.delete(f"/dicomweb/studies/{study}/series/{mr_series}").status_code == 204
    found = _study(client, study)
    assert found[MODALITIES_IN_STUDY]["Value"] == ["CT"]
    assert (found[STUDY_SERIES]["Value"], found[STUDY_INSTANCES]["Value"]) == ([1], [3])


def test_a_series_of_another_study_is_a_conflict_and_stores_nothing(
    stow: StowCall, client: Any, tmp_path: Path
) -> None:
    study, other_study, series_uid = generate_uid(), generate_uid(), generate_uid()
    assert stow([_instance(CT, tmp_path, study, series_uid)]).status_code == 200
    stray = _instance(CT, tmp_path, other_study, series_uid)

    response = stow([stray])

    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0111]
    assert failed["00000902"]["Value"][0].startswith("the series belongs to another study")
    assert _absent(client, other_study)
    found = _study(client, study)
    assert (found[STUDY_SERIES]["Value"], found[STUDY_INSTANCES]["Value"]) == ([1], [1])


def test_one_series_in_two_studies_of_one_request_stores_the_first(
    stow: StowCall, client: Any, tmp_path: Path
) -> None:
    study, other_study, series_uid = generate_uid(), generate_uid(), generate_uid()
    first = _instance(CT, tmp_path, study, series_uid)
    stray = _instance(CT, tmp_path, other_study, series_uid)

    response = stow([first, stray])

    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body["00081199"]["Value"]) == 1  # ReferencedSOPSequence: the first one
    assert len(body["00081198"]["Value"]) == 1  # FailedSOPSequence: the stray one
    assert _absent(client, other_study)
    assert _series_count(client, study, series_uid) == 1


def test_concurrent_writers_into_one_new_series_count_every_instance(
    settings: Settings, tmp_path: Path
) -> None:
    """Writers in separate processes (replicas), here each with its own archive (engine
    and write lock), store into the same new study and series at the same moment."""
    writers = 8
    archives = [
        Archive.open(settings.model_copy(update={"parse_workers": 0})) for _ in range(writers)
    ]
    study, series_uid = generate_uid(), generate_uid()
    files = [_instance(CT, tmp_path / "src", study, series_uid) for _ in range(writers)]
    start = threading.Barrier(writers)
    outcomes: list[Outcome] = []

    def store(archive: Archive, source: Path) -> None:
        staged = archive.staging_dir / f"{source.stem}.part"
        staged.write_bytes(source.read_bytes())
        start.wait()
        result = store_instances(archive, [ReceivedFile(staged, staged.stat().st_size)], "default")
        outcomes.append(result[0].outcome)

    try:
        threads = [
            threading.Thread(target=store, args=(archive, source))
            for archive, source in zip(archives, files, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == [Outcome.STORED] * writers
        with archives[0].engine.connect() as conn:
            study_row = conn.execute(select(studies.c.num_series, studies.c.num_instances)).one()
            series_rows = conn.execute(select(series.c.num_instances)).scalars().all()
        assert tuple(study_row) == (1, writers)
        assert series_rows == [writers]
        assert reconcile_partition(archives[0], "default").balanced
    finally:
        for archive in archives:
            archive.close()
