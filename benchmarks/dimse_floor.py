"""The C-STORE ceiling on this machine: what the parts medlake cannot avoid cost.

Two figures, measured in the same run as the C-STORE benchmark, so that its ratio to
Orthanc can be read against what is possible at all:

* ``floor.pynetdicom_noop``: dcmtk ``storescu`` (one association, TCP_NODELAY) into a
  pynetdicom 3.0 SCP that answers every C-STORE with Success and stores nothing, with
  medlake's event-driven transport (``medlake.dimse._transport``) and PDU size. This is
  the message layer alone: reading the PDUs, assembling the data set, the response.
* ``floor.fsync_ms``: write + fsync of one file of the dataset's mean instance size in
  the data folder, then the fsync of its directory after a rename: what making one
  received instance durable costs on this disk (Orthanc's default, SyncStorageArea=true,
  pays it too).

``floor.ceiling`` combines them: the most instances/s a pynetdicom SCP that stores each
instance durably before answering could reach here, before parsing or indexing it.

Usage: dimse_floor.py DATASET DATA_DIR [--port N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from medlake.config import Settings
from medlake.dimse._transport import EventDrivenRequestHandler, set_tcp_nodelay


def fig(name: str, value: float, unit: str, details: str) -> None:
    print(f"{name:<34} {value:12.3f} {unit:<10}  # {details}", flush=True)


def noop_rate(dataset: Path, port: int) -> tuple[float, int]:
    """Instances/s of storescu into a pynetdicom SCP that stores nothing."""
    ae = AE(ae_title="NOOP")
    ae.maximum_pdu_size = Settings().dimse_max_pdu
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_CONN_OPEN, set_tcp_nodelay)]
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=handlers, request_handler=EventDrivenRequestHandler
    )
    ae._servers.append(server)  # pynetdicom's shutdown() removes it from there
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        n = json.loads((dataset / "manifest.json").read_text())["n_instances"]
        started = time.perf_counter()
        subprocess.run(
            ["storescu", "-aet", "BENCHSCU", "-aec", "NOOP", "+sd", "+r", "-nh",
             "127.0.0.1", str(port), str(dataset / "dicom")],
            env={**os.environ, "TCP_NODELAY": "1"}, check=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return n / (time.perf_counter() - started), ae.maximum_pdu_size
    finally:
        server.shutdown()


def fsync_ms(folder: Path, size: int, runs: int = 200) -> float:
    """Median ms to write ``size`` bytes, fsync them, rename and fsync the directory."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    times = []
    for _ in range(runs):
        tmp, final = folder / f"{uuid.uuid4().hex}.part", folder / f"{uuid.uuid4().hex}.dcm"
        started = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        times.append(time.perf_counter() - started)
        final.unlink()
    return statistics.median(times) * 1e3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("data_dir", type=Path, help="a folder on the disk medlake stores to")
    parser.add_argument("--port", type=int, default=18599)
    args = parser.parse_args(argv)
    manifest = json.loads((args.dataset / "manifest.json").read_text())
    mean_size = int(manifest["total_bytes"] / manifest["n_instances"])
    rate, pdu = noop_rate(args.dataset, args.port)
    what = f"storescu into a pynetdicom SCP that stores nothing (medlake transport, PDU {pdu})"
    fig("floor.pynetdicom_noop.inst_per_s", rate, "inst/s", what)
    sync = fsync_ms(args.data_dir / "floor-fsync", mean_size)
    what = f"write + fsync of {mean_size} bytes, rename, fsync of the folder; median of 200"
    fig("floor.fsync_ms", sync, "ms", what)
    ceiling = 1 / (1 / rate + sync / 1e3)
    what = "1 / (no-op message layer + durable write): before any parse or index work"
    fig("floor.ceiling.inst_per_s", ceiling, "inst/s", what)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
