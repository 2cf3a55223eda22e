"""Middleware and error mapping on a small app of test routes (no engine needed): request ids, access
logs, drain refusals, body limits, gzip in and out, and the OpenAI error shape of framework errors."""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from openautoglm.config.server import ServerConfig
from openautoglm.engine.stats import EngineStats
from openautoglm.protocol.errors import RateLimitError, ServiceUnavailableError
from openautoglm.protocol.outputs import Usage
from openautoglm.server.http.errors import install_error_handlers
from openautoglm.server.http.metrics import ServerMetrics
from openautoglm.server.http.middleware import (
    GzipResponseMiddleware,
    RequestBodyMiddleware,
    RequestContextMiddleware,
    accepts_gzip,
)
from openautoglm.server.http.responses import OrjsonResponse
from openautoglm.server.http.state import ServerState

MAX_BODY = 4096
MAX_DECODED = 16384


def build(**cfg: Any) -> tuple[FastAPI, list[str]]:
    config = ServerConfig(max_body_bytes=MAX_BODY, max_decompressed_bytes=MAX_DECODED, gzip_min_bytes=512, **cfg)
    state = ServerState()
    metrics = ServerMetrics(lambda: EngineStats(num_blocks=8, num_free_blocks=8), "m", state)
    app = FastAPI()
    app.state.server_state = state
    app.state.metrics = metrics
    calls: list[str] = []
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        calls.append("echo")
        body = await request.body()
        info = request.state.info
        info.model, info.usage, info.prompt = "m", Usage(3, 4, 1), "secret prompt"
        return OrjsonResponse({"size": len(body), "sha": hashlib.sha256(body).hexdigest()})

    @app.get("/big")
    async def big() -> Response:
        return OrjsonResponse({"data": "x" * 5000})

    @app.get("/small")
    async def small() -> Response:
        return OrjsonResponse({"data": "x"})

    @app.get("/stream")
    async def stream() -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"data: " + b"y" * 600 + b"\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> Response:
        raise RuntimeError("kaput")

    @app.get("/busy")
    async def busy() -> Response:
        raise RateLimitError("slow down", retry_after=2.2)

    @app.get("/ready")
    async def ready() -> Response:
        return OrjsonResponse({"status": "ready"})

    app.add_middleware(RequestBodyMiddleware, max_body_bytes=MAX_BODY, max_decompressed_bytes=MAX_DECODED)
    app.add_middleware(GzipResponseMiddleware, min_bytes=config.gzip_min_bytes)
    app.add_middleware(RequestContextMiddleware, config=config, state=state, metrics=metrics)
    return app, calls


@pytest.fixture
def app_calls() -> tuple[FastAPI, list[str]]:
    return build()


@pytest.fixture
async def client(app_calls: tuple[FastAPI, list[str]]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_calls[0], raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def assert_openai_error(r: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if kind is not None:
        assert err["type"] == kind
    return err


# --- request ids and access logs ---------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    r = await client.get("/small", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = {(await client.get("/small")).headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3 and all(len(g) == 32 for g in generated)


async def test_unusable_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    for bad in ("a" * 200, "x y", "id\u00e9".encode()):
        r = await client.get("/small", headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32


async def test_request_id_header_name_is_configurable() -> None:
    app, _ = build(request_id_header="X-Trace")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/small", headers={"X-Trace": "t-1"})
    assert r.headers["x-trace"] == "t-1" and "x-request-id" not in r.headers


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "openautoglm.access"]


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_access_log_line_is_json_without_prompt_unless_configured(
    log_prompts: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = build(log_prompts=log_prompts)
    caplog.set_level(logging.INFO, logger="openautoglm.access")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/echo", content=b"hello", headers={"X-Request-ID": "rid-1"})
    (rec,) = access_records(caplog)
    assert rec["request_id"] == "rid-1" and rec["method"] == "POST" and rec["route"] == "/echo"
    assert rec["status"] == 200 and rec["latency_ms"] >= 0 and rec["model"] == "m"
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cached_tokens"]) == (3, 4, 1)
    assert ("prompt" in rec) is log_prompts
    assert ("secret prompt" in caplog.text) is log_prompts


async def test_probes_log_at_debug_only(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="openautoglm.access")
    await client.get("/ready")
    assert access_records(caplog) == []


async def test_request_metrics_by_route_status_model(
    app_calls: tuple[FastAPI, list[str]], client: httpx.AsyncClient
) -> None:
    await client.post("/echo", content=b"x")
    await client.get("/nope")
    text = app_calls[0].state.metrics.render().decode()
    assert 'autoglm_requests_total{model="m",route="/echo",status="200"} 1.0' in text
    assert 'autoglm_requests_total{model="",route="unmatched",status="404"} 1.0' in text


# --- errors ------------------------------------------------------------------------------------------------


async def test_unknown_route_and_method_are_openai_errors(client: httpx.AsyncClient) -> None:
    assert assert_openai_error(await client.get("/nope"), 404, "not_found_error")["code"] == "route_not_found"
    r = await client.put("/echo")
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"


async def test_unhandled_exception_is_500_with_request_id(client: httpx.AsyncClient) -> None:
    r = await client.get("/boom", headers={"X-Request-ID": "r-500"})
    err = assert_openai_error(r, 500, "internal_error")
    assert "kaput" not in err["message"]  # internals stay in the server log
    assert r.headers["x-request-id"] == "r-500"


async def test_429_carries_retry_after_rounded_up(client: httpx.AsyncClient) -> None:
    r = await client.get("/busy")
    assert_openai_error(r, 429, "rate_limit_error")
    assert r.headers["retry-after"] == "3"


# --- drain -------------------------------------------------------------------------------------------------


async def test_draining_refuses_new_requests_but_not_probes(
    app_calls: tuple[FastAPI, list[str]], client: httpx.AsyncClient
) -> None:
    app, calls = app_calls
    app.state.server_state.begin_drain()
    r = await client.post("/echo", content=b"x")
    assert assert_openai_error(r, 503, "service_unavailable")["code"] == "draining"
    assert r.headers["retry-after"] == str(ServerConfig().retry_after)
    assert calls == []
    assert (await client.get("/ready")).status_code == 200


async def test_in_flight_count_returns_to_zero(app_calls: tuple[FastAPI, list[str]], client: httpx.AsyncClient) -> None:
    await client.post("/echo", content=b"x")
    await client.get("/boom")
    assert app_calls[0].state.server_state.active_requests == 0


# --- request bodies ----------------------------------------------------------------------------------------


async def test_body_within_limit_passes_intact(client: httpx.AsyncClient) -> None:
    body = bytes(range(256)) * 16  # exactly MAX_BODY
    r = await client.post("/echo", content=body)
    assert r.json() == {"size": len(body), "sha": hashlib.sha256(body).hexdigest()}


async def test_content_length_over_limit_is_413_before_any_read(app_calls: tuple[FastAPI, list[str]]) -> None:
    app, calls = app_calls
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append({})
        return {"type": "http.request", "body": b"x" * 10, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"t"), (b"content-length", str(MAX_BODY + 1).encode())],
        "client": ("127.0.0.1", 1), "server": ("t", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    assert sent[0]["status"] == 413 and received == [] and calls == []
    assert orjson.loads(sent[1]["body"])["error"]["type"] == "invalid_request_error"


async def test_streamed_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 1000

    r = await client.post("/echo", content=chunks())  # chunked: no Content-Length to check up front
    assert_openai_error(r, 413)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_body_is_decoded(client: httpx.AsyncClient, encoding: str) -> None:
    body = b'{"prompt": "' + b"a" * 9000 + b'"}'  # over MAX_BODY decoded, far under it compressed
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    r = await client.post("/echo", content=packed, headers={"Content-Encoding": encoding})
    assert r.json() == {"size": len(body), "sha": hashlib.sha256(body).hexdigest()}


async def test_zip_bomb_is_413(client: httpx.AsyncClient) -> None:
    bomb = gzip.compress(b"\0" * (50 * MAX_DECODED))
    assert len(bomb) < MAX_BODY
    err = assert_openai_error(await client.post("/echo", content=bomb, headers={"Content-Encoding": "gzip"}), 413)
    assert "max_decompressed_bytes" in err["message"]


@pytest.mark.parametrize(
    ("content", "encoding", "status"),
    [
        (b"not gzip at all", "gzip", 400),
        (gzip.compress(b"abc")[:-6], "gzip", 400),  # truncated
        (gzip.compress(b"abc") + b"junk", "gzip", 400),
        (b"abc", "br", 415),
    ],
)
async def test_bad_encoded_bodies(client: httpx.AsyncClient, content: bytes, encoding: str, status: int) -> None:
    assert_openai_error(await client.post("/echo", content=content, headers={"Content-Encoding": encoding}), status)


# --- response compression ----------------------------------------------------------------------------------


async def test_large_response_is_gzipped_when_accepted(client: httpx.AsyncClient) -> None:
    r = await client.get("/big", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and "accept-encoding" in r.headers["vary"].lower()
    assert int(r.headers["content-length"]) < 1000
    assert r.json() == {"data": "x" * 5000}  # httpx decodes it


@pytest.mark.parametrize(
    ("path", "accept"), [("/big", "identity"), ("/big", "gzip;q=0"), ("/small", "gzip"), ("/stream", "gzip")]
)
async def test_not_gzipped(client: httpx.AsyncClient, path: str, accept: str) -> None:
    r = await client.get(path, headers={"Accept-Encoding": accept})
    assert "content-encoding" not in r.headers


def test_accepts_gzip_parsing() -> None:
    assert accepts_gzip("gzip, deflate, br") and accepts_gzip("br;q=1.0, gzip;q=0.8") and accepts_gzip("*")
    assert not accepts_gzip("") and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")


def test_service_unavailable_default_retry_after() -> None:
    from openautoglm.server.http.errors import error_response

    assert error_response(ServiceUnavailableError("x")).headers["retry-after"] == "1"
