"""Balancing strategies: given the backends that may take a request, pick one.

- weighted round robin: smooth WRR (nginx's): exact proportions, no bursts to one backend;
- least outstanding: fewest requests in flight per unit of weight;
- power of two choices on EWMA latency: two weighted-random candidates, the one with the lower
  ``latency × (in flight + 1) / weight`` wins — cheap, and adapts to slow backends without herding;
- affinity: consistent hashing (virtual nodes by weight) on a key (the user, or the prompt's leading text) so
  requests sharing a prefix land where its KV cache already is; a filtered-out backend's keys move to the
  next one on the ring, the others stay.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from abc import ABC, abstractmethod

from openautoglm.config.router import Strategy
from openautoglm.protocol.errors import ConfigError
from openautoglm.router.health import BackendState


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class Balancer(ABC):
    @abstractmethod
    def pick(self, candidates: list[BackendState], key: str | None = None) -> BackendState:
        """``candidates`` is never empty."""


class WeightedRoundRobin(Balancer):
    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(self, candidates: list[BackendState], key: str | None = None) -> BackendState:
        total = 0.0
        best: BackendState | None = None
        for c in candidates:
            w = c.backend.weight
            cur = self._current.get(c.name, 0.0) + w
            self._current[c.name] = cur
            total += w
            if best is None or cur > self._current[best.name]:
                best = c
        assert best is not None
        self._current[best.name] -= total
        return best


class LeastOutstanding(Balancer):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: list[BackendState], key: str | None = None) -> BackendState:
        def cost(c: BackendState) -> float:
            return c.backend.load().score() / c.backend.weight

        low = min(cost(c) for c in candidates)
        return self._rng.choice([c for c in candidates if cost(c) == low])


class PowerOfTwoEwma(Balancer):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: list[BackendState], key: str | None = None) -> BackendState:
        if len(candidates) == 1:
            return candidates[0]
        weights = [c.backend.weight for c in candidates]
        a = self._rng.choices(range(len(candidates)), weights)[0]
        rest = [i for i in range(len(candidates)) if i != a]
        b = self._rng.choices(rest, [weights[i] for i in rest])[0]
        return min(candidates[a], candidates[b], key=_p2c_cost)


def _p2c_cost(c: BackendState) -> float:
    # Unmeasured backends count as fast (1 ms) so they get tried and measured.
    latency = c.latency.value if c.latency.value > 0 else 0.001
    return latency * (c.backend.load().score() + 1.0) / c.backend.weight


class ConsistentHash(Balancer):
    VNODES_PER_WEIGHT = 100

    def __init__(self) -> None:
        self._ring: list[tuple[int, str]] = []
        self._points: list[int] = []
        self._members: tuple[tuple[str, float], ...] = ()
        self._fallback = WeightedRoundRobin()

    def pick(self, candidates: list[BackendState], key: str | None = None) -> BackendState:
        if key is None:
            return self._fallback.pick(candidates)
        by_name = {c.name: c for c in candidates}
        self._rebuild(candidates)
        start = bisect.bisect(self._points, stable_hash(key)) % len(self._ring)
        for step in range(len(self._ring)):
            name = self._ring[(start + step) % len(self._ring)][1]
            if name in by_name:
                return by_name[name]
        raise AssertionError("a ring over the candidates holds one of them")

    def rebuild_for(self, members: list[BackendState]) -> None:
        """Hash over ``members`` (the whole deployment, not just today's candidates) so that filtering a
        backend out moves only its own keys."""
        self._rebuild(members, force=True)

    def _rebuild(self, members: list[BackendState], force: bool = False) -> None:
        names = {n for n, _ in self._members}
        if not force and self._ring and all(m.name in names for m in members):
            return
        key = tuple(sorted((m.name, m.backend.weight) for m in members))
        if key == self._members and self._ring:
            return
        ring = []
        for name, weight in key:
            for v in range(max(int(self.VNODES_PER_WEIGHT * weight), 1)):
                ring.append((stable_hash(f"{name}#{v}"), name))
        ring.sort()
        self._ring, self._points, self._members = ring, [p for p, _ in ring], key


def make_balancer(strategy: Strategy, rng: random.Random | None = None) -> Balancer:
    if strategy == "weighted_round_robin":
        return WeightedRoundRobin()
    if strategy == "least_outstanding":
        return LeastOutstanding(rng)
    if strategy == "p2c_ewma":
        return PowerOfTwoEwma(rng)
    if strategy == "affinity":
        return ConsistentHash()
    raise ConfigError(f"router strategy must be one of weighted_round_robin, least_outstanding, p2c_ewma, "
                      f"affinity; got {strategy!r}")  # fmt: skip
