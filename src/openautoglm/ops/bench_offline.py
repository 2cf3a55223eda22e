"""`autoglm bench offline`: throughput of the engine on synthetic requests (the transformers reference it is
compared with runs in a child process: ops/bench_reference.py)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from openautoglm.config.settings import EngineConfig
from openautoglm.engine.llm import LLM
from openautoglm.ops.timing import settled_heap
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class Throughput:
    name: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def to_dict(self) -> dict[str, float | int | str]:
        d = asdict(self)
        d.update(
            requests_per_s=self.requests_per_s,
            output_tokens_per_s=self.output_tokens_per_s,
            total_tokens_per_s=self.total_tokens_per_s,
        )
        return d


def parse_range(spec: str, name: str) -> tuple[int, int]:
    """'16:128' → (16, 128); '32' → (32, 32)."""
    try:
        lo, _, hi = spec.partition(":")
        low, high = int(lo), int(hi or lo)
    except ValueError as exc:
        raise InvalidRequestError(f"{name} must be N or A:B with integers, got {spec!r}", param=name) from exc
    if not 1 <= low <= high:
        raise InvalidRequestError(f"{name} must satisfy 1 <= A <= B, got {spec!r}", param=name)
    return low, high


def synthetic_prompts(num: int, input_len: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Stay clear of the top of the vocabulary, where GLM tokenizers keep their special tokens.
    high = max(2, vocab - 64)
    return [[rng.randrange(1, high) for _ in range(rng.randint(*input_len))] for _ in range(num)]


def timed_engine_run(llm: LLM, prompts: list[list[int]], output_len: int, warmup: list[list[int]]) -> tuple[int, float]:
    """Greedy, EOS ignored: warm up on ``warmup`` (one-off kernel and allocator set-up is not timed), forget its
    prefix-cache entries, then time all ``prompts`` at once. (output tokens, seconds)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.run([GenerationRequest(f"warmup-{i}", prompt_token_ids=p, sampling=params) for i, p in enumerate(warmup)])
    llm.core.kv_cache.reset_prefix_cache()
    requests = [GenerationRequest(f"bench-{i}", prompt_token_ids=p, sampling=params) for i, p in enumerate(prompts)]
    with settled_heap():
        start = time.perf_counter()
        results = llm.run(requests)
        elapsed = time.perf_counter() - start
    return sum(len(s.token_ids) for r in results for s in r.sequences), elapsed


def bench_engine(config: EngineConfig, prompts: list[list[int]], output_len: int) -> Throughput:
    out_tokens, elapsed = timed_engine_run(LLM(config), prompts, output_len, prompts[:8])
    return Throughput("open-autoglm", len(prompts), sum(map(len, prompts)), out_tokens, elapsed)
