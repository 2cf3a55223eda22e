"""Canary rollout through the router: split and stickiness, automatic rollback and promotion, the audit hook."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest

from openautoglm.backends.base import UpstreamError
from openautoglm.config.router import AnalysisConfig, RouterConfig
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.outputs import CompletedRequest
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.router.rollout import Rollout, RolloutEvent, decide
from openautoglm.router.router import ROUTE_KEY, Router
from openautoglm.router.stats import WindowSummary

_ids = itertools.count()


def canary_router(stable: Any, canary: Any, weight: float, audit: Any = None, **analysis: Any) -> Router:
    data = {
        "deployments": [{
            "model": "m",
            "strategy": "weighted_round_robin",
            "backends": [
                {"name": "s", "url": stable.url, "version": "v1"},
                {"name": "c", "url": canary.url, "version": "v2"},
            ],
            "stable_version": "v1",
            "canary": {"version": "v2", "steps": [weight, 50, 100], "weight": weight},
        }],
        "analysis": {"min_requests": 30, "step_interval_s": 0, **analysis},
        "breaker": {"failure_threshold": 1000},
        "outlier": {"max_ejected_percent": 0},
    }  # fmt: skip
    return Router(RouterConfig.model_validate(data), audit=audit)


async def version_of(router: Router, user: str) -> str | None:
    req = GenerationRequest(
        request_id=f"r{next(_ids)}",
        messages=[{"role": "user", "content": "hi"}],
        sampling=SamplingParams(max_tokens=4),
        model="m",
        metadata={"user": user},
    )
    done = CompletedRequest(request_id=req.request_id)
    try:
        async for chunk in router.generate(req):
            done.add(chunk)
    except UpstreamError:
        return None
    return req.metadata[ROUTE_KEY]["version"]


async def test_canary_split_within_3_percent_and_sticky(fakes) -> None:
    stable, canary = await fakes("stable", "canary")
    router = canary_router(stable, canary, 20)
    versions = Counter([await version_of(router, f"user-{k}") for k in range(2000)])
    assert abs(versions["v2"] / 2000 - 0.20) <= 0.03, versions
    for k in range(0, 2000, 97):
        first = await version_of(router, f"user-{k}")
        assert {await version_of(router, f"user-{k}") for _ in range(5)} == {first}
    await router.aclose()


async def test_raising_the_weight_only_moves_users_to_canary() -> None:
    r = Rollout("m", "v1", AnalysisConfig())
    r.resume("v2", [5, 50, 100], 5, auto=False)
    before = {u: r.version_for(f"u{u}") for u in range(1000)}
    await r.promote()
    after = {u: r.version_for(f"u{u}") for u in range(1000)}
    assert all(after[u] == "v2" for u in before if before[u] == "v2")
    assert 400 <= sum(v == "v2" for v in after.values()) <= 600


async def test_canary_errors_trigger_automatic_rollback(fakes) -> None:
    stable, canary = await fakes("stable", "canary")
    canary.fault.error_rate = 0.5
    events: list[RolloutEvent] = []

    async def audit(event: RolloutEvent) -> None:
        events.append(event)

    router = canary_router(stable, canary, 50, audit=audit)
    for k in range(120):
        await version_of(router, f"user-{k}")
    decision = await router.deployments["m"].rollout.analyze()
    assert decision is not None and decision.action == "rollback" and "error rate" in decision.reason
    assert [e.action for e in events] == ["rollback"] and events[0].actor == "auto"
    assert events[0].canary["errors"] > 0 and events[0].weight_from == 50
    canary_hits = canary.hits
    assert {await version_of(router, f"user-{k}") for k in range(50)} == {"v1"}
    assert canary.hits == canary_hits  # no traffic to the rolled-back canary
    await router.aclose()


async def test_healthy_canary_is_promoted_step_by_step(fakes) -> None:
    stable, canary = await fakes("stable", "canary")
    events: list[RolloutEvent] = []
    router = canary_router(stable, canary, 10, audit=events.append, min_requests=5)
    rollout = router.deployments["m"].rollout
    for expected in (50, 100):
        for k in range(200):
            await version_of(router, f"user-{k}")
        assert (await rollout.analyze()).action == "promote"
        assert rollout.weight == expected
    for k in range(50):
        await version_of(router, f"user-{k}")
    await rollout.analyze()
    assert rollout.status == "complete" and rollout.stable_version == "v2" and rollout.canary_version is None
    assert [e.action for e in events] == ["promote", "promote", "complete"]
    assert {await version_of(router, f"user-{k}") for k in range(20)} == {"v2"}
    await router.aclose()


async def test_operator_operations_and_refusals() -> None:
    r = Rollout("m", "v1", AnalysisConfig())
    with pytest.raises(InvalidRequestError, match="no rollout running"):
        await r.promote()
    with pytest.raises(InvalidRequestError, match="already stable"):
        await r.start("v1", [5])
    with pytest.raises(InvalidRequestError, match="steps"):
        await r.start("v2", [50, 5])
    await r.start("v2", [5, 100], auto=False)
    with pytest.raises(InvalidRequestError, match="already rolls out"):
        await r.start("v3", [5])
    await r.rollback()
    assert r.status == "rolled_back" and [e.action for e in r.history] == ["start", "rollback"]


def test_decide_thresholds() -> None:
    cfg = AnalysisConfig(
        min_requests=10, max_error_rate_increase=0.05, max_p95_ratio=1.5, step_interval_s=0, min_p95_increase_s=0.01
    )
    ok = WindowSummary(100, 1, 0.10)
    assert decide(WindowSummary(5, 5, None), ok, cfg, 100).action == "hold"
    assert decide(WindowSummary(100, 7, 0.1), ok, cfg, 100).action == "rollback"
    assert decide(WindowSummary(100, 5, 0.1), ok, cfg, 100).action == "promote"
    assert decide(WindowSummary(100, 1, 0.16), ok, cfg, 100).action == "rollback"
    assert decide(WindowSummary(100, 1, 0.14), ok, cfg, 100).action == "promote"
    tiny = WindowSummary(100, 1, 0.001)
    assert decide(WindowSummary(100, 1, 0.003), tiny, cfg, 100).action == "promote"  # 3x, but only 2 ms
    slow_step = AnalysisConfig(min_requests=10, step_interval_s=60)
    assert decide(WindowSummary(100, 1, 0.1), ok, slow_step, 30).action == "hold"
