"""Engine chunks → ``chat.completion`` (collected) or ``chat.completion.chunk`` SSE events (streamed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from openautoglm.protocol.outputs import CompletionOutput, RequestOutput, TokenLogprob
from openautoglm.server.http.openai_output import (
    OpenAIStreamOutput,
    finish_fields,
    finite_logprob,
    usage_dict,
)

TokenBytes = Callable[[int, str], bytes]  # (token id, token text) → the token's raw bytes


def text_bytes(token_id: int, text: str) -> bytes:
    return text.encode("utf-8")


def chat_logprobs(lps: list[TokenLogprob], top: int, token_bytes: TokenBytes = text_bytes) -> list[dict[str, Any]]:
    """OpenAI's ``bytes`` are the raw bytes of a token, which differ from its text for partial characters."""
    return [
        {
            "token": lp.token,
            "logprob": finite_logprob(lp.logprob),
            "bytes": list(token_bytes(lp.token_id, lp.token)),
            "top_logprobs": [
                {"token": text, "logprob": finite_logprob(value), "bytes": list(token_bytes(tid, text))}
                for tid, text, value in lp.top[:top]
            ],
        }
        for lp in lps
    ]


class ChatOutput(OpenAIStreamOutput):
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        response_id: str,
        model: str,
        n: int,
        *,
        top_logprobs: int | None = None,
        include_usage: bool = False,
        token_bytes: TokenBytes = text_bytes,
        created: int | None = None,
    ) -> None:
        super().__init__(response_id, model, include_usage=include_usage, created=created)
        self.n = n
        self.token_bytes = token_bytes
        self.top_logprobs = top_logprobs  # None: no logprobs requested
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self._finish: list[CompletionOutput | None] = [None] * n

    # --- collected -----------------------------------------------------------------------------------------

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.account(out)
        for o in out.outputs:
            self._texts[o.index].append(o.text_delta)
            if self.top_logprobs is not None and o.logprobs_delta:
                self._logprobs[o.index].extend(chat_logprobs(o.logprobs_delta, self.top_logprobs, self.token_bytes))
            if o.finish_reason is not None:
                self._finish[o.index] = o

    def response(self) -> dict[str, Any]:
        choices = []
        for i in range(self.n):
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(self._texts[i])},
                    "logprobs": {"content": self._logprobs[i]} if self.top_logprobs is not None else None,
                    **finish_fields(self._finish[i]),
                }
            )
        return {**self.envelope("chat.completion"), "choices": choices, "usage": usage_dict(self.usage)}

    # --- streamed ------------------------------------------------------------------------------------------

    def start_events(self) -> list[bytes]:
        """The first chunk of each choice carries the role, as OpenAI's do."""
        return [
            self.stream_chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(self.n)
        ]

    def stream_choice(self, prompt_index: int, o: CompletionOutput) -> dict[str, Any]:
        logprobs = None
        if self.top_logprobs is not None and o.logprobs_delta:
            logprobs = {"content": chat_logprobs(o.logprobs_delta, self.top_logprobs, self.token_bytes)}
        return {"index": o.index, "delta": {"content": o.text_delta}, "logprobs": logprobs, "finish_reason": None}
