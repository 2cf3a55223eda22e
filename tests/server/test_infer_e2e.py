"""``POST /v1/infer`` against a real ``autoglm serve`` process (demo model, a free loopback port).

The server runs with small media limits (set through the environment, as a user would) so that the 413 paths
are reached by bodies far below the HTTP body limit. Oracles: the envelope's greedy text equals the OpenAI
routes' greedy text for the same prompt or messages, and a stream's deltas add up to the non-streaming text.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

MAX_IMAGE_BYTES = 16 * 1024
MAX_IMAGE_PIXELS = 128 * 128


@pytest.fixture(scope="module")
def server(serve_process) -> Iterator[str]:
    env = {
        "AUTOGLM_SERVER__MEDIA__MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "AUTOGLM_SERVER__MEDIA__MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
    }
    with serve_process(env) as handle:
        yield handle.url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def image_b64(fmt: str, size: tuple[int, int] = (16, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(buf, format=fmt.upper())
    return base64.b64encode(buf.getvalue()).decode()


def text(data: str, **metadata: str) -> dict:
    return {"modality": "text", "data": data, "metadata": metadata}


GREEDY = {"max_tokens": 8, "temperature": 0}


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_text_envelope_matches_completions(client: httpx.Client) -> None:
    body = {"inputs": [text("The quick brown fox")], "parameters": GREEDY}
    resp = client.post("/v1/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    model = client.get("/v1/models").json()["data"][0]["id"]
    assert out["object"] == "infer.response" and out["model"] == model and out["id"]
    [first] = out["outputs"]
    assert first["index"] == 0 and first["modality"] == "text" and first["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    ref = client.post("/v1/completions", json={"model": model, "prompt": "The quick brown fox", **GREEDY}).json()
    assert first["text"] == ref["choices"][0]["text"]
    assert usage["prompt_tokens"] == ref["usage"]["prompt_tokens"]


def test_roles_match_chat_completions(client: httpx.Client) -> None:
    inputs = [text("Be brief.", role="system"), text("Hello there", role="user")]
    out = client.post("/v1/infer", json={"inputs": inputs, "parameters": GREEDY}).json()
    model = out["model"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ref = client.post("/v1/chat/completions", json={"model": model, "messages": messages, **GREEDY}).json()
    assert out["outputs"][0]["text"] == ref["choices"][0]["message"]["content"]
    assert out["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]


def test_stream_adds_up_to_the_whole_text(client: httpx.Client) -> None:
    body = {
        "inputs": [text("Once upon a time")],
        "parameters": {**GREEDY, "n": 2, "seed": 3, "temperature": 0.8},
    }
    whole = client.post("/v1/infer", json=body).json()
    texts = ["", ""]
    events = []
    with client.stream("POST", "/v1/infer", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert chunk["object"] == "infer.chunk" and chunk["id"] == chunks[0]["id"]
        for o in chunk["outputs"]:
            texts[o["index"]] += o["text"]
    assert texts == [o["text"] for o in whole["outputs"]]
    # cached_tokens differs: the second run of the same prompt hits the prefix cache
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert chunks[-1]["usage"][key] == whole["usage"][key]


def test_unknown_modality_is_415(client: httpx.Client) -> None:
    body = {"inputs": [text("hi"), {"modality": "video", "data": "AAAA"}]}
    err = assert_error(client.post("/v1/infer", json=body), 415, "inputs[1].modality")
    assert "video" in err["message"]


def test_invalid_base64_is_400(client: httpx.Client) -> None:
    body = {"inputs": [text("hi"), {"modality": "image", "data": image_b64("png")[:-3]}]}
    assert_error(client.post("/v1/infer", json=body), 400, "inputs[1].data")


def test_format_mismatch_is_415(client: httpx.Client) -> None:
    body = {"inputs": [{"modality": "image", "data": image_b64("png"), "metadata": {"format": "jpeg"}}]}
    err = assert_error(client.post("/v1/infer", json=body), 415, "inputs[0].metadata.format")
    assert "png" in err["message"]


def test_image_over_byte_limit_is_413(client: httpx.Client) -> None:
    data = base64.b64encode(os.urandom(MAX_IMAGE_BYTES + 1)).decode()
    body = {"inputs": [{"modality": "image", "data": data, "metadata": {"format": "png"}}]}
    assert_error(client.post("/v1/infer", json=body), 413, "inputs[0].data")


def test_image_over_pixel_limit_is_413(client: httpx.Client) -> None:
    data = image_b64("png", (200, 200))
    assert len(data) < MAX_IMAGE_BYTES
    body = {"inputs": [{"modality": "image", "data": data}]}
    err = assert_error(client.post("/v1/infer", json=body), 413, "inputs[0].data")
    assert "200x200" in err["message"]


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "gif"])
def test_valid_image_to_text_only_model_is_415_naming_text(client: httpx.Client, fmt: str) -> None:
    body = {
        "inputs": [
            text("What is this?"),
            {"modality": "image", "data": image_b64(fmt), "metadata": {"format": fmt}},
        ]
    }
    err = assert_error(client.post("/v1/infer", json=body), 415)
    assert "'text'" in err["message"] and "image" in err["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": [{"modality": "text", "data": 7}]},
        {"inputs": [text("x")], "parameters": {"temperature": "warm"}},
        {"inputs": [text("x")], "parameters": {"top_p": 0}},
        {"inputs": [text("")]},
    ],
)
def test_malformed_envelope_is_400_never_422(client: httpx.Client, body: dict) -> None:
    assert_error(client.post("/v1/infer", json=body), 400)


def test_unknown_model_is_404(client: httpx.Client) -> None:
    assert_error(client.post("/v1/infer", json={"model": "no-such-model", "inputs": [text("x")]}), 404, "model")


def _metric(client: httpx.Client, name: str, label: str = "") -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and label in line and line[len(name)] in " {":
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_leaving_a_stream_aborts_it_and_frees_its_blocks(server: str, client: httpx.Client) -> None:
    free = "autoglm_kv_cache_free_blocks"
    aborted = ("autoglm_requests_aborted_total", 'reason="client_disconnected"')
    initial, aborted_before = _metric(client, free), _metric(client, *aborted)
    tokens_before = _metric(client, "autoglm_generation_tokens_total")
    max_model_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    params = {"max_tokens": None, "ignore_eos": True, "temperature": 0}  # runs to the end of the context
    body = {"inputs": [text("Tell me a very long story")], "parameters": params, "stream": True}
    with httpx.Client(base_url=server, timeout=60) as own, own.stream("POST", "/v1/infer", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert _metric(client, free) < initial  # the request holds KV blocks while it runs
    # The connection is closed: the request must be aborted and its blocks returned at once.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        _metric(client, free) != initial or _metric(client, "autoglm_num_requests_running") != 0
    ):
        time.sleep(0.1)
    assert _metric(client, free) == initial and _metric(client, "autoglm_num_requests_running") == 0
    assert _metric(client, *aborted) == aborted_before + 1
    generated = _metric(client, "autoglm_generation_tokens_total") - tokens_before
    assert generated < max_model_len // 2  # stopped early, not run to the end of the context


def test_envelope_records_queue_time_and_first_token(client: httpx.Client) -> None:
    names = ("autoglm_request_queue_time_seconds_count", "autoglm_time_to_first_token_seconds_count")
    before = [_metric(client, name) for name in names]
    resp = client.post("/v1/infer", json={"inputs": [text("Queue me")], "parameters": GREEDY})
    assert resp.status_code == 200, resp.text
    assert [_metric(client, name) for name in names] == [value + 1 for value in before]


def test_server_still_serves_afterwards(client: httpx.Client) -> None:
    assert client.get("/ready").status_code == 200
    resp = client.post("/v1/infer", json={"inputs": [text("Still there?")], "parameters": GREEDY})
    assert resp.status_code == 200 and resp.json()["outputs"][0]["finish_reason"] in ("stop", "length")
