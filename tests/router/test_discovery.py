"""Discovery: a Redis registry with heartbeat TTLs (real Redis at 127.0.0.1:6379) and DNS re-resolution."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from urllib.parse import urlparse

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from openautoglm.config.router import RouterConfig
from openautoglm.protocol.errors import ServiceUnavailableError
from openautoglm.protocol.outputs import CompletedRequest
from openautoglm.protocol.request import GenerationRequest
from openautoglm.router.discovery import RegistryAnnouncer, read_registry
from openautoglm.router.router import Router

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis():
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisConnectionError, OSError) as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} is required in CI: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"autoglm-test-router:{uuid.uuid4().hex}:"
    yield client, prefix
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def answer(router: Router) -> str:
    req = GenerationRequest(request_id=uuid.uuid4().hex, prompt="hi", model="m")
    done = CompletedRequest(request_id=req.request_id)
    async for chunk in router.generate(req):
        done.add(chunk)
    return done.sequences[0].text.split()[-1]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def discovery_router(discovery: dict) -> Router:
    template = {"name": "t", "kind": "openai", "url": "http://template"}
    data = {"deployments": [{"model": "m", "discovery": {**discovery, "template": template}}]}
    return Router(RouterConfig.model_validate(data))


async def test_redis_registry_adds_and_drops_with_the_heartbeat(fakes, redis) -> None:
    client, prefix = redis
    a, b = await fakes("a", "b")
    router = discovery_router({"redis": {"url": REDIS_URL, "key_prefix": prefix, "poll_interval_s": 0.1}})
    await router.start(probes=False, analysis=False)
    dep = router.deployments["m"]
    beat_a = RegistryAnnouncer(client, prefix, "a", a.url, ttl_s=0.6)
    beat_b = RegistryAnnouncer(client, prefix, "b", b.url, ttl_s=0.6)
    await beat_a.start()
    await wait_for(lambda: set(dep.discovered) == {"a"})
    assert await answer(router) == "a"
    await beat_b.start()
    await wait_for(lambda: set(dep.discovered) == {"a", "b"})
    await asyncio.sleep(1.0)  # longer than the TTL: the heartbeats keep both registered
    assert set(await read_registry(client, prefix)) == {"a", "b"}
    await beat_a.stop(remove=False)  # a "dies": its key lapses with the TTL
    await wait_for(lambda: set(dep.discovered) == {"b"}, timeout=3)
    assert {await answer(router) for _ in range(4)} == {"b"}
    await beat_b.stop()  # a clean shutdown removes the key at once
    await wait_for(lambda: not dep.discovered, timeout=1)
    with pytest.raises(ServiceUnavailableError):
        await answer(router)
    await router.aclose()


async def test_dns_names_are_resolved_into_backends(fakes) -> None:
    (a,) = await fakes("a")
    port = urlparse(a.url).port
    router = discovery_router({"dns": {"host": "localhost", "port": port, "interval_s": 0.2}})
    await router.start(probes=False, analysis=False)
    dep = router.deployments["m"]
    await wait_for(lambda: bool(dep.discovered))
    assert any("127.0.0.1" in name for name in dep.discovered)
    assert await answer(router) == "a"
    await router.aclose()
