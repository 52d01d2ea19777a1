"""HL7 v2 over MLLP: messages per second on one connection, each stored before its ACK.

    python benchmarks/hl7_mllp.py [--messages 5000] [--database-url URL] [--no-mapping]
                                  [--no-auth]
    python benchmarks/hl7_mllp.py --host H --port P     # against a listener already running

Starts ``medlake mllp`` on a free port with a fresh data folder (SQLite, or the
``--database-url`` index) and authentication on, as installed: the benchmark registers
itself as an HL7 sender (``medlake hl7 senders add``) and every message is audited in
the transaction of its row (``--no-auth``: authentication off, nothing audited, for
comparison). It then sends ``--messages`` messages (ADT^A01, ADT^A08 and
ORU^R01 with three OBX, each with its own MSH-10) over one connection with
python-hl7's ``MLLPClient``, one at a time: each waits for its ACK, which medlake
sends only once the message's row is committed. Prints the rate, the ACK latency
percentiles, the ACK codes (all must be AA), and, with mapping on, how long the
background mapper took to turn them all into FHIR resources.

Output lines use the shared bench format ``<figure> <value> <unit>  # details``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hl7.client import MLLPClient

REPO = Path(__file__).resolve().parents[1]


def messages(count: int) -> list[str]:
    """``count`` distinct messages: admissions, updates and lab results of 100 patients."""
    out = []
    for n in range(count):
        patient = f"P{n % 100:05d}"
        stamp = f"2024{1 + n % 12:02d}{1 + n % 28:02d}1200"
        kind = n % 3
        if kind == 0:
            out.append(
                f"MSH|^~\\&|BENCH|HOSP|MEDLAKE|LAKE|{stamp}||ADT^A01^ADT_A01|B{n:08d}|P|2.5.1\r"
                f"EVN|A01|{stamp}\r"
                f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN^{n}||19800101|M\r"
                f"PV1|1|I|WARD^1^A|||||||||||||||V{n:08d}^^^HOSP^VN\r"
            )
        elif kind == 1:
            out.append(
                f"MSH|^~\\&|BENCH|HOSP|MEDLAKE|LAKE|{stamp}||ADT^A08^ADT_A01|B{n:08d}|P|2.5.1\r"
                f"EVN|A08|{stamp}\r"
                f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN^{n}||19800101|M\r"
                f"PV1|1|O\r"
            )
        else:
            out.append(
                f"MSH|^~\\&|BENCH|LAB|MEDLAKE|LAKE|{stamp}||ORU^R01^ORU_R01|B{n:08d}|P|2.5.1\r"
                f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN\r"
                f"OBR|1||F{n:08d}^LAB|24331-1^Lipid panel^LN|||{stamp}\r"
                f"OBX|1|NM|2093-3^Cholesterol^LN||{150 + n % 50}|mg/dL^mg/dL^UCUM|<200|N|||F\r"
                f"OBX|2|NM|2571-8^Triglyceride^LN||{90 + n % 40}|mg/dL^mg/dL^UCUM|<150|N|||F\r"
                f"OBX|3|ST|8251-1^Comment^LN||fasting||||||F\r"
            )
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"medlake mllp exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit("medlake mllp did not start listening")


def send_all(host: str, port: int, batch: list[str]) -> tuple[float, list[float], dict[str, int]]:
    latencies: list[float] = []
    codes: dict[str, int] = {}
    with MLLPClient(host, port) as client:
        client.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        for message in batch:
            sent = time.perf_counter()
            ack = client.send_message(message)
            latencies.append(time.perf_counter() - sent)
            msa = next((s for s in ack.split(b"\r") if s.startswith(b"MSA")), b"MSA|??")
            code = msa.split(b"|")[1].decode()
            codes[code] = codes.get(code, 0) + 1
        elapsed = time.perf_counter() - start
    return elapsed, latencies, codes


def wait_mapped(data: Path, database_url: str | None, total: int, timeout: float) -> float | None:
    """Seconds until every message is mapped (None on timeout)."""
    from sqlalchemy import create_engine, func, select

    from medlake.index.schema import hl7_messages

    url = database_url or f"sqlite:///{data / 'index.sqlite'}"
    engine = create_engine(url)
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < timeout:
            with engine.connect() as conn:
                left = conn.execute(
                    select(func.count()).where(hl7_messages.c.status == "received")
                ).scalar_one()
            if left == 0:
                return time.perf_counter() - start
            time.sleep(0.5)
    finally:
        engine.dispose()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--no-mapping", action="store_true")
    parser.add_argument(
        "--no-auth", action="store_true", help="authentication off: no sender check, no audit"
    )
    parser.add_argument("--host", default=None, help="an MLLP listener already running")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()

    batch = messages(args.warmup + args.messages)
    server = None
    data = Path(tempfile.mkdtemp(prefix="medlake-hl7-bench-"))
    host, port = args.host or "127.0.0.1", args.port
    try:
        if args.host is None:
            port = free_port()
            env = dict(os.environ, MEDLAKE_LOG_LEVEL="WARNING")
            env["MEDLAKE_HL7_MAPPING"] = "false" if args.no_mapping else "true"
            if args.database_url:
                env["MEDLAKE_DATABASE_URL"] = args.database_url
            if args.no_auth:
                env["MEDLAKE_INSECURE_NO_AUTH"] = "true"
            else:
                subprocess.run(
                    [str(REPO / ".venv/bin/medlake"), "hl7", "senders", "add", "bench",
                     "--host", "127.0.0.1", "--partition", "default", "--data", str(data)],
                    env=env, check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip
            server = subprocess.Popen(
                [str(REPO / ".venv/bin/medlake"), "mllp", "--data", str(data), "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
            )
            wait_for_port(port, server)
        assert port is not None
        send_all(host, port, batch[: args.warmup])
        elapsed, latencies, codes = send_all(host, port, batch[args.warmup :])
        rate = args.messages / elapsed
        quantiles = statistics.quantiles(latencies, n=100)
        index = args.database_url.split("@")[-1].split("?")[0] if args.database_url else "sqlite"
        mapping = "off" if args.no_mapping else "on"
        auth = "off" if args.no_auth else "on (sender check + audit)"
        print(
            f"hl7.mllp.rate {rate:.0f} msg/s  # {args.messages} messages, one connection, "
            f"index {index}, mapping {mapping}, auth {auth}"
        )
        print(f"hl7.mllp.ack_p50 {quantiles[49] * 1000:.2f} ms")
        print(f"hl7.mllp.ack_p99 {quantiles[98] * 1000:.2f} ms")
        print(f"hl7.mllp.ack_codes {codes}")
        if server is not None and not args.no_mapping:
            took = wait_mapped(data, args.database_url, args.messages, timeout=600)
            mapped = "timeout" if took is None else f"{took:.1f} s"
            print(f"hl7.mapping.lag {mapped}  # after the last ACK, until every message was mapped")
        if codes.get("AA", 0) != args.messages:
            sys.exit("some messages were not acknowledged AA")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
