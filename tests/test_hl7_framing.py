"""MLLP framing: complete blocks, however the bytes are cut, and every framing error."""

from __future__ import annotations

from medlake.clinical.hl7.framing import (
    KEPT_BYTES,
    Block,
    MllpDecoder,
    OversizedBlock,
    StrayBytes,
    UnterminatedBlock,
    frame,
)

MESSAGE = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5.1\rEVN|A01|20240101\r"
STREAM = (
    b"junk"
    + frame(MESSAGE)
    + b"\r\n"  # a newline between blocks is harmless
    + frame(MESSAGE)
    + b"MSH|no start block\x1c\r"
    + frame(b"x" * 150)
    + frame(MESSAGE)
    + b"\x0bcut off"
)
EXPECTED = [
    StrayBytes(b"junk", 4, terminated=False),
    Block(MESSAGE),
    Block(MESSAGE),
    StrayBytes(b"MSH|no start block\x1c\r", 20, terminated=True),
    OversizedBlock(b"x" * 150, 150),
    Block(MESSAGE),
    UnterminatedBlock(b"cut off", 7),
]


def decode(*pieces: bytes, limit: int = 100) -> list[object]:
    decoder = MllpDecoder(limit)
    events: list[object] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    return events + list(decoder.close())


def test_a_stream_in_one_piece() -> None:
    assert decode(STREAM) == EXPECTED


def test_a_stream_cut_anywhere() -> None:
    for cut in range(1, len(STREAM)):
        assert decode(STREAM[:cut], STREAM[cut:]) == EXPECTED, f"cut after byte {cut}"


def test_a_stream_one_byte_at_a_time() -> None:
    assert decode(*(bytes([b]) for b in STREAM)) == EXPECTED


def test_a_new_start_block_ends_an_unterminated_one() -> None:
    assert decode(b"\x0bAAA\x0bBBB\x1c\r") == [UnterminatedBlock(b"AAA", 3), Block(b"BBB")]


def test_an_oversized_block_keeps_only_its_head() -> None:
    big = b"y" * (KEPT_BYTES * 3)
    events = decode(frame(big), frame(MESSAGE), limit=KEPT_BYTES)
    assert events == [OversizedBlock(big[:KEPT_BYTES], len(big)), Block(MESSAGE)]


def test_an_oversized_block_still_open_at_close() -> None:
    events = decode(b"\x0b" + b"z" * 500, limit=100)
    assert events == [OversizedBlock(b"z" * 500, 500)]


def test_a_lone_end_block_between_messages_says_nothing() -> None:
    assert decode(frame(MESSAGE) + b"\x1c\r" + frame(MESSAGE)) == [Block(MESSAGE), Block(MESSAGE)]
