"""Who is asking: principals, their roles per partition, and where grants are stored.

A :class:`Principal` is built by an adapter (HTTP bearer token, DIMSE calling AE, HL7
v2 sender) and handed to :func:`medlake.security.policy.authorize`; services receive it
as an argument and never read headers themselves.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from medlake.errors import InvalidInput
from medlake.index.schema import principals, role_grants
from medlake.index.writes import utcnow
from medlake.types import check_partition

#: The partition of a grant that covers every partition.
ALL_PARTITIONS = "*"

#: A FHIR compartment a grant may be limited to: ``Patient/123`` (FHIR id syntax).
_COMPARTMENT = re.compile(
    r"^(Patient|Encounter|RelatedPerson|Practitioner|Device)/[A-Za-z0-9.-]{1,64}$"
)


class Role(enum.StrEnum):
    """What a principal may do in a partition (see :mod:`medlake.security.policy`)."""

    ADMIN = "admin"
    INGEST = "ingest"
    READER = "reader"  # clinician: reads identified data
    RESEARCHER = "researcher"  # de-identified views only
    AUDITOR = "auditor"


#: Other names accepted for roles (in grants given on the command line or in token claims).
ROLE_ALIASES = {"clinician": Role.READER}


class PrincipalKind(enum.StrEnum):
    """How a principal authenticated."""

    USER = "user"  # an OIDC / OAuth2 bearer token
    TOKEN = "token"  # a medlake API token
    AE = "ae"  # a DICOM Application Entity (calling AE title + host)
    HL7_SENDER = "hl7"  # a registered HL7 v2 sender (MLLP: host, MSH-3/4, TLS subject)


def parse_role(text: str) -> Role:
    """The role named ``text`` (``clinician`` is ``reader``); InvalidInput otherwise."""
    name = text.strip().lower()
    if name in ROLE_ALIASES:
        return ROLE_ALIASES[name]
    try:
        return Role(name)
    except ValueError:
        known = ", ".join([r.value for r in Role] + list(ROLE_ALIASES))
        raise InvalidInput(f"unknown role {text!r}: use one of {known}") from None


@dataclass(frozen=True, order=True)
class Grant:
    """One role in one partition (``*``: all), optionally within one FHIR compartment."""

    role: Role
    partition: str = ALL_PARTITIONS
    compartment: str = ""

    def __post_init__(self) -> None:
        if self.partition != ALL_PARTITIONS:
            check_partition(self.partition)
        if self.compartment and not _COMPARTMENT.match(self.compartment):
            raise InvalidInput(
                f"compartment {self.compartment!r} is invalid: use Patient/<id> "
                "(or Encounter, RelatedPerson, Practitioner, Device)"
            )

    @classmethod
    def parse(cls, text: str) -> Grant:
        """``ROLE``, ``ROLE@PARTITION`` or ``ROLE@PARTITION:Patient/ID``; a bare role
        covers every partition."""
        role, _, where = text.strip().partition("@")
        partition, _, compartment = where.partition(":")
        return cls(parse_role(role), partition or ALL_PARTITIONS, compartment)

    def covers(self, partition: str | None) -> bool:
        """Whether the grant applies in ``partition`` (``None``: the whole archive)."""
        return self.partition == ALL_PARTITIONS or (
            partition is not None and self.partition == partition
        )

    def __str__(self) -> str:
        text = f"{self.role.value}@{self.partition}"
        return f"{text}:{self.compartment}" if self.compartment else text


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``scopes`` are SMART on FHIR scopes (``patient/*.read``, ``user/Observation.rs``);
    ``None`` means the credentials carry no scope limit, so roles alone decide.
    ``patient`` is the SMART launch context (the patient of ``patient/`` scopes).
    """

    subject: str
    kind: PrincipalKind
    grants: frozenset[Grant] = field(default_factory=frozenset)
    scopes: frozenset[str] | None = None
    display_name: str | None = None
    patient: str | None = None
    token_id: str | None = None

    def roles_in(self, partition: str | None) -> set[Role]:
        """The roles the principal holds in ``partition`` (whole-partition grants only)."""
        return {g.role for g in self.grants if g.covers(partition) and not g.compartment}

    @property
    def label(self) -> str:
        """``subject`` with its kind, for messages: ``token alice``."""
        return f"{self.kind.value} {self.subject}"


#: The principal of every request when authentication is turned off (local demos).
INSECURE_PRINCIPAL = Principal(
    subject="anonymous",
    kind=PrincipalKind.USER,
    grants=frozenset({Grant(Role.ADMIN)}),
    display_name="anonymous (authentication off)",
)


# --- stored principals and grants ----------------------------------------------------------


def ensure_principal(
    conn: Connection, subject: str, kind: PrincipalKind, display_name: str | None = None
) -> int:
    """The id of the principal ``subject``, created on first use."""
    if not subject or len(subject) > 255:
        raise InvalidInput(f"subject must be 1-255 characters, not {subject!r}")
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    row = {"subject": subject, "kind": kind.value, "display_name": display_name}
    conn.execute(
        dialect.insert(principals).on_conflict_do_nothing(),
        [{**row, "created_at": utcnow()}],
    )
    found: int = conn.execute(
        select(principals.c.id).where(principals.c.subject == subject)
    ).scalar_one()
    return found


def add_grants(conn: Connection, principal_id: int, grants: Iterable[Grant]) -> None:
    """Grant roles to a principal (grants it already has are kept once)."""
    rows = [
        {
            "principal_id": principal_id,
            "role": g.role.value,
            "partition": g.partition,
            "compartment": g.compartment,
            "created_at": utcnow(),
        }
        for g in set(grants)
    ]
    if rows:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        conn.execute(dialect.insert(role_grants).on_conflict_do_nothing(), rows)


def remove_grants(conn: Connection, principal_id: int, grants: Iterable[Grant]) -> int:
    """Take roles away from a principal; returns how many grants were removed."""
    removed = 0
    for g in set(grants):
        removed += conn.execute(
            delete(role_grants).where(
                role_grants.c.principal_id == principal_id,
                role_grants.c.role == g.role.value,
                role_grants.c.partition == g.partition,
                role_grants.c.compartment == g.compartment,
            )
        ).rowcount
    return removed


def stored_grants(conn: Connection, subject: str) -> frozenset[Grant]:
    """The grants recorded for ``subject`` (none for an unknown subject)."""
    rows = conn.execute(
        select(role_grants.c.role, role_grants.c.partition, role_grants.c.compartment)
        .join(principals, principals.c.id == role_grants.c.principal_id)
        .where(principals.c.subject == subject)
    )
    return frozenset(Grant(Role(r.role), r.partition, r.compartment) for r in rows)


__all__ = [
    "ALL_PARTITIONS",
    "INSECURE_PRINCIPAL",
    "ROLE_ALIASES",
    "Grant",
    "Principal",
    "PrincipalKind",
    "Role",
    "add_grants",
    "ensure_principal",
    "parse_role",
    "remove_grants",
    "stored_grants",
]
