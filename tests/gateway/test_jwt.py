"""JWT / OIDC bearer tokens against a JWKS file: RS256, ES256 and EdDSA accepted; every negative case refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from openautoglm.config.gateway import JwtConfig
from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.gateway.jwt import JwtVerifier
from openautoglm.protocol.errors import AuthenticationError
from openautoglm.server.http.app import create_app

from .conftest import gateway_settings  # type: ignore[import-not-found]

ISS, AUD = "https://idp.example", "open-autoglm"


class Issuer:
    def __init__(self, directory: Path) -> None:
        self.keys: dict[str, tuple[str, Any]] = {
            "rsa": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "ec": ("ES256", ec.generate_private_key(ec.SECP256R1())),
            "ed": ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
        }
        self.path = directory / "jwks.json"
        self.publish()

    def publish(self) -> None:
        jwks = []
        for kid, (alg, key) in self.keys.items():
            algo = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
            jwk = json.loads(algo.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": kid, "use": "sig"})
        self.path.write_text(json.dumps({"keys": jwks}))

    def token(self, kid: str = "rsa", **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISS, "aud": AUD, "sub": "user-1", "iat": now, "exp": now + 300, **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        alg, key = self.keys[kid]
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})

    def public_pem(self) -> bytes:
        return (
            self.keys["rsa"][1]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer(tmp_path)


def verifier(issuer: Issuer, **extra: Any) -> JwtVerifier:
    fields = {"enabled": True, "issuer": ISS, "audience": AUD, "jwks_file": str(issuer.path), "leeway_s": 10}
    return JwtVerifier(JwtConfig(**{**fields, **extra}))


@pytest.mark.parametrize("kid", ["rsa", "ec", "ed"])
async def test_valid_tokens_map_scopes_and_tenant(issuer: Issuer, kid: str) -> None:
    v = verifier(issuer, scopes_claim="roles", tenant_claim="org")
    identity = await v.verify(issuer.token(kid, scope="inference other:thing", roles=["audit:read"], org="acme"))
    assert identity.scopes == {"inference", "audit:read"} and identity.tenant == "acme"
    assert identity.subject == "jwt:user-1" and identity.kind == "jwt"
    assert (await v.verify(issuer.token(kid, scp=["models:read"]))).scopes == {"models:read"}
    assert (await v.verify(issuer.token(kid))).tenant == "user-1"


def _now() -> int:
    return int(time.time())


async def test_negative_cases(issuer: Issuer) -> None:
    v = verifier(issuer)
    now = _now()
    claims = {"iss": ISS, "aud": AUD, "sub": "u", "exp": now + 300}
    rsa_sig_header = {"alg": "none", "kid": "rsa", "typ": "JWT"}
    hs_token = _unsigned({"alg": "HS256", "kid": "rsa", "typ": "JWT"}, claims)
    hs_token += "." + _b64(hmac.new(issuer.public_pem(), hs_token.encode(), hashlib.sha256).digest())
    valid = issuer.token()
    cases = {
        "alg none": _unsigned(rsa_sig_header, claims) + ".",
        "HS256 with the public key as secret": hs_token,
        "wrong issuer": issuer.token(iss="https://evil.example"),
        "wrong audience": issuer.token(aud="someone-else"),
        "expired beyond the leeway": issuer.token(exp=now - 60),
        "not yet valid beyond the leeway": issuer.token(nbf=now + 60),
        "no exp": issuer.token(exp=None),
        "tampered payload": valid.split(".")[0] + "." + _b64(json.dumps({**claims, "sub": "admin"}).encode())
        + "." + valid.split(".")[2],
        "unknown kid": jwt.encode(claims, issuer.keys["rsa"][1], "RS256", {"kid": "zz"}),
        "malformed": "abc.def.ghi",
    }  # fmt: skip
    for name, token in cases.items():
        try:
            await v.verify(token)
        except AuthenticationError:
            continue
        pytest.fail(f"{name}: accepted")
    # Inside the leeway: accepted.
    assert (await v.verify(issuer.token(exp=now - 5))).subject == "jwt:user-1"
    assert (await v.verify(issuer.token(nbf=now + 5))).subject == "jwt:user-1"


async def test_unknown_kid_refreshes_the_jwks(issuer: Issuer) -> None:
    v = verifier(issuer, jwks_min_refresh_s=0)
    await v.verify(issuer.token("rsa"))
    issuer.keys["new"] = ("ES256", ec.generate_private_key(ec.SECP256R1()))
    issuer.publish()
    assert (await v.verify(issuer.token("new"))).subject == "jwt:user-1"


async def test_jwt_through_the_http_gateway(issuer: Issuer, engine: AsyncEngine, tmp_path: Path) -> None:
    jwt_cfg = {"enabled": True, "issuer": ISS, "audience": AUD, "jwks_file": str(issuer.path)}
    app = create_app(gateway_settings(tmp_path, auth={"jwt": jwt_cfg}), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        ok = await c.get("/v1/models", headers={"Authorization": f"Bearer {issuer.token(scope='models:read')}"})
        denied = await c.get("/admin/keys", headers={"Authorization": f"Bearer {issuer.token(scope='models:read')}"})
        expired = await c.get("/v1/models", headers={"Authorization": f"Bearer {issuer.token(exp=_now() - 600)}"})
    assert (ok.status_code, denied.status_code, expired.status_code) == (200, 403, 401)
    assert expired.json()["error"]["code"] == "token_expired"
    await app.state.gateway.close()
