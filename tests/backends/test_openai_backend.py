"""OpenAIBackend against fake OpenAI-compatible servers on loopback: streams, whole answers, faults, keys."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from openautoglm.backends.base import DEADLINE_KEY, UpstreamError, UpstreamTimeoutError
from openautoglm.backends.factory import build_backend
from openautoglm.backends.http_client import HttpPool
from openautoglm.backends.openai_compat import OpenAIBackend
from openautoglm.config.router import BackendConfig
from openautoglm.protocol.errors import ConfigError, InvalidRequestError
from openautoglm.protocol.outputs import CompletedRequest, FinishReason
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams


@pytest.fixture
async def pool():
    p = HttpPool()
    yield p
    await p.aclose()


def chat(rid: str = "r1", n: int = 1, **meta: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        messages=[{"role": "user", "content": "hi"}],
        sampling=SamplingParams(n=n, max_tokens=8),
        metadata=dict(meta),
    )


def backend(fake, pool: HttpPool, **cfg: object) -> OpenAIBackend:
    return OpenAIBackend(BackendConfig(name=fake.name, url=fake.url, **cfg), pool, model="m")


async def collect(b: OpenAIBackend, req: GenerationRequest) -> tuple[CompletedRequest, int]:
    done = CompletedRequest(request_id=req.request_id)
    count = 0
    async for chunk in b.generate(req):
        done.add(chunk)
        count += 1
    return done, count


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("n", [1, 2])
async def test_chat_stream_and_whole(fake_backend, pool, streaming: bool, n: int) -> None:
    fake = await fake_backend("a")
    b = backend(fake, pool, streaming=streaming)
    done, chunks = await collect(b, chat(n=n))
    assert done.finished and [s.text for s in done.sequences] == ["Hello from a"] * n
    assert all(s.finish_reason is FinishReason.STOP for s in done.sequences)
    assert done.usage is not None and (done.usage.prompt_tokens, done.usage.cached_tokens) == (7, 3)
    assert done.usage.completion_tokens == 3 * n
    assert fake.bodies[0]["stream"] is streaming and fake.bodies[0]["model"] == "m"
    if streaming:
        assert chunks == 4 * n  # one per word and sequence, one per finish (usage joins the last)
    assert b.in_flight == 0


async def test_completion_prompt_and_model_mapping(fake_backend, pool) -> None:
    fake = await fake_backend("c")
    b = backend(fake, pool, model="glm-upstream")
    req = GenerationRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4))
    done, _ = await collect(b, req)
    assert done.sequences[0].text == "Hello from c"
    assert fake.bodies[0]["prompt"] == [1, 2, 3] and fake.bodies[0]["model"] == "glm-upstream"


async def test_statuses_map_to_errors(fake_backend, pool) -> None:
    fake = await fake_backend("s")
    b = backend(fake, pool)
    for status, retryable in [(429, True), (503, True), (502, True), (500, False), (401, True)]:
        fake.fault.status = status
        with pytest.raises(UpstreamError) as info:
            await collect(b, chat())
        assert (info.value.status, info.value.retryable) == (status, retryable), status
        assert "injected" in info.value.message
    fake.fault.status = 429
    with pytest.raises(UpstreamError) as info:
        await collect(b, chat())
    assert info.value.retry_after == 1.0
    fake.fault.status = 400
    with pytest.raises(InvalidRequestError, match="injected 400"):
        await collect(b, chat())


async def test_reset_before_first_byte_is_retryable(fake_backend, pool) -> None:
    fake = await fake_backend("r")
    fake.fault.reset_before = True
    with pytest.raises(UpstreamError) as info:
        await collect(backend(fake, pool), chat())
    assert info.value.retryable


async def test_reset_after_first_event_raises_after_a_chunk(fake_backend, pool) -> None:
    fake = await fake_backend("r")
    fake.fault.reset_after_first = True
    b = backend(fake, pool)
    got = []
    with pytest.raises(UpstreamError):
        async for chunk in b.generate(chat()):
            got.append(chunk)
    assert [c.outputs[0].text_delta for c in got] == ["Hello"]  # the first word reached the caller


async def test_hang_times_out(fake_backend, pool) -> None:
    fake = await fake_backend("h")
    fake.fault.hang = True
    start = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        await collect(backend(fake, pool, first_byte_timeout_s=0.3), chat())
    assert time.monotonic() - start < 5


async def test_deadline_is_sent_and_enforced(fake_backend, pool) -> None:
    fake = await fake_backend("d")
    b = backend(fake, pool)
    await collect(b, chat(**{DEADLINE_KEY: time.time() + 10}))
    left_ms = int(fake.headers[0]["X-AutoGLM-Deadline-Ms"])
    assert 5000 < left_ms <= 10000
    with pytest.raises(UpstreamTimeoutError, match="deadline"):
        await collect(b, chat(**{DEADLINE_KEY: time.time() - 1}))
    fake.fault.latency_s = 2
    with pytest.raises(UpstreamTimeoutError):
        await collect(b, chat(**{DEADLINE_KEY: time.time() + 0.3}))


async def test_keys_from_env_and_file_never_inline(fake_backend, pool, tmp_path: Path) -> None:
    fake = await fake_backend("k")
    cfg = BackendConfig(name="k", url=fake.url, api_key_env="FAKE_KEY", headers={"X-Extra": "1"})
    b = build_backend(cfg, model="m", pool=pool, environ={"FAKE_KEY": "sk-env"})
    await collect(b, chat())
    assert fake.headers[-1]["Authorization"] == "Bearer sk-env" and fake.headers[-1]["X-Extra"] == "1"
    secret = tmp_path / "key"
    secret.write_text("sk-file\n")
    b = build_backend(BackendConfig(name="k", url=fake.url, api_key_file=str(secret)), model="m", pool=pool, environ={})
    await collect(b, chat())
    assert fake.headers[-1]["Authorization"] == "Bearer sk-file"
    with pytest.raises(ConfigError, match="FAKE_KEY"):
        build_backend(cfg, model="m", pool=pool, environ={})
    with pytest.raises(ConfigError, match="api_key_file"):
        build_backend(
            BackendConfig(name="k", url=fake.url, api_key_file=str(tmp_path / "none")), model="m", pool=pool, environ={}
        )
    with pytest.raises(ValueError, match="not both"):
        BackendConfig(name="k", url=fake.url, api_key_env="A", api_key_file="b")


async def test_health_and_connection_reuse(fake_backend, pool) -> None:
    fake = await fake_backend("p")
    b = backend(fake, pool)
    assert (await b.health()).healthy
    fake.healthy = False
    assert not (await b.health()).healthy
    for i in range(5):
        await collect(b, chat(f"r{i}"))
    connector = pool.session().connector
    assert connector is not None and len(connector._conns) == 1  # one kept-alive connection served all five
    await fake.stop()
    health = await b.health()
    assert not health.healthy and "Connect" in health.detail
