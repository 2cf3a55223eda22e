"""Robust baselines that flag anomalies in a stream of samples, and forecast rules over Holt fits.

A baseline (median/MAD over a window, or EWMA mean and variance) scores each sample in robust standard
deviations; a rule fires when ``consecutive`` samples in a row lie beyond ``z`` and beyond the absolute and
relative floors (so a server idling at zero errors is not alarmed by its first failure, nor a quiet one by
ordinary jitter). Anomalous samples are kept out of the baseline while the rule is firing, so a lasting shift
stays flagged instead of becoming the new normal within one window.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from openautoglm.config.observability import ActionName, AnomalyRule, ForecastRule, Severity
from openautoglm.observability.forecast import HoltForecaster, human_duration

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
_REBASE_AFTER = 5  # a shift that outlasts this many windows' worth of samples is accepted as the new normal


@dataclass(slots=True)
class Detection:
    kind: str  # e.g. "latency_anomaly", "disk_forecast", "gpu_errors"
    severity: Severity
    message: str
    actions: list[ActionName]
    evidence: dict[str, Any] = field(default_factory=dict)
    since: float = 0.0  # wall-clock time it was first raised

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "actions": list(self.actions),
            "since": self.since,
            "evidence": self.evidence,
        }


class _MadBaseline:
    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.values)

    def center_scale(self) -> tuple[float, float]:
        med = statistics.median(self.values)
        mad = statistics.median(abs(v - med) for v in self.values)
        return med, _MAD_TO_SIGMA * mad

    def add(self, x: float) -> None:
        self.values.append(x)


class _EwmaBaseline:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean: float | None = None
        self.var = 0.0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def center_scale(self) -> tuple[float, float]:
        return (self.mean or 0.0), math.sqrt(self.var)

    def add(self, x: float) -> None:
        self.count += 1
        if self.mean is None:
            self.mean = x
            return
        diff = x - self.mean
        self.mean += self.alpha * diff
        self.var = (1 - self.alpha) * (self.var + self.alpha * diff * diff)


class AnomalyDetector:
    """One anomaly rule over one signal: ``observe`` each sample, get the detection while it is out of line."""

    def __init__(self, rule: AnomalyRule, kind: str | None = None) -> None:
        self.rule = rule
        self.kind = kind or f"{rule.signal}_anomaly"
        self.baseline: _MadBaseline | _EwmaBaseline = (
            _MadBaseline(rule.window) if rule.method == "mad" else _EwmaBaseline(rule.alpha)
        )
        self.streak = 0
        self.held_out = 0  # anomalous samples in a row kept out of the baseline
        self.last: dict[str, Any] = {}

    def observe(self, x: float | None) -> Detection | None:
        if x is None or not math.isfinite(x):
            return None  # no traffic this tick: nothing to judge, keep the state
        rule = self.rule
        if len(self.baseline) < rule.warmup:
            self.baseline.add(x)
            return None
        center, scale = self.baseline.center_scale()
        delta = x - center
        floor = max(rule.min_delta, rule.min_rel_delta * abs(center))
        # The scale gets a floor too: a perfectly flat baseline (MAD 0) must not make every wobble infinite.
        score = delta / max(scale, floor / rule.z, 1e-12)
        out = self._beyond(delta, score, floor)
        self.last = {"value": x, "baseline": center, "scale": scale, "score": round(score, 3), "z": rule.z}
        if not out:
            self.streak, self.held_out = 0, 0
            self.baseline.add(x)
            return None
        self.streak += 1
        self.held_out += 1
        if self.held_out > _REBASE_AFTER * rule.window:
            self.baseline.add(x)
        if self.streak < rule.consecutive:
            return None
        direction = "above" if delta > 0 else "below"
        return Detection(
            self.kind, rule.severity,
            f"{rule.signal} {x:.4g} is {abs(score):.1f} robust sd {direction} its baseline {center:.4g} "
            f"({self.streak} samples in a row)",
            list(rule.actions), {**self.last, "signal": rule.signal, "method": rule.method, "streak": self.streak},
        )  # fmt: skip

    def _beyond(self, delta: float, score: float, floor: float) -> bool:
        if abs(delta) <= floor or abs(score) <= self.rule.z:
            return False
        return self.rule.direction == "both" or (delta > 0) == (self.rule.direction == "up")


class ForecastDetector:
    """One forecast rule over one series (a disk path, a GPU, or the single series of the signal)."""

    def __init__(self, rule: ForecastRule, series: str | None = None) -> None:
        self.rule = rule
        self.series = series
        self.kind = f"{rule.signal}_forecast"
        self.fit = HoltForecaster(rule.alpha, rule.beta)
        self.last: dict[str, Any] = {}

    def observe(self, t: float, value: float | None) -> Detection | None:
        if value is None:
            return None
        self.fit.update(t, value)
        p = self.fit.project(self.rule.limit)
        if p is None:
            return None
        self.last = {
            "value": value, "level": p.level, "trend_per_s": p.trend_per_s, "limit": self.rule.limit,
            "time_to_limit_s": p.time_to_limit_s, "horizon_s": self.rule.horizon_s, "samples": p.samples,
        }  # fmt: skip
        if self.series is not None:
            self.last["series"] = self.series
        ttl = 0.0 if value >= self.rule.limit else p.time_to_limit_s  # the reading, not the fit, says "now"
        if ttl is None or (ttl > 0 and (p.samples < self.rule.min_samples or ttl > self.rule.horizon_s)):
            return None
        what = self.rule.signal + (f" {self.series}" if self.series else "")
        target = "full" if self.rule.limit >= 1.0 and self.rule.signal != "queue" else f"at {self.rule.limit:g}"
        severity: Severity = self.rule.severity
        if ttl == 0:
            message, severity = f"{what} is {target} now ({value:.4g})", "critical"
        else:
            message = f"{what} {target} in {human_duration(ttl)}"
        return Detection(self.kind, severity, message, list(self.rule.actions), dict(self.last))
