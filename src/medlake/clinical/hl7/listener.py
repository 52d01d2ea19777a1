"""The MLLP listener: a TCP server that receives HL7 v2 messages and acknowledges each
once its row is committed.

One thread accepts connections; each connection gets a thread that reads, decodes the
MLLP framing, hands complete messages to the :class:`Receiver` and writes the ACKs
back. Any number of connections, any number of messages per connection; messages sent
without waiting for their ACKs are stored together and answered in order. A
connection's errors (framing, a peer that vanishes, a bug) end that connection only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from medlake.clinical.hl7.errors import MllpError
from medlake.clinical.hl7.framing import MllpDecoder
from medlake.clinical.hl7.receiver import Receiver
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

_READ_BYTES = 65536
_ACCEPT_POLL_SECONDS = 0.5


class MllpListener:
    """``MllpListener(archive).start()`` … ``.stop()``.

    ``host`` / ``port`` default to the settings (``mllp_host`` or ``host``,
    ``mllp_port``); port 0 picks a free port (see :attr:`port` once started).
    ``on_accepted`` is called after messages were accepted (to wake the mapper).
    """

    def __init__(
        self,
        archive: Archive,
        *,
        host: str | None = None,
        port: int | None = None,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        settings = archive.settings
        self.host = host or settings.mllp_host or settings.host
        self.port = settings.mllp_port if port is None else port
        self.idle_timeout = settings.mllp_idle_timeout or None
        self.receiver = Receiver(
            archive.engine,
            settings.hl7_partition,
            settings.mllp_max_message_bytes,
            on_accepted,
            write_lock=archive.write_lock,
        )
        self._max_bytes = settings.mllp_max_message_bytes
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def start(self) -> MllpListener:
        """Bind the port and start accepting connections."""
        try:
            server = socket.create_server((self.host, self.port), backlog=128)
        except OSError as exc:
            raise MllpError(f"cannot listen for MLLP on {self.host}:{self.port}: {exc}") from exc
        server.settimeout(_ACCEPT_POLL_SECONDS)
        self._server = server
        self.port = server.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"mllp-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        log.info("MLLP listener on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (a message being stored is still
        committed) and wait for the threads."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._server is not None:
            self._server.close()
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

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, address = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("MLLP accept failed")
                continue
            peer = f"{address[0]}:{address[1]}"
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name=f"mllp-{peer}", daemon=True
            )
            with self._lock:
                self._connections[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        decoder = MllpDecoder(self._max_bytes)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ACKs are small
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
                    answer = self.receiver.handle(events, peer)
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
