"""Known Application Entities (table ``application_entities``) and the calling-AE policy.

Each row is a peer medlake talks DIMSE with: where to reach it (C-MOVE destinations,
``medlake send`` / ``retrieve`` targets, with or without TLS), which partition its
C-STOREs go into and what it may do. The same table is the allow-list for incoming
associations (:func:`calling_ae_rules`): a registered calling AE title is admitted only
from its host (unless ``check_host`` is off), and each admitted association acts as a
:class:`~medlake.security.Principal` of kind ``ae`` whose roles in the AE's partition
come from its permissions (``allow_store``: ingest, ``allow_query``: reader), so the
DIMSE services ask the same policy decision point as HTTP.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, RowMapping, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from medlake.errors import Conflict, InvalidInput, NotFound
from medlake.index.schema import application_entities
from medlake.index.writes import utcnow
from medlake.ingest.archive import Archive
from medlake.security import Action, Grant, Principal, PrincipalKind, Role, authorize
from medlake.security.peer_address import host_matches
from medlake.types import DEFAULT_PARTITION, check_partition

log = logging.getLogger(__name__)

#: PS3.5 AE VR: 1-16 characters of the default repertoire, no backslash, no control
#: characters; leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class ApplicationEntity:
    """One known peer: its AE title, address, partition and permissions."""

    ae_title: str
    host: str
    port: int
    #: Partition its C-STOREs go into and its queries and retrieves read; None = default.
    partition: str | None = None
    allow_store: bool = True
    allow_query: bool = True
    description: str | None = None
    created_at: dt.datetime | None = None
    #: medlake reaches it over DICOM TLS (C-MOVE destination, send / retrieve target).
    tls: bool = False
    #: Its associations are admitted only from the addresses of ``host``.
    check_host: bool = True

    @property
    def effective_partition(self) -> str:
        """The partition this AE reads and writes."""
        return self.partition or DEFAULT_PARTITION

    def to_json(self) -> dict[str, Any]:
        """The AE as JSON (HTTP API and ``medlake ae list --json``)."""
        return {
            "aeTitle": self.ae_title,
            "host": self.host,
            "port": self.port,
            "partition": self.effective_partition,
            "allowStore": self.allow_store,
            "allowQuery": self.allow_query,
            "description": self.description,
            "tls": self.tls,
            "checkHost": self.check_host,
            "createdAt": self.created_at.isoformat() if self.created_at else None,
        }


def check_ae_title(title: str, name: str = "AE title") -> str:
    """``title`` without padding if it is a valid AE title, else :class:`InvalidInput`."""
    stripped = title.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise InvalidInput(
            f"{name} {title!r} is invalid: use 1-16 printable ASCII characters, "
            "no backslash and not only spaces"
        )
    return stripped


def ae_from_json(body: Any, ae_title: str | None = None) -> ApplicationEntity:
    """An AE from its JSON form (``aeTitle``, ``host``, ``port``, ``partition``,
    ``allowStore``, ``allowQuery``, ``description``, ``tls``, ``checkHost``); ``ae_title``
    (from a URL) wins
    over the body's and must agree with it. :class:`InvalidInput` names what is wrong."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object with aeTitle, host and port")
    known = {
        "aeTitle", "host", "port", "partition", "allowStore", "allowQuery", "description",
        "tls", "checkHost",
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; fields are {sorted(known)}")
    title = body.get("aeTitle", ae_title)
    if ae_title is not None and title is not None and str(title).strip() != ae_title.strip():
        raise InvalidInput(f"aeTitle {title!r} in the body differs from {ae_title!r} in the URL")
    fields = {
        "aeTitle": (title, str, True), "host": (body.get("host"), str, True),
        "port": (body.get("port"), int, True), "partition": (body.get("partition"), str, False),
        "allowStore": (body.get("allowStore", True), bool, True),
        "allowQuery": (body.get("allowQuery", True), bool, True),
        "description": (body.get("description"), str, False),
        "tls": (body.get("tls", False), bool, True),
        "checkHost": (body.get("checkHost", True), bool, True),
    }  # fmt: skip
    for name, (value, kind, required) in fields.items():
        if value is None and not required:
            continue
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if value is None or wrong_type:
            raise InvalidInput(f"{name} must be a JSON {kind.__name__}, not {value!r}")
    return _check(
        ApplicationEntity(
            str(title), str(body["host"]), int(body["port"]), body.get("partition"),
            bool(body.get("allowStore", True)), bool(body.get("allowQuery", True)),
            body.get("description"), tls=bool(body.get("tls", False)),
            check_host=bool(body.get("checkHost", True)),
        )
    )  # fmt: skip


def _check(ae: ApplicationEntity) -> ApplicationEntity:
    title = check_ae_title(ae.ae_title)
    if not ae.host.strip() or len(ae.host) > 255 or any(c.isspace() for c in ae.host):
        raise InvalidInput(f"host {ae.host!r} of AE {title} is not a host name or address")
    if not 1 <= ae.port <= 65535:
        raise InvalidInput(f"port {ae.port} of AE {title} is not between 1 and 65535")
    partition = check_partition(ae.partition) if ae.partition else None
    return ApplicationEntity(
        title, ae.host.strip(), ae.port, partition, ae.allow_store, ae.allow_query,
        ae.description, ae.created_at, ae.tls, ae.check_host,
    )  # fmt: skip


def _from_row(row: RowMapping) -> ApplicationEntity:
    created = row["created_at"]
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)  # SQLite returns naive UTC
    return ApplicationEntity(
        ae_title=row["ae_title"], host=row["host"], port=row["port"], partition=row["partition"],
        allow_store=bool(row["allow_store"]), allow_query=bool(row["allow_query"]),
        description=row["description"], created_at=created, tls=bool(row["tls"]),
        check_host=bool(row["check_host"]),
    )  # fmt: skip


def list_aes(archive: Archive) -> list[ApplicationEntity]:
    """Every known AE, by title."""
    with archive.engine.connect() as conn:
        rows = conn.execute(
            select(application_entities).order_by(application_entities.c.ae_title)
        ).mappings()
        return [_from_row(r) for r in rows]


def find_ae(conn: Connection, title: str) -> ApplicationEntity | None:
    """The AE registered as ``title`` (padding ignored), or None."""
    row = (
        conn.execute(
            select(application_entities).where(application_entities.c.ae_title == title.strip())
        )
        .mappings()
        .first()
    )
    return _from_row(row) if row is not None else None


def get_ae(archive: Archive, title: str) -> ApplicationEntity:
    """The AE registered as ``title``, or :class:`NotFound`."""
    with archive.engine.connect() as conn:
        found = find_ae(conn, title)
    if found is None:
        raise NotFound(f"AE title {title.strip()!r} is not registered")
    return found


def add_ae(archive: Archive, ae: ApplicationEntity, *, replace: bool = False) -> ApplicationEntity:
    """Register ``ae``; :class:`Conflict` if its title exists, unless ``replace``."""
    return _write_ae(archive, ae, replace=replace)[0]


def put_ae(archive: Archive, ae: ApplicationEntity) -> tuple[ApplicationEntity, bool]:
    """Register or replace ``ae``; the flag says whether an AE of its title was replaced
    (told in the same transaction as the write)."""
    return _write_ae(archive, ae, replace=True)


def _write_ae(
    archive: Archive, ae: ApplicationEntity, *, replace: bool
) -> tuple[ApplicationEntity, bool]:
    ae = _check(ae)
    values = {
        "host": ae.host, "port": ae.port, "partition": ae.partition,
        "allow_store": ae.allow_store, "allow_query": ae.allow_query,
        "description": ae.description, "tls": ae.tls, "check_host": ae.check_host,
    }  # fmt: skip
    with archive.engine.begin() as conn:
        existed = find_ae(conn, ae.ae_title) is not None
        if existed:
            if not replace:
                raise Conflict(f"AE title {ae.ae_title!r} is already registered")
            conn.execute(
                update(application_entities)
                .where(application_entities.c.ae_title == ae.ae_title)
                .values(**values)
            )
        else:
            try:
                conn.execute(
                    insert(application_entities).values(
                        ae_title=ae.ae_title, created_at=utcnow(), **values
                    )
                )
            except IntegrityError as exc:  # registered concurrently
                raise Conflict(f"AE title {ae.ae_title!r} is already registered") from exc
        added = find_ae(conn, ae.ae_title)
    assert added is not None
    return added, existed


def remove_ae(archive: Archive, title: str) -> None:
    """Forget the AE registered as ``title``; :class:`NotFound` if there is none."""
    with archive.engine.begin() as conn:
        removed = conn.execute(
            delete(application_entities).where(application_entities.c.ae_title == title.strip())
        ).rowcount
    if not removed:
        raise NotFound(f"AE title {title.strip()!r} is not registered")


def ae_grants(partition: str, *, allow_store: bool, allow_query: bool) -> frozenset[Grant]:
    """The roles an AE holds in its partition: ``ingest`` to store, ``reader`` to query
    and retrieve."""
    grants = set()
    if allow_store:
        grants.add(Grant(Role.INGEST, partition))
    if allow_query:
        grants.add(Grant(Role.READER, partition))
    return frozenset(grants)


def ae_principal(
    calling_ae: str,
    grants: frozenset[Grant],
    address: str | None = None,
    tls_subject: str | None = None,
) -> Principal:
    """The principal an association acts as: the calling AE title (subject), from
    ``address``, with the subject of its TLS client certificate when it sent one."""
    where = f" at {address}" if address else ""
    name = f"{calling_ae}{where}" + (f" (TLS {tls_subject})" if tls_subject else "")
    return Principal(
        subject=calling_ae, kind=PrincipalKind.AE, grants=grants, display_name=name[:255]
    )


@dataclass(frozen=True)
class CallingAeRules:
    """What an incoming association may do, decided from its calling AE title and host.

    ``allow_store`` / ``allow_query`` are the policy's answers for the principal (so a
    handler may check either); ``principal`` is who the association acts as.
    """

    calling_ae: str
    partition: str
    allow_store: bool
    allow_query: bool
    #: Whether the calling AE is registered (else the defaults for unknown AEs apply).
    known: bool
    principal: Principal | None = field(default=None, compare=False)
    #: The peer's network address (the audit log's source address).
    address: str | None = None


def calling_ae_rules(
    archive: Archive,
    calling_ae: str,
    address: str | None = None,
    tls_subject: str | None = None,
) -> CallingAeRules | None:
    """The rules for an association from ``calling_ae`` at ``address``; None when it must
    be rejected.

    A registered AE gets its own partition and permissions, if it calls from the
    addresses of its registered host (or ``check_host`` is off); from elsewhere it is
    rejected. An unregistered one is rejected when ``dimse_require_known_ae`` is set,
    else it may store into and query the default partition.
    """
    title = calling_ae.strip()
    with archive.engine.connect() as conn:
        known = find_ae(conn, title)
    if known is not None:
        if known.check_host and address is not None and not host_matches(known.host, address):
            log.warning(
                "association from registered AE %r rejected: it called from %s, not from "
                "its host %s (check_host)", title, address, known.host,
            )  # fmt: skip
            return None
        partition, store, query = known.effective_partition, known.allow_store, known.allow_query
    elif archive.settings.dimse_require_known_ae:
        return None
    else:
        partition, store, query = DEFAULT_PARTITION, True, True
    grants = ae_grants(partition, allow_store=store, allow_query=query)
    principal = ae_principal(title, grants, address, tls_subject)
    return CallingAeRules(
        title, partition,
        authorize(principal, Action.DICOM_STORE, partition).allowed,
        authorize(principal, Action.DICOM_SEARCH, partition).allowed,
        known is not None, principal, address,
    )  # fmt: skip


__all__ = [
    "ApplicationEntity",
    "CallingAeRules",
    "add_ae",
    "ae_from_json",
    "ae_grants",
    "ae_principal",
    "calling_ae_rules",
    "check_ae_title",
    "find_ae",
    "get_ae",
    "host_matches",
    "list_aes",
    "put_ae",
    "remove_ae",
]
