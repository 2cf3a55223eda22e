"""Pieces shared by the chat and completion output converters: usage sums, engine errors, logprob values, the
finish fields of a choice and the stream's framing (chunk envelope, usage chunk, ``[DONE]``)."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import orjson

from openautoglm.protocol.errors import EngineError
from openautoglm.protocol.outputs import CompletionOutput, FinishReason, RequestOutput, Usage
from openautoglm.server.http.responses import SSE_DONE, sse_event

# JSON has no -inf; OpenAI reports impossible tokens as -9999.0, and so do we.
LOGPROB_FLOOR = -9999.0


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class OutputBase:
    """Sums usage over the engine requests of one HTTP request and turns engine failures into EngineError."""

    def __init__(self, response_id: str, model: str, created: int | None = None) -> None:
        self.response_id = response_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.usage = Usage()
        self.aborted = False  # a sequence ended with finish_reason abort (drain, admin)

    def account(self, out: RequestOutput) -> None:
        failed = out.error is not None
        for o in out.outputs:
            reason = o.finish_reason
            if reason is FinishReason.ERROR:
                failed = True
            elif reason is FinishReason.ABORT:
                self.aborted = True
        if failed:
            raise EngineError(f"generation failed inside the engine: {out.error or 'no detail given'}")
        if out.finished and out.usage is not None:
            self.usage.prompt_tokens += out.usage.prompt_tokens
            self.usage.completion_tokens += out.usage.completion_tokens
            self.usage.cached_tokens += out.usage.cached_tokens

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}


def finish_fields(done: CompletionOutput | None) -> dict[str, Any]:
    """A choice's ``finish_reason`` and ``stop_reason``; ``done`` is the sequence's last output, if it ended."""
    reason = done.finish_reason.value if done is not None and done.finish_reason is not None else None
    return {"finish_reason": reason, "stop_reason": done.stop_reason if done is not None else None}


class OpenAIStreamOutput(OutputBase, ABC):
    """An OpenAI output whose stream is ``chunk_object`` chunks, one per sequence with news (text, logprobs or
    its end), then the usage chunk (if asked for), then ``[DONE]``. With include_usage, every other chunk
    carries ``"usage": null``, as OpenAI's do. Subclasses say what a streamed choice holds."""

    chunk_object: ClassVar[str]

    def __init__(self, response_id: str, model: str, *, include_usage: bool, created: int | None) -> None:
        super().__init__(response_id, model, created)
        self.include_usage = include_usage
        # Every chunk of the stream shares its envelope: serialise it once, splice each chunk's choices in.
        envelope = orjson.dumps(self.envelope(self.chunk_object))
        self._chunk_head = b"data: " + envelope[:-1] + b',"choices":'
        self._chunk_tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def stream_chunk(self, choices: list[dict[str, Any]]) -> bytes:
        """``{envelope…, "choices": choices[, "usage": null]}`` as one SSE event."""
        return self._chunk_head + orjson.dumps(choices) + self._chunk_tail

    @abstractmethod
    def stream_choice(self, prompt_index: int, o: CompletionOutput) -> dict[str, Any]:
        """The choice for one sequence's news, with ``"finish_reason": None`` (set here when it ends)."""

    def chunk_events(self, prompt_index: int, out: RequestOutput) -> list[bytes]:
        self.account(out)
        events = []
        for o in out.outputs:
            if not (o.text_delta or o.logprobs_delta or o.finish_reason is not None):
                continue
            choice = self.stream_choice(prompt_index, o)
            if o.finish_reason is not None:
                choice.update(finish_fields(o))
            events.append(self.stream_chunk([choice]))
        return events

    def end_events(self) -> list[bytes]:
        events = []
        if self.include_usage:
            body = {**self.envelope(self.chunk_object), "choices": [], "usage": usage_dict(self.usage)}
            events.append(sse_event(body))
        events.append(SSE_DONE)
        return events
