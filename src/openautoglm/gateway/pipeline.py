"""The policy pipeline: each policy has ``async before(ctx)`` and ``async after(ctx, outcome)``; the order is
configuration (``gateway.policies``). A policy rejects a request by raising an AutoGLMError in ``before``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from openautoglm.observability import tracing
from openautoglm.protocol.errors import ConfigError


@dataclass(frozen=True)
class Identity:
    """Who is calling: an API key, a JWT subject, a client certificate, or anonymous (auth turned off)."""

    subject: str
    kind: str  # "api_key" | "jwt" | "mtls" | "anonymous"
    scopes: frozenset[str]
    tenant: str | None = None
    key_id: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


@dataclass
class GatewayContext:
    """One request as the gateway sees it, transport-neutral."""

    transport: str  # "http" | "grpc"
    operation: str  # "POST /v1/completions" or the gRPC method name
    required_scope: str | None  # None: open
    client: str | None  # the client address that counts (see bruteforce.client_address)
    headers: Mapping[str, str]  # lower-case names (HTTP headers or gRPC metadata)
    request_id: str | None = None
    peer_subject: str | None = None  # common name of a verified client certificate (mutual TLS)
    identity: Identity | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    status: int  # HTTP status; gRPC calls use the equivalent HTTP status of their code
    error: str | None = None


class Policy(Protocol):
    name: str

    async def before(self, ctx: GatewayContext) -> None: ...

    async def after(self, ctx: GatewayContext, outcome: Outcome) -> None: ...


class Pipeline:
    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = tuple(policies)

    async def before(self, ctx: GatewayContext) -> None:
        """Run every policy's ``before`` in order; those that ran get ``after`` (in reverse), even on failure."""
        ran: list[Policy] = ctx.notes.setdefault("_policies_ran", [])
        for policy in self.policies:
            ran.append(policy)
            with tracing.span(f"gateway.{policy.name}"):
                await policy.before(ctx)

    async def after(self, ctx: GatewayContext, outcome: Outcome) -> None:
        for policy in reversed(ctx.notes.get("_policies_ran", [])):
            await policy.after(ctx, outcome)


def build_pipeline(order: Sequence[str], available: Mapping[str, Policy]) -> Pipeline:
    unknown = [name for name in order if name not in available]
    if unknown:
        raise ConfigError(f"gateway.policies: unknown policies {unknown}; available: {sorted(available)}")
    return Pipeline([available[name] for name in order])
