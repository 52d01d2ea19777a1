"""Security building blocks: who is asking (principals, API tokens, OIDC JWTs), may they
(one policy decision point), what they did (hash-chained audit log), and blobs only
key holders can read (envelope encryption).

Adapters authenticate, build a :class:`Principal` and ask :func:`authorize`; services
receive the principal and never read headers.
"""

from medlake.security.audit import (
    Anchor,
    AuditRecord,
    VerifyResult,
    append_audit,
    export_audit_events,
    record_audit,
    verify_chain,
)
from medlake.security.envelope import KeyProvider, LocalKeyFileProvider
from medlake.security.errors import (
    AuditUnavailable,
    DecryptionFailed,
    Forbidden,
    KeyUnavailable,
    Unauthenticated,
)
from medlake.security.jwt_verify import JwtVerifier, OidcConfig
from medlake.security.policy import Action, Decision, authorize
from medlake.security.principals import (
    ALL_PARTITIONS,
    INSECURE_PRINCIPAL,
    Grant,
    Principal,
    PrincipalKind,
    Role,
)
from medlake.security.tokens import (
    authenticate_token,
    create_token,
    list_tokens,
    looks_like_api_token,
    revoke_token,
)

__all__ = [
    "ALL_PARTITIONS",
    "INSECURE_PRINCIPAL",
    "Action",
    "Anchor",
    "AuditRecord",
    "AuditUnavailable",
    "Decision",
    "DecryptionFailed",
    "Forbidden",
    "Grant",
    "JwtVerifier",
    "KeyProvider",
    "KeyUnavailable",
    "LocalKeyFileProvider",
    "OidcConfig",
    "Principal",
    "PrincipalKind",
    "Role",
    "Unauthenticated",
    "VerifyResult",
    "append_audit",
    "authenticate_token",
    "authorize",
    "create_token",
    "export_audit_events",
    "list_tokens",
    "looks_like_api_token",
    "record_audit",
    "revoke_token",
    "verify_chain",
]
