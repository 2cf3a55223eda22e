"""What the router knows of each backend's health: active probes, passive outlier detection, circuit breaker.

A backend takes traffic when its probes say healthy, it is not ejected as an outlier and its breaker lets
the request through. The three look at different things: probes at an idle backend, outlier detection at the
error rate of real traffic, the breaker at consecutive failures (and it half-opens with one trial request).
"""

from __future__ import annotations

import time
from enum import Enum

from openautoglm.backends.base import Backend
from openautoglm.config.router import BackendConfig, BreakerConfig, HealthCheckConfig, OutlierConfig
from openautoglm.router.stats import CountWindow, Ewma


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, cfg: BreakerConfig) -> None:
        self.cfg = cfg
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self._trial = False  # a half-open trial request is in flight

    def available(self, now: float) -> bool:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cfg.cooldown_s:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            return not self._trial
        return self.state is BreakerState.CLOSED

    def acquire(self) -> None:
        """The router sends this backend a request; when half-open it is the one trial."""
        if self.state is BreakerState.HALF_OPEN:
            self._trial = True

    def success(self) -> None:
        self.failures = 0
        self._trial = False
        self.state = BreakerState.CLOSED

    def failure(self, now: float) -> None:
        self.failures += 1
        self._trial = False
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.cfg.failure_threshold:
            self.state = BreakerState.OPEN
            self.opened_at = now

    def release(self) -> None:
        """The request ended without a verdict (the client left): a half-open breaker may try again."""
        self._trial = False


class ProbeHealth:
    """Active probe results with hysteresis: unhealthy after N failures in a row, healthy after M successes."""

    def __init__(self, cfg: HealthCheckConfig) -> None:
        self.cfg = cfg
        self.healthy = True  # optimistic: a new backend gets traffic until probes say otherwise
        self._fails = 0
        self._oks = 0
        self.detail = ""

    def record(self, ok: bool, detail: str = "") -> None:
        self.detail = detail
        if ok:
            self._oks, self._fails = self._oks + 1, 0
            if not self.healthy and self._oks >= self.cfg.healthy_threshold:
                self.healthy = True
        else:
            self._fails, self._oks = self._fails + 1, 0
            if self.healthy and self._fails >= self.cfg.unhealthy_threshold:
                self.healthy = False


class BackendState:
    """One backend with everything the router tracks about it."""

    def __init__(
        self,
        backend: Backend,
        *,
        health: HealthCheckConfig,
        breaker: BreakerConfig,
        outlier: OutlierConfig,
        ewma_decay_s: float,
        config: BackendConfig | None = None,
    ) -> None:
        self.backend = backend
        self.config = config  # what it was built from: a reload keeps the state of an unchanged backend
        self.probe = ProbeHealth(health)
        self.breaker = CircuitBreaker(breaker)
        self.outlier_cfg = outlier
        self.window = CountWindow(outlier.window)
        self.ejected_until = 0.0
        self.latency = Ewma(ewma_decay_s)
        self.requests = 0
        self.failures = 0

    @property
    def name(self) -> str:
        return self.backend.name

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def available(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.probe.healthy and not self.ejected(now) and self.breaker.available(now)

    def record(self, ok: bool, latency_s: float | None, *, may_eject: bool, now: float | None = None) -> None:
        """A request's verdict (``ok`` False: the backend failed it). ``may_eject``: the group's ejection cap
        still allows ejecting one more."""
        now = time.monotonic() if now is None else now
        self.requests += 1
        self.window.add(ok)
        if ok:
            self.breaker.success()
            if latency_s is not None:
                self.latency.add(latency_s, now)
            return
        self.failures += 1
        self.breaker.failure(now)
        w, cfg = self.window, self.outlier_cfg
        if may_eject and w.requests >= cfg.min_requests and w.error_rate > cfg.max_error_rate:
            self.ejected_until = now + cfg.ejection_s
            w.clear()

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "name": self.name,
            "version": self.backend.version,
            "weight": self.backend.weight,
            "healthy": self.probe.healthy,
            "probe_detail": self.probe.detail,
            "breaker": self.breaker.state.value,
            "ejected": self.ejected(now),
            "in_flight": self.backend.in_flight,
            "ewma_latency_s": round(self.latency.value, 6),
            "requests": self.requests,
            "failures": self.failures,
        }
