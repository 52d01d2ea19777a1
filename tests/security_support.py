"""Helpers of the security tests: bearer headers and tokens for each role."""

from __future__ import annotations

from medlake.ingest.archive import Archive
from medlake.security import Grant, create_token


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def issue(archive: Archive, subject: str, *grants: str, scopes: list[str] | None = None) -> str:
    """A new API token of ``subject`` with ``grants`` (``reader@default``, ...)."""
    created = create_token(
        archive.engine, subject, grants=[Grant.parse(g) for g in grants], scopes=scopes
    )
    return created.secret
