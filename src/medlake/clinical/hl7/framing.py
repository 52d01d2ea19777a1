"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 2): a message travels as
``<VT> message <FS><CR>`` (0x0B … 0x1C 0x0D) over TCP.

:class:`MllpDecoder` turns the bytes of one connection, in whatever pieces they arrive,
into events: a complete :class:`Block`, or a framing error: bytes outside any block
(:class:`StrayBytes`), a block larger than the limit (:class:`OversizedBlock`, read to
its end so the stream stays in step), or a block cut off when the connection closed
(:class:`UnterminatedBlock`). A stream that never sends the start block but ends its
message with ``<FS><CR>`` yields :class:`StrayBytes` with ``terminated=True``: its
sender waits for an answer, so the receiver can reject it.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
#: Bytes of a refused or broken block kept for the record (enough for MSH and context).
KEPT_BYTES = 65536


@dataclass(frozen=True)
class Block:
    """A complete message: the bytes between the start block and the end block."""

    payload: bytes


@dataclass(frozen=True)
class StrayBytes:
    """Bytes outside any block. ``terminated``: they ended with ``<FS><CR>``, i.e. a
    message sent without its start block."""

    data: bytes
    size: int
    terminated: bool


@dataclass(frozen=True)
class OversizedBlock:
    """A block longer than the limit: its first bytes, and its whole size."""

    head: bytes
    size: int


@dataclass(frozen=True)
class UnterminatedBlock:
    """A block still open when the connection closed (or a new start block began)."""

    head: bytes
    size: int


MllpEvent = Block | StrayBytes | OversizedBlock | UnterminatedBlock


def frame(payload: bytes) -> bytes:
    """``payload`` wrapped in an MLLP block."""
    return START_BLOCK + payload + END_BLOCK


class MllpDecoder:
    """Incremental MLLP decoder of one connection.

    Feed it the received bytes; it returns the events completed by them. Memory stays
    bounded by ``max_block_bytes`` (plus :data:`KEPT_BYTES`) whatever the peer sends.
    Whitespace between blocks (a CR or LF some senders add) is ignored.
    """

    def __init__(self, max_block_bytes: int) -> None:
        self._max = max_block_bytes if max_block_bytes > 0 else 1 << 62
        self._inside = False
        self._kept = bytearray()  # the open block, or its head / the stray bytes' head
        self._size = 0  # bytes of the open block or of the run of stray bytes
        self._oversized = False
        self._fs_pending = False  # the last byte read was the FS of a possible end block

    @property
    def pending(self) -> bool:
        """Whether an unfinished block or unreported stray bytes are waiting."""
        return self._inside or self._size > 0

    def feed(self, data: bytes) -> list[MllpEvent]:
        """Take the next received bytes; return the events they complete, in order."""
        events: list[MllpEvent] = []
        pos = 0
        while pos < len(data):
            pos = (
                self._block(data, pos, events) if self._inside else self._outside(data, pos, events)
            )
        return events

    def close(self) -> list[MllpEvent]:
        """The connection closed: report whatever was left open."""
        events: list[MllpEvent] = []
        if self._inside and self._oversized:
            events.append(OversizedBlock(bytes(self._kept), self._size))
        elif self._inside:
            events.append(UnterminatedBlock(bytes(self._kept[:KEPT_BYTES]), self._size))
        elif self._size:
            events.append(StrayBytes(bytes(self._kept), self._size, terminated=False))
        self._begin(inside=False)
        return events

    def _begin(self, *, inside: bool) -> None:
        self._inside = inside
        self._kept = bytearray()
        self._size = 0
        self._oversized = False
        self._fs_pending = False

    def _keep(self, data: bytes, start: int, stop: int, limit: int) -> None:
        room = limit - len(self._kept)
        if room > 0:
            self._kept += data[start : min(stop, start + room)]
        self._size += stop - start

    def _find_end(self, data: bytes, pos: int, stop: int) -> int:
        """Index just past the end block in ``data[pos:stop]`` (one that began with the
        FS of the previous read counts), or -1."""
        if self._fs_pending and data[pos : pos + 1] == b"\r":
            return pos + 1
        end = data.find(END_BLOCK, pos, stop)
        return -1 if end < 0 else end + len(END_BLOCK)

    def _outside(self, data: bytes, pos: int, events: list[MllpEvent]) -> int:
        """Bytes between blocks: up to the next start block or end block."""
        start = data.find(START_BLOCK, pos)
        stop = start if start >= 0 else len(data)
        end = self._find_end(data, pos, stop)
        if end >= 0:
            # A message without its start block: its sender waits for an answer.
            self._keep(data, pos, end, KEPT_BYTES)
            if bytes(self._kept).strip(b"\r\n\x1c"):
                events.append(StrayBytes(bytes(self._kept), self._size, terminated=True))
            self._begin(inside=False)
            return end
        self._keep(data, pos, stop, KEPT_BYTES)
        if start < 0:
            self._fs_pending = data.endswith(b"\x1c")
            return len(data)
        if bytes(self._kept).strip(b"\r\n"):
            events.append(StrayBytes(bytes(self._kept), self._size, terminated=False))
        self._begin(inside=True)
        return start + 1

    def _block(self, data: bytes, pos: int, events: list[MllpEvent]) -> int:
        """Bytes of an open block: up to its end block, or a new start block."""
        end = self._find_end(data, pos, len(data))
        restart = data.find(START_BLOCK, pos, end if end >= 0 else len(data))
        if restart >= 0:
            # A new start block before this one ended: the sender gave up on it.
            self._keep(data, pos, restart, max(self._max + 1, KEPT_BYTES))
            if self._oversized:
                events.append(OversizedBlock(bytes(self._kept[:KEPT_BYTES]), self._size))
            else:
                events.append(UnterminatedBlock(bytes(self._kept[:KEPT_BYTES]), self._size))
            self._begin(inside=True)
            return restart + 1
        stop = end if end >= 0 else len(data)
        self._keep(
            data, pos, stop, KEPT_BYTES if self._oversized else max(self._max + 1, KEPT_BYTES)
        )
        if end < 0:
            self._fs_pending = data.endswith(b"\x1c")
            if self._size > self._max and not self._oversized:
                self._oversized = True
                del self._kept[KEPT_BYTES:]
            return len(data)
        size = self._size - len(END_BLOCK)
        if self._oversized or size > self._max:
            events.append(OversizedBlock(bytes(self._kept[: min(size, KEPT_BYTES)]), size))
        else:
            events.append(Block(bytes(self._kept[:size])))
        self._begin(inside=False)
        return end
