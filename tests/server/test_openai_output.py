"""Engine chunks → OpenAI response objects and SSE streams.

Oracles: the official ``openai`` package's own response types accept what we build, our documented schemas
accept it too, and a stream's deltas add up to exactly the collected response.
"""

from __future__ import annotations

import math

import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from openautoglm.protocol import openai as schemas
from openautoglm.protocol.errors import EngineError
from openautoglm.protocol.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob, Usage
from openautoglm.server.http.openai_chat_output import ChatOutput
from openautoglm.server.http.openai_completion_output import CompletionOutputs


def lp(tid: int, text: str, value: float, top: list[tuple[int, str, float]] | None = None) -> TokenLogprob:
    return TokenLogprob(token_id=tid, token=text, logprob=value, top=top or [(tid, text, value), (9, "z", -5.0)])


def script(n: int = 2, logprobs: bool = True) -> list[RequestOutput]:
    """Two sequences: 0 says "Hello world" and stops, 1 says "Hi…" and hits the length limit."""
    lps = (lambda *a: [lp(*a)]) if logprobs else (lambda *a: None)
    first = [CompletionOutput(0, "Hello", [1], lps(1, "Hello", -0.5))]
    if n > 1:
        first.append(CompletionOutput(1, "Hi", [2], lps(2, "Hi", -0.25)))
    chunks = [RequestOutput("r", first, prompt_token_ids=[7, 8, 9])]
    chunks.append(RequestOutput("r", [CompletionOutput(0, " world", [3], lps(3, " world", -math.inf))]))
    last = [CompletionOutput(0, "", [], None, FinishReason.STOP, "</s>")]
    if n > 1:
        last.append(CompletionOutput(1, "…", [4], lps(4, "…", -1.0), FinishReason.LENGTH))
    chunks.append(RequestOutput("r", last, finished=True, usage=Usage(3, 3 + n - 1, 2)))
    return chunks


def parse_sse(events: list[bytes]) -> list[dict | str]:
    out: list[dict | str] = []
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
        payload = event[6:-2]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def test_chat_collected_is_a_valid_openai_chat_completion() -> None:
    out = ChatOutput("chatcmpl-1", "demo", 2, top_logprobs=1, created=123)
    for chunk in script():
        out.add(0, chunk)
    body = out.response()
    ChatCompletion.model_validate(body)
    schemas.ChatCompletionResponse.model_validate(body)
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello world", "Hi…"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["choices"][0]["stop_reason"] == "</s>"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    tokens = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in tokens] == ["Hello", " world"]
    assert tokens[1]["logprob"] == -9999.0  # -inf has no JSON form
    assert tokens[0]["bytes"] == list(b"Hello") and len(tokens[0]["top_logprobs"]) == 1
    assert orjson.loads(orjson.dumps(body)) == body


def test_chat_without_logprobs_has_null_logprobs() -> None:
    out = ChatOutput("c", "demo", 2)
    for chunk in script(logprobs=False):
        out.add(0, chunk)
    assert all(c["logprobs"] is None for c in out.response()["choices"])


def test_chat_token_bytes_come_from_the_tokenizer() -> None:
    raw = {5: b"\xe4\xbd"}
    out = ChatOutput("c", "demo", 1, top_logprobs=0, token_bytes=lambda tid, text: raw[tid])
    out.add(0, RequestOutput("r", [CompletionOutput(0, "", [5], [lp(5, "bytes:\\xe4\\xbd", -1.0, top=[])])]))
    out.add(
        0,
        RequestOutput("r", [CompletionOutput(0, "", [], None, FinishReason.LENGTH)], finished=True, usage=Usage(1, 1)),
    )
    assert out.response()["choices"][0]["logprobs"]["content"][0]["bytes"] == [0xE4, 0xBD]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_adds_up_to_the_collected_response(include_usage: bool) -> None:
    collected = ChatOutput("c", "demo", 2, top_logprobs=1, created=1)
    streamed = ChatOutput("c", "demo", 2, top_logprobs=1, include_usage=include_usage, created=1)
    events = streamed.start_events()
    for chunk in script():
        collected.add(0, chunk)
        events += streamed.chunk_events(0, chunk)
    events += streamed.end_events()
    parsed = parse_sse(events)
    assert parsed[-1] == "[DONE]"
    bodies = [p for p in parsed if isinstance(p, dict)]
    for body in bodies:
        ChatCompletionChunk.model_validate(body)
        schemas.ChatCompletionChunk.model_validate(body)
    texts, finish, roles, logprob_tokens = ["", ""], [None, None], [0, 0], [[], []]
    for body in bodies:
        for choice in body["choices"]:
            i = choice["index"]
            roles[i] += choice["delta"].get("role") == "assistant"
            texts[i] += choice["delta"].get("content") or ""
            finish[i] = choice["finish_reason"] or finish[i]
            if choice["logprobs"]:
                logprob_tokens[i] += choice["logprobs"]["content"]
    want = collected.response()
    assert roles == [1, 1]  # the role comes once per choice, first
    assert texts == [c["message"]["content"] for c in want["choices"]]
    assert finish == [c["finish_reason"] for c in want["choices"]]
    assert logprob_tokens == [c["logprobs"]["content"] for c in want["choices"]]
    usage_chunks = [b for b in bodies if b.get("usage")]
    if include_usage:
        assert all("usage" in b for b in bodies)
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"] == want["usage"]
        assert bodies[-1] is usage_chunks[0]
    else:
        assert usage_chunks == [] and all("usage" not in b for b in bodies)


def test_engine_error_chunk_raises_engine_error() -> None:
    out = ChatOutput("c", "demo", 1)
    outputs = [CompletionOutput(0, "", [], None, FinishReason.ERROR)]
    bad = RequestOutput("r", outputs, finished=True, usage=Usage(1, 0), error="boom")
    with pytest.raises(EngineError, match="boom"):
        out.add(0, bad)
    with pytest.raises(EngineError, match="boom"):
        ChatOutput("c", "demo", 1).chunk_events(0, bad)


def test_abort_is_reported_as_finish_reason_abort() -> None:
    out = ChatOutput("c", "demo", 1)
    outputs = [CompletionOutput(0, "x", [1], None, FinishReason.ABORT)]
    out.add(0, RequestOutput("r", outputs, finished=True, usage=Usage(1, 1)))
    assert out.aborted and out.response()["choices"][0]["finish_reason"] == "abort"


# --- completions -------------------------------------------------------------------------------------------


def test_completions_of_two_prompts_index_choices_k_times_n_plus_i() -> None:
    out = CompletionOutputs("cmpl-1", "demo", 2, num_prompts=2, created=5)
    for k in (1, 0):  # arrival order does not matter
        for chunk in script():
            out.add(k, chunk)
    body = out.response()
    Completion.model_validate(body)
    schemas.CompletionResponse.model_validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["Hello world", "Hi…"] * 2
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 8


def test_completion_echo_and_logprob_offsets() -> None:
    out = CompletionOutputs("c", "demo", 2, logprobs=1, echo_texts=["Say: "])
    for chunk in script():
        out.add(0, chunk)
    first = out.response()["choices"][0]
    assert first["text"] == "Say: Hello world"
    logprobs = first["logprobs"]
    assert logprobs["tokens"] == ["Hello", " world"]
    assert logprobs["text_offset"] == [5, 10]  # after the echoed prompt
    assert logprobs["token_logprobs"] == [-0.5, -9999.0]
    assert logprobs["top_logprobs"] == [{"Hello": -0.5}, {" world": -9999.0}]
    assert first["text"][logprobs["text_offset"][1] :].startswith(" world")


def test_completion_offsets_of_partial_character_tokens_stay_inside_the_text() -> None:
    out = CompletionOutputs("c", "demo", 1, logprobs=0)
    toks = [lp(1, "bytes:\\xe4\\xbd", -1.0), lp(2, "bytes:\\xa0", -1.0), lp(3, "!", -1.0)]
    out.add(0, RequestOutput("r", [CompletionOutput(0, "你!", [1, 2, 3], toks)]))
    out.add(
        0,
        RequestOutput("r", [CompletionOutput(0, "", [], None, FinishReason.LENGTH)], finished=True, usage=Usage(1, 3)),
    )
    assert out.response()["choices"][0]["logprobs"]["text_offset"] == [0, 0, 0]


@pytest.mark.parametrize("echo", [None, ["P"]])
def test_completion_stream_adds_up_to_the_collected_response(echo: list[str] | None) -> None:
    collected = CompletionOutputs("c", "demo", 2, logprobs=1, echo_texts=echo, created=1)
    streamed = CompletionOutputs("c", "demo", 2, logprobs=1, echo_texts=echo, include_usage=True, created=1)
    events = streamed.start_events()
    for chunk in script():
        collected.add(0, chunk)
        events += streamed.chunk_events(0, chunk)
    events += streamed.end_events()
    parsed = parse_sse(events)
    assert parsed[-1] == "[DONE]"
    bodies = [p for p in parsed if isinstance(p, dict)]
    texts, offsets = ["", ""], [[], []]
    for body in bodies:
        # The SDK parses stream chunks leniently with its Completion type (finish_reason not optional there).
        schemas.CompletionResponse.model_validate(body)
        for choice in body["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["logprobs"]:
                offsets[choice["index"]] += choice["logprobs"]["text_offset"]
    want = collected.response()
    assert texts == [c["text"] for c in want["choices"]]
    assert offsets == [c["logprobs"]["text_offset"] for c in want["choices"]]
    assert bodies[-1]["usage"] == want["usage"] and bodies[-1]["choices"] == []
