"""JWT / OIDC bearer tokens: signatures checked against the issuer's JWKS (file or URL), asymmetric algorithms
only (``alg: none`` and HMAC tokens are refused outright), issuer, audience, exp and nbf enforced with a small
leeway. ``scope`` / ``scp`` and an optional configured claim become scopes; a configured claim names the tenant.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from openautoglm.config.gateway import JwtConfig
from openautoglm.gateway.pipeline import Identity
from openautoglm.gateway.scopes import ALL_SCOPES
from openautoglm.protocol.errors import AuthenticationError, ConfigError

_ASYMMETRIC_KTY = ("RSA", "EC", "OKP")


class JwksCache:
    """The issuer's keys by kid; refreshed when stale, or on an unknown kid (at most every min_refresh_s)."""

    def __init__(self, cfg: JwtConfig) -> None:
        self.cfg = cfg
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> PyJWK:
        age = time.monotonic() - self._fetched
        stale = not self._keys or age > self.cfg.jwks_cache_s
        if stale or (kid not in self._keys and age >= self.cfg.jwks_min_refresh_s):
            await self._refresh()
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise AuthenticationError(f"token signed with unknown key id {kid!r}", code="invalid_token")
        return key

    async def _refresh(self) -> None:
        async with self._lock:
            document = await self._load()
            keys: dict[str | None, PyJWK] = {}
            for jwk in document.get("keys", []):
                if jwk.get("kty") not in _ASYMMETRIC_KTY:
                    continue  # a symmetric key in a JWKS would let anyone holding it mint tokens
                try:
                    keys[jwk.get("kid")] = PyJWK(jwk)
                except jwt.PyJWKError as exc:
                    raise ConfigError(f"gateway.auth.jwt: a JWKS key is unusable ({exc})") from exc
            self._keys, self._fetched = keys, time.monotonic()

    async def _load(self) -> dict[str, Any]:
        try:
            if self.cfg.jwks_file:
                return json.loads(Path(self.cfg.jwks_file).read_text())
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(str(self.cfg.jwks_url))
                response.raise_for_status()
                return response.json()
        except (OSError, ValueError, httpx.HTTPError) as exc:
            where = self.cfg.jwks_file or self.cfg.jwks_url
            raise AuthenticationError(f"cannot load the issuer's keys from {where}", code="jwks_unavailable") from exc


class JwtVerifier:
    def __init__(self, cfg: JwtConfig) -> None:
        self.cfg = cfg
        self.jwks = JwksCache(cfg)

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthenticationError("malformed token", code="invalid_token") from exc
        alg = header.get("alg")
        if alg not in self.cfg.algorithms:
            raise AuthenticationError(
                f"token algorithm {alg!r} is not accepted; accepted: {self.cfg.algorithms}", code="invalid_token"
            )
        key = await self.jwks.key(header.get("kid"))
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=self.cfg.audience, issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_s, options={"require": ["exp", "iss", "aud", "sub"]},
            )  # fmt: skip
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("token expired", code="token_expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError("token not yet valid (nbf/iat in the future)", code="invalid_token") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError("token audience is not this service", code="invalid_token") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError("token issuer is not trusted", code="invalid_token") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(f"invalid token ({type(exc).__name__})", code="invalid_token") from exc
        tenant = claims.get(self.cfg.tenant_claim) or claims["sub"]
        return Identity(subject=f"jwt:{claims['sub']}", kind="jwt", scopes=self._scopes(claims), tenant=str(tenant))

    def _scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        names: set[str] = set()
        for claim in ("scope", "scp", self.cfg.scopes_claim):
            if claim is None:
                continue
            value = claims.get(claim)
            if isinstance(value, str):
                names.update(value.split())
            elif isinstance(value, list):
                names.update(str(v) for v in value)
        return frozenset(names & set(ALL_SCOPES))  # scopes of other services are ignored, not errors
