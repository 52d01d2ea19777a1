"""Access tiers: the lifecycle policy moves unread instances to cool and cold, every
tier stays retrievable, and a read brings an instance back to hot."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update
from tests.conftest import StowCall
from tests.dicomweb_payloads import read_multipart

try:
    from tests.cloud_servers import *  # noqa: F403 - registers the session fixtures
    from tests.cloud_servers import S3Server
except ModuleNotFoundError:  # the repo root is not on sys.path
    from cloud_servers import *  # type: ignore[import-not-found]  # noqa: F403
    from cloud_servers import S3Server  # type: ignore[no-redef]
from typer.testing import CliRunner

from medlake.cli.main import app as cli
from medlake.config import Settings
from medlake.dicomweb.lifecycle import (
    LifecyclePolicy,
    lifecycle_status,
    run_lifecycle,
    target_tier,
)
from medlake.dicomweb.retrieve import retrieve
from medlake.errors import InvalidInput, StorageError
from medlake.index.schema import instances
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.ingest.pipeline import ingest
from medlake.storage.base import Tier

DICOM_PARTS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DAY = dt.timedelta(days=1)
POLICY = LifecyclePolicy(cool_after=30 * DAY, cold_after=90 * DAY)
NOW = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def instance_url(path: Path) -> str:
    study, series, sop = uids(path)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


@pytest.fixture
def stored(stow: StowCall, samples: dict[str, Path]) -> list[Path]:
    files = [samples["CT_small.dcm"], samples["MR_small.dcm"], samples["JPEG2000.dcm"]]
    response = stow(files)
    assert response.status_code == 200, response.text
    return files


def tiers(archive: Archive) -> dict[str, str]:
    """Tier of every instance, by SOPInstanceUID."""
    with archive.engine.connect() as conn:
        return dict(conn.execute(select(instances.c.sop_uid, instances.c.tier)).all())


def tier_of(archive: Archive, path: Path) -> str:
    return tiers(archive)[uids(path)[2]]


def read(client, path: Path) -> bytes:
    response = client.get(instance_url(path), headers={"Accept": DICOM_PARTS})
    assert response.status_code == 200, response.text
    [(_headers, payload)] = read_multipart(response.headers["content-type"], response.content)
    return payload


# --- the policy (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "idle_days", "expected"),
    [
        (Tier.HOT, 0, None),
        (Tier.HOT, 29, None),
        (Tier.HOT, 30, Tier.COOL),
        (Tier.HOT, 89, Tier.COOL),
        (Tier.HOT, 90, Tier.COLD),
        (Tier.HOT, 400, Tier.COLD),
        (Tier.COOL, 40, None),
        (Tier.COOL, 100, Tier.COLD),
        (Tier.COLD, 100, None),
        (Tier.COLD, 5, None),  # only reads warm a blob up, never the policy
    ],
)
def test_policy_moves_unread_blobs_colder_only(
    current: Tier, idle_days: int, expected: Tier | None
) -> None:
    assert target_tier(current, NOW - idle_days * DAY, NOW, POLICY) is expected


def test_policy_accepts_naive_utc_times_from_sqlite() -> None:
    naive = (NOW - 31 * DAY).replace(tzinfo=None)

    assert target_tier(Tier.HOT, naive, NOW, POLICY) is Tier.COOL


@pytest.mark.parametrize(("cool", "cold"), [(30, 10), (0, 90), (30, -1)])
def test_policy_settings_are_checked(cool: int, cold: int) -> None:
    settings = Settings(cool_after_days=cool, cold_after_days=cold)

    with pytest.raises(InvalidInput, match=f"{cold}"):
        LifecyclePolicy.from_settings(settings)


# --- running it ----------------------------------------------------------------------------


def test_run_moves_to_cool_after_40_days_and_cold_after_100(
    archive: Archive, stored: list[Path]
) -> None:
    start = utcnow()

    assert run_lifecycle(archive, start + 10 * DAY).moved == 0
    assert set(tiers(archive).values()) == {"hot"}

    report = run_lifecycle(archive, start + 40 * DAY)
    assert (report.examined, report.to_cool, report.to_cold, report.failed) == (3, 3, 0, 0)
    assert set(tiers(archive).values()) == {"cool"}

    report = run_lifecycle(archive, start + 100 * DAY)
    assert (report.to_cool, report.to_cold, report.failed) == (0, 3, 0)
    assert set(tiers(archive).values()) == {"cold"}

    assert run_lifecycle(archive, start + 200 * DAY).moved == 0  # cold is the last tier


def test_hot_blob_unread_for_100_days_goes_straight_to_cold(
    archive: Archive, stored: list[Path]
) -> None:
    report = run_lifecycle(archive, utcnow() + 100 * DAY)

    assert (report.to_cool, report.to_cold) == (0, 3)


def test_dry_run_changes_nothing(archive: Archive, stored: list[Path]) -> None:
    report = run_lifecycle(archive, utcnow() + 40 * DAY, dry_run=True)

    assert (report.to_cool, report.dry_run) == (3, True)
    assert set(tiers(archive).values()) == {"hot"}


@pytest.mark.parametrize("tier_days", [40, 100], ids=["cool", "cold"])
def test_every_tier_stays_retrievable_and_a_read_brings_it_back_to_hot(
    client, archive: Archive, stored: list[Path], tier_days: int
) -> None:
    run_lifecycle(archive, utcnow() + tier_days * DAY)
    expected = "cool" if tier_days == 40 else "cold"
    ct, mr = stored[0], stored[1]
    assert tier_of(archive, ct) == expected

    assert read(client, ct) == ct.read_bytes()

    assert tier_of(archive, ct) == "hot"
    assert tier_of(archive, mr) == expected  # untouched instances stay where they are
    frames = client.get(
        instance_url(mr) + "/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    assert frames.status_code == 200
    assert tier_of(archive, mr) == "hot"


def backdate(archive: Archive, days: int) -> None:
    """Pretend every instance was last read ``days`` ago."""
    with archive.engine.begin() as conn:
        conn.execute(update(instances).values(last_accessed_at=utcnow() - days * DAY))


def test_a_read_restarts_the_clock(client, archive: Archive, stored: list[Path]) -> None:
    backdate(archive, 40)
    assert run_lifecycle(archive).to_cool == 3
    ct = stored[0]

    read(client, ct)

    assert run_lifecycle(archive, utcnow() + 20 * DAY).moved == 0
    assert tier_of(archive, ct) == "hot"
    report = run_lifecycle(archive, utcnow() + 35 * DAY)
    assert (report.to_cool, report.to_cold) == (1, 0)
    assert tier_of(archive, ct) == "cool"


def test_a_blob_that_fails_to_move_keeps_its_tier_and_is_reported(
    archive: Archive, stored: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = uids(stored[0])[2]
    original = archive.blobs.set_tier

    def set_tier(key: str, tier: Tier) -> None:
        if broken in key:
            raise StorageError(f"cannot move {key}: throttled")
        original(key, tier)

    monkeypatch.setattr(archive.blobs, "set_tier", set_tier)

    report = run_lifecycle(archive, utcnow() + 40 * DAY)

    assert (report.to_cool, report.failed) == (2, 1)
    assert broken in report.errors[0] and "throttled" in report.errors[0]
    assert tiers(archive)[broken] == "hot"


def test_a_blob_that_fails_to_warm_up_is_still_read_and_keeps_its_tier(
    client, archive: Archive, stored: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_lifecycle(archive, utcnow() + 100 * DAY)
    ct = stored[0]

    def set_tier(key: str, tier: Tier) -> None:
        raise StorageError(f"cannot move {key} to {tier}: throttled")

    monkeypatch.setattr(archive.blobs, "set_tier", set_tier)

    assert read(client, ct) == ct.read_bytes()
    # The blob moves in the background; when that fails the index says cold again.
    deadline = time.monotonic() + 10
    while tier_of(archive, ct) != "cold" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tier_of(archive, ct) == "cold"


def test_status_counts_instances_per_tier_and_moves_due(
    archive: Archive, stored: list[Path]
) -> None:
    start = utcnow()
    sizes = sum(p.stat().st_size for p in stored)

    before = lifecycle_status(archive, start + 40 * DAY)
    assert (before.usage[Tier.HOT].instances, before.usage[Tier.HOT].bytes) == (3, sizes)
    assert before.due == {Tier.COOL: 3, Tier.COLD: 0}

    run_lifecycle(archive, start + 40 * DAY)
    after = lifecycle_status(archive, start + 100 * DAY)
    assert after.usage[Tier.COOL].instances == 3
    assert after.usage[Tier.HOT].instances == 0
    assert after.due == {Tier.COOL: 0, Tier.COLD: 3}


# --- the command line ----------------------------------------------------------------------


def test_cli_lifecycle_run_and_status(
    archive: Archive, stored: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", archive.settings.resolved_database_url)
    data = str(archive.settings.data)
    later = (utcnow() + 40 * DAY).strftime("%Y-%m-%dT%H:%M:%S")
    runner = CliRunner()

    result = runner.invoke(cli, ["lifecycle", "run", "--data", data, "--now", later])

    assert result.exit_code == 0, result.output
    assert "moved to cool" in result.output and "3" in result.output
    assert set(tiers(archive).values()) == {"cool"}

    status = runner.invoke(cli, ["lifecycle", "status", "--data", data])
    assert status.exit_code == 0, status.output
    assert "cool" in status.output and "3" in status.output


def test_cli_rejects_a_bad_now_and_a_bad_policy(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", archive.settings.resolved_database_url)
    data = str(archive.settings.data)
    runner = CliRunner()

    bad_now = runner.invoke(cli, ["lifecycle", "run", "--data", data, "--now", "next tuesday"])
    assert bad_now.exit_code == 2
    assert "next tuesday" in bad_now.output

    bad_policy = runner.invoke(
        cli,
        ["lifecycle", "run", "--data", data, "--cool-after-days", "60", "--cold-after-days", "30"],
    )
    assert bad_policy.exit_code == 2
    assert "cold_after_days (30)" in bad_policy.output


# --- a store with its own tiers ----------------------------------------------------------


@pytest.mark.cloud
def test_s3_blobs_change_storage_class_and_come_back_on_read(
    s3_server: S3Server, tmp_path: Path, samples: dict[str, Path]
) -> None:
    prefix = f"lake-{uuid.uuid4().hex}"
    archive = Archive.open(
        Settings(
            data=tmp_path / "data",
            lake_url=s3_server.url(prefix),
            storage_options=s3_server.storage_options,
        )
    )
    client = s3_server.boto_client()

    def storage_class(path: Path) -> str:
        study, series, sop = uids(path)
        key = archive.layout.instance_key("default", study, series, sop)
        head = client.head_object(Bucket=s3_server.bucket, Key=f"{prefix}/{key}")
        return str(head.get("StorageClass", "STANDARD"))  # omitted for STANDARD

    try:
        ct = samples["CT_small.dcm"]
        assert ingest(archive, str(ct), "default", workers=0).stored == 1
        start = utcnow()

        run_lifecycle(archive, start + 40 * DAY)
        assert (tier_of(archive, ct), storage_class(ct)) == ("cool", "STANDARD_IA")
        run_lifecycle(archive, start + 100 * DAY)
        assert (tier_of(archive, ct), storage_class(ct)) == ("cold", "GLACIER_IR")

        [found] = retrieve(archive, "default", *uids(ct))
        assert archive.blobs.read_bytes(found.blob_key) == ct.read_bytes()
        assert tier_of(archive, ct) == "hot"
        deadline = time.monotonic() + 30  # the blob itself moves in the background
        while storage_class(ct) != "STANDARD" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storage_class(ct) == "STANDARD"
    finally:
        archive.close()
