"""The limiter interface (GCRA buckets and concurrency slots) and its in-process implementation.

``acquire_all`` is all-or-nothing: when one bucket refuses, the units taken from the others are given back, so
a refusal by the tenant's limit does not eat into the key's.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from openautoglm.gateway.gcra import Decision, Rate, decide, refund

_SWEEP_EVERY = 10_000  # in-process buckets: drop full ones after this many new keys


@dataclass(frozen=True, slots=True)
class Charge:
    key: str
    rate: Rate
    cost: int = 1


class Limiter(ABC):
    name: str

    @abstractmethod
    async def acquire(self, charges: Sequence[Charge], now_us: int | None = None) -> list[Decision]:
        """Try every charge (each taken when allowed); one decision per charge, in order."""

    @abstractmethod
    async def refund(self, charges: Sequence[Charge], now_us: int | None = None) -> None:
        """Give units back (negative cost: take more, never refused: usage that already happened)."""

    @abstractmethod
    async def acquire_slot(self, key: str, limit: int, holder: str, lease_s: float) -> bool: ...

    @abstractmethod
    async def release_slot(self, key: str, holder: str) -> None: ...

    async def close(self) -> None:  # noqa: B027 — nothing to close in-process
        """Release connections."""

    async def acquire_all(self, charges: Sequence[Charge], now_us: int | None = None) -> list[Decision]:
        decisions = await self.acquire(charges, now_us)
        if not all(d.allowed for d in decisions):
            taken = [c for c, d in zip(charges, decisions, strict=True) if d.allowed]
            if taken:
                await self.refund(taken, now_us)
        return decisions


def wall_us() -> int:
    return time.time_ns() // 1000


class InProcessLimiter(Limiter):
    """Buckets and slots of this process only."""

    name = "memory"

    def __init__(self) -> None:
        self._tat: dict[str, int] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._new_keys = 0

    async def acquire(self, charges: Sequence[Charge], now_us: int | None = None) -> list[Decision]:
        return [self.acquire_now(c, now_us) for c in charges]

    def acquire_now(self, charge: Charge, now: int | None = None) -> Decision:
        now = wall_us() if now is None else now
        decision, tat = decide(self._tat.get(charge.key), now, charge.rate, charge.cost)
        if tat is not None:
            self._store(charge.key, tat, now)
        return decision

    async def refund(self, charges: Sequence[Charge], now_us: int | None = None) -> None:
        for c in charges:
            now = wall_us() if now_us is None else now_us
            tat = refund(self._tat.get(c.key), now, c.rate, c.cost)
            if tat is None:
                self._tat.pop(c.key, None)
            else:
                self._store(c.key, tat, now)

    def _store(self, key: str, tat: int, now: int) -> None:
        if key not in self._tat:
            self._new_keys += 1
            if self._new_keys >= _SWEEP_EVERY:  # full buckets carry no state: forget them
                self._new_keys = 0
                self._tat = {k: v for k, v in self._tat.items() if v > now}
        self._tat[key] = tat

    async def acquire_slot(self, key: str, limit: int, holder: str, lease_s: float) -> bool:
        now = time.monotonic()
        held = self._slots.setdefault(key, {})
        for h in [h for h, until in held.items() if until <= now]:
            del held[h]
        if len(held) >= limit:
            return False
        held[holder] = now + lease_s
        return True

    async def release_slot(self, key: str, holder: str) -> None:
        held = self._slots.get(key)
        if held is not None:
            held.pop(holder, None)
            if not held:
                del self._slots[key]

    def slots_held(self, key: str) -> int:
        return len(self._slots.get(key, {}))
