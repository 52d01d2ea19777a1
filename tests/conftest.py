"""Fixtures of the DICOMweb suite: an archive on SQLite *and* PostgreSQL, the app
behind a TestClient or a real uvicorn server on a free port, and sample files.

Every test that uses ``settings`` (directly or through ``archive``, ``client``,
``live_server``) runs twice: ``[sqlite]`` and ``[postgresql]``. PostgreSQL is
expected at 127.0.0.1:5432 (user postgres, trust auth); the session creates a fresh
database (dropped at the end) and each test its own schema in it. Only an
unreachable server skips the ``[postgresql]`` variants.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from pydicom.data import get_testdata_file
from tests.dicomweb_payloads import copy_with_uids, multipart_body, new_boundary, stow_headers
from tests.lake_inspection import LakeInspection
from typer.testing import CliRunner

from medlake.api import create_app
from medlake.cli.demo_data import write_demo_studies
from medlake.config import Settings
from medlake.ingest.archive import Archive

with warnings.catch_warnings():
    # Starlette suggests "httpx2"; the TestClient works with httpx as installed.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

#: Fixtures of the DIMSE tests (an SCP per test module, dcmtk peers), the HL7 tests (an
#: MLLP listener) and the TLS tests (a test PKI).
pytest_plugins = ["tests.dimse_support", "tests.hl7_support", "tests.tls_support"]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

#: pydicom's bundled test files used by the suite, one per codec / layout.
SAMPLE_NAMES = (
    "CT_small.dcm",  # explicit VR little endian, 16-bit, 1 frame
    "MR_small.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # baseline JPEG, RGB
    "JPEGLSNearLossless_16.dcm",
    "examples_ybr_color.dcm",  # 30-frame baseline JPEG (encapsulated multi-frame)
    "rtdose.dcm",  # 15-frame native, implicit VR
)


# --- databases -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped at the end); skips the
    ``[postgresql]`` tests when the server is unreachable."""
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}")
    name = f"medlake_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLAlchemy URL of an empty index: a SQLite file, or a fresh PostgreSQL schema.

    PostgreSQL tests share the session's database, each in its own schema (the URL sets
    ``search_path``), so every test still starts from an empty index and runs the
    migrations, without paying for CREATE/DROP DATABASE (a checkpoint each) per test.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite'}"
        return
    database = request.getfixturevalue("postgres_database")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    conninfo = PG_ADMIN.rsplit("/", 1)[0] + f"/{database}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        # synchronous_commit=off: commits need not wait for the disk (tests survive no crash).
        options = f"-csearch_path%3D{schema}%20-csynchronous_commit%3Doff"
        yield PG_URL.format(name=database) + f"?options={options}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- archive, app, servers ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Put the root logger back after each test: a command run in-process configures
    logging (handlers on that test's captured streams), which must not leak into the next."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder for commands run in-process (created by them)."""
    return tmp_path / "medlake-data"


@pytest.fixture
def runner(db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """Runs commands in-process with the index at ``db_url`` (MEDLAKE_DATABASE_URL)."""
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", db_url)
    return CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings of a throw-away archive: data folder in tmp_path, index at ``db_url``.

    Authentication is off here (``insecure_no_auth``); the security tests turn it on.
    """
    return Settings(data=tmp_path / "data", database_url=db_url, insecure_no_auth=True)


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    """The opened archive (schema migrated); closed after the test."""
    opened = Archive.open(settings)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def lake(archive: Archive) -> LakeInspection:
    """Out-of-band views of the archive's files and rows."""
    return LakeInspection(archive)


@pytest.fixture
def app(archive: Archive) -> FastAPI:
    """The ASGI app without background threads (the health check runs once at startup)."""
    return create_app(archive, background=False)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """An in-process HTTP client of the app, lifespan included."""
    with TestClient(app) as test_client:
        yield test_client


@dataclass(frozen=True)
class LiveServer:
    """A uvicorn server on a free loopback port."""

    host: str
    port: int
    archive: Archive

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def dicomweb(self) -> str:
        """DICOMweb root of the default partition."""
        return f"{self.url}/dicomweb"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def live_server(app: FastAPI, archive: Archive) -> Iterator[LiveServer]:
    """The app served by uvicorn in a thread; stopped (and joined) after the test."""
    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    while thread.is_alive() and not server.started:
        time.sleep(0.01)
    if not server.started:
        pytest.fail("uvicorn did not start")
    try:
        yield LiveServer(config.host, config.port, archive)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- sample data -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pydicom's test files, each rewritten with its own Study/Series/SOP Instance UIDs
    (several of them share UIDs as shipped, JPEGLSNearLossless_16 has none)."""
    folder = tmp_path_factory.mktemp("samples")
    out = {}
    for name in SAMPLE_NAMES:
        source = get_testdata_file(name)
        assert source is not None, f"pydicom test file {name} is missing"
        out[name] = copy_with_uids(Path(source), folder / name)
    return out


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The demo studies (4 studies, 7 series, 37 instances) as Part-10 files."""
    return write_demo_studies(tmp_path_factory.mktemp("demo"))


StowCall = Callable[..., httpx.Response]


@pytest.fixture
def stow(client: TestClient) -> StowCall:
    """``stow(files, study=None, partition=None, method="POST")``: one STOW-RS request."""

    def send(
        files: list[Path] | list[bytes],
        *,
        study: str | None = None,
        partition: str | None = None,
        method: str = "POST",
    ) -> httpx.Response:
        boundary = new_boundary()
        root = f"/dicomweb/partitions/{partition}" if partition else "/dicomweb"
        url = f"{root}/studies" + (f"/{study}" if study else "")
        return client.request(
            method, url, content=multipart_body(files, boundary), headers=stow_headers(boundary)
        )

    return send


@pytest.fixture
def demo_loaded(stow: StowCall, demo_files: list[Path]) -> list[Path]:
    """The demo studies stored into the default partition; returns their files."""
    response = stow(demo_files)
    assert response.status_code == 200, response.text
    return demo_files
