"""The MLLP listener: a TCP server that receives HL7 v2 messages and acknowledges each
once its row is committed.

One thread accepts connections on each port (plain ``mllp_port``, and TLS
``mllp_tls_port``); each connection gets a thread that reads, decodes the MLLP framing,
hands complete messages to the :class:`Receiver` and writes the ACKs back. Any number
of connections, any number of messages per connection; messages sent without waiting
for their ACKs are stored together and answered in order. A connection's errors
(framing, a failed TLS handshake, a peer that vanishes, a bug) end that connection only.

TLS uses the BCP 195 profile of :mod:`medlake.security.tls` (as DICOM TLS does); the
handshake runs in the connection's thread, so a client that never says hello holds up
nobody else. With ``mllp_tls_ca_file`` a client certificate is required, and its
subject is part of the sender's identity (:mod:`.senders`). With authentication on,
only registered senders' messages are stored.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from medlake.clinical.hl7.errors import MllpError
from medlake.clinical.hl7.framing import MllpDecoder
from medlake.clinical.hl7.receiver import Receiver
from medlake.clinical.hl7.senders import PeerIdentity, SenderDirectory
from medlake.errors import MedlakeError
from medlake.ingest.archive import Archive
from medlake.security import tls

log = logging.getLogger(__name__)

_READ_BYTES = 65536
_ACCEPT_POLL_SECONDS = 0.5
#: Seconds a TLS client has to complete its handshake (``mllp_idle_timeout`` if shorter).
HANDSHAKE_SECONDS = 30.0


@dataclass
class _Port:
    """One listening socket and its accepting thread; ``context`` for TLS."""

    server: socket.socket
    context: ssl.SSLContext | None
    thread: threading.Thread | None = None


class MllpListener:
    """``MllpListener(archive).start()`` … ``.stop()``.

    ``host`` / ``port`` default to the settings (``mllp_host`` or ``host``,
    ``mllp_port``); port 0 picks a free port (see :attr:`port` once started).
    ``tls_port`` (default ``mllp_tls_port``; 0 = none) also listens for MLLP over TLS;
    ``plain=False`` listens on the TLS port only. ``on_accepted`` is called after
    messages were accepted (to wake the mapper).
    """

    def __init__(
        self,
        archive: Archive,
        *,
        host: str | None = None,
        port: int | None = None,
        tls_port: int | None = None,
        plain: bool = True,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        settings = archive.settings
        self.settings = settings
        self.host = host or settings.mllp_host or settings.host
        self.port = settings.mllp_port if port is None else port
        #: The MLLP TLS port (0: none); default ``mllp_tls_port``.
        self.tls_port = settings.mllp_tls_port if tls_port is None else tls_port
        self.plain = plain
        self.idle_timeout = settings.mllp_idle_timeout or None
        self.senders = SenderDirectory(archive.engine)
        self.receiver = Receiver(
            archive.engine,
            settings.hl7_partition,
            settings.mllp_max_message_bytes,
            on_accepted,
            write_lock=archive.write_lock,
            senders=self.senders,
            require_sender=settings.auth_enabled,
        )
        self._max_bytes = settings.mllp_max_message_bytes
        self._ports: list[_Port] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def start(self) -> MllpListener:
        """Bind the port(s) and start accepting connections; MllpError (nothing left
        listening) when a port is taken or the TLS certificate cannot be loaded."""
        try:
            if self.plain:
                self.port = self._listen(self.port, None)
            if self.tls_port:
                context = tls.server_context(
                    self.settings.tls_cert_file,
                    self.settings.tls_key_file,
                    self.settings.mllp_tls_ca_file,
                    port_setting="mllp_tls_port",
                )
                self.tls_port = self._listen(self.tls_port, context)
        except MedlakeError as exc:
            self.stop()  # do not serve half: the plain port without the TLS one
            raise MllpError(exc.message) from exc
        return self

    def _listen(self, port: int, context: ssl.SSLContext | None) -> int:
        what = "MLLP over TLS" if context is not None else "MLLP"
        try:
            server = socket.create_server((self.host, port), backlog=128)
        except OSError as exc:
            raise MllpError(f"cannot listen for {what} on {self.host}:{port}: {exc}") from exc
        server.settimeout(_ACCEPT_POLL_SECONDS)
        bound: int = server.getsockname()[1]
        listening = _Port(server, context)
        listening.thread = threading.Thread(
            target=self._accept_loop, args=(listening,), name=f"mllp-accept-{bound}", daemon=True
        )
        self._ports.append(listening)
        listening.thread.start()
        log.info("%s listener on %s:%d", what, self.host, bound)
        return bound

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (a message being stored is still
        committed) and wait for the threads."""
        self._stop.set()
        for listening in self._ports:
            if listening.thread is not None:
                listening.thread.join(timeout)
            listening.server.close()
        with self._lock:
            connections = list(self._connections.items())
        for conn, _thread in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
        for _conn, thread in connections:
            thread.join(timeout)

    @property
    def connection_count(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._connections)

    def _accept_loop(self, listening: _Port) -> None:
        while not self._stop.is_set():
            try:
                conn, address = listening.server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("MLLP accept failed")
                continue
            thread = threading.Thread(
                target=self._serve,
                args=(conn, address, listening.context),
                name=f"mllp-{address[0]}:{address[1]}",
                daemon=True,
            )
            with self._lock:
                self._connections[conn] = thread
            thread.start()

    def _handshake(
        self, conn: socket.socket, context: ssl.SSLContext, peer: str
    ) -> ssl.SSLSocket | None:
        """``conn`` in TLS once the handshake is done (None, logged, when it failed); the
        wrapped socket replaces ``conn`` among the connections that :meth:`stop` ends."""
        wrapped = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            thread = self._connections.pop(conn, None)
            if thread is not None:
                self._connections[wrapped] = thread
        try:
            wrapped.settimeout(min(HANDSHAKE_SECONDS, self.idle_timeout or HANDSHAKE_SECONDS))
            wrapped.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("MLLP TLS handshake with %s failed: %s", peer, exc)
            with self._lock:
                self._connections.pop(wrapped, None)
            wrapped.close()
            return None
        return wrapped

    def _serve(
        self, conn: socket.socket, address: tuple[str, int], context: ssl.SSLContext | None
    ) -> None:
        peer = f"{address[0]}:{address[1]}"
        decoder = MllpDecoder(self._max_bytes)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ACKs are small
            if context is not None:
                wrapped = self._handshake(conn, context, peer)
                if wrapped is None:
                    return
                conn = wrapped
            identity = PeerIdentity(
                address[0],
                address[1],
                tls=context is not None,
                tls_subject=tls.peer_certificate_subject(conn),
                tls_attributes=frozenset(
                    (name.upper(), value) for name, value in tls.peer_certificate_attributes(conn)
                ),
            )
            conn.settimeout(self.idle_timeout)
            while True:
                try:
                    data = conn.recv(_READ_BYTES)
                except TimeoutError:
                    log.info(
                        "MLLP connection from %s idle for %ss: closed", peer, self.idle_timeout
                    )
                    data = b""
                except OSError:
                    data = b""
                events = decoder.feed(data) if data else decoder.close()
                if events:
                    answer = self.receiver.handle(events, identity)
                    if answer:
                        conn.sendall(answer)
                if not data:
                    return
        except OSError as exc:
            log.info("MLLP connection from %s ended: %s", peer, exc)
        except Exception:
            log.exception("MLLP connection from %s failed", peer)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()
