"""Fixtures and helpers of the HL7 v2 tests: sample messages, a medlake MLLP listener on
a free port (SQLite and PostgreSQL, through ``archive``), and readers of the ACKs and
of the ``hl7_messages`` rows.

Test modules import the helpers they use by name (``from tests.hl7_support import
...``); the fixtures (``mllp_start``) come through ``pytest_plugins`` in conftest.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from medlake.clinical.hl7 import Hl7Mapper, MllpListener
from medlake.clinical.store import read_resource
from medlake.index.schema import hl7_messages
from medlake.ingest.archive import Archive

FHIR_BASE = "http://medlake.test/fhir"


@pytest.fixture
def mllp_start(archive: Archive) -> Iterator[Callable[..., MllpListener]]:
    """``mllp_start(**settings)``: a listener on a free port (and, with
    ``mllp_tls_port``, TLS there) after changing the archive's settings; stopped after
    the test."""
    started: list[MllpListener] = []

    def run(**changes: object) -> MllpListener:
        archive.settings = archive.settings.model_copy(update=changes)
        started.append(MllpListener(archive, host="127.0.0.1", port=0).start())
        return started[-1]

    yield run
    for listener in started:
        listener.stop()


def msh(
    message_type: str,
    control_id: str,
    *,
    version: str = "2.5.1",
    sender: str = "SENDAPP|SENDFAC",
    charset: str = "",
) -> str:
    """An MSH segment (``|^~\\&``) sent by ``sender`` to MEDLAKE|LAKE."""
    tail = f"||||||{charset}" if charset else ""  # MSH-13 to MSH-17 empty
    return (
        f"MSH|^~\\&|{sender}|MEDLAKE|LAKE|20240101120000+0100||{message_type}|{control_id}|P|"
        f"{version}{tail}\r"
    )


def segment(segment_id: str, fields: dict[int, str]) -> str:
    """A segment (not MSH) with ``fields[n]`` as field n, the others empty."""
    values = [fields.get(n, "") for n in range(1, max(fields) + 1)]
    return "|".join([segment_id, *values]) + "\r"


def adt(
    event: str,
    control_id: str,
    patient: str = "12345",
    *,
    family: str = "DOE",
    visit: str = "V123",
) -> str:
    """ADT^A01 / A04 / A08 for ``patient`` (assigning authority HOSP), with a visit."""
    pid = {
        1: "1",
        3: f"{patient}^^^HOSP^MR~999-{patient}^^^&2.16.840.1.113883.4.1&ISO^SS",
        5: f"{family}^JOHN^A",
        7: "19800101",
        8: "M",
        11: "1 MAIN ST^^TOWN^ST^12345^USA^H",
        13: "555-1234^PRN^PH",
    }
    pv1 = {
        1: "1",
        2: "I",
        3: "WARD^101^A",
        7: "1234^SMITH^ANNA",
        19: f"{visit}^^^HOSP^VN",
        44: "20240101110000",
    }
    return (
        msh(f"ADT^{event}^ADT_A01", control_id)
        + f"EVN|{event}|20240101120000\r"
        + segment("PID", pid)
        + segment("PV1", pv1)
    )


def oru(control_id: str, patient: str = "12345", *, filler: str = "FL1") -> str:
    """ORU^R01 with a numeric, a string and a coded result."""
    return (
        msh("ORU^R01^ORU_R01", control_id, sender="LAB|HOSP")
        + f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN\r"
        + f"OBR|1|PL1^ORD|{filler}^LAB|24331-1^Lipid panel^LN|||20240102080000\r"
        + "OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL^mg/dL^UCUM|<200|N|||F|||20240102080000\r"
        + "OBX|2|ST|8251-1^Comment^LN||fasting sample||||||F\r"
        + "OBX|3|CWE|882-1^ABO+Rh group^LN||278149003^Blood group A Rh(D) positive^SCT||||||F\r"
    )


def orm(control_id: str, patient: str = "12345") -> str:
    """ORM^O01: a new order (ORC + OBR)."""
    return (
        msh("ORM^O01^ORM_O01", control_id, sender="CPOE|HOSP")
        + f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN\r"
        + segment("ORC", {1: "NW", 2: "ORD777^CPOE", 9: "20240103090000", 12: "9876^JONES^BOB"})
        + "OBR|1|ORD777^CPOE||71045^Chest X-ray^C4\r"
    )


def omi(control_id: str, patient: str = "12345") -> str:
    """OMI^O23: an imaging order with its IPC segment."""
    return (
        msh("OMI^O23^OMI_O23", control_id, sender="RIS|HOSP")
        + f"PID|1||{patient}^^^HOSP^MR||DOE^JOHN\r"
        + segment("ORC", {1: "NW", 2: "PO123^RIS", 5: "SC", 7: "^^^^^R", 12: "9876^JONES^BOB"})
        + "OBR|1|PO123^RIS||CTHEAD^CT head^L\r"
        + "IPC|ACC1^RIS|RP1|1.2.826.0.1.3680043.2.1125.1|SPS1|CT\r"
    )


def a40(control_id: str, surviving: str, prior: str) -> str:
    """ADT^A40: patient ``prior`` merged into ``surviving``."""
    return (
        msh("ADT^A40^ADT_A39", control_id)
        + "EVN|A40|20240104100000\r"
        + f"PID|1||{surviving}^^^HOSP^MR||DOE^JOHN\r"
        + f"MRG|{prior}^^^HOSP^MR\r"
    )


def segments(ack: bytes) -> dict[str, list[list[str]]]:
    """An ACK's segments by ID, each as its fields (``msa[0][1]`` is MSA-1)."""
    out: dict[str, list[list[str]]] = {}
    text = ack.decode().strip("\x0b\x1c\r")
    for line in text.split("\r"):
        if line:
            fields = line.split("|")
            out.setdefault(fields[0], []).append(fields)
    return out


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK."""
    return segments(ack)["MSA"][0][1]


def err_codes(ack: bytes) -> list[str]:
    """The HL7 table 0357 codes of the ACK's ERR segments (ERR-3.1, or ERR-1's code)."""
    codes = []
    for err in segments(ack).get("ERR", []):
        if len(err) > 3 and err[3]:
            codes.append(err[3].split("^")[0])
        else:
            codes.append(err[1].split("^")[3].split("&")[0])
    return codes


def rows(archive: Archive, **where: Any) -> list[Any]:
    """``hl7_messages`` rows (all columns) matching column equalities, in id order."""
    query = select(hl7_messages).order_by(hl7_messages.c.id)
    for column, value in where.items():
        query = query.where(hl7_messages.c[column] == value)
    with archive.engine.connect() as conn:
        return list(conn.execute(query).all())


def resource(archive: Archive, reference: str) -> dict[str, Any]:
    """The current version of ``Type/id`` from the FHIR store."""
    kind, _, logical_id = reference.partition("/")
    found = read_resource(archive, kind, logical_id).resource()
    assert found is not None
    return found


def refs_of(archive: Archive, control_id: str, kind: str) -> list[str]:
    """The ``Type/id`` references of ``kind`` made from message ``control_id``."""
    import orjson

    (row,) = rows(archive, control_id=control_id, duplicate_of=None)
    assert row.status == "mapped", (row.status, row.error_text)
    return [r for r in orjson.loads(row.resource_refs) if r.startswith(f"{kind}/")]


@dataclass
class MllpServer:
    """A listener on a free port; ``mapper.run_pending()`` maps what was stored."""

    listener: MllpListener
    mapper: Hl7Mapper
    archive: Archive

    @property
    def port(self) -> int:
        """The listening port."""
        return self.listener.port

    def connect(self) -> socket.socket:
        """A raw TCP connection to the listener (for framing tests)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return sock


@contextmanager
def running_listener(archive: Archive) -> Iterator[MllpServer]:
    """An MLLP listener on a free port of ``archive``; its mapper is not running (tests
    call ``server.mapper.run_pending()``). Each test module's ``mllp`` fixture wraps it."""
    listener = MllpListener(archive, host="127.0.0.1", port=0).start()
    mapper = Hl7Mapper(archive, FHIR_BASE)
    try:
        yield MllpServer(listener, mapper, archive)
    finally:
        listener.stop()
        mapper.stop()


def read_acks(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` framed ACKs from a raw socket."""
    buffer = b""
    acks: list[bytes] = []
    while len(acks) < count:
        end = buffer.find(b"\x1c\r")
        if end >= 0:
            acks.append(buffer[: end + 2])
            buffer = buffer[end + 2 :]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return acks
