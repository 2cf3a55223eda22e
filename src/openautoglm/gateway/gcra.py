"""GCRA (generic cell rate algorithm), in integer microseconds so every backend decides exactly alike.

A limit of ``limit`` per ``period_s`` emits one unit every ``T = period/limit``; the state is one number, the
theoretical arrival time (TAT) of the next unit. A request of ``cost`` units at ``now`` is allowed when
``max(TAT, now) + cost*T - now <= capacity*T`` and then moves TAT forward by ``cost*T``. ``capacity`` units
may pass back to back; after that the rate is the limit's, so any window of one period admits at most
``limit + capacity`` units — never the 2x of a fixed window's boundary. A cost above the capacity passes only
when the bucket is full (TAT <= now), so large token reservations are not starved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

US = 1_000_000


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` units per period, one every ``interval_us``; ``capacity`` units may pass back to back."""

    limit: int
    interval_us: int
    capacity: int

    @classmethod
    def of(cls, limit: float, period_s: float, burst_fraction: float) -> Rate:
        interval = max(1, round(period_s * US / limit))
        return cls(max(1, round(limit)), interval, max(1, math.ceil(limit * burst_fraction)))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int  # units that could pass right now after this decision
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # 0 when allowed


def decide(tat_us: int | None, now_us: int, rate: Rate, cost: int) -> tuple[Decision, int | None]:
    """The decision and the new TAT (None: unchanged). Mirrors the Lua script in limiter_redis.py."""
    t = rate.interval_us
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    tolerance = max(rate.capacity, cost) * t
    new_tat = tat + cost * t
    if new_tat - now_us > tolerance:
        remaining = (rate.capacity * t - (tat - now_us)) // t
        retry = (new_tat - tolerance - now_us) / US
        return Decision(False, rate.limit, max(0, remaining), (tat - now_us) / US, retry), None
    remaining = (rate.capacity * t - (new_tat - now_us)) // t
    return Decision(True, rate.limit, max(0, remaining), (new_tat - now_us) / US, 0.0), new_tat


def refund(tat_us: int | None, now_us: int, rate: Rate, cost: int) -> int | None:
    """Give ``cost`` units back (a reservation larger than the real use); a negative cost charges more.
    The new TAT, or None when the bucket is full (nothing to store)."""
    base = now_us if tat_us is None or tat_us < now_us else tat_us
    tat = base - cost * rate.interval_us
    return tat if tat > now_us else None
