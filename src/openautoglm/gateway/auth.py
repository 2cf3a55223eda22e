"""The auth policy: who is calling (API key, JWT, client certificate) and may they do this (the scope table).

Every failure is a 401 (or 403 for a missing scope), is audited with its reason, and counts towards the
brute-force block of the client address. Key records are cached for at most ``key_cache_ttl_s`` (≤ 1 s), and
every change (revoke, disable, rotate) is announced through SharedState so replicas drop their copy at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone

from openautoglm.config.gateway import AuthConfig
from openautoglm.gateway.audit import AUTH_BLOCK, AUTH_DENIED, AUTH_FAILURE, Auditor
from openautoglm.gateway.bruteforce import BruteForceGuard
from openautoglm.gateway.jwt import JwtVerifier
from openautoglm.gateway.keys import KEY_PREFIX, parse_key, secret_matches
from openautoglm.gateway.pipeline import GatewayContext, Identity, Outcome
from openautoglm.gateway.scopes import ALL_SCOPES
from openautoglm.protocol.errors import AuthenticationError, PermissionDeniedError
from openautoglm.store.keys import ApiKeyRecord, ApiKeyRepository
from openautoglm.store.shared_state import SharedState, Subscription

log = logging.getLogger(__name__)
INVALIDATE_CHANNEL = "keys.invalidate"
ANONYMOUS = Identity(subject="anonymous", kind="anonymous", scopes=frozenset(ALL_SCOPES))
_TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and replica


class KeyAuthenticator:
    """Checks ``sk-agl-…`` keys against the store, through a short-TTL cache invalidated by pub/sub."""

    def __init__(self, repo: ApiKeyRepository, server_secret: bytes, cache_ttl_s: float) -> None:
        self.repo = repo
        self.server_secret = server_secret
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._touched: dict[str, float] = {}
        self._subscription: Subscription | None = None

    async def listen(self, state: SharedState) -> None:
        self._subscription = await state.subscribe(INVALIDATE_CHANNEL, self.invalidate)

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()

    def invalidate(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    async def _record(self, key_id: str) -> ApiKeyRecord | None:
        cached = self._cache.get(key_id)
        if cached is not None and time.monotonic() - cached[0] < self.cache_ttl_s:
            return cached[1]
        record = await asyncio.to_thread(self.repo.get, key_id)
        self._cache[key_id] = (time.monotonic(), record)
        if len(self._cache) > 10_000:  # unknown ids from scanners must not grow it without bound
            self._cache.clear()
        return record

    async def authenticate(self, token: str) -> Identity:
        parsed = parse_key(token)
        if parsed is None:
            raise AuthenticationError("malformed API key: expected sk-agl-<id>-<secret>", code="invalid_api_key")
        key_id, secret = parsed
        record = await self._record(key_id)
        now = datetime.now(timezone.utc)
        which = None if record is None else secret_matches(self.server_secret, record, secret, now)
        if record is None or which is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        # Only a caller holding the secret learns the key's state.
        if record.revoked_at is not None:
            raise AuthenticationError(f"API key {key_id} is revoked", code="key_revoked")
        if record.disabled:
            raise AuthenticationError(f"API key {key_id} is disabled", code="key_disabled")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthenticationError(f"API key {key_id} expired", code="key_expired")
        self._touch(key_id)
        return Identity(
            subject=f"key:{key_id}", kind="api_key", scopes=frozenset(record.scopes), tenant=record.owner,
            key_id=key_id, models=record.models, rpm=record.rpm, tpm=record.tpm,
            max_concurrent=record.max_concurrent,
        )  # fmt: skip

    def _touch(self, key_id: str) -> None:
        last = self._touched.get(key_id, 0.0)
        if time.monotonic() - last < _TOUCH_EVERY_S:
            return
        self._touched[key_id] = time.monotonic()
        task = asyncio.get_running_loop().run_in_executor(None, self.repo.touch, key_id, datetime.now(timezone.utc))
        task.add_done_callback(_log_touch_failure)


def _log_touch_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("could not record an API key's last use: %s", type(fut.exception()).__name__)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


class AuthPolicy:
    name = "auth"

    def __init__(
        self,
        cfg: AuthConfig,
        keys: KeyAuthenticator | None,
        auditor: Auditor,
        guard: BruteForceGuard | None = None,
        jwt: JwtVerifier | None = None,
        cert_identities: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.keys = keys
        self.auditor = auditor
        self.guard = guard
        self.jwt = jwt
        self.cert_identities = dict(cert_identities or {})

    async def before(self, ctx: GatewayContext) -> None:
        if ctx.required_scope is None:
            return
        if not self.cfg.required:
            ctx.identity = ANONYMOUS
            return
        if self.guard is not None:
            await self.guard.check(ctx.client)
        try:
            identity = await self.authenticate(ctx)
        except AuthenticationError as exc:
            await self._failed(ctx, exc)
            raise
        if ctx.required_scope not in identity.scopes:
            await self.auditor.record(
                identity.subject, AUTH_DENIED, ctx.operation, "denied", request_id=ctx.request_id,
                client=ctx.client, detail={"needs": ctx.required_scope},
            )  # fmt: skip
            raise PermissionDeniedError(
                f"{ctx.operation} needs scope '{ctx.required_scope}'; this identity has {sorted(identity.scopes)}",
                code="insufficient_scope",
            )
        ctx.identity = identity

    async def after(self, ctx: GatewayContext, outcome: Outcome) -> None:
        return None

    async def authenticate(self, ctx: GatewayContext) -> Identity:
        token = bearer_token(ctx.headers)
        if token is None:
            if ctx.peer_subject is not None:
                return self._certificate_identity(ctx.peer_subject)
            raise AuthenticationError(
                "missing credentials: send 'Authorization: Bearer <API key or token>'", code="missing_credentials"
            )
        if token.startswith(KEY_PREFIX) and self.keys is not None:
            return await self.keys.authenticate(token)
        if self.jwt is not None and token.count(".") == 2:
            return await self.jwt.verify(token)
        raise AuthenticationError("malformed credentials: not an Open-AutoGLM API key or an accepted token")

    def _certificate_identity(self, subject: str) -> Identity:
        scopes = self.cert_identities.get(subject)
        if scopes is None:
            raise AuthenticationError(f"client certificate {subject!r} is not mapped to an identity")
        return Identity(subject=f"cert:{subject}", kind="mtls", scopes=frozenset(scopes), tenant=subject)

    async def _failed(self, ctx: GatewayContext, exc: AuthenticationError) -> None:
        token = bearer_token(ctx.headers) or ""
        parsed = parse_key(token)
        actor = f"key:{parsed[0]}" if parsed else "anonymous"  # never the secret or the token itself
        await self.auditor.record(
            actor, AUTH_FAILURE, ctx.operation, "denied", request_id=ctx.request_id, client=ctx.client,
            detail={"reason": exc.code or "invalid_credentials", "transport": ctx.transport},
        )  # fmt: skip
        if self.guard is not None and await self.guard.failure(ctx.client):
            log.warning("blocking %s after repeated authentication failures", ctx.client)
            await self.auditor.record(
                "system", AUTH_BLOCK, ctx.client or "?", "blocked", request_id=ctx.request_id, client=ctx.client,
                detail={"block_s": self.guard.cfg.block_s, "max_failures": self.guard.cfg.max_failures},
            )  # fmt: skip
