"""Sampling parameters of one generation request.

``SamplingParams.validate`` checks what can be checked without a model; the engine's input processor checks the
rest (context length, vocabulary, configured limits on ``n`` and ``logprobs``) before anything is scheduled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from openautoglm.protocol.errors import InvalidRequestError

_SEED_MAX = 2**63 - 1


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the end of the context
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus k alternatives
    prompt_logprobs: int | None = None  # reserved; not computed yet, rejected by validate when set
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> SamplingParams:
        """Raise ``InvalidRequestError`` naming the first bad parameter; return self for chaining."""
        _int_at_least("n", self.n, 1)
        if self.max_tokens is not None:
            _int_at_least("max_tokens", self.max_tokens, 1)
        _int_at_least("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", param="min_tokens"
            )
        _float_in("temperature", self.temperature, 0.0, 100.0)
        if not (_finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}", param="top_k"
            )
        _float_in("min_p", self.min_p, 0.0, 1.0)
        if not (_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0):
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}", param="repetition_penalty"
            )
        _float_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -_SEED_MAX <= self.seed <= _SEED_MAX
        ):
            raise InvalidRequestError(f"seed must be an integer in [-2^63+1, 2^63-1], got {self.seed}", param="seed")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", param="stop")
        if len(self.stop) > 16:
            raise InvalidRequestError(f"stop takes at most 16 strings, got {len(self.stop)}", param="stop")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers", param="stop_token_ids")
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
        if self.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs is not supported", param="prompt_logprobs")
        return self


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}", param=name)


def _float_in(name: str, value: float, low: float, high: float) -> None:
    if not (_finite(value) and low <= value <= high):
        raise InvalidRequestError(f"{name} must be in [{low:g}, {high:g}], got {value!r}", param=name)
