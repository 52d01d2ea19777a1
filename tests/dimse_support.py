"""Fixtures and helpers of the DIMSE tests: a medlake SCP on a free port per test module
(on SQLite and on PostgreSQL), dcmtk's command-line tools, a dcmtk storescp as a
C-MOVE destination, and sample files in several transfer syntaxes.

Test modules import the fixtures they use by name (``from tests.dimse_support import
...``); pytest finds fixtures in a test module's namespace.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pydicom
import pytest
from pydicom.data import get_testdata_file
from tests.conftest import PG_ADMIN, PG_URL
from tests.dicomweb_payloads import copy_with_uids
from tests.lake_inspection import LakeInspection

from medlake.config import Settings
from medlake.dimse.scp import DimseServer
from medlake.ingest.archive import Archive

#: pydicom test files in different transfer syntaxes (and two multi-frame ones).
MIXED_SYNTAXES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # Deflated
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "examples_ybr_color.dcm": "1.2.840.10008.1.2.4.50",  # 30-frame JPEG Baseline
    "rtdose.dcm": "1.2.840.10008.1.2",  # 15-frame native, implicit VR
}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dcmtk(tool: str) -> str:
    """Path of a dcmtk tool; skips the test when dcmtk is not installed."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"dcmtk's {tool} is not installed (scripts/install-system-deps.sh installs it)")
    return path


def run_dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool with Nagle off on its side (TCP_NODELAY=1); output in .stdout."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [dcmtk(tool), *args], capture_output=True, text=True, timeout=timeout, env=env,
        check=False,
    )  # fmt: skip


def output(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr of a dcmtk run (dcmtk logs to both)."""
    return result.stdout + result.stderr


# --- an archive and its SCP, once per test module ------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty index for the module: a SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('dimse-index') / 'index.sqlite'}"
        return
    database = request.getfixturevalue("postgres_database")
    schema = f"dimse_{uuid.uuid4().hex[:16]}"
    conninfo = PG_ADMIN.rsplit("/", 1)[0] + f"/{database}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        options = f"-csearch_path%3D{schema}%20-csynchronous_commit%3Doff"
        yield PG_URL.format(name=database) + f"?options={options}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="module")
def module_archive(
    module_db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Archive]:
    """The module's archive (data folder in a temporary directory)."""
    data = tmp_path_factory.mktemp("dimse-data")
    archive = Archive.open(Settings(data=data, database_url=module_db_url))
    try:
        yield archive
    finally:
        archive.close()


@dataclass(frozen=True)
class RunningScp:
    """A medlake SCP under test."""

    server: DimseServer
    archive: Archive

    @property
    def port(self) -> str:
        """Its port, as a command-line argument."""
        return str(self.server.port)

    @property
    def ae_title(self) -> str:
        """Its AE title."""
        return self.server.ae_title

    @property
    def lake(self) -> LakeInspection:
        """Outside views of its archive."""
        return LakeInspection(self.archive)


@pytest.fixture(scope="module")
def scp(module_archive: Archive) -> Iterator[RunningScp]:
    """medlake's DIMSE SCP on a free port, for the whole module."""
    server = DimseServer(module_archive, host="127.0.0.1", port=0).start()
    try:
        yield RunningScp(server, module_archive)
    finally:
        server.stop()


# --- sample data and peers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of pydicom's test files in many transfer syntaxes, each with new UIDs."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in MIXED_SYNTAXES:
        source = get_testdata_file(name)
        assert source is not None, f"pydicom test file {name} is missing"
        copy_with_uids(Path(source), folder / name)
    return folder


def storescu_profile(folder: Path, target: Path) -> list[str]:
    """A storescu configuration proposing each file's own (SOP Class, transfer syntax)
    in a context of its own, so nothing is converted on the way (storescu proposes only
    uncompressed syntaxes by default); the arguments that select it."""
    pairs = sorted(
        {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir())
        }
    )
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Files]"]
    for n, (sop_class, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{n} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Files]", "PresentationContexts = Files"]
    target.write_text("\n".join(lines) + "\n")
    return ["-xf", str(target), "Files"]


def fresh_copy(name: str, folder: Path, **attributes: object) -> Path:
    """A pydicom test file with new UIDs (and the given attributes) in ``folder``."""
    source = get_testdata_file(name)
    assert source is not None, f"pydicom test file {name} is missing"
    return copy_with_uids(Path(source), folder / f"{uuid.uuid4().hex}-{name}", **attributes)


@dataclass
class StoreScp:
    """A dcmtk storescp writing what it receives into ``folder``."""

    process: subprocess.Popen[str]
    port: int
    ae_title: str
    folder: Path

    def files(self) -> list[Path]:
        """The files received so far."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """dcmtk's storescp (Nagle off) on a free port: a C-MOVE destination and send target."""
    tool = dcmtk("storescp")
    port = free_port()
    folder = tmp_path / "storescp"
    folder.mkdir()
    process = subprocess.Popen(
        [tool, "-aet", "STORESCP", "-od", str(folder), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("storescp did not start listening")
    try:
        yield StoreScp(process, port, "STORESCP", folder)
    finally:
        process.terminate()
        process.wait(timeout=10)


__all__ = [
    "MIXED_SYNTAXES",
    "RunningScp",
    "StoreScp",
    "dcmtk",
    "free_port",
    "fresh_copy",
    "mixed_folder",
    "module_archive",
    "module_db_url",
    "output",
    "run_dcmtk",
    "scp",
    "storescp",
    "storescu_profile",
]
