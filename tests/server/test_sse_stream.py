"""The streaming hot path: SSEResponse as an ASGI app (events in order, a client that leaves stops the stream and
runs its cleanup at once, a server-side cancellation still propagates), the spliced chunk envelope (byte-identical
to serialising the whole object), and text offsets that do not depend on how tokens were grouped into chunks."""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from starlette.types import Send

from openautoglm.protocol.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob, Usage
from openautoglm.server.http.openai_chat_output import ChatOutput
from openautoglm.server.http.openai_completion_output import CompletionOutputs
from openautoglm.server.http.responses import SSE_HEADERS, SSEResponse, sse_body, sse_event


class _Client:
    """The ASGI side of one connection: a queue of what ``receive`` returns, and every message sent."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.sent: list[dict[str, Any]] = []
        self.got_body = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.got_body.set()


def _producer(parts: list[bytes], cleanup: list[str], hold: asyncio.Event | None = None) -> Callable[[Send], Any]:
    async def produce(send: Send) -> None:
        try:
            for part in parts:
                await send(sse_body(part))
            if hold is not None:
                await hold.wait()  # an engine that has nothing new yet
        finally:
            cleanup.append("closed")

    return produce


async def test_events_go_out_in_order_with_the_sse_headers() -> None:
    client, cleanup = _Client(), []
    await SSEResponse(_producer([b"data: 1\n\n", b"data: 2\n\n"], cleanup), SSE_HEADERS)(
        {"type": "http"}, client.receive, client.send
    )
    start, *bodies = client.sent
    headers = dict(start["headers"])
    assert start["status"] == 200 and headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    sent = [(b["body"], b["more_body"]) for b in bodies]
    assert sent == [(b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"", False)]
    assert cleanup == ["closed"]


async def test_a_client_that_leaves_ends_the_stream_and_its_cleanup_at_once() -> None:
    client, cleanup, hold = _Client(), [], asyncio.Event()
    response = SSEResponse(_producer([b"data: 1\n\n"], cleanup, hold))
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    await client.got_body.wait()
    client.incoming.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(task, 5)  # ends normally: the disconnect is not an error of the app
    assert cleanup == ["closed"] and not task.cancelled()
    assert client.sent[-1]["body"] == b"data: 1\n\n"  # nothing more was sent after the client left


async def test_a_server_cancellation_still_cancels_the_response() -> None:
    client, cleanup, hold = _Client(), [], asyncio.Event()
    response = SSEResponse(_producer([], cleanup, hold))
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    while not client.sent:  # the response has started and waits for its first event
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleanup == ["closed"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_spliced_chunk_envelope_equals_serialising_the_whole_object(kind: str, include_usage: bool) -> None:
    out = (
        ChatOutput('chatcmpl-é"1', "demo/ü", 1, include_usage=include_usage, created=7)
        if kind == "chat"
        else CompletionOutputs("cmpl-1", "demo", 1, include_usage=include_usage, created=7)
    )
    choices = [{"index": 0, "text": 'a "quoted" \n line', "logprobs": None, "finish_reason": None}]
    body = {**out.envelope(out.chunk_object), "choices": choices}
    if include_usage:
        body["usage"] = None
    assert out.stream_chunk(choices) == sse_event(body)
    assert orjson.loads(out.stream_chunk(choices)[6:]) == body


def _tokens() -> list[RequestOutput]:
    """Five tokens of one sequence, two of them halves of one UTF-8 character."""
    lps = [
        TokenLogprob(1, "Hi", -0.1, [(1, "Hi", -0.1)]),
        TokenLogprob(2, "bytes:\\xe4\\xbd", -0.2, [(2, "bytes:\\xe4\\xbd", -0.2)]),
        TokenLogprob(3, "bytes:\\xa0", -0.3, [(3, "bytes:\\xa0", -0.3)]),
        TokenLogprob(4, " yo", -math.inf, [(4, " yo", -math.inf)]),
        TokenLogprob(5, "!", -0.5, [(5, "!", -0.5)]),
    ]
    texts = ["Hi", "", "你", " yo", "!"]
    chunks = [RequestOutput("r", [CompletionOutput(0, t, [lp.token_id], [lp], num_tokens=i + 1)]) for i, (t, lp) in
              enumerate(zip(texts, lps, strict=True))]  # fmt: skip
    chunks[-1].outputs[0].finish_reason = FinishReason.LENGTH
    chunks[-1].finished, chunks[-1].usage = True, Usage(2, 5)
    return chunks


def _merged(chunks: list[RequestOutput], groups: list[int]) -> list[RequestOutput]:
    """The same stream as a consumer that fell behind sees it: consecutive chunks merged by ``groups`` sizes."""
    chunks, out, at = copy.deepcopy(chunks), [], 0
    for size in groups:
        head = chunks[at]
        for later in chunks[at + 1 : at + size]:
            head.merge(later)
        out.append(head)
        at += size
    return out


@pytest.mark.parametrize("groups", [[1, 1, 1, 1, 1], [5], [2, 3], [1, 2, 2], [3, 1, 1]])
def test_completion_text_offsets_do_not_depend_on_chunking(groups: list[int]) -> None:
    def offsets(chunks: list[RequestOutput], echo: list[str] | None) -> tuple[list[int], list[int]]:
        collected = CompletionOutputs("c", "demo", 1, logprobs=0, echo_texts=echo)
        streamed = CompletionOutputs("c", "demo", 1, logprobs=0, echo_texts=echo)
        events: list[bytes] = []
        for chunk in chunks:
            collected.add(0, chunk)
            events += streamed.chunk_events(0, chunk)
        got = [o for e in events for c in orjson.loads(e[6:])["choices"] for o in (c["logprobs"] or {}).get(
            "text_offset", [])]  # fmt: skip
        return collected.response()["choices"][0]["logprobs"]["text_offset"], got

    for echo in (None, ["Say: "]):
        base = 5 if echo else 0
        want = [base + 0, base + 2, base + 2, base + 2, base + 5]
        assert offsets(_merged(_tokens(), groups), echo) == (want, want)
