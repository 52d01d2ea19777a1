"""HL7 v2 over MLLP with python-hl7's client against a real listener: every message
type stored, acknowledged and mapped to FHIR; bad messages and MLLP framing errors
answered and recorded without stopping the listener; store before ACK; duplicates;
A40 merges. Each test runs on SQLite and PostgreSQL (through ``archive``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
from hl7.client import MLLPClient
from tests.hl7_support import (
    MllpServer,
    a40,
    ack_code,
    adt,
    err_codes,
    msh,
    omi,
    orm,
    oru,
    read_acks,
    refs_of,
    resource,
    rows,
    running_listener,
    segments,
)

from medlake.clinical.hl7 import Hl7Mapper, frame
from medlake.ingest.archive import Archive


@pytest.fixture
def mllp(archive: Archive) -> Iterator[MllpServer]:
    """A listener on a free port (SQLite and PostgreSQL); its mapper runs on demand."""
    with running_listener(archive) as server:
        yield server


def send(server: MllpServer, *messages: str | bytes) -> list[bytes]:
    """Send messages one at a time over one connection; their ACKs."""
    with MLLPClient("127.0.0.1", server.port) as client:
        return [client.send_message(m) for m in messages]


# --- each message type --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "kinds"),
    [
        (lambda: adt("A01", "C-A01"), {"Patient", "Encounter"}),
        (lambda: adt("A04", "C-A04"), {"Patient", "Encounter"}),
        (lambda: adt("A08", "C-A08"), {"Patient", "Encounter"}),
        (lambda: oru("C-R01"), {"Patient", "DiagnosticReport", "Observation"}),
        (lambda: orm("C-O01"), {"Patient", "ServiceRequest"}),
        (lambda: omi("C-O23"), {"Patient", "ServiceRequest"}),
    ],
    ids=["ADT^A01", "ADT^A04", "ADT^A08", "ORU^R01", "ORM^O01", "OMI^O23"],
)
def test_each_message_type_is_stored_acknowledged_and_mapped(
    mllp: MllpServer, archive: Archive, build, kinds: set[str]
) -> None:
    message = build()
    control_id = message.split("|")[9]
    (ack,) = send(mllp, message)

    parts = segments(ack)
    assert ack_code(ack) == "AA"
    assert parts["MSA"][0][2] == control_id
    (row,) = rows(archive, control_id=control_id)
    assert row.status == "received"
    assert row.raw_text == message  # as received, byte for byte

    assert mllp.mapper.run_pending() == 1
    (row,) = rows(archive, control_id=control_id)
    assert row.status == "mapped", row.error_text
    made = orjson.loads(row.resource_refs)
    assert {ref.split("/")[0] for ref in made} == kinds
    for reference in made:
        assert resource(archive, reference)["resourceType"] == reference.split("/")[0]


def test_ack_swaps_sender_and_receiver_and_keeps_the_message_encoding(
    mllp: MllpServer,
) -> None:
    message = (
        "MSH*^~\\&*LAB^1.2.3^ISO*NORTH*MEDLAKE*LAKE*20240101120000**ORU^R01*Q-77*P*2.4\r"
        "PID*1**55^^^HOSP^MR**ROE^ANN\r"
        "OBR*1**F9^LAB*2345-7^Glucose^LN\r"
        "OBX*1*NM*2345-7^Glucose^LN**5.4*mmol/L^^UCUM*****F\r"
    )
    (ack,) = send(mllp, message)
    text = ack.decode().strip("\x0b\x1c\r")
    msh_fields = text.split("\r")[0].split("*")
    assert msh_fields[1] == "^~\\&"  # MSH-2 as the message had it
    assert msh_fields[2:6] == ["MEDLAKE", "LAKE", "LAB^1.2.3^ISO", "NORTH"]
    assert msh_fields[8] == "ACK^R01^ACK"
    assert msh_fields[11] == "2.4"
    assert text.split("\r")[1] == "MSA*AA*Q-77"


def test_background_mapper_maps_without_being_asked(mllp: MllpServer, archive: Archive) -> None:
    mapper = Hl7Mapper(archive, "http://medlake.test/fhir", poll_seconds=0.2).start()
    try:
        send(mllp, adt("A01", "BG-1"))
        deadline = time.monotonic() + 60
        while rows(archive, control_id="BG-1")[0].status == "received":
            assert time.monotonic() < deadline, "the mapper did not map the message"
            time.sleep(0.05)
    finally:
        mapper.stop()
    assert rows(archive, control_id="BG-1")[0].status == "mapped"


# --- mapping details a user sees in FHIR ---------------------------------------------------


def test_repeated_adt_messages_update_the_same_patient(mllp: MllpServer, archive: Archive) -> None:
    send(mllp, adt("A01", "P-1", family="DOE"), adt("A08", "P-2", family="DOE-SMITH"))
    mllp.mapper.run_pending()
    (first,) = refs_of(archive, "P-1", "Patient")
    (second,) = refs_of(archive, "P-2", "Patient")
    assert first == second
    patient = resource(archive, first)
    assert patient["name"][0]["family"] == "DOE-SMITH"
    assert patient["meta"]["versionId"] == "2"
    identifier = patient["identifier"][0]
    assert identifier["system"] == "urn:medlake:hl7v2:authority:HOSP"
    assert identifier["value"] == "12345"
    assert patient["identifier"][1]["system"] == "urn:oid:2.16.840.1.113883.4.1"


def test_result_values_become_typed_observations(mllp: MllpServer, archive: Archive) -> None:
    send(mllp, adt("A01", "R-0"), oru("R-1"))
    mllp.mapper.run_pending()
    (patient,) = refs_of(archive, "R-0", "Patient")
    observations = [resource(archive, ref) for ref in refs_of(archive, "R-1", "Observation")]
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    cholesterol = by_code["2093-3"]
    assert cholesterol["valueQuantity"] == {
        "value": 182,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert cholesterol["subject"]["reference"] == patient
    assert cholesterol["status"] == "final"
    assert by_code["8251-1"]["valueString"] == "fasting sample"
    coded = by_code["882-1"]["valueCodeableConcept"]["coding"][0]
    assert coded["system"] == "http://snomed.info/sct"
    assert coded["code"] == "278149003"


def test_a40_merge_repoints_observations_to_the_surviving_patient(
    mllp: MllpServer, archive: Archive
) -> None:
    send(
        mllp,
        adt("A01", "M-1", patient="111", visit="V1"),
        adt("A01", "M-2", patient="222", visit="V2"),
        oru("M-3", patient="222", filler="F-222"),
    )
    mllp.mapper.run_pending()
    (surviving,) = refs_of(archive, "M-1", "Patient")
    (prior,) = refs_of(archive, "M-2", "Patient")
    observation = refs_of(archive, "M-3", "Observation")[0]
    assert resource(archive, observation)["subject"]["reference"] == prior

    (ack,) = send(mllp, a40("M-4", surviving="111", prior="222"))
    assert ack_code(ack) == "AA"
    mllp.mapper.run_pending()

    assert rows(archive, control_id="M-4")[0].status == "mapped"
    assert resource(archive, observation)["subject"]["reference"] == surviving
    old = resource(archive, prior)
    assert old["active"] is False
    assert old["link"] == [{"other": {"reference": surviving}, "type": "replaced-by"}]
    assert {"other": {"reference": prior}, "type": "replaces"} in resource(archive, surviving)[
        "link"
    ]


# --- bad messages: the right ACK, the message stored ---------------------------------------


@pytest.mark.parametrize(
    ("message", "code", "errors"),
    [
        # broken segment: not a 3-character segment ID
        (msh("ADT^A01", "B-1") + "EVN|A01|20240101\rthis is not a segment\r", "AE", ["100"]),
        # required segment PV1 missing
        (msh("ADT^A01", "B-2") + "EVN|A01|20240101\rPID|1||1^^^H^MR||DOE\r", "AE", ["100"]),
        # PID-3 empty
        (
            msh("ADT^A01", "B-3") + "EVN|A01|20240101\rPID|1||||DOE\rPV1|1|I\r",
            "AE",
            ["101"],
        ),
        # PID-7 not a date
        (
            msh("ADT^A01", "B-4") + "EVN|A01|20240101\rPID|1||1^^^H^MR||DOE||1st May|M\rPV1|1|I\r",
            "AE",
            ["102"],
        ),
        # PV1-2 not in table 0004
        (
            msh("ADT^A01", "B-5") + "EVN|A01|20240101\rPID|1||1^^^H^MR||DOE\rPV1|1|Q\r",
            "AE",
            ["103"],
        ),
        # OBX-5 not a number while OBX-2 says NM
        (
            msh("ORU^R01", "B-6") + "OBR|1||F|1^X^L\rOBX|1|NM|1^X^L||high||||||F\r",
            "AE",
            ["102"],
        ),
        # unknown message type, unsupported trigger event, processing ID, version
        (msh("ZZZ^Z01", "B-7") + "EVN|Z01|2024\r", "AR", ["200"]),
        (msh("ADT^A03", "B-8") + "EVN|A03|2024\r", "AR", ["201"]),
        (msh("ADT^A01", "B-9").replace("|P|", "|X|") + "EVN|A01|2024\r", "AR", ["202"]),
        (msh("ADT^A01", "B-10", version="9.9") + "EVN|A01|2024\r", "AR", ["203"]),
    ],
    ids=[
        "broken-segment",
        "missing-segment",
        "missing-field",
        "bad-date",
        "bad-table-value",
        "bad-number",
        "unknown-type",
        "unsupported-event",
        "bad-processing-id",
        "bad-version",
    ],
)
def test_invalid_messages_are_answered_with_err_and_stored(
    mllp: MllpServer, archive: Archive, message: str, code: str, errors: list[str]
) -> None:
    control_id = message.split("|")[9]
    (ack,) = send(mllp, message)
    assert ack_code(ack) == code
    assert segments(ack)["MSA"][0][2] == control_id
    assert err_codes(ack)[: len(errors)] == errors
    (row,) = rows(archive, control_id=control_id)
    assert (row.status, row.ack_code) == ("rejected", code)
    assert row.raw_text == message
    assert row.error_code == errors[0]
    assert mllp.mapper.run_pending() == 0  # rejected messages are not mapped


def test_wrong_encoding_characters_are_rejected_with_the_control_id(
    mllp: MllpServer, archive: Archive
) -> None:
    message = "MSH|^^\\&|APP|FAC|MEDLAKE|LAKE|20240101||ADT^A01|ENC-1|P|2.5.1\rEVN|A01|2024\r"
    (ack,) = send(mllp, message)
    assert ack_code(ack) == "AR"
    assert segments(ack)["MSA"][0][2] == "ENC-1"
    assert err_codes(ack) == ["102"]
    assert "MSH^1^2" in segments(ack)["ERR"][0][2]
    assert ack.decode().split("|", 2)[1] == "^~\\&"  # the ACK falls back to the default
    (row,) = rows(archive, control_id="ENC-1")
    assert row.status == "rejected"


def test_a_message_without_msh_is_rejected_and_stored(mllp: MllpServer, archive: Archive) -> None:
    (ack,) = send(mllp, "PID|1||12345^^^HOSP^MR||DOE\r")
    assert ack_code(ack) == "AR"
    assert err_codes(ack) == ["100"]
    (row,) = rows(archive)
    assert (row.status, row.raw_text) == ("rejected", "PID|1||12345^^^HOSP^MR||DOE\r")


def test_declared_character_set_is_used_to_read_the_message(
    mllp: MllpServer, archive: Archive
) -> None:
    message = adt("A01", "CS-1", family="MÜLLER").replace("|P|2.5.1\r", "|P|2.5.1||||||8859/1\r")
    (ack,) = send(mllp, message.encode("latin-1"))
    assert ack_code(ack) == "AA"
    (row,) = rows(archive, control_id="CS-1")
    assert "MÜLLER" in row.raw_text
    mllp.mapper.run_pending()
    (patient,) = refs_of(archive, "CS-1", "Patient")
    assert resource(archive, patient)["name"][0]["family"] == "MÜLLER"


# --- MLLP framing errors ---------------------------------------------------------------------


def test_garbage_before_the_start_block_is_recorded_and_the_message_accepted(
    mllp: MllpServer, archive: Archive
) -> None:
    with mllp.connect() as sock:
        sock.sendall(b"GARBAGE\r\n" + frame(adt("A01", "F-1").encode()))
        (ack,) = read_acks(sock, 1)
    assert ack_code(ack) == "AA"
    stray, message = rows(archive)
    assert (stray.status, stray.error_code, stray.raw_bytes) == (
        "rejected",
        "MLLP-STRAY",
        b"GARBAGE\r\n",
    )
    assert stray.ack_code is None
    assert message.control_id == "F-1"


def test_a_message_without_start_block_gets_an_ar(mllp: MllpServer, archive: Archive) -> None:
    with mllp.connect() as sock:
        sock.sendall(adt("A01", "F-2").encode() + b"\x1c\r")
        (ack,) = read_acks(sock, 1)
    assert ack_code(ack) == "AR"
    assert segments(ack)["MSA"][0][2] == "F-2"
    (row,) = rows(archive)
    assert (row.error_code, row.control_id) == ("MLLP-START", "F-2")


def test_a_message_cut_off_at_close_is_recorded(mllp: MllpServer, archive: Archive) -> None:
    partial = adt("A01", "F-3").encode()[:60]
    with mllp.connect() as sock:
        sock.sendall(b"\x0b" + partial)
    deadline = time.monotonic() + 30
    while not rows(archive):
        assert time.monotonic() < deadline, "the cut-off message was not recorded"
        time.sleep(0.02)
    (row,) = rows(archive)
    assert (row.status, row.error_code, row.size) == ("rejected", "MLLP-END", len(partial))
    assert row.raw_text == partial.decode()
    assert ack_code(send(mllp, adt("A01", "F-4"))[0]) == "AA"  # the listener goes on


def test_an_oversized_message_is_refused_and_the_connection_goes_on(
    mllp: MllpServer, archive: Archive
) -> None:
    limit = archive.settings.mllp_max_message_bytes
    big = adt("A01", "F-5") + "NTE|1||" + "x" * (limit + 10) + "\r"
    with mllp.connect() as sock:
        sock.sendall(frame(big.encode()) + frame(adt("A01", "F-6").encode()))
        first, second = read_acks(sock, 2)
    assert ack_code(first) == "AR"
    assert segments(first)["MSA"][0][2] == "F-5"
    assert err_codes(first) == ["207"]
    assert ack_code(second) == "AA"
    (row,) = rows(archive, control_id="F-5")
    assert (row.status, row.error_code, row.size) == ("rejected", "MLLP-SIZE", len(big))
    assert len(row.raw_text) < len(big)  # the head is kept, not the whole block


# --- connections -----------------------------------------------------------------------------


def test_many_concurrent_connections_each_with_many_messages(
    mllp: MllpServer, archive: Archive
) -> None:
    senders, per_sender = 8, 25
    acks: dict[str, str] = {}
    lock = threading.Lock()

    def run(sender: int) -> None:
        batch = [adt("A08", f"CC-{sender}-{n}", patient=f"P{sender}") for n in range(per_sender)]
        for message, ack in zip(batch, send(mllp, *batch), strict=True):
            with lock:
                acks[message.split("|")[9]] = segments(ack)["MSA"][0][2] + ack_code(ack)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(acks) == senders * per_sender
    assert all(value == f"{key}AA" for key, value in acks.items())
    stored = rows(archive)
    assert len(stored) == senders * per_sender
    assert {row.control_id for row in stored} == set(acks)


def test_pipelined_messages_are_acknowledged_in_order(mllp: MllpServer, archive: Archive) -> None:
    batch = [adt("A08", f"PL-{n}") for n in range(20)]
    with mllp.connect() as sock:
        sock.sendall(b"".join(frame(m.encode()) for m in batch))
        acks = read_acks(sock, 20)
    assert [segments(a)["MSA"][0][2] for a in acks] == [f"PL-{n}" for n in range(20)]
    assert [row.control_id for row in rows(archive)] == [f"PL-{n}" for n in range(20)]


# --- store before ACK, duplicates --------------------------------------------------------------


def test_every_acknowledged_message_is_already_committed(
    mllp: MllpServer, archive: Archive
) -> None:
    # No mapper runs: what is in the table when each ACK arrives was stored before it.
    with MLLPClient("127.0.0.1", mllp.port) as client:
        for n in range(10):
            ack = client.send_message(adt("A01", f"D-{n}"))
            assert ack_code(ack) == "AA"
            (row,) = rows(archive, control_id=f"D-{n}")  # another connection sees it
            assert row.status == "received"
            assert segments(ack)["MSH"][0][9] == f"ACK{row.id}"


def test_a_message_stored_while_no_mapper_runs_is_mapped_later(
    mllp: MllpServer, archive: Archive
) -> None:
    send(mllp, adt("A01", "L-1"))
    assert rows(archive, control_id="L-1")[0].status == "received"
    later = Hl7Mapper(archive, "http://medlake.test/fhir")
    assert later.run_pending() == 1
    assert rows(archive, control_id="L-1")[0].status == "mapped"


def test_a_resent_message_is_stored_as_duplicate_and_not_mapped_twice(
    mllp: MllpServer, archive: Archive
) -> None:
    message = adt("A01", "DUP-1")
    first, second = send(mllp, message, message)
    assert ack_code(first) == ack_code(second) == "AA"
    original, duplicate = rows(archive, control_id="DUP-1")
    assert original.status == "received"
    assert (duplicate.status, duplicate.duplicate_of) == ("duplicate", original.id)
    assert mllp.mapper.run_pending() == 1
    (patient,) = refs_of(archive, "DUP-1", "Patient")
    assert resource(archive, patient)["meta"]["versionId"] == "1"


def test_a_rejected_message_sent_again_fixed_is_not_a_duplicate(
    mllp: MllpServer, archive: Archive
) -> None:
    broken = msh("ADT^A01", "FIX-1") + "EVN|A01|2024\rPID|1||||DOE\rPV1|1|I\r"
    fixed = adt("A01", "FIX-1")
    first, second = send(mllp, broken, fixed)
    assert (ack_code(first), ack_code(second)) == ("AE", "AA")
    assert [row.status for row in rows(archive, control_id="FIX-1")] == ["rejected", "received"]


def test_the_listener_survives_a_peer_that_resets_the_connection(mllp: MllpServer) -> None:
    sock = mllp.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.sendall(b"\x0b" + adt("A01", "V-1").encode()[:50])
    sock.close()  # RST in the middle of a message
    assert ack_code(send(mllp, adt("A01", "V-2"))[0]) == "AA"
