"""Errors of the security layer, each with the HTTP status it maps to."""

from __future__ import annotations

from medlake.errors import DatabaseUnavailable, MedlakeError


class Unauthenticated(MedlakeError):
    """No credentials, or credentials that do not prove who is asking (unknown, expired,
    revoked or wrongly signed token)."""

    http_status = 401


class Forbidden(MedlakeError):
    """The principal is known but no role it holds allows the action where it was asked."""

    http_status = 403


class AuditUnavailable(DatabaseUnavailable):
    """The audit record of an action could not be written, so the action is refused."""


class KeyUnavailable(MedlakeError):
    """A key-encryption key is missing from the key provider, or the key file is unusable."""

    http_status = 500


class DecryptionFailed(MedlakeError):
    """An encrypted blob failed authentication: it was changed, cut short or is not ours."""

    http_status = 500


__all__ = ["AuditUnavailable", "DecryptionFailed", "Forbidden", "KeyUnavailable", "Unauthenticated"]
