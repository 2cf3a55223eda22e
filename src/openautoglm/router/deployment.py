"""A deployment: the backends serving one model name, their balancer and rollout, and context-aware filtering.

Filtering happens before balancing, in this order: capability (modalities), context length, priority, then
the version the rollout assigned, then health (probes, outlier ejection, breaker). A request no backend could
ever take gets the specific 4xx; one whose backends are only unhealthy right now gets a 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from openautoglm.backends.base import Capabilities
from openautoglm.config.router import DeploymentConfig, RouterConfig
from openautoglm.protocol.errors import ContextLengthExceededError, ServiceUnavailableError, UnsupportedMediaTypeError
from openautoglm.protocol.request import GenerationRequest
from openautoglm.router.health import BackendState
from openautoglm.router.rollout import AuditHook, Rollout
from openautoglm.router.strategies import Balancer, ConsistentHash, make_balancer

TokenCounter = Callable[[GenerationRequest], int]


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """A lower bound on the prompt's tokens without a tokenizer (about four UTF-8 bytes per token or more), so
    a backend is only skipped for context when the prompt surely does not fit."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    if request.prompt is not None:
        return len(request.prompt.encode("utf-8")) // 4
    size = 0
    for m in request.messages or []:
        content = m.get("content")
        if isinstance(content, str):
            size += len(content.encode("utf-8"))
        elif isinstance(content, list):
            size += sum(len(str(p.get("text", "")).encode("utf-8")) for p in content if isinstance(p, dict))
    return size // 4


def required_modalities(request: GenerationRequest) -> frozenset[str]:
    found = {"text"}
    for m in request.messages or []:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    found.add("image")
                elif kind == "input_audio":
                    found.add("audio")
    return frozenset(found)


def affinity_key(request: GenerationRequest, by: str, prefix_chars: int) -> str:
    if by == "user":
        user = request.metadata.get("user")
        return str(user) if user is not None else request.request_id
    if request.prompt_token_ids is not None:
        return ",".join(map(str, request.prompt_token_ids[: max(prefix_chars // 4, 1)]))
    if request.prompt is not None:
        return request.prompt[:prefix_chars]
    text = "".join(f"{m.get('role')}:{m.get('content')}\n" for m in request.messages or [])
    return text[:prefix_chars]


@dataclass(frozen=True, slots=True)
class Needs:
    modalities: frozenset[str]
    prompt_tokens: int
    priority: int


class Deployment:
    def __init__(
        self, cfg: DeploymentConfig, router_cfg: RouterConfig, states: list[BackendState], audit: AuditHook | None
    ) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self.router_cfg = router_cfg
        self.static: dict[str, BackendState] = {s.name: s for s in states}
        self.discovered: dict[str, BackendState] = {}
        self.balancer: Balancer = make_balancer(cfg.strategy)
        self.rollout = Rollout(cfg.model, cfg.stable_version, router_cfg.analysis, audit)
        if cfg.canary is not None:
            c = cfg.canary
            self.rollout.resume(c.version, c.steps, c.weight or c.steps[0], auto=c.auto)

    @property
    def states(self) -> list[BackendState]:
        return [*self.static.values(), *self.discovered.values()]

    def needs(self, request: GenerationRequest, count: TokenCounter) -> Needs:
        return Needs(required_modalities(request), count(request), request.priority)

    def pick(self, request: GenerationRequest, version: str, needs: Needs, exclude: set[str]) -> BackendState:
        capable = self._capable(needs)
        if isinstance(self.balancer, ConsistentHash):
            self.balancer.rebuild_for([s for s in self.states if s.backend.version == version] or self.states)
        now = time.monotonic()
        up = [s for s in capable if s.available(now)]
        # Backends not tried yet for this request first; the same one again (after backoff) when it is the only one.
        fresh = [s for s in up if s.name not in exclude] or up
        preferred = [s for s in fresh if s.backend.version == version]
        # The assigned version's backends, else any live version's (a canary with no healthy backend sends its
        # users to stable rather than failing them).
        pool = preferred or [s for s in fresh if s.backend.version in self._live_versions()]
        if not pool:
            down = ", ".join(f"{s.name} ({self._why_down(s, now)})" for s in capable) or "none"
            raise ServiceUnavailableError(
                f"no backend of model {self.model!r} can take the request now; backends: {down}",
                retry_after=1.0,
                code="no_healthy_backend",
            )
        key = affinity_key(request, self.cfg.affinity_key, self.cfg.affinity_prefix_chars)
        return self.balancer.pick(pool, key)

    def capabilities(self) -> Capabilities:
        """What the deployment as a whole takes: any backend's modalities, the longest context one of them
        reports (None when none does), streaming when one streams. Requests are still filtered per backend."""
        caps = [s.backend.capabilities for s in self.states]
        contexts = [c.max_context for c in caps if c.max_context is not None]
        return Capabilities(
            modalities=frozenset().union(*(c.modalities for c in caps)) or frozenset({"text"}),
            max_context=max(contexts) if contexts else None,
            streaming=any(c.streaming for c in caps),
        )

    def may_eject(self) -> bool:
        states = self.states
        now = time.monotonic()
        ejected = sum(1 for s in states if s.ejected(now))
        return (ejected + 1) * 100.0 <= self.router_cfg.outlier.max_ejected_percent * len(states)

    def _live_versions(self) -> set[str]:
        r = self.rollout
        return {r.stable_version} | ({r.canary_version} if r.canary_version else set())

    def _capable(self, needs: Needs) -> list[BackendState]:
        states = self.states
        if not states:
            raise ServiceUnavailableError(
                f"model {self.model!r} has no backends right now (discovery has found none)",
                retry_after=1.0,
                code="no_backend",
            )
        out = [s for s in states if needs.modalities <= s.backend.capabilities.modalities]
        if not out:
            raise UnsupportedMediaTypeError(
                f"model {self.model!r} has no backend accepting {', '.join(sorted(needs.modalities))} input",
                param="messages",
                code="unsupported_modality",
            )
        fits = [s for s in out if (s.backend.capabilities.max_context or needs.prompt_tokens) >= needs.prompt_tokens]
        if not fits:
            longest = max(s.backend.capabilities.max_context or 0 for s in out)
            raise ContextLengthExceededError(
                f"the prompt (at least {needs.prompt_tokens} tokens) exceeds the longest context of model "
                f"{self.model!r}'s backends ({longest} tokens)"
            )
        allowed = [s for s in fits if s.backend.max_priority is None or needs.priority <= s.backend.max_priority]
        if not allowed:
            raise ServiceUnavailableError(
                f"no backend of model {self.model!r} takes requests of priority {needs.priority}",
                code="no_backend_for_priority",
            )
        return allowed

    @staticmethod
    def _why_down(s: BackendState, now: float) -> str:
        if not s.probe.healthy:
            return f"failing health probes: {s.probe.detail}"
        if s.ejected(now):
            return "ejected as an outlier"
        return f"circuit breaker {s.breaker.state.value}"
