"""Pieces shared by the chat and completion output converters: usage sums, engine errors, logprob values."""

from __future__ import annotations

import math
import time
from typing import Any

from openautoglm.protocol.errors import EngineError
from openautoglm.protocol.outputs import FinishReason, RequestOutput, Usage

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
        failed = out.error is not None or any(o.finish_reason is FinishReason.ERROR for o in out.outputs)
        if failed:
            raise EngineError(f"generation failed inside the engine: {out.error or 'no detail given'}")
        for o in out.outputs:
            self.aborted = self.aborted or o.finish_reason is FinishReason.ABORT
        if out.finished and out.usage is not None:
            self.usage.prompt_tokens += out.usage.prompt_tokens
            self.usage.completion_tokens += out.usage.completion_tokens
            self.usage.cached_tokens += out.usage.cached_tokens

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}
