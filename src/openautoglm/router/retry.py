"""Retry policy: exponential backoff with full jitter, and a budget so retries cannot multiply load.

The budget is Finagle's and Envoy's idea: retries may add at most ``ratio`` of the requests of the last
``window_s`` seconds, plus ``min_per_s`` always, so during an outage the extra load stays bounded instead of
every request turning into ``max_attempts`` requests.
"""

from __future__ import annotations

import random
import time
from collections import deque

from openautoglm.config.router import RetryConfig


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1 for the first retry): uniform in [0, min(max, base·2^(n-1))]."""
    cap = min(max_s, base_s * (2 ** (attempt - 1)))
    return (rng or random).uniform(0.0, cap)


class RetryBudget:
    def __init__(self, cfg: RetryConfig, window_s: float = 10.0) -> None:
        self.ratio = cfg.budget_ratio
        self.min_per_s = cfg.budget_min_per_s
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def request(self, now: float | None = None) -> None:
        self._requests.append(time.monotonic() if now is None else now)

    def try_retry(self, now: float | None = None) -> bool:
        """Take one retry from the budget; False (and counted in ``refused``) when it is spent."""
        now = time.monotonic() if now is None else now
        for q in (self._requests, self._retries):
            while q and q[0] < now - self.window_s:
                q.popleft()
        allowed = self.ratio * len(self._requests) + self.min_per_s * self.window_s
        if len(self._retries) + 1 > allowed:
            self.refused += 1
            return False
        self._retries.append(now)
        return True
