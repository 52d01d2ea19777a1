"""OIDC bearer JWTs: RS256 and ES256 tokens verified against a JWKS served over HTTP by
a local identity-provider stand-in; every forged, stale or misdirected token is 401."""

from __future__ import annotations

import base64
import json
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from tests.security_support import bearer

from medlake.api import create_app
from medlake.config import Settings
from medlake.ingest.archive import Archive
from medlake.security import Grant
from medlake.security.principals import PrincipalKind, add_grants, ensure_principal

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

AUDIENCE = "medlake-api"


@dataclass
class IdentityProvider:
    """Signing keys and the HTTP server publishing their JWKS (and OpenID configuration)."""

    issuer: str
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    requests: list[str]

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks.json"

    def token(self, alg: str = "RS256", **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-42",
            "name": "Dr. Who",
            "iat": now,
            "exp": now + 300,
            "medlake_roles": ["reader@default"],
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        key = self.rsa_key if alg == "RS256" else self.ec_key
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": alg.lower()})


def _jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> bytes:
    rs = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    es = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    keys = [{**rs, "kid": "rs256", "use": "sig"}, {**es, "kid": "es256", "use": "sig"}]
    return json.dumps({"keys": keys}).encode()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    requests: list[str] = []
    documents: dict[str, bytes] = {"/jwks.json": _jwks(rsa_key, ec_key)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = documents.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body or b"{}")

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    issuer = f"http://127.0.0.1:{server.server_address[1]}"
    documents["/.well-known/openid-configuration"] = json.dumps(
        {"issuer": issuer, "jwks_uri": f"{issuer}/jwks.json"}
    ).encode()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield IdentityProvider(issuer, rsa_key, ec_key, requests)
    finally:
        server.shutdown()
        thread.join(timeout=10)


def _client(settings: Settings, idp: IdentityProvider, **extra: Any) -> Iterator[TestClient]:
    oidc = {
        "insecure_no_auth": False,
        "oidc_issuer": idp.issuer,
        "oidc_audience": AUDIENCE,
        "oidc_jwks_url": idp.jwks_url,
        "clock_skew_seconds": 60.0,
        **extra,
    }
    archive = Archive.open(settings.model_copy(update=oidc))
    try:
        with TestClient(create_app(archive, background=False)) as client:
            client.archive = archive  # type: ignore[attr-defined]
            yield client
    finally:
        archive.close()


@pytest.fixture
def client(settings: Settings, idp: IdentityProvider) -> Iterator[TestClient]:
    yield from _client(settings, idp)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_token_is_accepted(client: TestClient, idp: IdentityProvider, alg: str) -> None:
    response = client.get("/dicomweb/studies", headers=bearer(idp.token(alg)))
    assert response.status_code == 204, response.text


def test_a_token_within_the_clock_skew_is_accepted(
    client: TestClient, idp: IdentityProvider
) -> None:
    just_expired = idp.token(exp=int(time.time()) - 20)
    assert client.get("/dicomweb/studies", headers=bearer(just_expired)).status_code == 204


def _none_token(idp: IdentityProvider) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    payload = jwt.decode(idp.token(), options={"verify_signature": False})
    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'rs256'})}.{part(payload)}."


def _hs256_with_public_key(idp: IdentityProvider) -> str:
    pem = idp.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = jwt.decode(idp.token(), options={"verify_signature": False})
    # PyJWT refuses PEM keys as HMAC secrets, so sign by hand as an attacker would.
    import hashlib
    import hmac

    def part(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT", "kid": "rs256"}) + b"." + part(payload)
    signature = hmac.new(pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


@pytest.mark.parametrize(
    "case",
    ["expired", "wrong signature", "wrong audience", "wrong issuer", "alg none",
     "hs256 with the public key", "not yet valid", "no subject", "garbage"],
)  # fmt: skip
def test_bad_tokens_are_401(client: TestClient, idp: IdentityProvider, case: str) -> None:
    now = int(time.time())
    if case == "expired":
        token = idp.token(exp=now - 120)
    elif case == "wrong signature":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode(
            jwt.decode(idp.token(), options={"verify_signature": False}),
            other,
            algorithm="RS256",
            headers={"kid": "rs256"},
        )
    elif case == "wrong audience":
        token = idp.token(aud="someone-else")
    elif case == "wrong issuer":
        token = idp.token(iss="https://evil.example.org")
    elif case == "alg none":
        token = _none_token(idp)
    elif case == "hs256 with the public key":
        token = _hs256_with_public_key(idp)
    elif case == "not yet valid":
        token = idp.token(nbf=now + 600)
    elif case == "no subject":
        token = idp.token(sub=None)
    else:
        token = "not.a.jwt"
    response = client.get("/dicomweb/studies", headers=bearer(token))
    assert response.status_code == 401, (case, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "PatientName" not in response.text


def test_roles_from_claims_and_from_stored_grants(
    client: TestClient, idp: IdentityProvider
) -> None:
    no_roles = idp.token(medlake_roles=None)
    assert client.get("/dicomweb/studies", headers=bearer(no_roles)).status_code == 403
    other = idp.token(medlake_roles={"other": ["reader"]})
    assert client.get("/dicomweb/studies", headers=bearer(other)).status_code == 403
    assert (
        client.get("/dicomweb/partitions/other/studies", headers=bearer(other)).status_code != 403
    )
    # The identity provider knows nothing of medlake roles; medlake holds them for the subject.
    archive: Archive = client.archive  # type: ignore[attr-defined]
    with archive.engine.begin() as conn:
        add_grants(
            conn,
            ensure_principal(conn, "user-42", PrincipalKind.USER),
            [Grant.parse("reader@default")],
        )
    assert client.get("/dicomweb/studies", headers=bearer(no_roles)).status_code == 204


def test_jwks_found_through_openid_discovery(settings: Settings, idp: IdentityProvider) -> None:
    for client in _client(settings, idp, oidc_jwks_url=None):
        before = len(idp.requests)
        assert (
            client.get("/dicomweb/studies", headers=bearer(idp.token("ES256"))).status_code == 204
        )
        assert (
            client.get("/dicomweb/studies", headers=bearer(idp.token("RS256"))).status_code == 204
        )
        fetched = idp.requests[before:]
        assert fetched[0] == "/.well-known/openid-configuration"
        assert fetched.count("/jwks.json") == 1  # cached for the second token
