"""medlake as an SCU and its commands: ``medlake ae``, ``send`` (to dcmtk storescp and to
another medlake), ``retrieve`` with C-GET and C-MOVE from another medlake, and the SCP
that ``medlake serve`` and ``medlake dimse`` run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pydicom
import pytest
from pynetdicom.dsutils import split_dataset
from tests.dimse_support import (
    StoreScp,
    free_port,
    fresh_copy,
    output,
    run_dcmtk,
)
from tests.lake_inspection import LakeInspection
from typer.testing import CliRunner

from medlake.cli.main import app
from medlake.config import Settings
from medlake.dimse.ae_registry import ApplicationEntity, add_ae
from medlake.dimse.scp import DimseServer
from medlake.ingest.archive import Archive


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[DimseServer]:
    """Another medlake (SQLite) with its own SCP: the "other PACS"."""
    folder = tmp_path / "peer"  # its own index, whatever MEDLAKE_DATABASE_URL says
    archive = Archive.open(
        Settings(data=folder, database_url=f"sqlite:///{folder / 'index.sqlite'}", ae_title="PEER")
    )
    server = DimseServer(archive, host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop()
        archive.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "ours"


@pytest.fixture
def runner(db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """Runs commands in-process with our index at ``db_url`` and AE title OURS."""
    monkeypatch.setenv("MEDLAKE_DATABASE_URL", db_url)
    monkeypatch.setenv("MEDLAKE_AE_TITLE", "OURS")
    return CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.fixture
def ours(data: Path, db_url: str) -> Iterator[Archive]:
    """Our archive, opened beside the commands (same data folder and index)."""
    archive = Archive.open(Settings(data=data, database_url=db_url))
    try:
        yield archive
    finally:
        archive.close()


def _files(folder: Path, names: list[str], **attributes: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [fresh_copy(name, folder, **attributes) for name in names]


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _dataset_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_ae_commands(runner: CliRunner, data: Path, peer: DimseServer) -> None:
    add = runner.invoke(
        app,
        [
            "ae",
            "add",
            "PEER",
            "127.0.0.1",
            str(peer.port),
            "--partition",
            "research",
            "--no-store",
            "--data",
            str(data),
        ],
    )
    dup = runner.invoke(app, ["ae", "add", "PEER", "127.0.0.1", "1", "--data", str(data)])
    listed = runner.invoke(app, ["ae", "list", "--json", "--data", str(data)])
    echo = runner.invoke(app, ["ae", "echo", "PEER", "--data", str(data)])
    removed = runner.invoke(app, ["ae", "remove", "PEER", "--data", str(data)])
    again = runner.invoke(app, ["ae", "remove", "PEER", "--data", str(data)])

    assert add.exit_code == 0, add.output
    assert dup.exit_code == 1 and "already registered" in dup.output
    entries = orjson.loads(listed.output)
    assert [(e["aeTitle"], e["port"], e["partition"], e["allowStore"]) for e in entries] == [
        ("PEER", peer.port, "research", False)
    ]
    assert echo.exit_code == 0, echo.output
    assert "status 0x0000" in echo.output
    assert removed.exit_code == 0
    assert again.exit_code == 1 and "not registered" in again.output
    assert (entries[0]["tls"], entries[0]["checkHost"]) == (False, True)  # the defaults


def test_ae_add_registers_a_tls_peer_without_the_host_check(runner: CliRunner, data: Path) -> None:
    add = runner.invoke(
        app,
        ["ae", "add", "SECURE", "pacs.example", "2762", "--tls", "--no-check-host",
         "--data", str(data)],
    )  # fmt: skip
    assert add.exit_code == 0, add.output
    listed = orjson.loads(runner.invoke(app, ["ae", "list", "--json", "--data", str(data)]).output)
    assert [(e["aeTitle"], e["tls"], e["checkHost"]) for e in listed] == [("SECURE", True, False)]
    table = runner.invoke(app, ["ae", "list", "--data", str(data)], env={"COLUMNS": "200"})
    header = next(line for line in table.output.splitlines() if "AE title" in line)
    row = next(line for line in table.output.splitlines() if "SECURE" in line)
    columns = dict(
        zip(
            (c.strip() for c in header.split("┃")),
            (c.strip() for c in row.split("│")),
            strict=True,
        )
    )
    assert (columns["TLS"], columns["host check"]) == ("yes", "no")


def test_send_files_to_another_medlake_byte_for_byte(
    runner: CliRunner, data: Path, tmp_path: Path, peer: DimseServer
) -> None:
    files = _files(
        tmp_path / "src",
        ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm"],
    )
    runner.invoke(app, ["ae", "add", "PEER", "127.0.0.1", str(peer.port), "--data", str(data)])

    result = runner.invoke(
        app, ["send", str(tmp_path / "src"), "--aec", "PEER", "--data", str(data)]
    )

    assert result.exit_code == 0, result.output
    assert "4 sent, 0 failed" in result.output
    lake = LakeInspection(peer.archive)
    for path in files:
        stored = lake.instance_path(*_uids(path))
        assert _dataset_bytes(stored) == _dataset_bytes(path)  # each in its own syntax


def test_send_a_study_to_storescp_and_failures_exit_1(
    runner: CliRunner, data: Path, tmp_path: Path, ours: Archive, storescp: StoreScp
) -> None:
    study = pydicom.uid.generate_uid()
    _files(tmp_path / "src", ["CT_small.dcm", "CT_small.dcm"], StudyInstanceUID=study)
    ingest = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--data", str(data)])
    assert ingest.exit_code == 0, ingest.output

    sent = runner.invoke(
        app,
        [
            "send",
            "--study",
            study,
            "--aec",
            "STORESCP",
            "--host",
            "127.0.0.1",
            "--port",
            str(storescp.port),
            "--data",
            str(data),
        ],
    )
    down = runner.invoke(
        app,
        [
            "send",
            "--study",
            study,
            "--aec",
            "DOWN",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--data",
            str(data),
        ],
    )
    missing = runner.invoke(
        app,
        [
            "send",
            "--study",
            "1.2.3.4",
            "--aec",
            "STORESCP",
            "--host",
            "127.0.0.1",
            "--port",
            str(storescp.port),
            "--data",
            str(data),
        ],
    )

    assert sent.exit_code == 0, sent.output
    assert len(storescp.files()) == 2
    assert down.exit_code == 1 and "cannot connect" in down.output
    assert missing.exit_code == 1 and "not stored" in missing.output


def test_retrieve_with_c_get_from_another_medlake(
    runner: CliRunner, data: Path, tmp_path: Path, ours: Archive, peer: DimseServer
) -> None:
    study = pydicom.uid.generate_uid()
    files = _files(
        tmp_path / "src",
        ["CT_small.dcm", "MR_small.dcm", "MR_small.dcm"],
        StudyInstanceUID=study,
        PatientID="MIGR01",
    )
    _store_at(peer, files)
    runner.invoke(
        app,
        [
            "ae",
            "add",
            "PEER",
            "127.0.0.1",
            str(peer.port),
            "--partition",
            "migrated",
            "--data",
            str(data),
        ],
    )

    result = runner.invoke(
        app, ["retrieve", "--aec", "PEER", "--query", "PatientID=MIGR01", "--data", str(data)]
    )

    assert result.exit_code == 0, result.output
    assert "1 studies match" in result.output
    assert "3 instances completed" in result.output
    lake = LakeInspection(ours)
    for path in files:
        stored = lake.instance_path(*_uids(path), partition="migrated")
        assert _dataset_bytes(stored) == _dataset_bytes(path)


def test_retrieve_with_c_move_keeps_compressed_instances_as_stored(
    runner: CliRunner,
    data: Path,
    tmp_path: Path,
    ours: Archive,
    peer: DimseServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = pydicom.uid.generate_uid()
    files = _files(
        tmp_path / "src",
        ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
        StudyInstanceUID=study,
    )
    _store_at(peer, files)
    our_port = free_port()
    monkeypatch.setenv("MEDLAKE_DIMSE_PORT", str(our_port))
    add_ae(peer.archive, ApplicationEntity("OURS", "127.0.0.1", our_port))  # the destination

    result = runner.invoke(
        app,
        [
            "retrieve",
            "--method",
            "move",
            "--study",
            study,
            "--aec",
            "PEER",
            "--host",
            "127.0.0.1",
            "--port",
            str(peer.port),
            "--data",
            str(data),
        ],
    )

    assert result.exit_code == 0, result.output
    assert "3 instances completed" in result.output
    lake = LakeInspection(ours)
    for path in files:
        assert _dataset_bytes(lake.instance_path(*_uids(path))) == _dataset_bytes(path)


def test_retrieve_from_an_unknown_ae_fails(runner: CliRunner, data: Path) -> None:
    result = runner.invoke(app, ["retrieve", "--aec", "NOSUCH", "--data", str(data)])

    assert result.exit_code == 1
    assert "not registered" in result.output


def _store_at(server: DimseServer, files: list[Path]) -> None:
    from pynetdicom import AE, _config

    ae = AE(ae_title="LOADER")
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
        try:
            assert [assoc.send_c_store(p).Status for p in files] == [0] * len(files)
        finally:
            assoc.release()


# --- the SCP in medlake serve / medlake dimse ------------------------------------------------


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"the server exited: {out}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on {port}")


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("command", ["serve", "dimse"])
def test_serve_and_dimse_run_the_scp_and_stop_it(command: str, tmp_path: Path, db_url: str) -> None:
    script = Path(sys.executable).with_name("medlake")
    dimse_port = free_port()
    http_port = free_port()
    args = [str(script), command, "--data", str(tmp_path / "data")]
    if command == "serve":
        args += [
            "--http-port",
            str(http_port),
            "--dimse-port",
            str(dimse_port),
            "--insecure-no-auth",
        ]
    else:
        args += ["--port", str(dimse_port)]
    env = {**os.environ, "MEDLAKE_DATABASE_URL": db_url, "MEDLAKE_OHIF_DIST": str(tmp_path)}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(dimse_port, process)
        if command == "serve":
            # Ctrl-C is the HTTP server's to handle once it listens; before that it
            # interrupts start-up like any program's (exit 130).
            _wait_for_port(http_port, process)
        echo = run_dcmtk("echoscu", "-aec", "MEDLAKE", "127.0.0.1", str(dimse_port))
        assert echo.returncode == 0, output(echo)
    finally:
        process.send_signal(signal.SIGINT if command == "serve" else signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()  # leave no server behind, then report the hang
            raise
    assert process.returncode == 0, process.stdout.read().decode() if process.stdout else ""
    assert _port_closed(dimse_port)
