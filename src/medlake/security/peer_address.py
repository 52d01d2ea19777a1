"""Is this connection from that host? Matching a peer's IP address against a
registered host name or address, for the allow-lists of DIMSE calling AEs and HL7 v2
senders.

A host matches the addresses it is (an IP literal) or resolves to (a name); an
IPv4-mapped IPv6 address (``::ffff:10.0.0.5``, as dual-stack sockets report IPv4
peers) is its IPv4 address, and an IPv6 zone (``%eth0``) is ignored.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_ip(text: str) -> IpAddress | None:
    """``text`` as an IP address (IPv4-mapped IPv6 as IPv4), or None if it is not one."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.5 is 10.0.0.5 (dual-stack sockets)
    return address


def host_addresses(host: str) -> frozenset[IpAddress]:
    """The addresses ``host`` is: itself when it is an IP literal, else what the name
    resolves to now (none, logged, when it does not resolve)."""
    literal = peer_ip(host)
    if literal is not None:
        return frozenset({literal})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve %s to check a peer's address: %s", host, exc)
        return frozenset()
    return frozenset(ip for info in infos if (ip := peer_ip(str(info[4][0]))) is not None)


def host_matches(host: str, address: str) -> bool:
    """Whether ``address`` (a peer's IP) is ``host``: the same IP, or one that the host
    name resolves to (a name that does not resolve matches nothing)."""
    peer = peer_ip(address)
    if peer is None:
        return False
    literal = peer_ip(host)
    if literal is not None:
        return literal == peer
    return peer in host_addresses(host)


__all__ = ["IpAddress", "host_addresses", "host_matches", "peer_ip"]
