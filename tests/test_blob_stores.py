"""One behavioural suite for every lake backend: local folder, memory://, S3, Azure Blob.

S3 runs against moto's standalone server and abfs against Azurite, both real HTTP
servers in their own processes (tests/cloud_servers.py), so s3fs/adlfs are exercised
as they are in production, tiers included.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from medlake.errors import NotFound, StorageError
from medlake.storage import BlobStore, Tier, open_blob_store
from medlake.storage.fsspec_store import FsspecBlobStore
from medlake.storage.local import LocalBlobStore

try:
    from tests.cloud_servers import *  # noqa: F403 - registers the session fixtures
    from tests.cloud_servers import AzuriteServer, S3Server
except ModuleNotFoundError:  # the repo root is not on sys.path (no pythonpath = ["."])
    from cloud_servers import *  # type: ignore[import-not-found]  # noqa: F403
    from cloud_servers import AzuriteServer, S3Server  # type: ignore[no-redef]

#: What each tier must become in the store's own terms (None: no native tiers).
EXPECTED_NATIVE = {
    "s3": {Tier.HOT: "STANDARD", Tier.COOL: "STANDARD_IA", Tier.COLD: "GLACIER_IR"},
    "abfs": {Tier.HOT: "Hot", Tier.COOL: "Cool", Tier.COLD: "Cold"},
}


@dataclass
class Backend:
    """A store under test plus out-of-band access to the same bytes."""

    name: str
    store: BlobStore
    #: Writes a blob without going through ``store`` (another process, Spark, azcopy).
    write_behind: Callable[[str, bytes], None]
    #: The tier as the server reports it to a plain SDK client (None: no tiers).
    server_tier: Callable[[str], str | None]


def _local_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "lake"
    root.mkdir()

    def write_behind(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("local", open_blob_store(str(root)), write_behind, lambda _key: None)


def _memory_backend() -> Iterator[Backend]:
    # memory:// is one process-wide dict: a unique root keeps tests apart.
    root = f"memory://lake-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    base = root.removeprefix("memory://")

    def write_behind(key: str, data: bytes) -> None:
        fs.pipe_file(f"/{base}/{key}", data)

    yield Backend("memory", open_blob_store(root), write_behind, lambda _key: None)
    if fs.exists(f"/{base}"):
        fs.rm(f"/{base}", recursive=True)


def _s3_backend(server: S3Server) -> Backend:
    prefix = f"lake-{uuid.uuid4().hex}"
    client = server.boto_client()

    def write_behind(key: str, data: bytes) -> None:
        client.put_object(Bucket=server.bucket, Key=f"{prefix}/{key}", Body=data)

    def server_tier(key: str) -> str | None:
        head = client.head_object(Bucket=server.bucket, Key=f"{prefix}/{key}")
        # S3 omits x-amz-storage-class for STANDARD objects.
        return str(head.get("StorageClass", "STANDARD"))

    store = open_blob_store(server.url(prefix), storage_options=server.storage_options)
    return Backend("s3", store, write_behind, server_tier)


def _abfs_backend(server: AzuriteServer) -> Iterator[Backend]:
    prefix = f"lake-{uuid.uuid4().hex}"
    with server.service_client() as service:
        container = service.get_container_client(server.container)

        def write_behind(key: str, data: bytes) -> None:
            container.upload_blob(f"{prefix}/{key}", data, overwrite=True)

        def server_tier(key: str) -> str | None:
            tier = container.get_blob_client(f"{prefix}/{key}").get_blob_properties().blob_tier
            return None if tier is None else str(tier)

        store = open_blob_store(server.url(prefix), storage_options=server.storage_options)
        yield Backend("abfs", store, write_behind, server_tier)


@pytest.fixture(
    params=[
        "local",
        "memory",
        pytest.param("s3", marks=pytest.mark.cloud),
        pytest.param("abfs", marks=pytest.mark.cloud),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn, rooted at a fresh, empty prefix."""
    name = request.param
    if name == "local":
        yield _local_backend(tmp_path)
    elif name == "memory":
        yield from _memory_backend()
    elif name == "s3":
        yield _s3_backend(request.getfixturevalue("s3_server"))
    else:
        yield from _abfs_backend(request.getfixturevalue("azurite_server"))


KEY = "medlake/default/dicom/default/Microsoft.Default/1.2.3/1.2.3.4/1.2.3.4.5.dcm"


def _payload(size: int = 200_000) -> bytes:
    return os.urandom(size)


# --- writes and reads ---------------------------------------------------------------


def test_put_file_consumes_source_and_stores_identical_bytes(
    backend: Backend, tmp_path: Path
) -> None:
    data = _payload()
    source = tmp_path / "incoming.dcm"
    source.write_bytes(data)

    backend.store.put_file(KEY, source)

    assert not source.exists()
    assert backend.store.read_bytes(KEY) == data


def test_put_file_replaces_existing_blob(backend: Backend, tmp_path: Path) -> None:
    backend.store.put_bytes(KEY, b"old bytes, longer than the new ones")
    source = tmp_path / "new.dcm"
    source.write_bytes(b"new")

    backend.store.put_file(KEY, source)

    assert backend.store.read_bytes(KEY) == b"new"
    assert backend.store.size(KEY) == 3


def test_put_bytes_then_exists_size_read(backend: Backend) -> None:
    data = _payload(12_345)
    assert not backend.store.exists(KEY)

    backend.store.put_bytes(KEY, data)

    assert backend.store.exists(KEY)
    assert backend.store.size(KEY) == len(data)
    assert backend.store.read_bytes(KEY) == data


def test_open_is_seekable_binary_reader(backend: Backend) -> None:
    data = _payload(70_000)
    backend.store.put_bytes(KEY, data)

    with backend.store.open(KEY) as fh:
        assert fh.read(10) == data[:10]
        fh.seek(65_000)
        assert fh.read(100) == data[65_000:65_100]
        fh.seek(0)
        assert fh.read() == data


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (128, 4096), (199_990, 10), (199_990, 1000), (0, 0), (200_000, 10), (250_000, 5)],
    ids=["first", "middle", "tail", "past-end-clipped", "empty", "at-end", "beyond-end"],
)
def test_read_range(backend: Backend, offset: int, length: int) -> None:
    data = _payload()
    backend.store.put_bytes(KEY, data)

    assert backend.store.read_range(KEY, offset, length) == data[offset : offset + length]


def test_missing_key_is_not_found(backend: Backend) -> None:
    missing = "medlake/nothing/here.dcm"

    assert not backend.store.exists(missing)
    with pytest.raises(NotFound):
        backend.store.open(missing)
    with pytest.raises(NotFound):
        backend.store.read_bytes(missing)
    with pytest.raises(NotFound):
        backend.store.read_range(missing, 0, 10)
    with pytest.raises(NotFound):
        backend.store.size(missing)


def test_a_folder_is_not_a_blob(backend: Backend) -> None:
    backend.store.put_bytes("study/series/a.dcm", b"x")

    assert not backend.store.exists("study/series")
    with pytest.raises(NotFound):
        backend.store.size("study/series")


def test_key_escaping_the_lake_is_refused(backend: Backend) -> None:
    with pytest.raises(StorageError):
        backend.store.put_bytes("../outside.dcm", b"x")


def test_sees_blobs_written_by_another_client(backend: Backend) -> None:
    backend.store.put_bytes("shared/first.dcm", b"1")
    assert list(backend.store.list("shared")) == ["shared/first.dcm"]  # a listing is now known

    backend.write_behind("shared/second.dcm", b"22")

    assert backend.store.exists("shared/second.dcm")
    assert backend.store.size("shared/second.dcm") == 2
    assert sorted(backend.store.list("shared")) == ["shared/first.dcm", "shared/second.dcm"]


# --- delete and list ----------------------------------------------------------------


def test_delete_removes_and_missing_is_no_error(backend: Backend) -> None:
    backend.store.put_bytes(KEY, b"x")

    backend.store.delete(KEY)
    assert not backend.store.exists(KEY)
    backend.store.delete(KEY)  # again: already gone
    backend.store.delete("never/was/there.dcm")
    with pytest.raises(NotFound):
        backend.store.read_bytes(KEY)


def test_list_returns_keys_relative_to_the_lake_root(backend: Backend) -> None:
    keys = ["p/a.dcm", "p/s/b.dcm", "p/s/t/c.json.gz", "pq/d.dcm", "other/e.dcm"]
    for key in keys:
        backend.store.put_bytes(key, key.encode())

    assert sorted(backend.store.list("p")) == ["p/a.dcm", "p/s/b.dcm", "p/s/t/c.json.gz"]
    assert sorted(backend.store.list("p/")) == ["p/a.dcm", "p/s/b.dcm", "p/s/t/c.json.gz"]
    assert sorted(backend.store.list("p/s")) == ["p/s/b.dcm", "p/s/t/c.json.gz"]
    assert sorted(backend.store.list("")) == sorted(keys)
    assert list(backend.store.list("nothing")) == []
    # A prefix is a folder: a blob's own key lists nothing.
    assert list(backend.store.list("p/a.dcm")) == []
    for key in backend.store.list(""):
        assert backend.store.read_bytes(key) == key.encode()


def test_list_after_delete(backend: Backend) -> None:
    backend.store.put_bytes("d/one.dcm", b"1")
    backend.store.put_bytes("d/two.dcm", b"2")

    backend.store.delete("d/one.dcm")

    assert list(backend.store.list("d")) == ["d/two.dcm"]


# --- tiers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tiers",
    [[Tier.COOL], [Tier.COLD], [Tier.COOL, Tier.COLD, Tier.HOT]],
    ids=["cool", "cold", "cool-cold-hot"],
)
def test_set_tier_moves_blob_and_keeps_it_readable(backend: Backend, tiers: list[Tier]) -> None:
    data = _payload(4096)
    backend.store.put_bytes(KEY, data)
    expected = EXPECTED_NATIVE.get(backend.name)

    for tier in tiers:
        backend.store.set_tier(KEY, tier)

        native = None if expected is None else expected[tier]
        assert backend.server_tier(KEY) == native
        if isinstance(backend.store, FsspecBlobStore):
            assert backend.store.native_tier(KEY) == native
        assert backend.store.read_bytes(KEY) == data
        assert backend.store.read_range(KEY, 100, 10) == data[100:110]
        assert backend.store.size(KEY) == len(data)
        assert list(backend.store.list("medlake")) == [KEY]


def test_set_tier_to_current_tier_is_a_no_op(backend: Backend) -> None:
    # S3 refuses a copy onto itself that changes nothing; the store must not issue one.
    backend.store.put_bytes(KEY, b"x")

    backend.store.set_tier(KEY, Tier.HOT)
    backend.store.set_tier(KEY, Tier.HOT)

    assert backend.store.read_bytes(KEY) == b"x"


def test_set_tier_on_missing_key_is_not_found(backend: Backend) -> None:
    for tier in Tier:
        with pytest.raises(NotFound):
            backend.store.set_tier("medlake/missing.dcm", tier)


def test_native_tier_of_missing_key_is_not_found(backend: Backend) -> None:
    if not isinstance(backend.store, FsspecBlobStore):
        pytest.skip("native_tier is an FsspecBlobStore method")
    with pytest.raises(NotFound):
        backend.store.native_tier("medlake/missing.dcm")


# --- local failures: atomic writes leave nothing behind -----------------------------


def _parts(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


@pytest.fixture
def local_store(tmp_path: Path) -> LocalBlobStore:
    root = tmp_path / "lake"
    root.mkdir()
    return LocalBlobStore(root)


def test_local_put_under_a_regular_file_fails_cleanly(
    local_store: LocalBlobStore, tmp_path: Path
) -> None:
    # Tests run as root, so a read-only folder would not stop the write; a parent
    # that is a regular file does (ENOTDIR / EEXIST) whoever runs them.
    local_store.put_bytes("blocker", b"a file where a folder should be")
    source = tmp_path / "incoming.dcm"
    source.write_bytes(b"payload")

    with pytest.raises(StorageError):
        local_store.put_bytes("blocker/child.dcm", b"payload")
    with pytest.raises(StorageError):
        local_store.put_file("blocker/child.dcm", source)

    assert source.read_bytes() == b"payload"  # not consumed by a failed put
    assert _parts(Path(local_store.root)) == []
    assert local_store.read_bytes("blocker") == b"a file where a folder should be"


def test_local_put_onto_a_folder_fails_and_removes_its_temporary(
    local_store: LocalBlobStore, tmp_path: Path
) -> None:
    # The key is an existing folder: the temporary is written, then the rename fails.
    local_store.put_bytes("series/inner/x.dcm", b"x")
    source = tmp_path / "incoming.dcm"
    source.write_bytes(b"payload")

    with pytest.raises(StorageError):
        local_store.put_bytes("series/inner", b"payload")
    with pytest.raises(StorageError):
        local_store.put_file("series/inner", source)

    assert source.exists()
    assert _parts(Path(local_store.root)) == []
    assert list(local_store.list("series")) == ["series/inner/x.dcm"]


def _other_filesystem(path: Path) -> Path | None:
    """A writable folder on another filesystem than ``path``, if the machine has one."""
    for candidate in (Path("/dev/shm"), Path("/run/user") / str(os.getuid())):
        if (
            candidate.is_dir()
            and os.access(candidate, os.W_OK)
            and candidate.stat().st_dev != path.stat().st_dev
        ):
            return candidate
    return None


@pytest.fixture
def foreign_source(tmp_path: Path) -> Iterator[Path]:
    other = _other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no second filesystem (e.g. /dev/shm) to exercise the cross-device copy")
    source = other / f"medlake-test-{uuid.uuid4().hex}.dcm"
    source.write_bytes(b"from another filesystem")
    yield source
    source.unlink(missing_ok=True)


def test_local_put_file_across_filesystems(
    local_store: LocalBlobStore, foreign_source: Path
) -> None:
    local_store.put_file("x/y.dcm", foreign_source)

    assert not foreign_source.exists()
    assert local_store.read_bytes("x/y.dcm") == b"from another filesystem"
    assert _parts(Path(local_store.root)) == []


def test_local_put_file_across_filesystems_failure_removes_temporary(
    local_store: LocalBlobStore, foreign_source: Path
) -> None:
    local_store.put_bytes("x/y/z.dcm", b"z")

    with pytest.raises(StorageError):
        local_store.put_file("x/y", foreign_source)  # copied beside it, rename onto a folder fails

    assert foreign_source.exists()
    assert _parts(Path(local_store.root)) == []


def test_local_fsync_off_still_writes(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "lake", fsync=False)
    source = tmp_path / "s.dcm"
    source.write_bytes(b"s")

    store.put_bytes("a/b.dcm", b"b")
    store.put_file("a/s.dcm", source)

    assert sorted(store.list("a")) == ["a/b.dcm", "a/s.dcm"]
