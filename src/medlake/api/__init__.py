"""The HTTP adapter: one ASGI app serving DICOMweb, FHIR, the change feed and health.

``create_app`` is imported on first use (PEP 562): the command line imports small
parts of this package (the request-id log filter) for every command, and building
the app pulls in every route, FHIR model and service, which ``medlake ingest`` or
``medlake --version`` do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medlake.api.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from medlake.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_app"]
