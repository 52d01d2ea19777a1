"""DICOM over TLS: the BCP 195 TLS Secure Transport Connection Profiles of PS3.15
(B.9 / B.10 non-downgrading / B.12), as :mod:`medlake.security.tls` builds them
(shared with MLLP), with certificates from ``tls_cert_file`` / ``tls_key_file`` and
peers' certificates checked against ``dimse_tls_ca_file``.

The SCP listens for TLS on its own port (``dimse_tls_port``, DICOM's registered port
is 2762). pynetdicom's server does the TLS handshake in its accepting thread, so one
peer that connects and never says hello would stop every other connection until the
network timeout; here the handshake runs in the connection's own thread
(:class:`DeferredHandshake`, :class:`TlsRequestHandler`), with the DIMSE timeout.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from typing import Any

from medlake.config import Settings
from medlake.dimse._transport import EventDrivenRequestHandler
from medlake.dimse.ae_registry import find_ae
from medlake.ingest.archive import Archive
from medlake.security import tls
from medlake.security.tls import BCP195_TLS12_CIPHERS, peer_certificate_subject

log = logging.getLogger(__name__)


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the SCP's TLS port: our certificate; with ``dimse_tls_ca_file``
    a client certificate signed by one of its CAs is required (mutual TLS)."""
    return tls.server_context(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.dimse_tls_ca_file,
        port_setting="dimse_tls_port",
    )


def client_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of medlake as an SCU (send, retrieve, C-MOVE sub-operations): the
    peer's certificate must chain to ``dimse_tls_ca_file`` (else the system's CAs) and
    name the host connected to; ours (``tls_cert_file``) is offered for mutual TLS."""
    context = tls.bcp195_profile(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    if settings.dimse_tls_ca_file is not None:
        tls.load_trusted_cas(context, settings.dimse_tls_ca_file)
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls.load_certificate(context, settings.tls_cert_file, settings.tls_key_file)
    return context


def tls_args_for(archive: Archive, ae_title: str, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` to reach the AE registered as ``ae_title`` at ``host``
    (the name its certificate must carry), or None when it is not a TLS peer."""
    with archive.engine.connect() as conn:
        known = find_ae(conn, ae_title)
    if known is None or not known.tls:
        return None
    return client_context(archive.settings), host


class DeferredHandshake:
    """Server mixin: wrap accepted sockets in TLS without the handshake, which
    :class:`TlsRequestHandler` then does in the connection's own thread."""

    def get_request(self: Any) -> tuple[socket.socket, Any]:
        """Accept a connection and wrap it for TLS, leaving the handshake to its thread."""
        client, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(
            client, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address


class TlsRequestHandler(EventDrivenRequestHandler):
    """Completes the TLS handshake (within the DIMSE timeout) before the association
    starts; a failed or silent handshake closes the connection and is logged."""

    def handle(self) -> None:
        """Handshake, then hand the connection to pynetdicom's association."""
        sock = self.request
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.settimeout(self.ae.network_timeout)
            sock.do_handshake()
            sock.settimeout(None)  # the association's transport waits in select()
        except (ssl.SSLError, OSError) as exc:
            log.warning("DICOM TLS handshake with %s failed: %s", self.client_address[0], exc)
            with contextlib.suppress(OSError):
                sock.close()
            return
        super().handle()


__all__ = [
    "BCP195_TLS12_CIPHERS",
    "DeferredHandshake",
    "TlsRequestHandler",
    "client_context",
    "peer_certificate_subject",
    "server_context",
    "tls_args_for",
]
