"""The response cache through the HTTP app and the demo engine: deterministic requests only, tenants never see
each other's answers, L1 then L2 (a second app on the same Redis is another replica), the streaming replay,
Cache-Control, x-cache and x-ratelimit headers, 429 with Retry-After, and a failing L2 never failing a request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import orjson
import pytest
from fastapi import FastAPI

from openautoglm.config.settings import Settings
from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.gateway.keys import Actor
from openautoglm.server.http.app import create_app

from .conftest import SERVER_SECRET, gateway_settings  # type: ignore[import-not-found]
from .traffic_fakes import TcpProxy  # type: ignore[import-not-found]

ROOT = Actor("test")
CMPL = "/v1/completions"
BODY = {"prompt": "The cache", "max_tokens": 6, "temperature": 0}


def make_app(engine: AsyncEngine, tmp_path: Path, store: dict[str, Any] | None = None, **gateway: Any) -> FastAPI:
    settings = gateway_settings(tmp_path, None, cache={"enabled": True, **gateway.pop("cache", {})}, **gateway)
    if store:
        data = settings.model_dump(mode="json")
        data["store"].update(store)
        data["gateway"]["auth"]["secret"] = SERVER_SECRET
        settings = Settings.model_validate(data)
    return create_app(settings, engine)


@pytest.fixture
async def app(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[FastAPI]:
    application = make_app(engine, tmp_path)
    yield application
    await application.state.gateway.close()


def client(app: FastAPI, key: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 40000))
    return httpx.AsyncClient(
        transport=transport, base_url="http://t", timeout=60, headers={"Authorization": f"Bearer {key}"}
    )


def key(app: FastAPI, tenant: str, **extra: Any) -> str:
    return app.state.gateway.keys.create(ROOT, name="t", owner=tenant, scopes=["inference"], **extra)[1]


def engine_calls(app: FastAPI) -> int:
    return app.state.engine.stats().prompt_tokens_total


async def test_hits_by_tier_within_a_tenant_and_never_across(app: FastAPI) -> None:
    a1, a2, b = key(app, "acme"), key(app, "acme"), key(app, "bravo")
    async with client(app, a1) as ca, client(app, a2) as ca2, client(app, b) as cb:
        first = await ca.post(CMPL, json=BODY)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        again = await ca2.post(CMPL, json=BODY)  # another key of the same tenant
        assert again.headers["x-cache"] == "hit-l1"
        assert again.json()["choices"] == first.json()["choices"] and again.json()["id"] != first.json()["id"]
        other = await cb.post(CMPL, json=BODY)  # another tenant: its own namespace
        assert other.headers["x-cache"] == "miss"
        sampled = await ca.post(CMPL, json={**BODY, "temperature": 0.8})  # not deterministic: never cached
        assert "x-cache" not in sampled.headers
        seeded = await ca.post(CMPL, json={**BODY, "temperature": 0.8, "seed": 7})
        assert seeded.headers["x-cache"] == "miss"
        assert (await ca.post(CMPL, json={**BODY, "temperature": 0.8, "seed": 7})).headers["x-cache"] == "hit-l1"
        scraped = (await ca.get("/metrics")).text
    for series in ("autoglm_cache_hits_total", "autoglm_cache_misses_total", "autoglm_cache_evictions_total",
                   "autoglm_cache_bytes", "autoglm_admission_queue_wait_seconds_bucket",
                   "autoglm_admission_queue_length_bucket", "autoglm_ratelimit_refused_total"):  # fmt: skip
        assert series in scraped, series
    reg = app.state.metrics.registry
    assert reg.get_sample_value("autoglm_cache_hits_total", {"tier": "l1"}) == 2
    assert reg.get_sample_value("autoglm_cache_misses_total") == 3
    assert (reg.get_sample_value("autoglm_cache_bytes", {"model": ""}) or 0) > 0


async def test_streaming_requests_replay_the_cached_answer(app: FastAPI) -> None:
    async with client(app, key(app, "acme")) as c:
        whole = await c.post(CMPL, json=BODY)
        calls = engine_calls(app)
        events = []
        async with c.stream("POST", CMPL, json={**BODY, "stream": True}) as r:
            assert r.headers["x-cache"] == "hit-l1"
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
        assert text == whole.json()["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole.json()["choices"][0]["finish_reason"]
        assert engine_calls(app) == calls  # the engine never saw it


async def test_cache_control_bypasses_reading_or_writing(app: FastAPI) -> None:
    async with client(app, key(app, "acme")) as c:
        body = {**BODY, "prompt": "no store"}
        r = await c.post(CMPL, json=body, headers={"Cache-Control": "no-store"})
        assert r.headers["x-cache"] == "miss"
        assert (await c.post(CMPL, json=body)).headers["x-cache"] == "miss"  # nothing was stored
        assert (await c.post(CMPL, json=body)).headers["x-cache"] == "hit-l1"
        assert (await c.post(CMPL, json=body, headers={"Cache-Control": "no-cache"})).headers["x-cache"] == "miss"


async def test_l2_is_shared_between_replicas_and_fills_l1(
    engine: AsyncEngine, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    store = {"redis_url": redis_url, "redis_prefix": redis_prefix, "url": f"sqlite:///{tmp_path / 's.db'}"}
    one = make_app(engine, tmp_path / "a", store)
    two = make_app(engine, tmp_path / "b", store)
    k = key(one, "acme")
    try:
        async with client(one, k) as c1, client(two, k) as c2:
            assert (await c1.post(CMPL, json=BODY)).headers["x-cache"] == "miss"
            r = await c2.post(CMPL, json=BODY)
            assert r.headers["x-cache"] == "hit-l2"
            assert (await c2.post(CMPL, json=BODY)).headers["x-cache"] == "hit-l1"
    finally:
        await one.state.gateway.close()
        await two.state.gateway.close()


async def test_a_failing_l2_never_fails_the_request(
    engine: AsyncEngine, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    target = urlparse(redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    store = {"redis_url": f"redis://127.0.0.1:{proxy.port}/0", "redis_prefix": redis_prefix}
    # The brute-force guard has no Redis failover of its own (it would answer 500): off for this test.
    app = make_app(engine, tmp_path, store, brute_force={"enabled": False})
    try:
        async with client(app, key(app, "acme")) as c:
            assert (await c.post(CMPL, json=BODY)).status_code == 200
            await proxy.stop()  # Redis goes away: L2 reads are misses, writes fail, requests succeed
            body = {**BODY, "prompt": "while Redis is away"}
            assert (await c.post(CMPL, json=body)).status_code == 200
            again = await c.post(CMPL, json=body)
            assert again.status_code == 200 and again.headers["x-cache"] == "hit-l1"
        reg = app.state.metrics.registry
        assert reg.get_sample_value("autoglm_cache_write_errors_total", {"tier": "l2"}) == 1
    finally:
        await app.state.gateway.close()


async def test_rate_limit_headers_and_refusal(engine: AsyncEngine, tmp_path: Path) -> None:
    app = make_app(engine, tmp_path, limits={"burst_fraction": 0.5}, cache={"enabled": False})
    try:
        async with client(app, key(app, "acme", rpm=4, tpm=10_000)) as c:
            r = await c.post(CMPL, json=BODY)
            assert r.headers["x-ratelimit-limit-requests"] == "4"
            assert r.headers["x-ratelimit-remaining-requests"] == "1"  # capacity 2 back to back
            assert r.headers["x-ratelimit-limit-tokens"] == "10000"
            assert int(r.headers["x-ratelimit-remaining-tokens"]) < 10_000
            assert (await c.post(CMPL, json=BODY)).status_code == 200
            refused = await c.post(CMPL, json=BODY)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            err = refused.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            assert "key" in err["message"] and "RPM" in err["message"]
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    finally:
        await app.state.gateway.close()


def test_the_key_covers_every_field_that_shapes_the_answer() -> None:
    import dataclasses

    from openautoglm.gateway.cache import cache_key
    from openautoglm.protocol.request import GenerationRequest
    from openautoglm.protocol.sampling import SamplingParams

    base = GenerationRequest("r1", messages=[{"role": "user", "content": "hi"}], sampling=SamplingParams(temperature=0))
    same = dataclasses.replace(base, request_id="r2", priority=3, metadata={"user": "u"})
    assert cache_key("t", "v", base) == cache_key("t", "v", same)
    variants = [
        dataclasses.replace(base, tools=[{"type": "function", "function": {"name": "f"}}]),
        dataclasses.replace(base, sampling=SamplingParams(temperature=0, max_tokens=3)),
        dataclasses.replace(base, chat_template_kwargs={"enable_thinking": False}),
        dataclasses.replace(base, model="other"),
    ]
    keys = {cache_key("t", "v", v) for v in variants} | {cache_key("t2", "v", base), cache_key("t", "v2", base)}
    assert len(keys) == 6 and cache_key("t", "v", base) not in keys
