"""Staging copies of bulk ingest (medlake.ingest.copying): every way of copying stores the
same bytes with the hash of what was stored, falls back where the filesystem cannot, and
leaves nothing behind when the disk fails."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medlake.errors import StorageError, Unreadable
from medlake.ingest import copying
from medlake.ingest.inspect import StagingJob, StagingOptions, _stage_many, stage_and_inspect

MIN = copying.DIRECT_MIN_BYTES
#: Around the 4 KiB alignment of direct I/O and the 1 MiB buffer it is copied through.
SIZES = [MIN, MIN + 1, MIN + 4095, MIN + 4097, MIN + 65536 + 7, 1 << 20, (1 << 20) + 1]
SIZES += [(2 << 20) + 4096, (5 << 19) + 123]


def _content(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(f"{size}/{seed}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _direct_io_works(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def direct_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a copy falls back from direct I/O (skip where the filesystem of
    the test's folder has no direct I/O at all)."""
    if not _direct_io_works(tmp_path):
        pytest.skip(f"no O_DIRECT on the filesystem of {tmp_path}")

    def no_fallback(*_: Any) -> bool:
        raise AssertionError("copied through the page cache, not with direct I/O")

    monkeypatch.setattr(copying, "_copy_in_kernel", no_fallback)


@pytest.mark.parametrize("size", SIZES)
def test_direct_copy_is_byte_identical_with_its_hash_and_head(
    tmp_path: Path, size: int, direct_only: None
) -> None:
    source = tmp_path / "source.dcm"
    data = _content(size)
    source.write_bytes(data)
    target = tmp_path / "staged.part"

    copied = copying.copy_local(str(source), target, link=False, direct=True)

    assert target.read_bytes() == data  # cut back from the padded last block
    assert copied == (size, hashlib.sha256(data).hexdigest(), data[: copying.HEAD_BYTES])


@pytest.mark.parametrize("size", [0, 1, 4097, MIN - 1])
def test_a_small_file_is_copied_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Below the threshold, waiting for each direct write costs more than it saves."""
    source = tmp_path / "source.dcm"
    data = _content(size)
    source.write_bytes(data)
    target = tmp_path / "staged.part"
    refused = _refusing_direct_open(monkeypatch)

    copied = copying.copy_local(str(source), target, link=False, direct=True)

    assert refused == []
    assert target.read_bytes() == data
    assert copied == (size, hashlib.sha256(data).hexdigest(), data[: copying.HEAD_BYTES])


@pytest.mark.parametrize("direct", [True, False])
def test_a_target_left_from_before_is_replaced_not_kept(tmp_path: Path, direct: bool) -> None:
    source = tmp_path / "source.dcm"
    source.write_bytes(_content(MIN + 5000))
    target = tmp_path / "staged.part"
    target.write_bytes(b"x" * (MIN + 20000))  # a copy of a run killed before

    copying.copy_local(str(source), target, link=False, direct=direct)

    assert target.read_bytes() == source.read_bytes()


def _refusing_direct_open(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    refused: list[str] = []
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            refused.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return refused


def test_a_filesystem_without_direct_io_gets_a_buffered_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.dcm"
    data = _content(MIN + 300_000)
    source.write_bytes(data)
    target = tmp_path / "staged.part"
    refused = _refusing_direct_open(monkeypatch)

    copied = copying.copy_local(str(source), target, link=False, direct=True)

    assert refused == [str(target)]
    assert target.read_bytes() == data
    assert copied[:2] == (len(data), hashlib.sha256(data).hexdigest())


def test_direct_writes_refused_after_open_fall_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.dcm"
    data = _content(MIN + 9000)
    source.write_bytes(data)
    target = tmp_path / "staged.part"

    def no_direct_write(*_: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", no_direct_write)

    copied = copying.copy_local(str(source), target, link=False, direct=True)

    assert target.read_bytes() == data
    assert copied[1] == hashlib.sha256(data).hexdigest()


def test_direct_io_off_never_opens_with_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.dcm"
    data = _content(MIN + 70_000)
    source.write_bytes(data)
    refused = _refusing_direct_open(monkeypatch)

    copying.copy_local(str(source), tmp_path / "staged.part", link=False, direct=False)

    assert refused == []
    assert (tmp_path / "staged.part").read_bytes() == data


def _failing(error: int) -> Callable[..., int]:
    def fail(*_: Any) -> int:
        raise OSError(error, os.strerror(error))

    return fail


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_is_a_storage_error_and_leaves_no_staging_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    source = tmp_path / "source.dcm"
    source.write_bytes(_content(3 << 20))
    target = tmp_path / "staged.part"
    monkeypatch.setattr(os, "pwrite", _failing(errno.ENOSPC))
    monkeypatch.setattr(os, "copy_file_range", _failing(errno.ENOSPC))

    inspection = stage_and_inspect(
        str(source), target, parse=True, options=StagingOptions(direct=direct)
    )

    assert isinstance(inspection.error, StorageError)
    assert "No space left on device" in inspection.error.message
    assert not target.exists()


def test_a_read_error_mid_file_is_unreadable_and_leaves_no_staging_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.dcm"
    source.write_bytes(_content(3 << 20))
    target = tmp_path / "staged.part"
    real_readv = os.readv
    calls = [0]

    def failing_second_read(fd: int, buffers: Any) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", failing_second_read)

    inspection = stage_and_inspect(str(source), target, parse=True, options=StagingOptions())

    assert isinstance(inspection.error, Unreadable)
    assert "Input/output error" in inspection.error.message
    assert not target.exists()


def test_a_clone_is_hashed_from_what_was_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem clones (XFS, btrfs), the copy is the clone: no bytes are copied
    by medlake, and the hash is read back from the clone."""
    source = tmp_path / "source.dcm"
    data = _content(200_000)
    source.write_bytes(data)
    target = tmp_path / "staged.part"
    cloned: list[int] = []

    def clone(out: int, request: int, src: int) -> int:  # what FICLONE does, bytes-wise
        assert request == copying._FICLONE
        cloned.append(out)
        os.write(out, os.pread(src, 1 << 30, 0))
        return 0

    def no_copy(*_: Any) -> Any:
        raise AssertionError("copied although the file was cloned")

    monkeypatch.setattr(fcntl, "ioctl", clone)
    monkeypatch.setattr(copying, "_copy_direct", no_copy)
    monkeypatch.setattr(copying, "_copy_in_kernel", no_copy)

    copied = copying.copy_local(str(source), target, link=False, direct=True)

    assert len(cloned) == 1
    assert copied == (len(data), hashlib.sha256(data).hexdigest(), data[: copying.HEAD_BYTES])


def test_files_staged_side_by_side_each_get_their_own_bytes(
    tmp_path: Path, direct_only: None
) -> None:
    """Two staging threads share a worker: each copies through its own buffer."""
    sources = []
    for i, size in enumerate([700_000, MIN + 5_000, 1_500_000, MIN + 64_000] * 5):
        path = tmp_path / f"source-{i}.bin"
        path.write_bytes(_content(size, seed=i))
        sources.append(path)
    jobs = [StagingJob(str(p), tmp_path / f"{p.stem}.part", parse=False) for p in sources]

    inspections = _stage_many(jobs, StagingOptions())

    for job, source, inspection in zip(jobs, sources, inspections, strict=True):
        assert inspection.error is None
        assert job.target.read_bytes() == source.read_bytes()
        assert inspection.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
