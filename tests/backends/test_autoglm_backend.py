"""The autoglm backend against a real second ``autoglm serve`` process, with the in-process engine behind the
local backend as the oracle (same demo model, greedy), and the router failing over to it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from openautoglm.backends.autoglm import AutoGLMBackend
from openautoglm.backends.base import Backend
from openautoglm.backends.http_client import HttpPool
from openautoglm.backends.local import LocalBackend
from openautoglm.config.router import BackendConfig, RouterConfig
from openautoglm.config.settings import load_settings
from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.protocol.outputs import CompletedRequest
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.router.router import ROUTE_KEY, Router

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(serve_process):
    with serve_process() as srv:
        yield srv


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    eng = AsyncEngine.from_config(load_settings(environ={}).engine)
    yield eng
    asyncio.run(eng.shutdown())


def greedy(rid: str, chat: bool) -> GenerationRequest:
    req = GenerationRequest(request_id=rid, sampling=SamplingParams(max_tokens=12, temperature=0.0), model="demo")
    if chat:
        req.messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    else:
        req.prompt = "Once upon a time"
    return req


async def run(backend: Backend | Router, req: GenerationRequest) -> CompletedRequest:
    done = CompletedRequest(request_id=req.request_id)
    async for chunk in backend.generate(req):
        done.add(chunk)
    return done


@pytest.mark.parametrize("chat", [True, False])
async def test_remote_server_matches_the_local_engine(server, engine: AsyncEngine, chat: bool) -> None:
    pool = HttpPool()
    remote = AutoGLMBackend(BackendConfig(name="remote", kind="autoglm", url=f"{server.url}/v1"), pool, model="demo")
    local = LocalBackend(engine)
    got, want = await run(remote, greedy("a", chat)), await run(local, greedy("b", chat))
    assert got.sequences[0].text == want.sequences[0].text and want.sequences[0].text
    assert got.sequences[0].finish_reason == want.sequences[0].finish_reason
    assert got.usage is not None and want.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        want.usage.prompt_tokens,
        want.usage.completion_tokens,
    )
    await pool.aclose()


async def test_health_capabilities_and_load_from_the_server(server, engine: AsyncEngine) -> None:
    pool = HttpPool()
    remote = AutoGLMBackend(BackendConfig(name="remote", kind="autoglm", url=f"{server.url}/v1"), pool, model="demo")
    assert remote.capabilities.max_context is None
    assert (await remote.health()).healthy
    await remote.refresh()
    assert remote.capabilities.max_context == engine.max_model_len
    assert remote.capabilities.modalities == frozenset(engine.modalities)
    load = remote.load()
    assert load.running == 0 and load.queued == 0 and load.kv_usage is not None
    local = LocalBackend(engine).load()
    assert (local.running, local.queued) == (0, 0)
    await pool.aclose()


async def test_router_fails_over_from_a_dead_backend_to_the_server(server, fakes_for_autoglm) -> None:
    dead = fakes_for_autoglm
    dead.fault.reset_before = True
    cfg = RouterConfig.model_validate({
        "deployments": [{
            "model": "demo", "strategy": "weighted_round_robin",
            "backends": [{"name": "dead", "url": dead.url, "weight": 100},
                         {"name": "real", "kind": "autoglm", "url": f"{server.url}/v1"}],
        }],
        "retry": {"backoff_base_s": 0.001},
    })  # fmt: skip
    router = Router(cfg)
    req = greedy("f", chat=True)
    done = await run(router, req)
    assert done.finished and done.sequences[0].text
    assert req.metadata[ROUTE_KEY] == {"backend": "real", "version": "stable", "attempts": 2} and dead.hits == 1
    await router.aclose()


@pytest.fixture
async def fakes_for_autoglm(fake_backend):
    return await fake_backend("dead")
