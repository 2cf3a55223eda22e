"""Latency EWMA and sliding windows of request outcomes (for outlier detection and canary analysis)."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


class Ewma:
    """Exponentially weighted moving average with a time constant: old samples fade by age, not by count, so a
    backend that was slow a minute ago and has been idle since is not punished forever."""

    def __init__(self, decay_s: float, initial: float = 0.0) -> None:
        self.decay_s = decay_s
        self.value = initial
        self._stamp: float | None = None

    def add(self, sample: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._stamp is None:
            self.value = sample
        else:
            w = math.exp(-max(now - self._stamp, 0.0) / self.decay_s)
            self.value = self.value * w + sample * (1.0 - w)
        self._stamp = now
        return self.value


@dataclass(frozen=True, slots=True)
class Outcome:
    at: float
    ok: bool
    latency_s: float


@dataclass(frozen=True, slots=True)
class WindowSummary:
    requests: int
    errors: int
    p95_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
    return ordered[rank - 1]


class TimeWindow:
    """Outcomes of the last ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[Outcome] = deque()

    def add(self, ok: bool, latency_s: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._items.append(Outcome(now, ok, latency_s))
        self._trim(now)

    def summary(self, now: float | None = None) -> WindowSummary:
        self._trim(time.monotonic() if now is None else now)
        errors = sum(1 for o in self._items if not o.ok)
        # Latency of successes only: a fast failure must not make a version look quick.
        p95 = percentile([o.latency_s for o in self._items if o.ok], 95)
        return WindowSummary(len(self._items), errors, p95)

    def clear(self) -> None:
        self._items.clear()

    def _trim(self, now: float) -> None:
        while self._items and self._items[0].at < now - self.window_s:
            self._items.popleft()


class CountWindow:
    """Success/failure of the last ``size`` requests."""

    def __init__(self, size: int) -> None:
        self._items: deque[bool] = deque(maxlen=size)

    def add(self, ok: bool) -> None:
        self._items.append(ok)

    def clear(self) -> None:
        self._items.clear()

    @property
    def requests(self) -> int:
        return len(self._items)

    @property
    def error_rate(self) -> float:
        return (len(self._items) - sum(self._items)) / len(self._items) if self._items else 0.0
