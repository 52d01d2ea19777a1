"""OIDC / OAuth2 bearer tokens (JWT) verified against the configured issuer's JWKS.

Only RS256 and ES256 signatures are accepted: ``alg: none`` and HMAC algorithms (which
would let a public key be used as a shared secret) are refused before any key is
looked at, and the key that verifies must be of the algorithm's type. The issuer,
audience, expiry and not-before are checked with ``clock_skew_seconds`` of leeway. The
JWKS (from ``oidc_jwks_url``, or the issuer's OpenID configuration) is cached and
fetched again when a token names a key id it does not hold (key rotation).

Roles come from the claim named by ``oidc_roles_claim`` (a dotted path such as
``realm_access.roles``): a list of ``ROLE`` / ``ROLE@PARTITION`` strings, or an object
mapping partitions to lists of roles. Unknown roles are ignored (identity providers
put their own there). SMART scopes come from ``scope`` (space-separated) or ``scp``,
the launch patient from ``patient``; grants stored for the subject are added.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

from medlake.config import Settings
from medlake.errors import InvalidInput
from medlake.security.errors import Unauthenticated
from medlake.security.principals import Grant, Principal, PrincipalKind

#: The only signature algorithms accepted.
ALGORITHMS = ("RS256", "ES256")
_DISCOVERY_TIMEOUT = 10.0


@dataclass(frozen=True)
class OidcConfig:
    """Where tokens come from and what they must say."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    roles_claim: str = "medlake_roles"
    clock_skew_seconds: float = 60.0
    jwks_cache_seconds: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcConfig | None:
        """The OIDC configuration of ``settings``; ``None`` when no issuer is set."""
        if not settings.oidc_issuer:
            return None
        if not settings.oidc_audience:
            raise InvalidInput("oidc_issuer is set but oidc_audience is not")
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            jwks_url=settings.oidc_jwks_url,
            roles_claim=settings.oidc_roles_claim,
            clock_skew_seconds=settings.clock_skew_seconds,
        )


def _discover_jwks_url(issuer: str) -> str:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, timeout=_DISCOVERY_TIMEOUT) as response:
        document = json.loads(response.read())
    if document.get("issuer") != issuer or not document.get("jwks_uri"):
        raise Unauthenticated(
            f"the OpenID configuration of {issuer} does not name it or a jwks_uri"
        )
    jwks_uri: str = document["jwks_uri"]
    return jwks_uri


class JwtVerifier:
    """Verifies bearer JWTs and turns their claims into a :class:`Principal`."""

    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._client: PyJWKClient | None = None
        self._lock = threading.Lock()

    def _keys(self) -> PyJWKClient:
        with self._lock:
            if self._client is None:
                url = self.config.jwks_url or _discover_jwks_url(self.config.issuer)
                self._client = PyJWKClient(
                    url, cache_jwk_set=True, lifespan=self.config.jwks_cache_seconds, timeout=10
                )
            return self._client

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of ``token`` once its signature, issuer, audience and times hold;
        Unauthenticated (saying which check failed) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed bearer token: {exc}") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(f"token algorithm {alg!r} is not accepted (only RS256, ES256)")
        try:
            key: PyJWK = self._keys().get_signing_key_from_jwt(token)
        except jwt.PyJWKClientError as exc:
            raise Unauthenticated(f"no key of the issuer verifies this token: {exc}") from None
        except OSError as exc:
            raise Unauthenticated(f"the issuer's keys could not be fetched: {exc}") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(ALGORITHMS),
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.clock_skew_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"token is not for audience {self.config.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"token is not from issuer {self.config.issuer!r}") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token is not valid yet") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        return claims

    def principal(
        self, token: str, stored: Callable[[str], frozenset[Grant]] | None = None
    ) -> Principal:
        """The principal of a verified token; ``stored(subject)`` adds grants kept in
        medlake for that subject."""
        claims = self.verify(token)
        subject = str(claims["sub"])
        grants = grants_from_claim(_claim(claims, self.config.roles_claim))
        if stored is not None:
            grants |= stored(subject)
        name = claims.get("name") or claims.get("preferred_username") or claims.get("email")
        return Principal(
            subject=subject,
            kind=PrincipalKind.USER,
            grants=grants,
            scopes=_scopes(claims),
            display_name=str(name) if name else None,
            patient=str(claims["patient"]) if claims.get("patient") else None,
        )


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def grants_from_claim(value: Any) -> frozenset[Grant]:
    """Grants from a roles claim: ``["admin", "reader@default"]`` or
    ``{"default": ["reader"], "*": ["auditor"]}``; unknown roles are skipped."""
    texts: list[str] = []
    if isinstance(value, str):
        texts = value.split()
    elif isinstance(value, list):
        texts = [v for v in value if isinstance(v, str)]
    elif isinstance(value, Mapping):
        for partition, roles in value.items():
            names = roles if isinstance(roles, list) else [roles]
            texts += [f"{r}@{partition}" for r in names if isinstance(r, str)]
    grants = set()
    for text in texts:
        try:
            grants.add(Grant.parse(text))
        except InvalidInput:
            continue
    return frozenset(grants)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str] | None:
    if isinstance(claims.get("scope"), str):
        return frozenset(claims["scope"].split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        return frozenset(scp.split())
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    return None


__all__ = ["ALGORITHMS", "JwtVerifier", "OidcConfig", "grants_from_claim"]
