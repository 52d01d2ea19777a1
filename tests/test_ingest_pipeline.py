"""The ingest pipeline end to end (index on SQLite and PostgreSQL): sources of every kind,
batch records, byte-identical lake files, resuming, the durable queue."""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

import fsspec
import pytest
from sqlalchemy import func, select, update
from tests.ingest_files import errors_of, instance_count, make_instances, refresh
from tests.lake_inspection import LakeInspection

from medlake.config import Settings
from medlake.index.schema import instances, work_queue
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchStatus
from medlake.ingest.events import BatchFinished, FilesProcessed, IngestEvent
from medlake.ingest.pipeline import discover, ingest, open_batch, run_batch
from medlake.ingest.queue import Worker, claim


def test_folder_is_stored_byte_for_byte_and_reconciled(
    archive: Archive, lake: LakeInspection, demo_files: list[Path]
) -> None:
    folder = demo_files[0].parents[2]

    batch = ingest(archive, str(folder), "default", workers=0)

    assert batch.status == BatchStatus.COMPLETED
    assert batch.verdict == "balanced"
    assert (batch.seen, batch.stored, batch.duplicates, batch.rejected) == (37, 37, 0, 0)
    assert batch.bytes == sum(p.stat().st_size for p in demo_files)
    assert batch.detail["differences"] == []
    assert sorted(p.read_bytes() for p in lake.dicom_files()) == sorted(
        p.read_bytes() for p in demo_files
    )
    assert lake.staging_files() == []
    with archive.engine.connect() as conn:
        carried = conn.execute(
            select(func.count()).where(instances.c.batch_id == batch.id)
        ).scalar_one()
        queue_rows = conn.execute(select(func.count()).select_from(work_queue)).scalar_one()
    assert carried == 37
    assert queue_rows == 0  # staging rows of a finished batch are removed


def test_running_again_stores_no_duplicate(
    archive: Archive, lake: LakeInspection, demo_files: list[Path]
) -> None:
    folder = demo_files[0].parents[2]
    first = ingest(archive, str(folder), "default", workers=0)

    second = ingest(archive, str(folder), "default", workers=0)

    assert second.id != first.id
    assert (second.seen, second.stored, second.duplicates) == (37, 0, 37)
    assert second.verdict == "balanced"
    assert instance_count(archive) == 37
    assert len(lake.dicom_files()) == 37


def test_worker_processes_and_small_chunks(settings: Settings, tmp_path: Path) -> None:
    files = make_instances(tmp_path / "src", 45, per_series=10)
    archive = Archive.open(settings.model_copy(update={"ingest_chunk_files": 7}))
    try:
        batch = ingest(archive, str(tmp_path / "src"), "default", workers=2)
        assert (batch.seen, batch.stored, batch.verdict) == (45, 45, "balanced")
        assert instance_count(archive) == len(files)
    finally:
        archive.close()


def test_glob_zip_and_tar_sources(archive: Archive, tmp_path: Path) -> None:
    files = make_instances(tmp_path / "src", 6, per_series=3)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        for path in files[:2]:
            zf.write(path, f"inside/{path.name}")
    with tarfile.open(tmp_path / "two.tar.gz", "w:gz") as tf:
        for path in files[2:4]:
            tf.add(path, f"deep/er/{path.name}")

    from_glob = ingest(archive, str(tmp_path / "src" / "series001" / "*.dcm"), "default", workers=0)
    from_zip = ingest(archive, str(tmp_path / "two.zip"), "default", workers=0)
    from_tar = ingest(archive, str(tmp_path / "two.tar.gz"), "default", workers=0)

    assert (from_glob.seen, from_glob.stored) == (3, 3)
    assert (from_zip.seen, from_zip.stored, from_zip.verdict) == (2, 2, "balanced")
    assert (from_tar.seen, from_tar.stored, from_tar.verdict) == (2, 1, "balanced")
    assert from_tar.duplicates == 1  # files[3] came in through the glob already
    assert instance_count(archive) == 6
    assert not (archive.staging_dir / "batches").exists() or not any(
        (archive.staging_dir / "batches").iterdir()
    )


def test_archive_members_are_named_in_error_rows(archive: Archive, tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
        zf.writestr("a/readme.txt", "not an image " * 20)

    batch = ingest(archive, str(tmp_path / "mixed.zip"), "default", workers=0)

    [error] = errors_of(archive, batch.id)
    assert error.source == f"{tmp_path / 'mixed.zip'}!a/readme.txt"
    assert error.rule == "dicom_part10"


def test_fsspec_url_source(archive: Archive, tmp_path: Path) -> None:
    files = make_instances(tmp_path / "src", 3)
    fs = fsspec.filesystem("memory")
    for path in files:
        fs.pipe_file(f"/bucket-{os.getpid()}/drop/{path.name}", path.read_bytes())

    batch = ingest(archive, f"memory:///bucket-{os.getpid()}/drop", "default", workers=0)

    assert (batch.seen, batch.stored, batch.verdict) == (3, 3, "balanced")


def test_hard_links_when_configured(settings: Settings, tmp_path: Path) -> None:
    [source] = make_instances(settings.data.parent / "src", 1)
    archive = Archive.open(settings.model_copy(update={"ingest_link_files": True}))
    try:
        batch = ingest(archive, str(source), "default", workers=0)
        [stored] = LakeInspection(archive).dicom_files()
    finally:
        archive.close()
    assert batch.stored == 1
    assert stored.stat().st_ino == source.stat().st_ino


def test_events_reach_subscribers(archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 4)
    seen: list[IngestEvent] = []
    archive.events.subscribe(seen.append)

    ingest(archive, str(tmp_path / "src"), "default", workers=0)

    processed = [e for e in seen if isinstance(e, FilesProcessed)]
    assert sum(e.stored for e in processed) == 4
    assert [e.verdict for e in seen if isinstance(e, BatchFinished)] == ["balanced"]


def test_an_interrupted_batch_is_resumed_exactly_once(archive: Archive, tmp_path: Path) -> None:
    files = make_instances(tmp_path / "src", 30)
    batch, resumed = open_batch(archive, str(tmp_path / "src"), "default")
    discover(archive, batch)
    # A worker on this host claimed 10 files and died (its pid no longer exists).
    dead = Worker(Worker.here().host, 2**22 + 12345, "deadbeef")
    claimed = claim(archive.engine, batch.id, dead, 10)

    again, resumed_now = open_batch(archive, str(tmp_path / "src"), "default")
    done = run_batch(archive, again.id, workers=0)

    assert not resumed and resumed_now and again.id == batch.id
    assert len(claimed) == 10
    assert (done.seen, done.stored, done.verdict) == (30, 30, "balanced")
    assert instance_count(archive) == len(files)


def test_claims_of_a_live_worker_wait_for_the_timeout(settings: Settings, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 5)
    archive = Archive.open(settings.model_copy(update={"ingest_claim_timeout": 0.0}))
    try:
        batch, _ = open_batch(archive, str(tmp_path / "src"), "default")
        discover(archive, batch)
        other_host = Worker("elsewhere.example", 1, "cafe")
        claim(archive.engine, batch.id, other_host, 5)

        done = run_batch(archive, batch.id, workers=0)  # timeout 0: the claims are stale
    finally:
        archive.close()
    assert (done.seen, done.stored) == (5, 5)


def test_workers_claim_disjoint_items(archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 20)
    batch, _ = open_batch(archive, str(tmp_path / "src"), "default")
    discover(archive, batch)
    one, two = Worker("h", 1, "a"), Worker("h", 2, "b")

    first = claim(archive.engine, batch.id, one, 8)
    second = claim(archive.engine, batch.id, two, 8)
    third = claim(archive.engine, batch.id, one, 8)

    ids = [i.id for i in first + second + third]
    assert len(ids) == len(set(ids)) == 20
    assert [len(first), len(second), len(third)] == [8, 8, 4]


def test_skip_locked_lets_a_second_claimer_past_an_open_claim(
    archive: Archive, tmp_path: Path
) -> None:
    if archive.engine.dialect.name != "postgresql":
        pytest.skip("FOR UPDATE SKIP LOCKED is PostgreSQL's; SQLite has one writer")
    make_instances(tmp_path / "src", 6)
    batch, _ = open_batch(archive, str(tmp_path / "src"), "default")
    discover(archive, batch)
    with archive.engine.connect() as held:
        locked = held.execute(
            select(work_queue.c.id)
            .where(work_queue.c.batch_id == batch.id)
            .order_by(work_queue.c.id)
            .limit(3)
            .with_for_update()
        ).scalars()
        locked_ids = set(locked)
        # Another machine claims meanwhile: it skips the locked rows instead of waiting.
        got = claim(archive.engine, batch.id, Worker("other", 1, "x"), 6)
        held.rollback()
    assert {i.id for i in got}.isdisjoint(locked_ids)
    assert len(got) == 3


def test_resume_after_the_index_lost_a_stale_claim(archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 4)
    batch, _ = open_batch(archive, str(tmp_path / "src"), "default")
    discover(archive, batch)
    with archive.engine.begin() as conn:
        conn.execute(
            update(work_queue)
            .where(work_queue.c.batch_id == batch.id)
            .values(status="claimed", claimed_by="garbage")
        )

    done = run_batch(archive, batch.id, workers=0)

    # Claims by names that are not workers of medlake wait for ingest_claim_timeout.
    assert done.status == BatchStatus.RUNNING
    assert refresh(archive, done).seen == 0
