"""Per-app serving state: readiness, drain, what is in flight. One instance per app, on ``app.state``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Paths that keep answering while draining: probes and metrics, so orchestrators can watch the drain.
PROBE_PATHS = frozenset({"/healthz", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"})


@dataclass
class ServerState:
    draining: bool = False
    drain_started: float | None = None
    active_requests: int = 0  # HTTP requests being handled, probes excluded
    engine_requests: set[str] = field(default_factory=set)  # engine request ids in flight (for drain aborts)

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
