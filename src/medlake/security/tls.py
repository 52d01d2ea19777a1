"""TLS for medlake's own listeners and connections: the BCP 195 profile that DICOM
(PS3.15 B.9 / B.10 / B.12) and HL7 v2 over MLLP share, certificate loading with errors
that name the file, and the subject of a peer's certificate.

TLS 1.2 or 1.3 only; TLS 1.2 limited to the ECDHE/DHE AES-GCM (and ChaCha20-Poly1305)
suites; no compression, no renegotiation. The DIMSE and MLLP listeners each build their
server context with :func:`server_context` from the same ``tls_cert_file`` /
``tls_key_file`` and their own CA file (set: a client certificate is required).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from medlake.errors import InvalidInput

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


def bcp195_profile(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` limited to the BCP 195 versions and suites (returned for chaining)."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # never TLS 1.0 / 1.1 (non-downgrading)
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def load_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load our certificate chain and key; InvalidInput naming the files if they fail."""
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from exc


def load_trusted_cas(context: ssl.SSLContext, ca_file: Path) -> None:
    """Trust the CA certificates of ``ca_file``; InvalidInput naming it if it fails."""
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the CA certificates {ca_file}: {exc}") from exc


def server_context(
    cert: Path | None, key: Path | None, ca_file: Path | None, *, port_setting: str
) -> ssl.SSLContext:
    """The TLS context of a listener: our certificate; with ``ca_file`` a client
    certificate signed by one of its CAs is required (mutual TLS). ``port_setting``
    names the setting that asked for TLS, for the error when no certificate is set."""
    if cert is None or key is None:
        raise InvalidInput(f"{port_setting} needs tls_cert_file and tls_key_file")
    context = bcp195_profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    load_certificate(context, cert, key)
    if ca_file is not None:
        load_trusted_cas(context, ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}  # fmt: skip


def peer_certificate_attributes(sock: Any) -> tuple[tuple[str, str], ...]:
    """The subject of the certificate the peer presented on ``sock`` as (attribute,
    value) pairs with short attribute names (``("CN", "lab-1")``); empty without TLS or
    without a client certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return ()
    certificate: Any = sock.getpeercert()
    if not certificate:
        return ()
    return tuple(
        (_SHORT.get(name, name), value)
        for rdn in certificate.get("subject", ())
        for name, value in rdn
    )


def peer_certificate_subject(sock: Any) -> str | None:
    """The subject of the certificate the peer presented on ``sock`` (``O=…, CN=…``), or
    None (no TLS, or no client certificate)."""
    parts = [f"{name}={value}" for name, value in peer_certificate_attributes(sock)]
    return ", ".join(parts) or None


__all__ = [
    "BCP195_TLS12_CIPHERS",
    "bcp195_profile",
    "load_certificate",
    "load_trusted_cas",
    "peer_certificate_attributes",
    "peer_certificate_subject",
    "server_context",
]
