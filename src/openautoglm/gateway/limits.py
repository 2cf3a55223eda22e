"""Rate limits: requests per minute/second, tokens per minute and concurrent requests, per key, per tenant,
per model and for the whole deployment, on one Limiter (in-process, or Redis shared by every replica).

``LimitsPolicy`` is the pipeline policy (request counts and concurrency: known before the body is read).
``TokenLimits`` runs once the request is parsed: the model's limits and the token budget, reserving
``prompt_tokens + n * max_tokens`` at admission and settling with the real usage at the end.
Responses carry OpenAI's ``x-ratelimit-*`` headers; a refusal is a RateLimitError (429, Retry-After).
"""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from openautoglm.config.traffic import LimitsConfig, RateLimits
from openautoglm.gateway.gcra import Decision, Rate
from openautoglm.gateway.limiter import Charge, Limiter
from openautoglm.gateway.pipeline import GatewayContext, Identity, Outcome
from openautoglm.gateway.traffic_metrics import TrafficMetrics
from openautoglm.protocol.errors import RateLimitError

HEADERS_NOTE = "headers"  # ctx.notes[HEADERS_NOTE]: response headers the transport adds
_SLOTS_NOTE = "limits.slots"


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket: what it limits (for messages and headers) and its rate."""

    subject: str  # "key k1", "tenant acme", "model glm", "deployment"
    unit: str  # "requests" | "tokens"
    per: str  # "min" | "s"
    charge: Charge


def format_reset(seconds: float) -> str:
    """OpenAI's duration format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{int(rest)}s"


def response_headers(unit: str, limits: Sequence[Limit], decisions: Sequence[Decision]) -> dict[str, str]:
    """The headers of the tightest bucket (fewest units left)."""
    if not decisions:
        return {}
    _, decision = min(zip(limits, decisions, strict=True), key=lambda ld: ld[1].remaining)
    return {
        f"x-ratelimit-limit-{unit}": str(decision.limit),
        f"x-ratelimit-remaining-{unit}": str(decision.remaining),
        f"x-ratelimit-reset-{unit}": format_reset(decision.reset_s),
    }


def refusal(limit: Limit, decision: Decision, requested: int) -> RateLimitError:
    name = {"requests": "RPM" if limit.per == "min" else "RPS", "tokens": "TPM"}[limit.unit]
    used = decision.limit - decision.remaining
    return RateLimitError(
        f"Rate limit reached for {limit.subject} on {limit.unit} per {limit.per} ({name}): limit "
        f"{decision.limit}, used {used}, requested {requested}. Please try again in "
        f"{format_reset(decision.retry_after_s)}.",
        retry_after=decision.retry_after_s, code="rate_limit_exceeded", param=name.lower(),
    )  # fmt: skip


class LimitsBook:
    """Which buckets apply to whom, built from LimitsConfig and the key's own record."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg

    def _rate(self, limit: float, period_s: float) -> Rate:
        return Rate.of(limit, period_s, self.cfg.burst_fraction)

    def tenant_limits(self, tenant: str) -> RateLimits:
        return self.cfg.tenants.get(tenant, self.cfg.tenant_defaults)

    def key_limits(self, identity: Identity) -> RateLimits:
        d = self.cfg.key_defaults
        return RateLimits(
            rpm=identity.rpm if identity.rpm is not None else d.rpm,
            tpm=identity.tpm if identity.tpm is not None else d.tpm,
            rps=d.rps,
            max_concurrent=identity.max_concurrent if identity.max_concurrent is not None else d.max_concurrent,
        )

    def subjects(self, identity: Identity | None) -> list[tuple[str, str, RateLimits]]:
        """(bucket key prefix, subject for messages, limits) of the caller's key and tenant."""
        if identity is None or identity.kind == "anonymous":
            return []
        out = [(f"key:{identity.key_id or identity.subject}", f"key {identity.key_id or identity.subject}",
                self.key_limits(identity))]  # fmt: skip
        if identity.tenant is not None:
            out.append((f"tenant:{identity.tenant}", f"tenant {identity.tenant}", self.tenant_limits(identity.tenant)))
        return out

    def request_limits(self, identity: Identity | None) -> list[Limit]:
        out: list[Limit] = []
        if self.cfg.global_rps is not None:
            out.append(self._req("deployment", "global:rps", self.cfg.global_rps, "s"))
        for key, subject, lim in self.subjects(identity):
            out += self._request_buckets(key, subject, lim)
        return out

    def model_request_limits(self, model: str) -> list[Limit]:
        lim = self.cfg.models.get(model)
        return [] if lim is None else self._request_buckets(f"model:{model}", f"model {model}", lim)

    def _request_buckets(self, key: str, subject: str, lim: RateLimits) -> list[Limit]:
        out = []
        if lim.rpm is not None:
            out.append(self._req(subject, f"{key}:rpm", lim.rpm, "min"))
        if lim.rps is not None:
            out.append(self._req(subject, f"{key}:rps", lim.rps, "s"))
        return out

    def _req(self, subject: str, key: str, limit: float, per: str) -> Limit:
        return Limit(subject, "requests", per, Charge(key, self._rate(limit, 60.0 if per == "min" else 1.0)))

    def token_limits(self, identity: Identity | None, model: str, cost: int) -> list[Limit]:
        subjects = self.subjects(identity)
        model_lim = self.cfg.models.get(model)
        if model_lim is not None:
            subjects.append((f"model:{model}", f"model {model}", model_lim))
        return [
            Limit(subject, "tokens", "min", Charge(f"{key}:tpm", self._rate(lim.tpm, 60.0), cost))
            for key, subject, lim in subjects
            if lim.tpm is not None
        ]


async def take(
    limiter: Limiter,
    limits: Sequence[Limit],
    metrics: TrafficMetrics,
    notes: MutableMapping[str, object],
    unit: str,
    requested: int = 1,
) -> list[Decision]:
    """Take every bucket or none, noting the tightest bucket's headers (refusals carry them too); a refusal
    names the first bucket that refused."""
    decisions = await limiter.acquire_all([lim.charge for lim in limits])
    add_headers(notes, response_headers(unit, limits, decisions))
    for lim, decision in zip(limits, decisions, strict=True):
        if not decision.allowed:
            metrics.limited.labels(f"{lim.unit}_per_{lim.per}").inc()
            raise refusal(lim, decision, requested)
    return decisions


def add_headers(notes: MutableMapping[str, object], headers: dict[str, str]) -> None:
    if headers:
        notes.setdefault(HEADERS_NOTE, {}).update(headers)  # type: ignore[union-attr]


class LimitsPolicy:
    """Request rate and concurrency of the caller's key and tenant, and the deployment's requests/s."""

    name = "limits"

    def __init__(self, book: LimitsBook, limiter: Limiter, metrics: TrafficMetrics) -> None:
        self.book = book
        self.limiter = limiter
        self.metrics = metrics

    async def before(self, ctx: GatewayContext) -> None:
        if ctx.required_scope is None:
            return
        limits = self.book.request_limits(ctx.identity)
        if limits:
            await take(self.limiter, limits, self.metrics, ctx.notes, "requests")
        try:
            await self._slots(ctx)
        except RateLimitError:
            await self.limiter.refund([lim.charge for lim in limits])
            raise

    async def _slots(self, ctx: GatewayContext) -> None:
        holder = ctx.request_id or uuid.uuid4().hex
        held: list[tuple[str, str]] = []
        for key, subject, lim in self.book.subjects(ctx.identity):
            if lim.max_concurrent is None:
                continue
            lease = self.book.cfg.concurrency_lease_s
            if not await self.limiter.acquire_slot(key, lim.max_concurrent, holder, lease):
                for k, h in held:
                    await self.limiter.release_slot(k, h)
                self.metrics.limited.labels("concurrent").inc()
                raise RateLimitError(
                    f"Concurrency limit reached for {subject}: at most {lim.max_concurrent} requests at once",
                    retry_after=1.0, code="rate_limit_exceeded", param="max_concurrent",
                )  # fmt: skip
            held.append((key, holder))
        ctx.notes[_SLOTS_NOTE] = held

    async def after(self, ctx: GatewayContext, outcome: Outcome) -> None:
        for key, holder in ctx.notes.pop(_SLOTS_NOTE, ()):
            await self.limiter.release_slot(key, holder)


class TokenReservation:
    """Tokens reserved for one generation; ``settle`` gives back (or charges) the difference with real use."""

    def __init__(self, limiter: Limiter, charges: list[Charge], reserved: int) -> None:
        self.limiter = limiter
        self.charges = charges
        self.reserved = reserved
        self.settled = False

    async def settle(self, used: int) -> None:
        if self.settled:
            return
        self.settled = True
        diff = self.reserved - used
        if diff and self.charges:
            await self.limiter.refund([Charge(c.key, c.rate, diff) for c in self.charges])


class TokenLimits:
    """The model's request limits and every token budget that applies, once the request is parsed."""

    def __init__(self, book: LimitsBook, limiter: Limiter, metrics: TrafficMetrics) -> None:
        self.book = book
        self.limiter = limiter
        self.metrics = metrics

    async def reserve(
        self, identity: Identity | None, model: str, tokens: int, notes: MutableMapping[str, object]
    ) -> TokenReservation:
        model_limits = self.book.model_request_limits(model)
        if model_limits:
            before = dict(notes.get(HEADERS_NOTE, {}))  # type: ignore[call-overload]
            await take(self.limiter, model_limits, self.metrics, notes, "requests")
            if "x-ratelimit-limit-requests" in before:  # the key's own request limit is what the client sees
                add_headers(notes, {k: v for k, v in before.items() if k.startswith("x-ratelimit-")})
        limits = self.book.token_limits(identity, model, tokens)
        for lim in limits:
            if tokens > lim.charge.rate.limit:
                self.metrics.limited.labels("tokens_per_min").inc()
                raise RateLimitError(
                    f"Request too large for {lim.subject}: it may use {tokens} tokens (prompt plus max_tokens), "
                    f"more than the limit of {lim.charge.rate.limit} tokens per min (TPM); lower max_tokens",
                    code="tokens_exceed_limit", param="max_tokens",
                )  # fmt: skip
        try:
            await take(self.limiter, limits, self.metrics, notes, "tokens", tokens)
        except RateLimitError:
            await self.limiter.refund([lim.charge for lim in model_limits])
            raise
        return TokenReservation(self.limiter, [lim.charge for lim in limits], tokens)
