"""Low-latency transport for pynetdicom associations: TCP_NODELAY, and no polling.

Why this exists: a C-STORE round trip is serial (the SCU waits for each C-STORE-RSP
before it sends the next instance), so every millisecond of latency per message
caps the rate. Stock pynetdicom 3.0 adds two kinds of it:

* Nagle's algorithm on the socket: the small C-STORE-RSP waits for the peer's
  delayed ACK (~40 ms per instance; ``../shared/bench/FINDINGS.md``). Every socket
  gets ``TCP_NODELAY`` (:func:`set_tcp_nodelay`, bound to ``EVT_CONN_OPEN``).
* Polling: the DUL thread sleeps 1 ms whenever its socket and queue are idle, and
  the association thread sleeps 1 ms before each look at its message queue, so a
  request and its response each wait up to a millisecond in a queue. Here the DUL
  thread blocks in ``select()`` on the socket *and* a wake-up socket that is
  written whenever something is queued for sending, and the association thread
  blocks on its message queue. Idle associations cost no CPU either.
* Encoding each C-STORE-RSP through a pydicom Dataset (a quarter of a millisecond
  per instance): a successful one is a fixed list of seven command elements, so
  :func:`store_success_command` encodes it directly, byte for byte as pynetdicom
  does (``tests/test_dimse_transport.py`` compares them).

The last two parts replace private pieces of pynetdicom (``Association._run_reactor``,
the DUL's provider queue and loop delay, ``AssociationSocket.ready``/``recv``,
``DIMSEServiceProvider.send_msg``), so they are only switched on for the pynetdicom
versions they were written against (:data:`FAST_TRANSPORT`); other versions run
stock pynetdicom, just slower.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

#: Whether the event-driven association transport is used (pynetdicom 3.0.x only).
FAST_TRANSPORT = pynetdicom.__version__.startswith("3.0.")

#: Longest a DUL thread blocks in select() before it looks at its timers and flags again.
_DUL_WAIT = 0.05
#: Longest an association thread blocks on its message queue before it checks for
#: release, abort and timeouts (those arrive through the DUL, not this queue).
_REACTOR_WAIT = 0.01


def set_tcp_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: switch Nagle's algorithm off on the new connection."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. the peer already closed it
            log.debug("cannot set TCP_NODELAY: %s", exc)


class _WakingQueue(queue.Queue[Any]):
    """The DUL's queue of primitives to send; a put wakes the DUL thread's select()."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        # A full buffer means a wake-up is pending anyway; a closed one, that nobody waits.
        with contextlib.suppress(OSError):
            self._wake.send(b"\0")


class _EventDrivenSocket(AssociationSocket):
    """An AssociationSocket whose ``ready`` blocks until data or a queued send arrives."""

    _wake_r: socket.socket
    _wake_w: socket.socket

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes that select() cannot see
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], _DUL_WAIT)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closes) straight into one buffer."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                return buffer[:got]
            got += n
        return buffer

    def close(self) -> None:
        super().close()
        for end in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                end.close()


class _EventDrivenAssociation(Association):
    """An Association whose reactor waits on its message queue instead of sleeping.

    Same steps as pynetdicom 3.0's ``Association._run_reactor``, in the same order.
    """

    def _run_reactor(self) -> None:
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            # Another thread may pause the reactor to send and receive itself (see
            # pynetdicom's comment on _reactor_checkpoint); keep that handshake.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = messages.get(timeout=_REACTOR_WAIT)
            except queue.Empty:
                msg = None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("DIMSE network timeout: closing the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _element(tag: int, value: bytes) -> bytes:
    """A command element in Implicit VR Little Endian (group 0000)."""
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def store_success_command(primitive: C_STORE) -> bytes | None:
    """The encoded command set of a successful C-STORE-RSP (PS3.7 §9.3.1.2), or None
    when ``primitive`` is anything else (a request, a failure or warning status, an
    Error Comment or Offending Element to send): pynetdicom encodes those."""
    responding_to = primitive.MessageIDBeingRespondedTo
    if (
        responding_to is None
        or primitive.Status != 0x0000
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or primitive.DataSet
    ):
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    elements = b"".join(
        (
            _element(0x0002, _uid(sop_class)) if sop_class is not None else b"",
            _element(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
            _element(0x0120, struct.pack("<H", responding_to)),
            _element(0x0800, struct.pack("<H", 0x0101)),  # no data set
            _element(0x0900, struct.pack("<H", 0x0000)),  # Status: success
            _element(0x1000, _uid(sop_instance)) if sop_instance is not None else b"",
        )
    )
    return _element(0x0000, struct.pack("<I", len(elements))) + elements


class _FastResponses(DIMSEServiceProvider):
    """A DIMSE provider that sends successful C-STORE-RSPs without pynetdicom's
    Dataset round trip (only when nothing listens to ``EVT_DIMSE_SENT``, whose
    handlers would expect the decoded message)."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = (
            store_success_command(primitive)
            if isinstance(primitive, C_STORE) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
            else None
        )
        if command is None:
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        # 0x03: the last (only) fragment of a command; a response always fits one PDU.
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


class EventDrivenRequestHandler(RequestHandler):
    """Creates acceptor associations that use the event-driven transport."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if not FAST_TRANSPORT:
            return assoc
        assoc.__class__ = _EventDrivenAssociation
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        sock = cast(_EventDrivenSocket, assoc.dul.socket)
        sock.__class__ = _EventDrivenSocket
        sock._wake_r, sock._wake_w = wake_r, wake_w
        assoc.dul.to_provider_queue = _WakingQueue(wake_w)
        assoc.dul._run_loop_delay = 0  # the wait happens in select(), not in a sleep
        assoc.dimse.__class__ = _FastResponses
        return assoc


__all__ = [
    "FAST_TRANSPORT",
    "EventDrivenRequestHandler",
    "set_tcp_nodelay",
    "store_success_command",
]
