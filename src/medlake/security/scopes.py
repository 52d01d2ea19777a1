"""SMART on FHIR scopes: ``patient/Observation.read`` (v1), ``user/*.rs`` (v2).

A scope names a context (``patient``: only the launch patient's compartment; ``user``
and ``system``: whatever the principal's roles allow), a resource type (or ``*``) and
the interactions: v1 ``read`` (read + search), ``write`` (create, update, delete) or
``*``; v2 any of ``c r u d s`` in that order. Scopes with query parameters
(``patient/Observation.rs?category=...``) narrow by search criteria medlake cannot
enforce here, so they are refused rather than widened.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from medlake.errors import InvalidInput

_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{0,63})"
    r"\.(?P<perm>read|write|\*|c?r?u?d?s?)$"
)


class Interaction(enum.StrEnum):
    """The FHIR interactions a scope grants, as SMART v2 letters."""

    CREATE = "c"
    READ = "r"
    UPDATE = "u"
    DELETE = "d"
    SEARCH = "s"


_V1 = {
    "read": frozenset({Interaction.READ, Interaction.SEARCH}),
    "write": frozenset({Interaction.CREATE, Interaction.UPDATE, Interaction.DELETE}),
    "*": frozenset(Interaction),
}


@dataclass(frozen=True)
class SmartScope:
    """One parsed resource scope."""

    context: str  # patient | user | system
    resource_type: str  # a FHIR type or "*"
    interactions: frozenset[Interaction]

    def allows(self, resource_type: str, interaction: Interaction) -> bool:
        """Whether this scope covers ``interaction`` on ``resource_type`` (``*``: any type,
        which only a wildcard scope covers)."""
        type_ok = self.resource_type == "*" or self.resource_type == resource_type
        return type_ok and interaction in self.interactions


def parse_scope(text: str) -> SmartScope | None:
    """The resource scope ``text`` names, or ``None`` for other scopes (``openid``,
    ``launch``, ``offline_access``, or one with query parameters)."""
    match = _SCOPE.match(text)
    if match is None:
        return None
    perm = match.group("perm")
    if perm in _V1:
        interactions = _V1[perm]
    elif perm:
        interactions = frozenset(Interaction(letter) for letter in perm)
    else:
        return None
    return SmartScope(match.group("context"), match.group("type"), interactions)


def check_scope(text: str) -> str:
    """``text`` if it is a SMART resource scope; InvalidInput otherwise (for scopes given
    to medlake tokens, where anything else would be a typo)."""
    if parse_scope(text) is None:
        raise InvalidInput(
            f"scope {text!r} is not a SMART resource scope such as patient/*.read, "
            "user/Observation.rs or system/*.*"
        )
    return text


def matching_scopes(
    scopes: Iterable[str], resource_type: str, interaction: Interaction
) -> list[SmartScope]:
    """The resource scopes among ``scopes`` that allow ``interaction`` on the type."""
    parsed = (parse_scope(s) for s in scopes)
    return [s for s in parsed if s is not None and s.allows(resource_type, interaction)]


__all__ = ["Interaction", "SmartScope", "check_scope", "matching_scopes", "parse_scope"]
