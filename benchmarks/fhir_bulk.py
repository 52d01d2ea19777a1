#!/usr/bin/env python3
"""FHIR bulk data benchmark: ``$import`` and transaction-bundle rates, and a ``$export``
of 1M resources with the server's memory sampled from ``/proc`` (``make bench-fhir``).

Runs ``medlake serve`` (fresh data folder, authentication off, no DIMSE / MLLP) and talks
to it over HTTP, as a client would. Synthetic data is deterministic (``--seed``): per
10 resources, 1 Patient, 7 Observations (LOINC lab results about that patient), 2
Conditions, each with its own id, written as NDJSON files of one type each.

Phases (figures are ``<name> <value> <unit>  # details``, the shared bench's format):

1. ``import.*``: ``POST /fhir/$import`` of ``--resources`` resources (``file://`` inputs
   under ``fhir_import_root``), kick-off to complete manifest; resources/s.
   Target: >= 2,000 resources/s.
2. ``transaction.*``: ``--bundles`` transaction Bundles of 500 ``PUT`` entries each
   (Observations), one after another on one connection; resources/s.
3. ``load.*``: more Observations imported until the store holds ``--export-resources``
   (the same ``$import``; its rate is reported too).
4. ``export.*``: ``GET /fhir/$export`` of everything; wall time, resources/s, output
   files, and the server's resident memory (``VmRSS`` of ``/proc/<pid>/status``, sampled
   every 0.2 s) before and during the export, and its peak (``VmHWM``).

Usage::

    fhir_bulk.py [--resources 100000] [--bundles 20] [--export-resources 1000000]
                 [--database-url postgresql+psycopg://...] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
MEDLAKE = Path(sys.executable).with_name("medlake")
KICKOFF = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = [("2345-7", "Glucose", "mg/dL", 70, 140), ("718-7", "Hemoglobin", "g/dL", 11, 17),
         ("2160-0", "Creatinine", "mg/dL", 0.5, 1.4), ("2093-3", "Cholesterol", "mg/dL", 120, 260),
         ("4548-4", "Hemoglobin A1c", "%", 4.5, 9.0)]  # fmt: skip
ICD10 = [("E11.9", "Type 2 diabetes mellitus"), ("I10", "Essential hypertension"),
         ("J45.909", "Asthma"), ("N18.3", "Chronic kidney disease, stage 3")]  # fmt: skip


def emit(lines: list[str], name: str, value: float | int | str, unit: str, detail: str) -> None:
    text = value if isinstance(value, str) else (
        f"{value:.1f}" if isinstance(value, float) else str(value)
    )  # fmt: skip
    line = f"{name:<40} {text:>10} {unit:<8}  # {detail}"
    print(line, flush=True)
    lines.append(line)


# --- synthetic data ------------------------------------------------------------------------


def patient(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"bp{n}",
        "identifier": [{"system": "http://hospital.example.org/identifiers/mrn",
                        "value": f"B{n:08d}"}],
        "name": [{"family": f"Family{n % 997}", "given": [f"Given{n % 89}"]}],
        "gender": rng.choice(["male", "female"]),
        "birthDate": f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }  # fmt: skip


def observation(oid: str, patient_n: int, rng: random.Random) -> dict[str, Any]:
    code, name, unit, low, high = rng.choice(LOINC)
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                  "observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": name}]},
        "subject": {"reference": f"Patient/bp{patient_n}"},
        "effectiveDateTime": f"20{rng.randint(10, 24)}-{rng.randint(1, 12):02d}-"
                             f"{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z",
        "valueQuantity": {"value": round(rng.uniform(low, high), 1), "unit": unit,
                          "system": "http://unitsofmeasure.org", "code": unit},
    }  # fmt: skip


def condition(cid: str, patient_n: int, rng: random.Random) -> dict[str, Any]:
    code, name = rng.choice(ICD10)
    return {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                       "condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": code,
                             "display": name}]},
        "subject": {"reference": f"Patient/bp{patient_n}"},
        "onsetDateTime": f"20{rng.randint(0, 24):02d}-{rng.randint(1, 12):02d}-01",
    }  # fmt: skip


def generate(folder: Path, total: int, seed: int) -> dict[str, Path]:
    """``total`` resources (1 Patient, 7 Observations, 2 Conditions per 10), one NDJSON
    file per type; returns the files by type."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: folder / f"{kind}.ndjson" for kind in ("Patient", "Observation", "Condition")}
    handles = {kind: path.open("w") for kind, path in files.items()}
    try:
        for n in range(total // 10):
            handles["Patient"].write(json.dumps(patient(n, rng)) + "\n")
            for k in range(7):
                handles["Observation"].write(json.dumps(observation(f"bo{n}-{k}", n, rng)) + "\n")
            for k in range(2):
                handles["Condition"].write(json.dumps(condition(f"bc{n}-{k}", n, rng)) + "\n")
    finally:
        for handle in handles.values():
            handle.close()
    return files


def generate_observations(path: Path, total: int, patients: int, seed: int, prefix: str) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for n in range(total):
            handle.write(json.dumps(observation(f"{prefix}{n}", n % patients, rng)) + "\n")
    return path


# --- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and of its finished children (the import's
    checker process), from ``/proc/<pid>/stat`` fields 14-17: unlike wall time, not
    stretched by other work on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self, work: Path, database_url: str | None, imports: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MEDLAKE_FHIR_IMPORT_ROOT": str(imports),
               "MEDLAKE_LOG_LEVEL": "WARNING"}  # fmt: skip
        if database_url:
            env["MEDLAKE_DATABASE_URL"] = database_url
        self.log = (work / "server.log").open("w")
        self.process = subprocess.Popen(
            [str(MEDLAKE), "serve", "--data", str(work / "data"), "--http-port", str(self.port),
             "--dimse-port", "0", "--mllp-port", "0", "--insecure-no-auth"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"medlake serve exited; see {work / 'server.log'}")
            time.sleep(0.2)
        raise SystemExit("medlake serve did not answer /healthz within 60 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class RssSampler:
    """The server's VmRSS every 0.2 s while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(proc_kib(self.pid, "VmRSS"))
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- phases --------------------------------------------------------------------------------


def wait_done(client: httpx.Client, location: str) -> dict[str, Any]:
    while True:
        response = client.get(location)
        if response.status_code == 200:
            manifest: dict[str, Any] = response.json()
            return manifest
        if response.status_code != 202:
            raise SystemExit(f"{location}: {response.status_code} {response.text}")
        time.sleep(0.25)


def bulk_import(client: httpx.Client, files: list[tuple[str, Path]]) -> tuple[float, int]:
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "inputFormat", "valueString": "application/fhir+ndjson"}]
        + [
            {"name": "input", "part": [{"name": "type", "valueString": kind},
                                       {"name": "url", "valueUrl": path.as_uri()}]}
            for kind, path in files
        ],
    }  # fmt: skip
    started = time.perf_counter()
    response = client.post("/fhir/$import", json=body, headers={**KICKOFF, **FHIR_JSON})
    if response.status_code != 202:
        raise SystemExit(f"$import kick-off: {response.status_code} {response.text}")
    manifest = wait_done(client, response.headers["content-location"])
    elapsed = time.perf_counter() - started
    if manifest["error"]:
        raise SystemExit(f"$import rejected lines: {manifest['error']}")
    return elapsed, sum(item["count"] for item in manifest["output"])


def transactions(client: httpx.Client, bundles: int, patients: int, seed: int) -> float:
    rng = random.Random(seed)
    started = time.perf_counter()
    for b in range(bundles):
        entries = []
        for k in range(500):
            resource = observation(f"tx{b}-{k}", rng.randrange(patients), rng)
            entries.append(
                {
                    "resource": resource,
                    "request": {"method": "PUT", "url": f"Observation/{resource['id']}"},
                }
            )
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
        if response.status_code != 200:
            raise SystemExit(f"transaction {b}: {response.status_code} {response.text[:500]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resources", type=int, default=100_000)
    parser.add_argument("--bundles", type=int, default=20)
    parser.add_argument("--export-resources", type=int, default=1_000_000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fhir-bulk-"))
    if work.exists():
        shutil.rmtree(work)
    imports = work / "input"
    imports.mkdir(parents=True)
    lines: list[str] = []
    database = "postgresql" if args.database_url else "sqlite"
    lines.append(f"# fhir_bulk {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} "
                 f"{platform.node()} cpus={os.cpu_count()} index={database}")  # fmt: skip
    print(lines[-1], flush=True)

    files = generate(imports / "first", args.resources, args.seed)
    server = Server(work, args.database_url, imports)
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            pid = server.process.pid
            cpu = cpu_seconds(pid)
            elapsed, taken = bulk_import(client, [(k, p) for k, p in files.items()])
            cpu = cpu_seconds(pid) - cpu
            emit(lines, "import.resources", taken, "res", f"{len(files)} NDJSON inputs")
            emit(lines, "import.seconds", elapsed, "s", "kick-off to complete manifest")
            emit(lines, "import.resources_per_s", taken / elapsed, "res/s", "target >= 2000")
            emit(lines, "import.resources_per_cpu_s", taken / cpu, "res/s",
                 f"per CPU second of the server and its checker process ({cpu:.1f} s)")  # fmt: skip
            emit(lines, "machine.load_1min", os.getloadavg()[0], "", "other work on the machine")

            patients = args.resources // 10
            cpu = cpu_seconds(pid)
            elapsed = transactions(client, args.bundles, patients, args.seed)
            cpu = cpu_seconds(pid) - cpu
            count = args.bundles * 500
            emit(lines, "transaction.resources", count, "res", f"{args.bundles} x 500 PUT")
            emit(lines, "transaction.resources_per_s", count / elapsed, "res/s",
                 "transaction Bundles of 500 entries, one connection")  # fmt: skip
            emit(lines, "transaction.resources_per_cpu_s", count / cpu, "res/s",
                 "per CPU second of the server process")  # fmt: skip

            stored = taken + count
            if args.export_resources > stored:
                extra = args.export_resources - stored
                path = generate_observations(imports / "load.ndjson", extra, patients,
                                             args.seed + 1, "lo")  # fmt: skip
                elapsed, loaded = bulk_import(client, [("Observation", path)])
                emit(lines, "load.resources", loaded, "res", "imported to reach the export size")
                emit(lines, "load.resources_per_s", loaded / elapsed, "res/s", "$import")
                stored += loaded

            before = proc_kib(pid, "VmRSS")
            cpu = cpu_seconds(pid)
            with RssSampler(pid) as sampler:
                started = time.perf_counter()
                response = client.get("/fhir/$export", headers=KICKOFF)
                manifest = wait_done(client, response.headers["content-location"])
                elapsed = time.perf_counter() - started
            cpu = cpu_seconds(pid) - cpu
            exported = sum(item["count"] for item in manifest["output"])
            emit(lines, "export.resources", exported, "res", f"{stored} stored")
            emit(lines, "export.seconds", elapsed, "s", "kick-off to complete manifest")
            emit(lines, "export.resources_per_s", exported / elapsed, "res/s", "system $export")
            emit(lines, "export.resources_per_cpu_s", exported / cpu, "res/s",
                 "per CPU second of the server process")  # fmt: skip
            emit(lines, "machine.load_1min", os.getloadavg()[0], "", "after the export")
            emit(lines, "export.files", len(manifest["output"]), "files",
                 "at most fhir_export_file_resources (100k) each")  # fmt: skip
            emit(lines, "export.rss_before_mb", before / 1024, "MiB", "server VmRSS at kick-off")
            emit(lines, "export.rss_max_mb", max(sampler.samples or [0]) / 1024, "MiB",
                 f"max of {len(sampler.samples)} VmRSS samples during the export")  # fmt: skip
            emit(lines, "export.hwm_mb", proc_kib(server.process.pid, "VmHWM") / 1024, "MiB",
                 "server peak RSS over the whole run (VmHWM)")  # fmt: skip
            check = client.get(manifest["output"][0]["url"])
            first = json.loads(check.text.splitlines()[0])
            emit(lines, "export.first_file_ok", "yes" if first.get("resourceType") else "no",
                 "", f"{manifest['output'][0]['url'].rsplit('/', 1)[1]} parses")  # fmt: skip
    finally:
        server.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
