"""DICOM over TLS: the BCP 195 TLS Secure Transport Connection Profiles of PS3.15
(B.9 / B.10 non-downgrading / B.12): TLS 1.2 or 1.3 only, TLS 1.2 limited to the
ECDHE/DHE AES-GCM (and ChaCha20-Poly1305) suites, certificates from ``tls_cert_file`` /
``tls_key_file``, peers' certificates checked against ``dimse_tls_ca_file``.

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
from pathlib import Path
from typing import Any

from medlake.config import Settings
from medlake.dimse._transport import EventDrivenRequestHandler
from medlake.dimse.ae_registry import find_ae
from medlake.errors import InvalidInput
from medlake.ingest.archive import Archive

log = logging.getLogger(__name__)

#: TLS 1.2 suites of the BCP 195 profiles (PS3.15 B.10 lists the four RSA ones; B.10
#: allows others of similar or greater strength). TLS 1.3 suites are all AEAD already.
BCP195_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # never TLS 1.0 / 1.1 (non-downgrading)
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the CA certificates {ca_file}: {exc}") from exc


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the SCP's TLS port: our certificate; with ``dimse_tls_ca_file``
    a client certificate signed by one of its CAs is required (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise InvalidInput("dimse_tls_port needs tls_cert_file and tls_key_file")
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, settings.tls_cert_file, settings.tls_key_file)
    if settings.dimse_tls_ca_file is not None:
        _load_ca(context, settings.dimse_tls_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of medlake as an SCU (send, retrieve, C-MOVE sub-operations): the
    peer's certificate must chain to ``dimse_tls_ca_file`` (else the system's CAs) and
    name the host connected to; ours (``tls_cert_file``) is offered for mutual TLS."""
    context = _profile(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    if settings.dimse_tls_ca_file is not None:
        _load_ca(context, settings.dimse_tls_ca_file)
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        _load_chain(context, settings.tls_cert_file, settings.tls_key_file)
    return context


def tls_args_for(archive: Archive, ae_title: str, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` to reach the AE registered as ``ae_title`` at ``host``
    (the name its certificate must carry), or None when it is not a TLS peer."""
    with archive.engine.connect() as conn:
        known = find_ae(conn, ae_title)
    if known is None or not known.tls:
        return None
    return client_context(archive.settings), host


def peer_certificate_subject(sock: Any) -> str | None:
    """The subject of the certificate the peer presented on ``sock`` (``CN=…, O=…``), or
    None (no TLS, or no client certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate: Any = sock.getpeercert()
    if not certificate:
        return None
    parts = [
        f"{_SHORT.get(name, name)}={value}"
        for rdn in certificate.get("subject", ())
        for name, value in rdn
    ]
    return ", ".join(parts) or None


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}  # fmt: skip


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
