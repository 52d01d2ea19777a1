"""Bad input to a bulk ingest, one case at a time: each ends in an ``ingest_errors`` row with
a clear message, the rest of the batch carries on, and reconciliation still balances.

"Unreadable (permissions)" is tested honestly although the suite runs as root (whom
file permissions do not stop): the ingest runs in a child process that drops to user
``nobody`` and meets a ``chmod 000`` file. A FIFO and a dangling symbolic link named
``*.dcm`` are tested in-process as further unreadable files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.exc import OperationalError
from tests.ingest_files import BAD_INPUT, bad_file, errors_of, instance_count, make_instances
from tests.lake_inspection import LakeInspection

from medlake.config import Settings
from medlake.errors import StorageError
from medlake.ingest import store as store_module
from medlake.ingest.archive import Archive
from medlake.ingest.batches import BatchStatus, resume_batch
from medlake.ingest.pipeline import ingest, run_batch
from medlake.ingest.reconcile import reconcile_partition
from medlake.storage.base import BlobStore


def _balanced(archive: Archive, partition: str = "default") -> None:
    result = reconcile_partition(archive, partition)
    assert result.balanced, result.to_json()


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_each_bad_file_is_one_error_row_and_the_rest_is_stored(
    archive: Archive, lake: LakeInspection, tmp_path: Path, name: str
) -> None:
    good = make_instances(tmp_path / "src", 3)
    made = bad_file(tmp_path / "src", name)
    original = made.path.read_bytes()

    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    assert (batch.seen, batch.stored, batch.rejected) == (4, 3, 1)
    assert (batch.status, batch.verdict) == (BatchStatus.COMPLETED, "balanced")
    [error] = errors_of(archive, batch.id)
    assert error.source == str(made.path)
    assert (error.rule, error.severity) == (made.rule, "reject")
    assert error.message  # says what was wrong
    kept = Path(error.kept_at or "")
    assert kept.is_file() and kept.read_bytes() == original  # kept aside, never deleted
    assert made.path.read_bytes() == original  # the source is untouched
    assert len(lake.dicom_files()) == len(good)
    _balanced(archive)


def test_messages_say_what_is_wrong(archive: Archive, tmp_path: Path) -> None:
    for name in BAD_INPUT:
        bad_file(tmp_path / "src", name)

    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    messages = {Path(e.source).name: e.message for e in errors_of(archive, batch.id)}
    assert "empty (0 bytes)" in messages["zero-bytes.dcm"]
    assert "DICM" in messages["no-preamble.dcm"] or "Part 10" in messages["no-preamble.dcm"]
    assert "not a DICOM Part 10 file" in messages["notes.txt"]
    assert (
        "truncated" in messages["truncated.dcm"].lower()
        or "pixel" in messages["truncated.dcm"].lower()
    )


@pytest.mark.parametrize("chunk", [1, 200], ids=["other-chunk", "same-chunk"])
def test_duplicate_sop_instance_uid_with_different_content(
    settings: Settings, tmp_path: Path, chunk: int
) -> None:
    [first] = make_instances(tmp_path / "src" / "a", 1)
    ds = pydicom.dcmread(first)
    ds.PatientName = "SOMEONE^ELSE"  # same SOPInstanceUID, different bytes
    other = tmp_path / "src" / "b" / "same-uid.dcm"
    other.parent.mkdir(parents=True)
    ds.save_as(other, enforce_file_format=True)
    shutil.copy(first, tmp_path / "src" / "b" / "same-bytes.dcm")
    archive = Archive.open(settings.model_copy(update={"ingest_chunk_files": chunk}))
    try:
        batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
        [error] = errors_of(archive, batch.id)
        assert (batch.seen, batch.stored, batch.duplicates, batch.rejected) == (3, 1, 1, 1)
        assert batch.verdict == "balanced"
        assert error.rule == "conflict" and ds.SOPInstanceUID in error.message
        assert error.source == str(other)
        assert Path(error.kept_at or "").read_bytes() == other.read_bytes()
        _balanced(archive)
    finally:
        archive.close()


def test_fifo_and_dangling_link_are_unreadable(archive: Archive, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 2)
    os.mkfifo(tmp_path / "src" / "pipe.dcm")
    (tmp_path / "src" / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")

    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    errors = {Path(e.source).name: e for e in errors_of(archive, batch.id)}
    assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (4, 2, 2, "balanced")
    assert errors["pipe.dcm"].rule == errors["gone.dcm"].rule == "unreadable"
    assert "not a regular file (a FIFO)" in errors["pipe.dcm"].message
    assert "No such file" in errors["gone.dcm"].message
    assert {e.severity for e in errors.values()} == {"error"}  # a failure, not a rule


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder user nobody can use (tmp_path lies under root's private folder)."""
    folder = Path(tempfile.mkdtemp(prefix="medlake-nobody-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: Runs a command as user nobody (util-linux setpriv: changes the uid and gid, drops groups).
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_file_without_read_permission(db_url: str, shared_tmp: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("dropping to user nobody needs root and setpriv")
    source = shared_tmp / "src"
    files = make_instances(source, 3)
    secret = files[1]
    secret.chmod(0o000)
    for folder in (source, *source.iterdir()):
        folder.chmod(0o777)
    data = shared_tmp / "data"
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{shared_tmp / 'index.sqlite'}"  # where nobody may write
    medlake = Path(sys.executable).with_name("medlake")
    probe = subprocess.run([*AS_NOBODY, str(medlake), "--version"], capture_output=True,
                           check=False)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run the venv here: {probe.stderr[-300:]!r}")
    env = {**os.environ, "MEDLAKE_DATABASE_URL": db_url, "HOME": str(shared_tmp),
           "COLUMNS": "200", "NO_COLOR": "1"}  # fmt: skip

    run = subprocess.run(
        [*AS_NOBODY, str(medlake), "ingest", str(source), "--data", str(data), "--workers", "0"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip

    assert run.returncode == 1, run.stdout + run.stderr
    assert "Permission denied" in run.stdout
    archive = Archive.open(Settings(data=data, database_url=db_url))
    try:
        assert instance_count(archive) == 2
        from medlake.ingest.batches import list_batches

        with archive.engine.connect() as conn:
            [batch] = list_batches(conn, kind="ingest")
        [error] = errors_of(archive, batch.id)
        assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (3, 2, 1, "balanced")
        assert error.source == str(secret) and error.rule == "unreadable"
        assert "Permission denied" in error.message
    finally:
        archive.close()


class _FullDisk(BlobStore):
    """A lake whose disk is full for every second file written (ENOSPC)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.root = inner.root
        self.full = True
        self._count = 0

    def put_files(
        self, items: Sequence[tuple[str, Path]], *, synced: bool = False
    ) -> list[Exception | None]:
        errors: list[Exception | None] = []
        for key, source in items:
            self._count += 1
            if self.full and self._count % 2 == 0:
                errors.append(StorageError(f"cannot write {key}: No space left on device"))
            else:
                errors.extend(self.inner.put_files([(key, source)], synced=synced))
        return errors

    def put_file(self, key: str, source: Path) -> None:
        self.inner.put_file(key, source)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.inner.put_bytes(key, data)

    def open(self, key: str):  # type: ignore[no-untyped-def]
        return self.inner.open(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str):  # type: ignore[no-untyped-def]
        return self.inner.list(prefix)


def test_disk_full_in_the_lake(archive: Archive, lake: LakeInspection, tmp_path: Path) -> None:
    make_instances(tmp_path / "src", 6)
    full = _FullDisk(archive.blobs)
    archive.blobs = full

    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    errors = errors_of(archive, batch.id)
    assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (6, 3, 3, "balanced")
    assert {(e.rule, e.severity) for e in errors} == {("lake_write", "error")}
    assert all("No space left on device" in e.message for e in errors)
    assert len(lake.dicom_files()) == 3 and lake.staging_files() == []
    _balanced(archive)


def test_failed_files_are_retried_after_the_cause_is_fixed(
    archive: Archive, tmp_path: Path
) -> None:
    make_instances(tmp_path / "src", 6)
    full = _FullDisk(archive.blobs)
    archive.blobs = full
    batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
    assert batch.stored == 3 and batch.status == BatchStatus.COMPLETED

    full.full = False  # space was freed; the batch is completed, so ingest again
    again = ingest(archive, str(tmp_path / "src"), "default", workers=0)

    assert (again.stored, again.duplicates, again.verdict) == (3, 3, "balanced")
    assert instance_count(archive) == 6


def test_database_locked_during_a_chunk(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_instances(tmp_path / "src", 6)
    real = store_module.write_instances
    calls = {"n": 0}

    def locked_once(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("INSERT INTO instances", {}, Exception("database is locked"))
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "write_instances", locked_once)
    archive = Archive.open(settings.model_copy(update={"ingest_chunk_files": 2}))
    try:
        batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
        errors = errors_of(archive, batch.id)
        assert (batch.seen, batch.stored, batch.rejected, batch.verdict) == (6, 4, 2, "balanced")
        assert {e.rule for e in errors} == {"index_write"}
        assert all("database is locked" in e.message for e in errors)
        _balanced(archive)  # the files of the failed chunk were taken out of the lake again
        assert len(LakeInspection(archive).dicom_files()) == 4
    finally:
        archive.close()


def test_resume_retries_failed_files(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_instances(tmp_path / "src", 4)
    real = store_module.write_instances
    state = {"locked": True}

    def locked(*args: object, **kwargs: object) -> None:
        if state["locked"]:
            raise OperationalError("INSERT INTO instances", {}, Exception("database is locked"))
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "write_instances", locked)
    archive = Archive.open(settings.model_copy(update={"ingest_pause_min_files": 2}))
    try:
        batch = ingest(archive, str(tmp_path / "src"), "default", workers=0)
        assert batch.status == BatchStatus.PAUSED  # every file failed: the batch paused
        state["locked"] = False

        resumed = resume_batch(archive.engine, batch.id, retry_failed=True)
        done = run_batch(archive, resumed.id, workers=0)

        assert (done.seen, done.stored, done.rejected, done.verdict) == (4, 4, 0, "balanced")
        assert len(errors_of(archive, batch.id)) == 4  # the failed attempts stay as history
        _balanced(archive)
    finally:
        archive.close()
