"""Canary rollout of a deployment: weighted, sticky split between a stable and a canary version, automatic
analysis over a sliding window, promotion step by step and rollback at once; every step goes to the audit hook.

Stickiness: a user's bucket (a stable hash of deployment and user, 0..9999) decides, so a user stays on one
version while the weight holds, and raising the weight only moves users from stable to canary, never back.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from openautoglm.config.router import AnalysisConfig
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.router.stats import TimeWindow, WindowSummary
from openautoglm.router.strategies import stable_hash

logger = logging.getLogger(__name__)

BUCKETS = 10_000
Action = Literal["start", "promote", "complete", "rollback"]


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    deployment: str
    action: Action
    version: str
    weight_from: float
    weight_to: float
    actor: str  # "auto" for the analysis, else the operator
    reason: str
    canary: dict[str, Any] = field(default_factory=dict)
    stable: dict[str, Any] = field(default_factory=dict)


AuditHook = Callable[[RolloutEvent], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["hold", "promote", "rollback"]
    reason: str


def decide(canary: WindowSummary, stable: WindowSummary, cfg: AnalysisConfig, time_at_step_s: float) -> Decision:
    """The analysis: rollback when the canary is worse than stable by more than the thresholds, promote when
    it has had enough requests and time at this step, hold otherwise."""
    if canary.requests < cfg.min_requests:
        return Decision("hold", f"canary has {canary.requests} of {cfg.min_requests} requests needed")
    increase = canary.error_rate - stable.error_rate
    if increase > cfg.max_error_rate_increase:
        return Decision(
            "rollback",
            f"canary error rate {canary.error_rate:.3f} exceeds stable {stable.error_rate:.3f} by more than "
            f"{cfg.max_error_rate_increase}",
        )
    if canary.p95_s is not None and stable.p95_s:
        ratio = canary.p95_s / stable.p95_s
        if ratio > cfg.max_p95_ratio and canary.p95_s - stable.p95_s > cfg.min_p95_increase_s:
            return Decision(
                "rollback",
                f"canary p95 {canary.p95_s:.3f}s is {ratio:.2f}x stable's {stable.p95_s:.3f}s "
                f"(max {cfg.max_p95_ratio})",
            )
    if time_at_step_s < cfg.step_interval_s:
        return Decision("hold", f"{time_at_step_s:.0f}s of {cfg.step_interval_s:.0f}s at this step")
    return Decision("promote", "canary within thresholds")


class Rollout:
    def __init__(self, deployment: str, stable_version: str, cfg: AnalysisConfig, audit: AuditHook | None = None):
        self.deployment = deployment
        self.stable_version = stable_version
        self.cfg = cfg
        self.audit = audit
        self.canary_version: str | None = None
        self.steps: list[float] = []
        self.weight = 0.0
        self.auto = True
        self.status = "idle"  # idle | running | complete | rolled_back
        self.step_started = 0.0
        self.windows: dict[str, TimeWindow] = {}
        self.history: list[RolloutEvent] = []

    # --- routing ---------------------------------------------------------------------------------------------

    def version_for(self, key: str) -> str:
        """The version a request with this sticky key (the user, else the request id) goes to."""
        if self.canary_version is None or self.weight <= 0:
            return self.stable_version
        bucket = stable_hash(f"{self.deployment}\x00{key}") % BUCKETS
        return self.canary_version if bucket < self.weight * BUCKETS / 100.0 else self.stable_version

    def record(self, version: str, ok: bool, latency_s: float, now: float | None = None) -> None:
        window = self.windows.get(version)
        if window is not None:
            window.add(ok, latency_s, now)

    # --- operations --------------------------------------------------------------------------------------------

    async def start(self, version: str, steps: list[float], *, auto: bool = True, actor: str = "operator") -> None:
        if self.canary_version is not None:
            raise InvalidRequestError(
                f"deployment {self.deployment!r} already rolls out {self.canary_version!r}; promote or roll back first",
                param="version",
            )
        if version == self.stable_version:
            raise InvalidRequestError(f"version {version!r} is already stable", param="version")
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
            raise InvalidRequestError(f"steps must rise within (0, 100], got {steps}", param="steps")
        self.canary_version, self.steps, self.auto, self.status = version, list(steps), auto, "running"
        self.windows = {v: TimeWindow(self.cfg.window_s) for v in (self.stable_version, version)}
        await self._set_weight(steps[0], "start", actor, f"rollout of {version!r} started")

    def resume(self, version: str, steps: list[float], weight: float, *, auto: bool) -> None:
        """Take up a rollout the configuration describes (at start-up or reload): no audit event, nothing new."""
        self.canary_version, self.steps, self.auto, self.status = version, list(steps), auto, "running"
        self.weight, self.step_started = weight, time.monotonic()
        self.windows = {v: TimeWindow(self.cfg.window_s) for v in (self.stable_version, version)}

    async def promote(self, *, actor: str = "operator", reason: str = "promoted by the operator") -> None:
        canary = self._require_running()
        later = [s for s in self.steps if s > self.weight]
        if later:
            await self._set_weight(later[0], "promote", actor, reason)
            return
        await self._event("complete", actor, reason, self.weight, 100.0)
        self.stable_version, self.canary_version = canary, None
        self.weight, self.status = 0.0, "complete"
        self.windows = {}

    async def rollback(self, *, actor: str = "operator", reason: str = "rolled back by the operator") -> None:
        self._require_running()
        await self._event("rollback", actor, reason, self.weight, 0.0)
        self.canary_version, self.weight, self.status = None, 0.0, "rolled_back"
        self.windows = {}

    async def analyze(self, now: float | None = None) -> Decision | None:
        """Run the analysis once and act on it (when ``auto``); None when no rollout runs."""
        if self.canary_version is None:
            return None
        now = time.monotonic() if now is None else now
        decision = decide(
            self.windows[self.canary_version].summary(now),
            self.windows[self.stable_version].summary(now),
            self.cfg,
            now - self.step_started,
        )
        if self.auto and decision.action == "rollback":
            await self.rollback(actor="auto", reason=decision.reason)
        elif self.auto and decision.action == "promote":
            await self.promote(actor="auto", reason=decision.reason)
        return decision

    def status_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "deployment": self.deployment,
            "status": self.status,
            "stable_version": self.stable_version,
            "canary_version": self.canary_version,
            "weight": self.weight,
            "steps": self.steps,
            "auto": self.auto,
            "windows": {v: asdict(w.summary(now)) for v, w in self.windows.items()},
            "history": [asdict(e) for e in self.history[-20:]],
        }

    # --- internals ---------------------------------------------------------------------------------------------

    def _require_running(self) -> str:
        if self.canary_version is None:
            raise InvalidRequestError(f"deployment {self.deployment!r} has no rollout running", param="deployment")
        return self.canary_version

    async def _set_weight(self, weight: float, action: Action, actor: str, reason: str) -> None:
        await self._event(action, actor, reason, self.weight, weight)
        self.weight = weight
        self.step_started = time.monotonic()
        for window in self.windows.values():
            window.clear()  # judge each step on its own traffic

    async def _event(self, action: Action, actor: str, reason: str, before: float, after: float) -> None:
        now = time.monotonic()
        windows = {v: asdict(w.summary(now)) for v, w in self.windows.items()}
        canary = self.canary_version or ""
        event = RolloutEvent(
            self.deployment, action, canary, before, after, actor, reason,
            canary=windows.get(canary, {}), stable=windows.get(self.stable_version, {}),
        )  # fmt: skip
        self.history.append(event)
        logger.info("rollout %s %s: %s %.1f%% → %.1f%% (%s)", self.deployment, action, canary, before, after, reason)
        if self.audit is not None:
            result = self.audit(event)
            if inspect.isawaitable(result):
                await result
