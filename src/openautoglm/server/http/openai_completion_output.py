"""Engine chunks → ``text_completion`` objects, collected or streamed; several prompts share one response.

Choice ``k * n + i`` is sequence ``i`` of prompt ``k``, as with OpenAI.
"""

from __future__ import annotations

from typing import Any

from openautoglm.protocol.outputs import CompletionOutput, RequestOutput, TokenLogprob
from openautoglm.server.http.openai_output import OutputBase, finite_logprob, usage_dict
from openautoglm.server.http.responses import SSE_DONE, sse_event


class CompletionOutputs(OutputBase):
    def __init__(
        self,
        response_id: str,
        model: str,
        n: int,
        *,
        num_prompts: int = 1,
        logprobs: int | None = None,
        echo_texts: list[str] | None = None,
        include_usage: bool = False,
        created: int | None = None,
    ) -> None:
        super().__init__(response_id, model, created)
        self.n = n
        self.logprobs = logprobs  # None: no logprobs requested
        self.include_usage = include_usage
        self.echo_texts = echo_texts
        size = n * num_prompts
        self._texts: list[list[str]] = [[] for _ in range(size)]
        self._offsets = [0] * size  # characters of text so far, for text_offset
        self._lp: list[dict[str, list[Any]] | None] = [self._empty_lp() for _ in range(size)]
        self._finish: list[CompletionOutput | None] = [None] * size
        if echo_texts is not None:
            for k, text in enumerate(echo_texts):
                for i in range(n):
                    self._texts[k * n + i].append(text)
                    self._offsets[k * n + i] = len(text)

    def _empty_lp(self) -> dict[str, list[Any]] | None:
        if self.logprobs is None:
            return None
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _logprobs_of(self, index: int, lps: list[TokenLogprob], text: str, into: dict[str, list[Any]]) -> None:
        """Append one chunk's tokens. Offsets are clamped to the chunk's text: a token that is part of a UTF-8
        character (``bytes:…``) adds no text of its own."""
        assert self.logprobs is not None
        start = self._offsets[index]
        end = start + len(text)
        at = start
        for lp in lps:
            into["tokens"].append(lp.token)
            into["token_logprobs"].append(finite_logprob(lp.logprob))
            into["top_logprobs"].append({t: finite_logprob(v) for _, t, v in lp.top[: self.logprobs]})
            into["text_offset"].append(min(at, end))
            if not lp.token.startswith("bytes:"):
                at += len(lp.token)

    # --- collected -----------------------------------------------------------------------------------------

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.account(out)
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            self._texts[index].append(o.text_delta)
            lp = self._lp[index]
            if lp is not None and o.logprobs_delta:
                self._logprobs_of(index, o.logprobs_delta, o.text_delta, lp)
            self._offsets[index] += len(o.text_delta)
            if o.finish_reason is not None:
                self._finish[index] = o

    def response(self) -> dict[str, Any]:
        choices = []
        for index, texts in enumerate(self._texts):
            done = self._finish[index]
            choices.append(
                {
                    "index": index,
                    "text": "".join(texts),
                    "logprobs": self._lp[index],
                    "finish_reason": done.finish_reason.value if done and done.finish_reason else None,
                    "stop_reason": done.stop_reason if done else None,
                }
            )
        return {**self.envelope("text_completion"), "choices": choices, "usage": usage_dict(self.usage)}

    # --- streamed ------------------------------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        body = {**self.envelope("text_completion"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return sse_event(body)

    def start_events(self) -> list[bytes]:
        """With echo, each choice's stream starts with its prompt text."""
        if self.echo_texts is None:
            return []
        return [
            self._chunk({"index": k * self.n + i, "text": text, "logprobs": None, "finish_reason": None})
            for k, text in enumerate(self.echo_texts)
            for i in range(self.n)
        ]

    def chunk_events(self, prompt_index: int, out: RequestOutput) -> list[bytes]:
        self.account(out)
        events = []
        for o in out.outputs:
            if not o.text_delta and o.finish_reason is None and not o.logprobs_delta:
                continue
            index = prompt_index * self.n + o.index
            lp = self._empty_lp()
            if lp is not None and o.logprobs_delta:
                self._logprobs_of(index, o.logprobs_delta, o.text_delta, lp)
            self._offsets[index] += len(o.text_delta)
            choice: dict[str, Any] = {
                "index": index,
                "text": o.text_delta,
                "logprobs": lp,
                "finish_reason": None,
            }
            if o.finish_reason is not None:
                choice["finish_reason"] = o.finish_reason.value
                choice["stop_reason"] = o.stop_reason
            events.append(self._chunk(choice))
        return events

    def end_events(self) -> list[bytes]:
        events = []
        if self.include_usage:
            body = {**self.envelope("text_completion"), "choices": [], "usage": usage_dict(self.usage)}
            events.append(sse_event(body))
        events.append(SSE_DONE)
        return events
