"""Holt's linear trend fitted online on irregularly spaced samples, and the time until it crosses a limit.

The trend is kept per second so that a late tick does not bend the forecast: each update first projects the
level over the elapsed time, then blends in the new observation (Holt 1957, with a time-scaled trend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Projection:
    level: float
    trend_per_s: float
    time_to_limit_s: float | None  # None: not approaching the limit; 0: already there
    samples: int


class HoltForecaster:
    def __init__(self, alpha: float, beta: float) -> None:
        if not (0 < alpha <= 1 and 0 < beta <= 1):
            raise ValueError(f"alpha and beta must lie in (0, 1], got {alpha}, {beta}")
        self.alpha = alpha
        self.beta = beta
        self.level: float | None = None
        self.trend = 0.0  # units per second
        self.last_t: float | None = None
        self.samples = 0

    def update(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            return
        if self.level is None or self.last_t is None:
            self.level, self.last_t, self.samples = value, t, 1
            return
        dt = t - self.last_t
        if dt <= 0:  # a repeated timestamp carries no slope
            return
        if self.samples == 1:  # the first difference is the best first guess of the slope
            self.trend = (value - self.level) / dt
            self.level, self.last_t, self.samples = value, t, 2
            return
        predicted = self.level + self.trend * dt
        level = self.alpha * value + (1 - self.alpha) * predicted
        self.trend = self.beta * (level - self.level) / dt + (1 - self.beta) * self.trend
        self.level, self.last_t = level, t
        self.samples += 1

    def project(self, limit: float) -> Projection | None:
        """Where the fit stands and when it reaches ``limit`` (approached from below); None before any sample."""
        if self.level is None:
            return None
        if self.level >= limit:
            ttl: float | None = 0.0
        elif self.trend > 0:
            ttl = (limit - self.level) / self.trend
        else:
            ttl = None
        return Projection(self.level, self.trend, ttl, self.samples)


def human_duration(seconds: float) -> str:
    """``~14 min`` style: what an operator reads at a glance."""
    if seconds < 90:
        return f"~{max(round(seconds), 0)} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.1f} days"
