"""The ``CapabilityStatement`` served at ``GET /fhir/metadata``: what the FHIR store
supports, as it is implemented (R4 capabilitystatement.html)."""

from __future__ import annotations

from functools import cache
from typing import Any

from medlake.clinical.resources import FHIR_VERSION, RESOURCE_TYPES
from medlake.clinical.search_params import parameters_of
from medlake.clinical.store import fhir_instant, now_ms

#: Interactions on every resource type (TypeRestfulInteraction).
TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
#: Interactions on the whole server (SystemRestfulInteraction).
SYSTEM_INTERACTIONS = ("transaction", "batch", "history-system")


def _search_params(resource_type: str) -> list[dict[str, Any]]:
    out = []
    for name, param in sorted(parameters_of(resource_type).items()):
        entry: dict[str, Any] = {"name": name, "type": param.type}
        if param.documentation:
            entry["documentation"] = param.documentation
        out.append(entry)
    return out


@cache
def _resources() -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "type": resource_type,
            "interaction": [{"code": code} for code in TYPE_INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "full-support",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "searchParam": _search_params(resource_type),
        }
        for resource_type in sorted(RESOURCE_TYPES)
    )


def capability_statement(*, base_url: str, software_version: str) -> dict[str, Any]:
    """The CapabilityStatement of the FHIR endpoint at ``base_url``."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhir_instant(now_ms()),
        "publisher": "medlake",
        "kind": "instance",
        "software": {"name": "medlake", "version": software_version},
        "implementation": {
            "description": "medlake FHIR R4 store",
            "url": base_url,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Resources are validated against FHIR R4 (JSON only); every write "
                    "keeps its version. Deleted resources answer 410 Gone. Conditional "
                    "delete acts on one match at most; PATCH is not supported."
                ),
                "resource": list(_resources()),
                "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
            }
        ],
    }


__all__ = ["SYSTEM_INTERACTIONS", "TYPE_INTERACTIONS", "capability_statement"]
