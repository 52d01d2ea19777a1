"""The HTTP adapter: one ASGI app serving DICOMweb, the change feed and health."""

from medlake.api.app import create_app

__all__ = ["create_app"]
