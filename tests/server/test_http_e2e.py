"""End to end against real ``autoglm serve`` processes (demo model, free loopback ports, tiny KV budget).

Clients are the official ``openai`` package, raw httpx and the schemathesis CLI. Oracles: greedy output is the
same whether it is streamed, collected, sent gzipped or not; the engine's own counters (read from /metrics)
show that a client going away frees its KV blocks long before its tokens would have been generated; the process
exit code and the responses of a real SIGTERM drain.
"""

from __future__ import annotations

import base64
import gzip
import io
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import orjson
import pytest
from PIL import Image

if TYPE_CHECKING:
    from conftest import ServerHandle as Server

pytestmark = pytest.mark.slow

NUM_BLOCKS = 48  # 16-token blocks: ~750 tokens of KV in all
MAX_BODY = 65536
MAX_DECODED = 262144
MAX_IMAGE_PIXELS = 64 * 64
LONG = 700  # tokens: fits the tiny KV budget, takes the demo model most of a second


@pytest.fixture(scope="module")
def server(serve_process: Callable[..., Server]) -> Iterator[Server]:
    env = {
        "AUTOGLM_ENGINE__CACHE__NUM_BLOCKS": str(NUM_BLOCKS),
        "AUTOGLM_SERVER__MAX_BODY_BYTES": str(MAX_BODY),
        "AUTOGLM_SERVER__MAX_DECOMPRESSED_BYTES": str(MAX_DECODED),
        "AUTOGLM_SERVER__MEDIA__MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
    }
    srv = serve_process(env)
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


MESSAGES = [{"role": "user", "content": "Tell me about GLM."}]


# --- the official openai client ----------------------------------------------------------------------------


def test_sdk_chat_collected(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=8, temperature=0, n=2, logprobs=True, top_logprobs=2
    )
    assert r.object == "chat.completion" and r.model == "demo" and len(r.choices) == 2
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + 16 and r.usage.prompt_tokens > 0
    first, second = r.choices
    assert first.message.role == "assistant" and first.message.content == second.message.content  # greedy
    assert first.finish_reason == "length"
    assert first.logprobs is not None and first.logprobs.content is not None
    assert len(first.logprobs.content) == 8 and all(len(t.top_logprobs) == 2 for t in first.logprobs.content)
    # Greedy: the chosen token is the most likely one.
    assert all(t.logprob >= t.top_logprobs[1].logprob for t in first.logprobs.content)


def test_sdk_chat_stream_equals_collected(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "demo", "messages": MESSAGES, "max_completion_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content and finish == "length"
    assert usage is not None and usage.completion_tokens == 12 == whole.usage.completion_tokens


def test_sdk_completions_collected_and_streamed(client: openai.OpenAI) -> None:
    prompts = ["Once upon a time", "GLM is"]
    whole = client.completions.create(model="demo", prompt=prompts, max_tokens=6, temperature=0, logprobs=2)
    assert [c.index for c in whole.choices] == [0, 1] and whole.usage.completion_tokens == 12
    assert all(c.logprobs is not None and len(c.logprobs.tokens) == 6 for c in whole.choices)
    texts = ["", ""]
    for chunk in client.completions.create(model="demo", prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]
    echoed = client.completions.create(model="demo", prompt=prompts[0], max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + whole.choices[0].text


def test_sdk_errors_are_typed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=MESSAGES, temperature=-1)
    assert bad.value.status_code == 400 and "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError):  # a wrong type: 400, never 422
        client.chat.completions.create(model="demo", messages=MESSAGES, extra_body={"max_tokens": "ten"})
    with pytest.raises(openai.BadRequestError) as ctx:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=100_000)
    assert ctx.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert [m.id for m in client.models.list()] == ["demo"]


# --- every validation case ---------------------------------------------------------------------------------


def png(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_message(url: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
OK_MSG = {"messages": MESSAGES, "max_tokens": 2}
CASES: list[tuple[str, Any, int, str | None]] = [
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CHAT, {**OK_MSG, "temperature": "0.5"}, 400, "temperature"),
    (CHAT, {**OK_MSG, "stream": "yes"}, 400, "stream"),
    (CHAT, {**OK_MSG, "max_tokens": 1.5}, 400, "max_tokens"),
    (CHAT, {**OK_MSG, "stop": 5}, 400, "stop"),
    (CHAT, {**OK_MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {**OK_MSG, "n": 1000}, 400, "n"),
    (CHAT, {**OK_MSG, "logprobs": True, "top_logprobs": 500}, 400, "logprobs"),
    (CHAT, {**OK_MSG, "seed": 2**70}, 400, "seed"),
    (CHAT, {**OK_MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {**OK_MSG, "model": "gpt-4"}, 404, "model"),
    (CHAT, {**OK_MSG, "frobnicate": {"x": 1}}, 200, None),  # unknown fields are ignored, as OpenAI does
    (CHAT, {"messages": image_message("data:image/png;base64,!!!!")}, 400, "messages.0.content.1"),
    (CHAT, {"messages": image_message("data:image/jpeg;base64," + png(8))}, 415, "messages.0.content.1"),
    (CHAT, {"messages": image_message("data:image/png;base64," + png(100))}, 413, "messages.0.content.1"),
    (CHAT, {"messages": image_message("data:image/png;base64," + png(8))}, 415, "messages.0.content.1"),
    (CHAT, {"messages": image_message("https://example.com/cat.png")}, 400, "messages.0.content.1"),
    (CMPL, {"max_tokens": 2}, 400, "prompt"),
    (CMPL, {"prompt": [[1, -1]]}, 400, "prompt"),
    (CMPL, {"prompt": [10**9]}, 400, "prompt"),
    (CMPL, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (CMPL, {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    (CMPL, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (CMPL, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (CMPL, {"prompt": "x" * 3000, "max_tokens": 1}, 400, "prompt"),  # longer than the KV budget holds
]


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES)
def test_validation(http: httpx.Client, path: str, body: Any, status: int, param: str | None) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize(
    ("content", "status"), [(b"{", 400), (b"", 400), (b"[]", 400), (b"null", 400), ("\u00e9".encode("latin-1"), 400)]
)
def test_malformed_bodies(http: httpx.Client, content: bytes, status: int) -> None:
    r = http.post(CHAT, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    r = http.get(CHAT)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# --- gzip, body limits, request ids ------------------------------------------------------------------------


def test_gzip_request_body_gives_the_same_answer(http: httpx.Client) -> None:
    body = {"prompt": "gzip " * 20, "max_tokens": 6, "temperature": 0}
    plain = http.post(CMPL, json=body).json()
    packed = http.post(CMPL, content=gzip.compress(orjson.dumps(body)), headers={"Content-Encoding": "gzip"})
    assert packed.status_code == 200 and packed.json()["choices"] == plain["choices"]


def test_zip_bomb_and_bad_gzip(http: httpx.Client) -> None:
    bomb = gzip.compress(b'{"prompt": "' + b" " * (4 * MAX_DECODED) + b'"}')
    r = http.post(CMPL, content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "max_decompressed_bytes" in r.json()["error"]["message"]
    r = http.post(CMPL, content=b"\x1f\x8bnot really", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400


def test_large_responses_are_gzipped_when_accepted_streams_never(http: httpx.Client) -> None:
    body = {"prompt": "zip", "max_tokens": 32, "n": 4, "logprobs": 5, "temperature": 0}
    zipped = http.post(CMPL, json=body, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip" and int(zipped.headers["content-length"]) < len(zipped.content)
    plain = http.post(CMPL, json=body, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json()["choices"] == zipped.json()["choices"]
    with http.stream("POST", CMPL, json={**body, "stream": True}, headers={"Accept-Encoding": "gzip"}) as s:
        assert "content-encoding" not in s.headers
        s.read()


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    big = orjson.dumps({"prompt": "x" * MAX_BODY})
    r = http.post(CMPL, content=big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:
        yield big[:40000]
        yield big[40000:]

    assert http.post(CMPL, content=chunks()).status_code == 413  # no Content-Length: counted as read


def test_request_id_echoed_and_logged_without_prompt(server: Server, http: httpx.Client) -> None:
    marker = "zebra-quartz-marker"
    r = http.post(CMPL, json={"prompt": marker, "max_tokens": 3}, headers={"X-Request-ID": "e2e-req-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-req-1"
    bad = http.post(CMPL, json={"prompt": marker, "max_tokens": 0}, headers={"X-Request-ID": "e2e-req-2"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "e2e-req-2"
    assert len(http.get("/v1/models").headers["x-request-id"]) == 32
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = {rec["request_id"]: rec for rec in server.access_log()}
        if "e2e-req-2" in records:
            break
        time.sleep(0.1)
    ok, refused = records["e2e-req-1"], records["e2e-req-2"]
    assert (ok["status"], ok["route"], ok["method"], ok["model"]) == (200, CMPL, "POST", "demo")
    assert ok["completion_tokens"] == 3 and ok["prompt_tokens"] > 0 and ok["latency_ms"] > 0
    assert refused["status"] == 400
    assert marker not in server.log.read_text()


def test_metrics_after_traffic(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model="demo", prompt="count me", max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'autoglm_requests_total{model="demo",route="/v1/completions",status="200"}' in text
    m = server.metrics()
    for name in ("e2e_request_latency", "time_to_first_token", "time_per_output_token", "request_queue_time"):
        assert m[f"autoglm_{name}_seconds_count"] >= 1, name
    assert m["autoglm_prompt_tokens_total"] > 0 and m["autoglm_generation_tokens_total"] >= 4
    assert m["autoglm_kv_cache_blocks"] == NUM_BLOCKS and m["autoglm_engine_step_loop_alive"] == 1
    assert m["autoglm_prefix_cache_queries_total"] >= m["autoglm_prefix_cache_hits_total"] >= 0


# --- disconnects free KV blocks ----------------------------------------------------------------------------


def _wait_idle(server: Server) -> dict[str, float]:
    deadline = time.monotonic() + 15
    while True:
        m = server.metrics()
        if m["autoglm_num_requests_running"] == 0 and m["autoglm_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def test_stream_disconnect_aborts_and_frees_blocks(server: Server) -> None:
    before = _wait_idle(server)
    body = {"prompt": "Tell me a long story", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", CMPL, json=body) as s:
        lines = s.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        during = server.metrics()
    # The connection is closed here, a handful of tokens in.
    after = _wait_idle(server)
    assert during["autoglm_kv_cache_free_blocks"] < before["autoglm_kv_cache_free_blocks"]
    assert after["autoglm_kv_cache_free_blocks"] == before["autoglm_kv_cache_free_blocks"]
    generated = after["autoglm_generation_tokens_total"] - before["autoglm_generation_tokens_total"]
    assert 0 < generated < LONG
    assert after["autoglm_requests_aborted_total"] > before.get("autoglm_requests_aborted_total", 0)


def test_collecting_request_disconnect_aborts_too(server: Server) -> None:
    before = _wait_idle(server)
    body = {"prompt": "Tell me a long story", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{CMPL}", json=body, timeout=httpx.Timeout(60, read=0.15))
    after = _wait_idle(server)
    assert after["autoglm_kv_cache_free_blocks"] == before["autoglm_kv_cache_free_blocks"]
    assert after["autoglm_generation_tokens_total"] - before["autoglm_generation_tokens_total"] < LONG


# --- schemathesis ------------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_errors(server: Server, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(st), "run", f"{server.url}/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples", "15", "--workers", "1", "--seed", "7", "--request-timeout", "60",
        "--generation-database", "none", "--no-color",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


# --- SIGTERM drain -----------------------------------------------------------------------------------------


def _drain_server(serve_process: Callable[..., Server], drain_timeout: float) -> Server:
    """A process of the test's own: SIGTERM ends it."""
    env = {"AUTOGLM_ENGINE__CACHE__NUM_BLOCKS": "512", "AUTOGLM_SERVER__DRAIN_TIMEOUT": str(drain_timeout)}
    return serve_process(env)


def _stream_events(lines: Iterator[str]) -> list[Any]:
    return [
        "[DONE]" if line == "data: [DONE]" else orjson.loads(line.removeprefix("data: "))
        for line in lines
        if line.startswith("data: ")
    ]


def test_sigterm_drain_finishes_in_flight_and_refuses_new(serve_process: Callable[..., Server]) -> None:
    server = _drain_server(serve_process, drain_timeout=60)
    body = {"prompt": "drain", "max_tokens": 1500, "n": 2, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", CMPL, json=body) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while (ready := c.get("/ready")).status_code != 503:
                assert time.monotonic() < deadline, "readiness never turned 503"
                time.sleep(0.01)
            assert ready.json()["error"]["code"] == "draining" and int(ready.headers["retry-after"]) >= 1
            assert c.get("/healthz").status_code == 200  # still alive while draining
            refused = c.post(CMPL, json={"prompt": "new", "max_tokens": 2})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            events = _stream_events(iter([first, *lines]))
        assert events[-1] == "[DONE]"
        finish = {ch["index"]: ch["finish_reason"] for e in events[:-1] for ch in e["choices"] if ch["finish_reason"]}
        assert finish == {0: "length", 1: "length"}
        assert sum(len(ch["text"]) > 0 for e in events[:-1] for ch in e["choices"]) > 100
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()


def test_drain_timeout_aborts_in_flight_with_finish_reason_abort(serve_process: Callable[..., Server]) -> None:
    server = _drain_server(serve_process, drain_timeout=0.2)
    body = {"prompt": "drain", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", CMPL, json=body) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            server.proc.send_signal(signal.SIGTERM)
            events = _stream_events(iter([first, *lines]))
        assert events[-1] == "[DONE]"
        finishes = [ch["finish_reason"] for e in events[:-1] for ch in e["choices"] if ch["finish_reason"]]
        assert finishes == ["abort"]
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
