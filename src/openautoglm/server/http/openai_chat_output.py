"""Engine chunks → ``chat.completion`` (collected) or ``chat.completion.chunk`` SSE events (streamed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from openautoglm.protocol.outputs import CompletionOutput, RequestOutput, TokenLogprob
from openautoglm.server.http.openai_output import OutputBase, finite_logprob, usage_dict
from openautoglm.server.http.responses import SSE_DONE, sse_event

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


class ChatOutput(OutputBase):
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
        super().__init__(response_id, model, created)
        self.n = n
        self.token_bytes = token_bytes
        self.top_logprobs = top_logprobs  # None: no logprobs requested
        self.include_usage = include_usage
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
            done = self._finish[i]
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(self._texts[i])},
                    "logprobs": {"content": self._logprobs[i]} if self.top_logprobs is not None else None,
                    "finish_reason": done.finish_reason.value if done and done.finish_reason else None,
                    "stop_reason": done.stop_reason if done else None,
                }
            )
        return {**self.envelope("chat.completion"), "choices": choices, "usage": usage_dict(self.usage)}

    # --- streamed ------------------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        body = {**self.envelope("chat.completion.chunk"), "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return sse_event(body)

    def start_events(self) -> list[bytes]:
        """The first chunk of each choice carries the role, as OpenAI's do."""
        return [
            self._chunk(
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

    def chunk_events(self, prompt_index: int, out: RequestOutput) -> list[bytes]:
        self.account(out)
        events = []
        for o in out.outputs:
            if not o.text_delta and o.finish_reason is None and not o.logprobs_delta:
                continue
            choice: dict[str, Any] = {
                "index": o.index,
                "delta": {"content": o.text_delta},
                "logprobs": None,
                "finish_reason": None,
            }
            if self.top_logprobs is not None and o.logprobs_delta:
                choice["logprobs"] = {"content": chat_logprobs(o.logprobs_delta, self.top_logprobs, self.token_bytes)}
            if o.finish_reason is not None:
                choice["finish_reason"] = o.finish_reason.value
                choice["stop_reason"] = o.stop_reason
            events.append(self._chunk([choice]))
        return events

    def end_events(self) -> list[bytes]:
        events = []
        if self.include_usage:
            body = {**self.envelope("chat.completion.chunk"), "choices": [], "usage": usage_dict(self.usage)}
            events.append(sse_event(body))
        events.append(SSE_DONE)
        return events
