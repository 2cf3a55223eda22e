"""LLM: the synchronous batch API for offline use. It drives EngineCore in the calling thread."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from openautoglm.config.settings import EngineConfig, ModelConfig
from openautoglm.engine.core import EngineCore
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.outputs import CompletedRequest, RequestOutput
from openautoglm.protocol.request import ChatMessage, GenerationRequest
from openautoglm.protocol.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """``LLM(model="demo").generate(["Hello"], SamplingParams(max_tokens=8))`` → one CompletedRequest a prompt."""

    def __init__(self, config: EngineConfig | None = None, **model_fields: Any) -> None:
        if config is None:
            config = EngineConfig(model=ModelConfig(**model_fields))
        elif model_fields:
            config = config.model_copy(update={"model": config.model.model_copy(update=model_fields)})
        self.core = EngineCore(config)
        self._ids = itertools.count()

    @classmethod
    def from_core(cls, core: EngineCore) -> LLM:
        """Drive an existing EngineCore (tests inject faults into one they hold)."""
        llm = cls.__new__(cls)
        llm.core, llm._ids = core, itertools.count()
        return llm

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[CompletedRequest]:
        requests = [
            GenerationRequest(
                request_id=f"offline-{next(self._ids)}",
                prompt=p if isinstance(p, str) else None,
                prompt_token_ids=None if isinstance(p, str) else list(p),
                sampling=s,
            )
            for p, s in zip(prompts, self._params(sampling, len(prompts)), strict=True)
        ]
        return self.run(requests)

    def chat(
        self,
        conversations: Sequence[list[ChatMessage]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletedRequest]:
        requests = [
            GenerationRequest(request_id=f"offline-{next(self._ids)}", messages=list(msgs), sampling=s)
            for msgs, s in zip(conversations, self._params(sampling, len(conversations)), strict=True)
        ]
        return self.run(requests)

    def run(self, requests: Sequence[GenerationRequest]) -> list[CompletedRequest]:
        """Validate every request first (nothing is scheduled if one is bad), then run them all to completion."""
        processed = [self.core.input_processor.process(r) for r in requests]
        results = {p.request_id: CompletedRequest(p.request_id) for p in processed}
        for p in processed:
            self.core.add_request(p)
        while self.core.has_unfinished():
            for chunk in self.core.step():
                results[chunk.request_id].add(chunk)
        return [results[p.request_id] for p in processed]

    def stream(self, request: GenerationRequest) -> Iterator[RequestOutput]:
        """Run one request, yielding its chunks as the engine produces them."""
        processed = self.core.input_processor.process(request)
        self.core.add_request(processed)
        try:
            while self.core.has_unfinished():
                for chunk in self.core.step():
                    if chunk.request_id == processed.request_id:
                        yield chunk
        finally:
            self.core.abort([processed.request_id])

    @staticmethod
    def _params(sampling: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sampling is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling, SamplingParams):
            return [sampling] * n
        if len(sampling) != n:
            raise InvalidRequestError(f"got {len(sampling)} SamplingParams for {n} prompts", param="sampling")
        return list(sampling)
