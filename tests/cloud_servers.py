"""Real object-store servers for tests: moto (S3) and Azurite (Azure Blob).

Both run as separate processes on free loopback ports, once per test session,
so the fsspec backends (s3fs, adlfs) are exercised over real HTTP rather than
through in-process mocks. Load them with ``pytest_plugins = ["tests.cloud_servers"]``
(tests/conftest.py) or ``from tests.cloud_servers import *``.

A missing toolchain (node/npm) or a failed Azurite install skips the tests that
need it; set ``MEDLAKE_REQUIRE_CLOUD=1`` (e.g. in CI) to make that a failure instead,
so a green run cannot silently hide untested backends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = [
    "AZURITE_ACCOUNT_KEY",
    "AZURITE_ACCOUNT_NAME",
    "AzuriteServer",
    "S3Server",
    "azurite_server",
    "s3_server",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_AZURITE = REPO_ROOT / "scripts" / "install-azurite.sh"
NPM_PREFIX = Path(os.environ.get("MEDLAKE_NPM_PREFIX", REPO_ROOT / ".cache" / "npm"))

#: Azurite's fixed development account (public, documented by Microsoft). Note the
#: "...FPTOtr..." (letter O): a copy with "FPTBtr" fails with AuthorizationFailure.
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server with one bucket created."""

    endpoint_url: str
    bucket: str
    startup_seconds: float
    storage_options: dict[str, Any] = field(default_factory=dict)

    def url(self, prefix: str) -> str:
        """An ``s3://`` lake URL under ``prefix`` in the test bucket."""
        return f"s3://{self.bucket}/{prefix}"

    def boto_client(self) -> Any:
        """A plain boto3 S3 client, to check what the store did from the outside."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@dataclass(frozen=True)
class AzuriteServer:
    """A running Azurite blob service with one container created."""

    blob_endpoint: str
    connection_string: str
    container: str
    startup_seconds: float
    account_name: str = AZURITE_ACCOUNT_NAME
    account_key: str = AZURITE_ACCOUNT_KEY
    storage_options: dict[str, Any] = field(default_factory=dict)

    def url(self, prefix: str) -> str:
        """An ``abfs://`` lake URL under ``prefix`` in the test container."""
        return f"abfs://{self.container}/{prefix}"

    def service_client(self) -> Any:
        """A plain (sync) azure.storage.blob client, to check the store from the outside."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail when the run demands every backend (MEDLAKE_REQUIRE_CLOUD=1)."""
    if os.environ.get("MEDLAKE_REQUIRE_CLOUD") == "1":
        pytest.fail(f"{reason} (MEDLAKE_REQUIRE_CLOUD=1)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    # The port is released before the server binds it; a clash is possible in
    # theory but the kernel does not hand the same ephemeral port out again at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll ``url`` until the server answers any HTTP status."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} during startup:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP error status still means the server is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {url} within {STARTUP_TIMEOUT_S}s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` with output to ``log``; terminate it (then kill) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server in its own process, with bucket ``medlake-test``."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # Dummy credentials in the child's environment too, so nothing reaches for real ones.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    started = time.monotonic()
    with _process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log, env
    ) as proc:
        _wait_http(f"{endpoint}/moto-api/", proc, log, "moto server")
        server = S3Server(
            endpoint_url=endpoint,
            bucket="medlake-test",
            startup_seconds=time.monotonic() - started,
            storage_options={
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            },
        )
        server.boto_client().create_bucket(Bucket=server.bucket)
        yield server


def _azurite_binary() -> Path:
    """Path of ``azurite-blob``, installing it into .cache/npm when missing."""
    binary = NPM_PREFIX / "bin" / "azurite-blob"
    if shutil.which("node") is None:
        _unavailable("node is not installed: Azurite (abfs:// tests) needs Node.js")
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        _unavailable(f"Azurite is not installed in {NPM_PREFIX} and npm is missing to install it")
    result = subprocess.run(
        ["bash", str(INSTALL_AZURITE)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MEDLAKE_NPM_PREFIX": str(NPM_PREFIX)},
        check=False,
    )
    if result.returncode != 0 or not binary.exists():
        _unavailable(
            f"{INSTALL_AZURITE.name} failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-800:]}"
        )
    return binary


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """Azurite's blob service in its own process, with container ``medlake-test``."""
    binary = _azurite_binary()
    port = _free_port()
    workspace = tmp_path_factory.mktemp("azurite")
    blob_endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT_NAME}"
    connection_string = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT_NAME};"
        f"AccountKey={AZURITE_ACCOUNT_KEY};BlobEndpoint={blob_endpoint};"
    )
    cmd = [
        str(binary),
        "--blobHost", "127.0.0.1",
        "--blobPort", str(port),
        "--location", str(workspace / "data"),
        "--silent",
        "--skipApiVersionCheck",  # azure-storage-blob may be newer than the emulator
        "--loose",
        "--disableTelemetry",  # the test machine must not phone home
    ]  # fmt: skip
    started = time.monotonic()
    with _process(cmd, workspace / "azurite.log") as proc:
        # Any request gets an HTTP answer (400 here) once the listener is up.
        _wait_http(f"{blob_endpoint}?comp=list", proc, workspace / "azurite.log", "Azurite")
        server = AzuriteServer(
            blob_endpoint=blob_endpoint,
            connection_string=connection_string,
            container="medlake-test",
            startup_seconds=time.monotonic() - started,
            storage_options={
                "account_name": AZURITE_ACCOUNT_NAME,
                "account_key": AZURITE_ACCOUNT_KEY,
                "connection_string": connection_string,
            },
        )
        with server.service_client() as client:
            client.create_container(server.container)
        yield server
