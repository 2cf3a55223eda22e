"""The router over fake OpenAI-compatible backends (real HTTP servers on loopback with injected faults)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from openautoglm.backends.base import DEADLINE_KEY, UpstreamError, UpstreamTimeoutError
from openautoglm.config.router import RouterConfig
from openautoglm.protocol.errors import ContextLengthExceededError, ServiceUnavailableError, UnsupportedMediaTypeError
from openautoglm.protocol.outputs import CompletedRequest
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.router.router import ROUTE_KEY, Router
from openautoglm.server.http.router_metrics import RouterCollector

_ids = itertools.count()


def config(fakes: list[Any], *, weights: list[float] | None = None, versions: list[str] | None = None,
           backend: dict[str, Any] | None = None, **deployment: Any) -> dict[str, Any]:  # fmt: skip
    backends = [
        {"name": f.name, "url": f.url, "weight": (weights or [1.0] * len(fakes))[i],
         "version": (versions or ["stable"] * len(fakes))[i], **(backend or {})}
        for i, f in enumerate(fakes)
    ]  # fmt: skip
    return {"deployments": [{"model": "m", "backends": backends, **deployment}]}


def make_router(fakes: list[Any], router: dict[str, Any] | None = None, **kw: Any) -> Router:
    data = config(fakes, **kw)
    data.update(router or {})
    return Router(RouterConfig.model_validate(data))


def request(user: str | None = None, content: str = "hi", **meta: Any) -> GenerationRequest:
    metadata = {**meta, **({"user": user} if user else {})}
    return GenerationRequest(
        request_id=f"r{next(_ids)}",
        messages=[{"role": "user", "content": content}],
        sampling=SamplingParams(max_tokens=8),
        model="m",
        metadata=metadata,
    )


async def served_by(router: Router, req: GenerationRequest | None = None) -> str:
    """The backend that answered (the fake's reply ends with its name)."""
    req = req or request()
    done = CompletedRequest(request_id=req.request_id)
    async for chunk in router.generate(req):
        done.add(chunk)
    assert done.finished
    name = done.sequences[0].text.split()[-1]
    assert name == req.metadata[ROUTE_KEY]["backend"]
    return name


async def test_weighted_round_robin_proportions(fakes) -> None:
    a, b, c = await fakes("a", "b", "c")
    router = make_router([a, b, c], weights=[1, 2, 5], strategy="weighted_round_robin")
    counts = Counter([await served_by(router) for _ in range(160)])
    assert counts == {"a": 20, "b": 40, "c": 100}
    await router.aclose()


async def test_p2c_prefers_the_fast_backend(fakes) -> None:
    fast, slow = await fakes("fast", "slow")
    slow.fault.latency_s = 0.05
    router = make_router([fast, slow], strategy="p2c_ewma")
    counts = Counter([await served_by(router) for _ in range(60)])
    assert counts["fast"] >= 50, counts  # the slow one is measured once or twice, then avoided
    await router.aclose()


async def test_least_outstanding_spreads_concurrent_streams(fakes) -> None:
    a, b = await fakes("a", "b")
    for f in (a, b):
        f.fault.event_delay_s = 0.05
    router = make_router([a, b], strategy="least_outstanding")
    counts = Counter(await asyncio.gather(*(served_by(router) for _ in range(20))))
    assert counts == {"a": 10, "b": 10}
    await router.aclose()


async def test_affinity_keeps_a_prefix_on_one_backend(fakes) -> None:
    backends = await fakes("a", "b", "c")
    router = make_router(backends, strategy="affinity", affinity_key="prefix")
    prompts = [f"system prompt {k} " + "x" * 300 for k in range(30)]
    homes = {}
    for p in prompts:
        seen = {await served_by(router, request(content=p + f" turn {t}")) for t in range(3)}
        assert len(seen) == 1, (p[:20], seen)  # the suffix after the hashed prefix does not matter
        homes[p] = seen.pop()
    assert len(set(homes.values())) == 3  # prefixes spread over all backends
    # One backend out: only its prefixes move.
    router.deployments["m"].static["a"].probe.healthy = False
    for p, home in homes.items():
        now = await served_by(router, request(content=p))
        assert now == home if home != "a" else now != "a"
    await router.aclose()


@pytest.mark.parametrize("fault", ["status_503", "status_429", "reset_before", "hang"])
async def test_failover_before_the_first_byte(fakes, fault: str) -> None:
    bad, good = await fakes("bad", "good")
    if fault.startswith("status_"):
        bad.fault.status = int(fault[7:])
    else:
        setattr(bad.fault, fault, True)
    router = make_router([bad, good], strategy="weighted_round_robin", backend={"first_byte_timeout_s": 0.3},
                         router={"retry": {"backoff_base_s": 0.001}})  # fmt: skip
    req = request()
    assert await served_by(router, req) == "good"
    assert bad.hits == 1 and req.metadata[ROUTE_KEY]["attempts"] == 2
    await router.aclose()


async def test_no_failover_for_500_or_after_the_stream_started(fakes) -> None:
    bad, good = await fakes("bad", "good")
    router = make_router([bad, good], strategy="weighted_round_robin")
    bad.fault.status = 500
    with pytest.raises(UpstreamError) as info:
        await served_by(router)
    assert info.value.status == 500 and good.hits == 0
    bad.fault.status = None
    bad.fault.reset_after_first = True
    router.deployments["m"].balancer._current.clear()  # type: ignore[attr-defined]  # bad first again
    got = []
    with pytest.raises(UpstreamError):
        async for chunk in router.generate(request()):
            got.append(chunk)
    assert [c.outputs[0].text_delta for c in got] == ["Hello"] and good.hits == 0
    await router.aclose()


async def test_retry_budget_and_attempts_bound_retries(fakes) -> None:
    a, b = await fakes("a", "b")
    a.fault.status = b.fault.status = 503
    router = make_router([a, b], router={"retry": {"max_attempts": 3, "backoff_base_s": 0.001}})
    with pytest.raises(UpstreamError):
        await served_by(router)
    assert a.hits + b.hits == 3
    router = make_router([a, b], router={"retry": {"budget_ratio": 0, "budget_min_per_s": 0}})
    with pytest.raises(UpstreamError):
        await served_by(router)
    assert a.hits + b.hits == 4 and router.budget.refused == 1  # the budget refused the retry
    await router.aclose()


async def test_deadline_bounds_the_whole_request(fakes) -> None:
    (slow,) = await fakes("slow")
    slow.fault.event_delay_s = 0.2
    router = make_router([slow])
    start = time.monotonic()
    with pytest.raises(UpstreamTimeoutError, match="deadline"):
        await served_by(router, request(**{DEADLINE_KEY: time.time() + 0.3}))
    assert time.monotonic() - start < 1.0
    assert int(slow.headers[0]["X-AutoGLM-Deadline-Ms"]) <= 300
    await router.aclose()


async def test_breaker_opens_then_half_opens_and_closes(fakes) -> None:
    a, b = await fakes("a", "b")
    a.fault.status = 500
    router = make_router([a, b], strategy="weighted_round_robin",
                         router={"breaker": {"failure_threshold": 3, "cooldown_s": 0.3}})  # fmt: skip
    state = router.deployments["m"].static["a"]
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(await served_by(router))
        except UpstreamError as exc:
            outcomes.append(exc.status)
    assert outcomes.count(500) == 3  # a failed three times (WRR alternates), then its breaker kept it out
    assert state.breaker.state.value == "open" and a.hits == 3
    assert _breaker_metric(router) == {"a": 1.0, "b": 0.0}  # what the AutoGLMBackendCircuitOpen alert reads
    assert [await served_by(router) for _ in range(5)] == ["b"] * 5
    a.fault.status = None
    await asyncio.sleep(0.35)
    assert state.available() and state.breaker.state.value == "half_open"
    names = [await served_by(router) for _ in range(4)]
    assert "a" in names and state.breaker.state.value == "closed"
    await router.aclose()


def _breaker_metric(router: Router) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(RouterCollector(SimpleNamespace(router=router)))
    return {
        s.labels["backend"]: s.value
        for f in registry.collect()
        if f.name == "autoglm_backend_circuit_open"
        for s in f.samples
    }


async def test_half_open_failure_reopens(fakes) -> None:
    a, b = await fakes("a", "b")
    a.fault.status = 500
    router = make_router([a, b], router={"breaker": {"failure_threshold": 1, "cooldown_s": 0.2}})
    state = router.deployments["m"].static["a"]
    state.record(False, None, may_eject=False)
    await asyncio.sleep(0.25)
    assert state.available()
    state.breaker.acquire()
    assert not state.available()  # one trial at a time
    state.record(False, None, may_eject=False)
    assert state.breaker.state.value == "open" and not state.available()
    await router.aclose()


async def test_active_probes_mark_down_and_up(fakes) -> None:
    a, b = await fakes("a", "b")
    router = make_router([a, b])
    state = router.deployments["m"].static["a"]
    a.healthy = False
    for expected in (True, True, False):  # unhealthy after the third failure
        await router.probe_all()
        assert state.probe.healthy is expected
    assert {await served_by(router) for _ in range(5)} == {"b"}
    a.healthy = True
    for expected in (False, True):  # healthy after the second success
        await router.probe_all()
        assert state.probe.healthy is expected
    await router.aclose()


async def test_outlier_ejection_is_capped(fakes) -> None:
    a, b = await fakes("a", "b")
    a.fault.error_rate, b.fault.error_rate = 1.0, 1.0
    outlier = {"window": 10, "min_requests": 5, "max_error_rate": 0.5, "ejection_s": 30, "max_ejected_percent": 50}
    router = make_router([a, b], router={"outlier": outlier, "breaker": {"failure_threshold": 1000}})
    for _ in range(20):
        with pytest.raises(UpstreamError):
            await served_by(router)
    ejected = [s.ejected(time.monotonic()) for s in router.deployments["m"].states]
    assert sorted(ejected) == [False, True]  # half of two backends may be ejected, not both
    await router.aclose()


async def test_capability_context_and_priority_filtering(fakes) -> None:
    text, vision = await fakes("text", "vision")
    data = config([text, vision], strategy="weighted_round_robin")
    data["deployments"][0]["backends"][0].update(max_context=100, max_priority=0)
    data["deployments"][0]["backends"][1].update(max_context=10_000, modalities=["text", "image"])
    router = Router(RouterConfig.model_validate(data))
    image = request()
    image.messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    assert {await served_by(router, image) for _ in range(3)} == {"vision"}
    long = "word " * 200  # at least 250 tokens: over text's 100
    assert {await served_by(router, request(content=long)) for _ in range(3)} == {"vision"}
    low = request()
    low.priority = 5  # text takes only priority <= 0
    assert {await served_by(router, low) for _ in range(3)} == {"vision"}
    audio = request()
    audio.messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(UnsupportedMediaTypeError):
        await served_by(router, audio)
    with pytest.raises(ContextLengthExceededError):
        await served_by(router, request(content="word " * 10_000))
    await router.aclose()


async def test_all_down_is_a_503_naming_why(fakes) -> None:
    (a,) = await fakes("a")
    router = make_router([a])
    router.deployments["m"].static["a"].probe.healthy = False
    with pytest.raises(ServiceUnavailableError, match="failing health probes"):
        await served_by(router)
    await router.aclose()


async def test_reload_keeps_in_flight_on_their_backend(fakes) -> None:
    old, new = await fakes("old", "new")
    old.fault.event_delay_s = 0.1
    router = make_router([old])
    in_flight = asyncio.ensure_future(served_by(router))
    await asyncio.sleep(0.15)  # started on old
    router.reload(RouterConfig.model_validate(config([new])))
    assert await in_flight == "old"
    assert await served_by(router) == "new"
    with pytest.raises(Exception, match="api_key_env"):
        bad = config([new], backend={"api_key_env": "NOT_SET_ANYWHERE"})
        router.reload(RouterConfig.model_validate(bad))
    assert await served_by(router) == "new"  # the refused reload changed nothing
    await router.aclose()


async def test_reload_under_load_fails_no_request(fakes) -> None:
    a, b = await fakes("a", "b")
    for f in (a, b):
        f.fault.event_delay_s = 0.005
    router = make_router([a])
    stop = asyncio.Event()
    results: list[str] = []

    async def client() -> None:
        while not stop.is_set():
            results.append(await served_by(router))

    clients = [asyncio.ensure_future(client()) for _ in range(8)]
    for k in range(10):
        await asyncio.sleep(0.03)
        router.reload(RouterConfig.model_validate(config([a, b][k % 2 : k % 2 + 1])))
    stop.set()
    await asyncio.gather(*clients)  # any failed request would raise here
    assert len(results) > 50 and set(results) == {"a", "b"}
    await router.aclose()
