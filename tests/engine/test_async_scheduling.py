"""Async scheduling on the CPU (the GPU default): each greedy step is launched before the previous step's
tokens are read, its input ids copied on the device from the previous step's sampled tokens. The oracle is the
same engine with async scheduling off, which the transformers tests check. (Aborts: test_engine's abort storm.)"""

from __future__ import annotations

import random
from pathlib import Path

from tests.engine.test_engine import _mixed_prompts

from openautoglm.config.settings import EngineConfig
from openautoglm.engine.llm import LLM
from openautoglm.protocol.outputs import FinishReason
from openautoglm.protocol.sampling import SamplingParams


def _pair(config: EngineConfig) -> tuple[LLM, LLM]:
    """The same engine with async scheduling on and off."""
    on = LLM(config.model_copy(update={"async_scheduling": True}))
    off = LLM(config.model_copy(update={"async_scheduling": False}))
    assert on.core.async_scheduling and not off.core.async_scheduling
    return on, off


def _tokens(llm: LLM, prompts: list, params: list[SamplingParams]) -> list[list[list[int]]]:
    return [[s.token_ids for s in r.sequences] for r in llm.generate(prompts, params)]


def test_greedy_under_load_equals_the_synchronous_engine(tiny_glm4: Path, make_engine_config) -> None:
    """Preemption, prefix hits and chunked prefill while tokens are still on the device."""
    config = make_engine_config(
        tiny_glm4,
        cache={"num_blocks": 40, "block_size": 4},
        scheduler={"max_num_batched_tokens": 24, "max_num_seqs": 16},
    )
    on, off = _pair(config)
    prompts = _mixed_prompts(on.core.arch.vocab_size, 36, seed=1)
    params = [SamplingParams(max_tokens=random.Random(i).randint(4, 24), temperature=0.0) for i in range(36)]
    assert _tokens(on, prompts, params) == _tokens(off, prompts, params)
    stats = on.core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert on.core.num_deferred_steps > 0, "greedy steps were meant to run asynchronously"
    assert on.core.kv_cache.num_free_blocks == on.core.kv_cache.num_usable_blocks


def test_stop_conditions_end_on_the_same_token(tiny_glm4: Path, make_engine_config) -> None:
    on, off = _pair(make_engine_config(tiny_glm4))
    base = off.generate(["stop test"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    seq = base.sequences[0]
    stop_id, text = seq.token_ids[5], seq.text
    stop_str = next(
        w for w in (text[i : i + 3] for i in range(len(text) // 2, len(text) - 3))
        if w.strip() == w and "\ufffd" not in w and len(w.split()) == 1
    )  # fmt: skip
    cases = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=24, temperature=0, stop=[stop_str]),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=24, temperature=0),
    ]
    for params in cases:
        a, b = on.generate(["stop test"], params)[0], off.generate(["stop test"], params)[0]
        sa, sb = a.sequences[0], b.sequences[0]
        assert (sa.token_ids, sa.text, sa.finish_reason, sa.stop_reason) == (
            sb.token_ids, sb.text, sb.finish_reason, sb.stop_reason,
        ), params  # fmt: skip
        assert a.usage == b.usage
    assert on.generate(["stop test"], cases[1])[0].sequences[0].finish_reason is FinishReason.STOP


def test_mixed_batches_switch_between_device_and_host_sampling(tiny_glm4: Path, make_engine_config) -> None:
    """Seeded random rows, logprobs and penalties need the host; greedy rows around them do not."""
    on, off = _pair(make_engine_config(tiny_glm4, scheduler={"max_num_seqs": 8}))
    prompts = _mixed_prompts(on.core.arch.vocab_size, 16, seed=4)
    params = []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=10 + i, temperature=0.8, seed=i))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=12, temperature=0, logprobs=2))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=9, temperature=0, repetition_penalty=1.3, min_tokens=3))
        else:
            params.append(SamplingParams(max_tokens=6 + 2 * i, temperature=0))
    a, b = on.generate(prompts, params), off.generate(prompts, params)
    for ra, rb in zip(a, b, strict=True):
        assert [s.token_ids for s in ra.sequences] == [s.token_ids for s in rb.sequences]
        assert [s.logprobs for s in ra.sequences] == [s.logprobs for s in rb.sequences]
    assert on.core.num_deferred_steps > 0


def test_generated_blocks_join_the_prefix_cache(tiny_glm4: Path, make_engine_config) -> None:
    """A block that ends on a placeholder is hashed once its token is read, never over the placeholder."""
    on, off = _pair(make_engine_config(tiny_glm4, cache={"block_size": 4}))
    prompt = list(range(20, 30))
    first = on.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    follow_up = prompt + first.sequences[0].token_ids + [7, 8]
    hits_before = on.core.kv_cache.prefix_cache_hits
    again = _tokens(on, [follow_up], [SamplingParams(max_tokens=8, temperature=0)])
    # 10 prompt + 20 generated tokens: 7 full blocks computed by the first request, the 7th full only once
    # its last-but-one token was read.
    assert on.core.kv_cache.prefix_cache_hits - hits_before >= 7 * 4
    assert again == _tokens(off, [follow_up], [SamplingParams(max_tokens=8, temperature=0)])
