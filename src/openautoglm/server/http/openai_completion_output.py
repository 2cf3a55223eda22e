"""Engine chunks → ``text_completion`` objects, collected or streamed; several prompts share one response.

Choice ``k * n + i`` is sequence ``i`` of prompt ``k``, as with OpenAI.
"""

from __future__ import annotations

from typing import Any

from openautoglm.protocol.outputs import CompletionOutput, RequestOutput
from openautoglm.server.http.openai_output import (
    OpenAIStreamOutput,
    finish_fields,
    finite_logprob,
    usage_dict,
)


class CompletionOutputs(OpenAIStreamOutput):
    chunk_object = "text_completion"

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
        super().__init__(response_id, model, include_usage=include_usage, created=created)
        self.n = n
        self.logprobs = logprobs  # None: no logprobs requested
        self.echo_texts = echo_texts
        size = n * num_prompts
        self._texts: list[list[str]] = [[] for _ in range(size)]
        self._offsets = [0] * size  # where the next token's text starts, for text_offset
        self._lengths = [0] * size  # characters of text so far
        self._lp: list[dict[str, list[Any]] | None] = [self._empty_lp() for _ in range(size)]
        self._finish: list[CompletionOutput | None] = [None] * size
        if echo_texts is not None:
            for k, text in enumerate(echo_texts):
                for i in range(n):
                    self._texts[k * n + i].append(text)
                    self._offsets[k * n + i] = self._lengths[k * n + i] = len(text)

    def _empty_lp(self) -> dict[str, list[Any]] | None:
        if self.logprobs is None:
            return None
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add_text(self, index: int, o: CompletionOutput, into: dict[str, list[Any]] | None) -> None:
        """Count one chunk's text and append its tokens' logprobs. Offsets add up the tokens' texts, whatever
        chunks they came in (a consumer that fell behind gets several tokens per chunk); a token that is part of
        a UTF-8 character (``bytes:…``) adds no text of its own, and no offset passes the text sent so far."""
        self._lengths[index] += len(o.text_delta)
        if into is None or not o.logprobs_delta:
            return
        assert self.logprobs is not None
        at, end = self._offsets[index], self._lengths[index]
        for lp in o.logprobs_delta:
            into["tokens"].append(lp.token)
            into["token_logprobs"].append(finite_logprob(lp.logprob))
            into["top_logprobs"].append({t: finite_logprob(v) for _, t, v in lp.top[: self.logprobs]})
            into["text_offset"].append(min(at, end))
            if not lp.token.startswith("bytes:"):
                at += len(lp.token)
        self._offsets[index] = at

    # --- collected -----------------------------------------------------------------------------------------

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.account(out)
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            self._texts[index].append(o.text_delta)
            self._add_text(index, o, self._lp[index])
            if o.finish_reason is not None:
                self._finish[index] = o

    def response(self) -> dict[str, Any]:
        choices = []
        for index, texts in enumerate(self._texts):
            choice = {"index": index, "text": "".join(texts), "logprobs": self._lp[index]}
            choices.append(choice | finish_fields(self._finish[index]))
        return {**self.envelope("text_completion"), "choices": choices, "usage": usage_dict(self.usage)}

    # --- streamed ------------------------------------------------------------------------------------------

    def start_events(self) -> list[bytes]:
        """With echo, each choice's stream starts with its prompt text."""
        if self.echo_texts is None:
            return []
        return [
            self.stream_chunk([{"index": k * self.n + i, "text": text, "logprobs": None, "finish_reason": None}])
            for k, text in enumerate(self.echo_texts)
            for i in range(self.n)
        ]

    def stream_choice(self, prompt_index: int, o: CompletionOutput) -> dict[str, Any]:
        index = prompt_index * self.n + o.index
        lp = self._empty_lp()
        self._add_text(index, o, lp)
        return {"index": index, "text": o.text_delta, "logprobs": lp, "finish_reason": None}
