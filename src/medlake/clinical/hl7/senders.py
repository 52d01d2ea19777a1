"""Registered HL7 v2 senders (table ``hl7_senders``): who may send over MLLP, and into
which partition.

HL7 v2 names a message's sender in MSH-3 (sending application) and MSH-4 (sending
facility), which anyone can write; the network names it by the peer's address and,
over mutual TLS, by its client certificate. A registered sender ties them together:

- ``host``: the peer's address must be this host's (an IP, or a name resolving to it;
  ``*``: any address, only for senders known by their certificate);
- ``tls_subject`` (optional): the connection must be TLS with a client certificate
  whose subject has each of these attributes (``CN=lab-1`` or ``CN=lab-1, O=Hospital``);
- ``application`` / ``facility`` (optional): MSH-3 / MSH-4 must equal them (the whole
  field as sent, or its first component, the HD namespace ID).

A message is the most specific sender's that matches it (the one with the most of
these set; ties by name). With authentication on, a message no sender matches is
refused (ACK ``AR``) and not stored; the sender's principal (kind ``hl7``, role
``ingest`` in its partition) is authorized by :func:`medlake.security.authorize` like
any other. With authentication off, unmatched messages go to ``hl7_partition``.
Events without an MSH (stray bytes) are matched by the network identity alone.

The listener reads the table through a :class:`SenderDirectory`, which reloads it every
:data:`REFRESH_SECONDS`, so ``medlake hl7 senders add`` / ``remove`` take effect on
open connections within seconds.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, RowMapping, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from medlake.clinical.hl7.message import Header
from medlake.errors import Conflict, InvalidInput, NotFound
from medlake.index.schema import hl7_senders
from medlake.index.writes import utcnow
from medlake.security import Grant, Principal, PrincipalKind, Role
from medlake.security.peer_address import IpAddress, host_addresses, peer_ip
from medlake.types import check_partition

#: Seconds a :class:`SenderDirectory` serves the table as it last read it.
REFRESH_SECONDS = 2.0
#: ``host`` of a sender admitted from any address.
ANY_HOST = "*"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class PeerIdentity:
    """Who the network says is on the other end of an MLLP connection."""

    address: str
    port: int
    #: Whether the connection is TLS (the MLLP TLS port).
    tls: bool = False
    #: Subject of the client certificate (``O=…, CN=…``), or None (none sent, or no TLS).
    tls_subject: str | None = None
    #: The same subject as (attribute, value) pairs, as the certificate has them.
    tls_attributes: frozenset[tuple[str, str]] = frozenset()

    @property
    def label(self) -> str:
        """``address:port``, as stored in ``hl7_messages.peer``."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Hl7Sender:
    """One registered sender: how to recognise it and the partition its messages go to."""

    name: str
    host: str
    partition: str
    application: str | None = None
    facility: str | None = None
    tls_subject: str | None = None
    description: str | None = None
    created_at: dt.datetime | None = None

    @property
    def specificity(self) -> int:
        """How many of host, TLS subject, MSH-3 and MSH-4 it constrains."""
        return sum(
            bool(v)
            for v in (
                self.host != ANY_HOST,
                self.tls_subject,
                self.application,
                self.facility,
            )
        )

    def to_json(self) -> dict[str, Any]:
        """The sender as JSON (``medlake hl7 senders list --json``)."""
        return {
            "name": self.name,
            "host": self.host,
            "partition": self.partition,
            "sendingApplication": self.application,
            "sendingFacility": self.facility,
            "tlsSubject": self.tls_subject,
            "description": self.description,
            "createdAt": self.created_at.isoformat() if self.created_at else None,
        }


def subject_attributes(text: str) -> frozenset[tuple[str, str]]:
    """``CN=lab-1, O=Hospital`` as its (attribute, value) pairs; InvalidInput if it is
    not a comma-separated list of ``ATTRIBUTE=value``."""
    pairs = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidInput(
                f"TLS subject {text!r} is invalid: use ATTRIBUTE=value pairs separated by "
                "commas, e.g. 'CN=lab-1, O=Hospital'"
            )
        pairs.add((key.strip().upper(), value.strip()))
    return frozenset(pairs)


def _optional_text(value: str | None, what: str, limit: int = 255) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > limit or _CONTROL.search(value):
        raise InvalidInput(f"{what} {value!r} is invalid: 1-{limit} characters, no control ones")
    return value.strip()


def check_sender(sender: Hl7Sender) -> Hl7Sender:
    """``sender`` with its values trimmed; InvalidInput naming the first bad value."""
    if not _NAME.match(sender.name):
        raise InvalidInput(
            f"sender name {sender.name!r} is invalid: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    host = sender.host.strip()
    if not host or len(host) > 255 or any(c.isspace() for c in host):
        raise InvalidInput(f"host {sender.host!r} of sender {sender.name} is not a host name, "
                           f"an address or {ANY_HOST}")  # fmt: skip
    tls_subject = _optional_text(sender.tls_subject, "TLS subject")
    if tls_subject is not None:
        subject_attributes(tls_subject)
    elif host == ANY_HOST:  # MSH-3 / MSH-4 alone are anyone's to write
        raise InvalidInput(
            f"sender {sender.name} from any host ({ANY_HOST}) needs a TLS subject: "
            "without a host, only a client certificate identifies it"
        )
    return Hl7Sender(
        name=sender.name,
        host=host,
        partition=check_partition(sender.partition),
        application=_optional_text(sender.application, "sending application (MSH-3)"),
        facility=_optional_text(sender.facility, "sending facility (MSH-4)"),
        tls_subject=tls_subject,
        description=sender.description,
        created_at=sender.created_at,
    )


def _from_row(row: RowMapping) -> Hl7Sender:
    created = row["created_at"]
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)  # SQLite returns naive UTC
    return Hl7Sender(
        name=row["name"], host=row["host"], partition=row["partition"],
        application=row["sending_application"], facility=row["sending_facility"],
        tls_subject=row["tls_subject"], description=row["description"], created_at=created,
    )  # fmt: skip


#: The JSON members of a sender (``createdAt`` is the server's and is ignored).
_JSON_MEMBERS = {
    "name": "name", "host": "host", "partition": "partition",
    "sendingApplication": "application", "sendingFacility": "facility",
    "tlsSubject": "tls_subject", "description": "description",
}  # fmt: skip


def sender_from_json(body: Any, name: str | None = None) -> Hl7Sender:
    """The sender described by ``body`` (as :meth:`Hl7Sender.to_json` writes it); with
    ``name`` (the URL's), the body's ``name`` may be left out but not differ.
    InvalidInput for anything else: not an object, an unknown member, a value that is
    not a string, a missing ``name``, ``host`` or ``partition``."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object describing the sender")
    unknown = sorted(set(body) - set(_JSON_MEMBERS) - {"createdAt"})
    if unknown:
        raise InvalidInput(f"unknown member(s) of a sender: {', '.join(unknown)}")
    values: dict[str, str | None] = {}
    for member, field_name in _JSON_MEMBERS.items():
        value = body.get(member)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{member} of a sender must be a string, not {value!r}")
        values[field_name] = value
    if name is not None:
        if values["name"] not in (None, name):
            raise InvalidInput(f"the body names sender {values['name']!r}, the URL {name!r}")
        values["name"] = name
    for required in ("name", "host", "partition"):  # (members named as the fields)
        if not values[required]:
            raise InvalidInput(f"a sender needs {required}")
    sender = Hl7Sender(
        name=values["name"] or "", host=values["host"] or "",
        partition=values["partition"] or "", application=values["application"],
        facility=values["facility"], tls_subject=values["tls_subject"],
        description=values["description"],
    )  # fmt: skip
    return check_sender(sender)


def get_sender(engine: Engine, name: str) -> Hl7Sender:
    """The sender ``name``; NotFound if there is none."""
    with engine.connect() as conn:
        row = conn.execute(select(hl7_senders).where(hl7_senders.c.name == name)).mappings().first()
    if row is None:
        raise NotFound(f"HL7 sender {name!r} is not registered")
    return _from_row(row)


def list_senders(engine: Engine) -> list[Hl7Sender]:
    """Every registered sender, by name."""
    with engine.connect() as conn:
        rows = conn.execute(select(hl7_senders).order_by(hl7_senders.c.name)).mappings()
        return [_from_row(r) for r in rows]


def add_sender(engine: Engine, sender: Hl7Sender, *, replace: bool = False) -> Hl7Sender:
    """Register ``sender``; Conflict if its name is taken, unless ``replace``."""
    return _write_sender(engine, sender, replace=replace)[0]


def put_sender(engine: Engine, sender: Hl7Sender) -> tuple[Hl7Sender, bool]:
    """Register or replace ``sender``; the flag says whether one of its name was
    replaced (told in the same transaction as the write)."""
    return _write_sender(engine, sender, replace=True)


def _write_sender(engine: Engine, sender: Hl7Sender, *, replace: bool) -> tuple[Hl7Sender, bool]:
    sender = check_sender(sender)
    values = {
        "host": sender.host, "partition": sender.partition,
        "sending_application": sender.application, "sending_facility": sender.facility,
        "tls_subject": sender.tls_subject, "description": sender.description,
    }  # fmt: skip
    where = hl7_senders.c.name == sender.name
    with engine.begin() as conn:
        exists = conn.execute(select(hl7_senders.c.id).where(where)).first() is not None
        if exists and not replace:
            raise Conflict(f"HL7 sender {sender.name!r} is already registered")
        try:
            if exists:
                conn.execute(update(hl7_senders).where(where).values(**values))
            else:
                conn.execute(
                    insert(hl7_senders).values(name=sender.name, created_at=utcnow(), **values)
                )
        except IntegrityError as exc:  # registered concurrently
            raise Conflict(f"HL7 sender {sender.name!r} is already registered") from exc
        row = conn.execute(select(hl7_senders).where(where)).mappings().one()
    return _from_row(row), exists


def remove_sender(engine: Engine, name: str) -> None:
    """Forget the sender ``name``; NotFound if there is none."""
    with engine.begin() as conn:
        removed = conn.execute(delete(hl7_senders).where(hl7_senders.c.name == name)).rowcount
    if not removed:
        raise NotFound(f"HL7 sender {name!r} is not registered")


def sender_principal(sender: Hl7Sender, peer: PeerIdentity | None) -> Principal:
    """The principal a sender's messages act as: role ``ingest`` in its partition."""
    where = f" at {peer.address}" if peer is not None else ""
    subject = peer.tls_subject if peer is not None else None
    name = f"{sender.name}{where}" + (f" (TLS {subject})" if subject else "")
    return Principal(
        subject=sender.name,
        kind=PrincipalKind.HL7_SENDER,
        grants=frozenset({Grant(Role.INGEST, sender.partition)}),
        display_name=name[:255],
    )


def _msh_matches(wanted: str | None, header: Header, number: int) -> bool:
    if wanted is None:
        return True
    return wanted in (header.get(number), header.component(number, 1))


@dataclass(frozen=True)
class _Entry:
    sender: Hl7Sender
    addresses: frozenset[IpAddress] | None  # None: any address
    subject: frozenset[tuple[str, str]] | None

    def matches(
        self, ip: IpAddress | None, subject: frozenset[tuple[str, str]], header: Header | None
    ) -> bool:
        if self.addresses is not None and ip not in self.addresses:
            return False
        if self.subject is not None and not self.subject <= subject:
            return False
        if header is None:  # no MSH to read: the network identity decides
            return True
        return _msh_matches(self.sender.application, header, 3) and _msh_matches(
            self.sender.facility, header, 4
        )


class SenderDirectory:
    """The registered senders as the listener sees them: reloaded (and host names
    resolved again) when older than ``refresh_seconds``; thread-safe."""

    def __init__(self, engine: Engine, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self._engine = engine
        self._refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._loaded_at = -1e9

    def invalidate(self) -> None:
        """Read the table again before the next lookup."""
        with self._lock:
            self._loaded_at = -1e9

    def _current(self) -> list[_Entry]:
        with self._lock:
            if time.monotonic() - self._loaded_at < self._refresh_seconds:
                return self._entries
            entries = [
                _Entry(
                    sender,
                    None if sender.host == ANY_HOST else host_addresses(sender.host),
                    subject_attributes(sender.tls_subject) if sender.tls_subject else None,
                )
                for sender in list_senders(self._engine)
            ]
            # Most specific first; ties by name, so the choice never depends on row order.
            entries.sort(key=lambda e: (-e.sender.specificity, e.sender.name))
            self._entries, self._loaded_at = entries, time.monotonic()
            return entries

    def identify(self, peer: PeerIdentity | None, header: Header | None) -> Hl7Sender | None:
        """The most specific registered sender matching ``peer`` and the message's MSH
        (None: no MSH could be read), or None when none does."""
        if peer is None:
            return None
        ip = peer_ip(peer.address)
        for entry in self._current():
            if entry.matches(ip, peer.tls_attributes, header):
                return entry.sender
        return None


__all__ = [
    "ANY_HOST",
    "REFRESH_SECONDS",
    "Hl7Sender",
    "PeerIdentity",
    "SenderDirectory",
    "add_sender",
    "check_sender",
    "get_sender",
    "list_senders",
    "put_sender",
    "remove_sender",
    "sender_from_json",
    "sender_principal",
    "subject_attributes",
]
