"""The DIMSE server: Verification, Storage and Query/Retrieve SCP on one port.

:class:`DimseServer` runs pynetdicom's threaded association server (one thread per
association, beside whatever else the process runs, e.g. uvicorn in ``medlake
serve``). At each association request the calling AE title is looked up
(:func:`~medlake.dimse.ae_registry.calling_ae_rules`, with the peer's address): an AE
that may not connect is rejected (result 1 rejected-permanent, source 1 service-user,
reason 3 calling AE title not recognised); the others get a session with their
partition, their principal (kind ``ae``) and the association's ingest batch, which every
handler of the association uses. Each C-STORE, C-FIND, C-MOVE and C-GET asks the policy
(:func:`medlake.security.authorize`) and is audited with the AE as the actor
(:mod:`medlake.dimse.association_audit`).

With ``dimse_tls_port`` set the same AE also listens for DICOM TLS there
(:mod:`medlake.dimse.tls`).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from medlake.dimse._transport import EventDrivenRequestHandler, set_tcp_nodelay
from medlake.dimse.ae_registry import CallingAeRules, calling_ae_rules, check_ae_title
from medlake.dimse.association_audit import (
    StoreAudit,
    audit_rejected_association,
    audit_request,
)
from medlake.dimse.association_batch import AssociationBatch, open_association_batch
from medlake.dimse.contexts import prefer_proposed_syntaxes, scp_contexts
from medlake.dimse.echo import handle_echo
from medlake.dimse.find import InvalidIdentifier, find
from medlake.dimse.move_get import handle_get, handle_move
from medlake.dimse.store import NOT_AUTHORISED, StoreContext, handle_store, status
from medlake.dimse.tls import (
    DeferredHandshake,
    TlsRequestHandler,
    peer_certificate_subject,
    server_context,
    tls_args_for,
)
from medlake.errors import MedlakeError, NetworkError
from medlake.ingest.archive import Archive
from medlake.security import Action, Decision, authorize

log = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ (result, source, reason): permanent, service user, calling AE unknown.
REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)
#: Transient, service user, no reason: the index could not be asked.
REJECT_TRANSIENT = (0x02, 0x01, 0x01)
_C_STORE_RQ = 0x0001


def new_ae(archive: Archive, ae_title: str | None = None) -> AE:
    """A pynetdicom AE with medlake's title, PDU size and timeouts (SCP and SCU)."""
    settings = archive.settings
    ae = AE(ae_title=check_ae_title(ae_title or settings.ae_title, "ae_title"))
    ae.maximum_pdu_size = settings.dimse_max_pdu
    ae.maximum_associations = settings.dimse_max_associations
    ae.network_timeout = settings.dimse_timeout
    ae.acse_timeout = settings.dimse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.connection_timeout = settings.dimse_timeout
    return ae


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, but shutting down never waits for connection threads.

    socketserver joins every handler thread on close (``block_on_close``); a peer that
    connected and never sent an A-ASSOCIATE-RQ keeps its thread waiting for the network
    timeout, which made a stop hang for that long. Open associations are aborted by
    :meth:`DimseServer.stop` instead.
    """

    daemon_threads = True
    block_on_close = False


class _TlsAssociationServer(DeferredHandshake, _AssociationServer):
    """The same server on the TLS port; each connection does its handshake in its thread."""


class DimseServer:
    """medlake's DIMSE SCP, started with :meth:`start` and stopped with :meth:`stop`."""

    def __init__(
        self,
        archive: Archive,
        *,
        host: str | None = None,
        port: int | None = None,
        ae_title: str | None = None,
        tls_port: int | None = None,
    ) -> None:
        settings = archive.settings
        self.archive = archive
        self.host = host or settings.dimse_host or settings.host
        self.port = settings.dimse_port if port is None else port
        #: The DICOM TLS port (0: none); default ``dimse_tls_port``.
        self.tls_port = settings.dimse_tls_port if tls_port is None else tls_port
        self.ae = new_ae(archive, ae_title)
        self._contexts = scp_contexts()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._tls_thread: threading.Thread | None = None
        self._sessions: dict[Association, StoreContext] = {}
        self._store_audits: dict[Association, StoreAudit] = {}
        self._lock = threading.Lock()

    @property
    def ae_title(self) -> str:
        """The AE title the server answers as."""
        return str(self.ae.ae_title)

    def start(self) -> DimseServer:
        """Listen on (host, port) and serve associations in background threads; with port
        0 a free port is taken (see :attr:`port`). With a :attr:`tls_port`, listen for
        DICOM TLS there too. :class:`NetworkError` if it cannot."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom formats a log line per message and prints every C-FIND/MOVE/GET
            # identifier; with its logger above INFO nobody reads them, and they cost.
            _config.LOG_HANDLER_LEVEL = "none"
            _config.LOG_REQUEST_IDENTIFIERS = False
            _config.LOG_RESPONSE_IDENTIFIERS = False
        self._server, self._thread = self._listen(self.port, handlers)
        self.port = int(self._server.server_address[1])
        log.info("DIMSE SCP %s listening on %s:%s", self.ae_title, self.host, self.port)
        if self.tls_port:
            try:
                context = server_context(self.archive.settings)
                self._tls_server, self._tls_thread = self._listen(self.tls_port, handlers, context)
            except MedlakeError:
                self.stop()  # do not serve half: the plain port without the TLS one
                raise
            log.info("DICOM TLS on %s:%s", self.host, self.tls_port)
        return self

    def _listen(
        self, port: int, handlers: list[Any], ssl_context: ssl.SSLContext | None = None
    ) -> tuple[ThreadedAssociationServer, threading.Thread]:
        try:
            server = self.ae.make_server(
                (self.host, port),
                contexts=self._contexts,
                evt_handlers=handlers,
                ssl_context=ssl_context,
                server_class=_TlsAssociationServer if ssl_context else _AssociationServer,
                request_handler=TlsRequestHandler if ssl_context else EventDrivenRequestHandler,
            )
        except OSError as exc:
            what = "DICOM TLS" if ssl_context else "DIMSE"
            raise NetworkError(
                f"cannot listen for {what} on {self.host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.ae._servers.append(server)  # pynetdicom's shutdown() removes it from there
        bound = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, name=f"dimse-{bound}", daemon=True)
        thread.start()
        return server, thread

    def bind(self, event: Any, handler: Any) -> None:
        """Also call ``handler`` on the pynetdicom notification ``event`` (e.g.
        ``evt.EVT_ESTABLISHED``) of every association from now on; the server must be
        started. Observers use it (metrics); medlake's own handlers are set in
        :meth:`start`."""
        if self._server is None:
            raise NetworkError("the DIMSE server is not started")
        self._server.bind(event, handler)
        if self._tls_server is not None:
            self._tls_server.bind(event, handler)

    def stop(self) -> None:
        """Stop listening, abort open associations and close their batches."""
        server, self._server = self._server, None
        if server is None:
            return
        tls_server, self._tls_server = self._tls_server, None
        for listening, thread in ((server, self._thread), (tls_server, self._tls_thread)):
            if listening is None:
                continue
            listening.shutdown()
            for assoc in list(listening.active_associations):
                assoc.abort()
            if thread is not None:
                thread.join(timeout=10)
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            audits = list(self._store_audits.values())
            self._store_audits.clear()
        for session in sessions:
            session.batch.close("server stopped")
        for audit in audits:
            audit.flush(self.archive, "server stopped")

    def __enter__(self) -> DimseServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- association life -------------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive  # the A-ASSOCIATE-RQ; negotiation comes next
        assert request is not None
        calling = str(request.calling_ae_title or "").strip()
        address = str(assoc.requestor.address)
        tls_subject = peer_certificate_subject(getattr(assoc.dul.socket, "socket", None))
        try:
            rules = calling_ae_rules(self.archive, calling, address, tls_subject)
        except (SQLAlchemyError, MedlakeError) as exc:
            log.error("cannot check calling AE %r: %s", calling, exc)
            _reject(assoc, REJECT_TRANSIENT)
            return
        if rules is None:
            log.warning(
                "association from calling AE %r (%s) rejected: not registered "
                "(dimse_require_known_ae) or not from its registered host",
                calling, address,
            )  # fmt: skip
            _reject(assoc, REJECT_UNKNOWN_CALLING_AE)
            audit_rejected_association(
                self.archive, calling, address, "calling AE title not recognised from this host"
            )
            return
        assoc.acceptor.supported_contexts = prefer_proposed_syntaxes(
            assoc.acceptor.supported_contexts,
            request.presentation_context_definition_list,
        )
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        source = f"dimse://{calling}@{peer} -> {self.ae_title}"
        batch = open_association_batch(self.archive, rules.partition, source)
        with self._lock:
            self._sessions[assoc] = StoreContext(rules, batch)
            self._store_audits[assoc] = StoreAudit(rules)

    def _session(self, event: evt.Event) -> StoreContext:
        with self._lock:
            session = self._sessions.get(event.assoc)
        if session is None:  # cannot happen: every accepted association got one
            raise NetworkError("association without a session")
        return session

    def _on_released(self, event: evt.Event) -> None:
        self._end(event.assoc, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        with self._lock:
            session = self._sessions.get(event.assoc)
        if session is not None:
            _record_interrupted_store(event.assoc, session.batch)
        self._end(event.assoc, "aborted")

    def _on_closed(self, event: evt.Event) -> None:
        """The connection closed: the batch is normally closed already (EVT_RELEASED /
        EVT_ABORTED); if not (the association's threads died), close it once the
        association thread has finished, so that no handler is still storing."""
        assoc = event.assoc
        if threading.current_thread() is assoc:
            self._end(assoc, "closed")
            return

        def end_when_done() -> None:
            assoc.join(timeout=self.archive.settings.dimse_timeout + 30)
            self._end(assoc, "closed")

        threading.Thread(target=end_when_done, name="dimse-close", daemon=True).start()

    def _end(self, assoc: Association, how: str) -> None:
        with self._lock:
            session = self._sessions.pop(assoc, None)
            audit = self._store_audits.pop(assoc, None)
        if session is not None:
            session.batch.close(how)
        if audit is not None:
            audit.flush(self.archive, how)

    # --- services -----------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset:
        session = self._session(event)
        with self._lock:
            audit = self._store_audits.get(event.assoc)
        rules = session.rules
        decision = authorize(rules.principal, Action.DICOM_STORE, rules.partition)
        if not decision.allowed:
            if audit is not None:
                audit.refuse(decision.reason)
            return status(
                NOT_AUTHORISED, f"AE {rules.calling_ae} may not store into {rules.partition}"
            )
        answer = handle_store(self.archive, session, event)
        if audit is not None:
            sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "") or None
            audit.add(sop_uid, int(answer.Status))
        return answer

    def _audited(
        self, rules: CallingAeRules, action: Action, event: evt.Event, request: str
    ) -> Decision | None:
        """The policy's decision on a C-FIND / C-MOVE / C-GET, audited before anything is
        answered; None when the audit record could not be written (it must then fail)."""
        decision = authorize(rules.principal, action, rules.partition)
        try:
            identifier = event.identifier
        except (ValueError, KeyError, TypeError, AttributeError):
            identifier = Dataset()  # undecodable: audited without its keys, then refused
        try:
            audit_request(
                self.archive, rules, action, identifier, request,
                allowed=decision.allowed, reason=decision.reason,
            )  # fmt: skip
        except MedlakeError as exc:
            log.error("%s from %s refused: %s", request, rules.calling_ae, exc.message)
            return None
        return decision

    def _on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        rules = self._session(event).rules
        decision = self._audited(rules, Action.DICOM_SEARCH, event, "C-FIND")
        if decision is None:
            yield status(0xA700, _NOT_AUDITED), None
            return
        if not decision.allowed:
            yield status(NOT_AUTHORISED, f"AE {rules.calling_ae} may not query"), None
            return
        try:
            identifier = event.identifier
            model = str(event.request.AffectedSOPClassUID)
            yield from find(
                self.archive, identifier, rules.partition, model,
                retrieve_ae_title=self.ae_title, cancelled=lambda: bool(event.is_cancelled),
            )  # fmt: skip
        except InvalidIdentifier as exc:
            yield status(exc.dicom_reason, exc.message), None
        except (MedlakeError, SQLAlchemyError) as exc:
            log.error("C-FIND from %s failed: %s", rules.calling_ae, exc)
            yield status(0xA700, str(exc)), None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # undecodable
            yield status(0xA900, f"cannot read the identifier: {exc}"), None

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        rules = self._session(event).rules
        destination = str(event.move_destination or "").strip()
        moves = handle_move(self.archive, rules, event)
        target = next(moves)  # the destination is resolved (and looked up) first
        if target[0] is None:
            yield target  # unknown destination: 0xA801, nothing is read
            return
        tls_args = tls_args_for(self.archive, destination, str(target[0]))
        yield (*target[:2], {**target[2], "tls_args": tls_args}) if tls_args else target
        decision = self._audited(rules, Action.DICOM_READ, event, f"C-MOVE to {destination}")
        refusal = _retrieve_refusal(rules, decision)
        if refusal is not None:
            yield 1  # one pseudo sub-operation, so that the failure status is sent
            yield refusal, None
            return
        yield from moves

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        rules = self._session(event).rules
        refusal = _retrieve_refusal(rules, self._audited(rules, Action.DICOM_READ, event, "C-GET"))
        if refusal is not None:
            yield 1
            yield refusal, None
            return
        yield from handle_get(self.archive, rules, event)


_NOT_AUDITED = "the audit record could not be written"


def _retrieve_refusal(rules: CallingAeRules, decision: Decision | None) -> Dataset | None:
    """The failure status of a retrieve that may not go on (None when it may)."""
    if decision is None:
        return status(0xA701, _NOT_AUDITED)
    if not decision.allowed:
        return status(NOT_AUTHORISED, f"AE {rules.calling_ae} may not query or retrieve")
    return None


def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
    """Refuse an association request from an EVT_REQUESTED handler (as pynetdicom's own
    checks do: send A-ASSOCIATE-RJ, then wait for the peer to close)."""
    assoc.acse.send_reject(*reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _record_interrupted_store(assoc: Association, batch: AssociationBatch) -> None:
    """A C-STORE whose data set was still arriving when the association ended: nothing
    was stored; record it (pynetdicom keeps the half-received message on its DIMSE)."""
    message = getattr(assoc.dimse, "message", None)
    command = getattr(message, "command_set", None)
    if command is None or command.get("CommandField") != _C_STORE_RQ:
        return
    data = getattr(message, "data_set", None)
    received = len(data.getbuffer()) if isinstance(data, BytesIO) else 0
    sop_uid = str(command.get("AffectedSOPInstanceUID", "") or "") or None
    text = (
        f"the association ended (aborted) after {received} bytes of the data set of SOP "
        f"Instance {sop_uid or '(unknown)'}; nothing was stored"
    )
    log.warning("C-STORE from %s interrupted: %s", assoc.requestor.ae_title, text)
    batch.record_failure(
        int(command.get("MessageID", 0) or 0), sop_uid, received, "unreadable", text
    )


__all__ = ["REJECT_UNKNOWN_CALLING_AE", "DimseServer", "new_ae"]
