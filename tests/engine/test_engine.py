"""The engine end to end on CPU, with transformers as the oracle (issue tests 2–5)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.engine.core import EngineCore
from openautoglm.engine.llm import LLM
from openautoglm.protocol.errors import ContextLengthExceededError, InvalidRequestError
from openautoglm.protocol.outputs import CompletedRequest, FinishReason
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams


def _mixed_prompts(vocab: int, num: int, seed: int) -> list[list[int]]:
    """Mixed lengths, a third of them sharing one long prefix and a third sharing a short one."""
    rng = random.Random(seed)
    high = vocab - 64
    long_prefix = [rng.randrange(1, high) for _ in range(40)]
    short_prefix = [rng.randrange(1, high) for _ in range(9)]
    prompts = []
    for i in range(num):
        tail = [rng.randrange(1, high) for _ in range(rng.randint(1, 60))]
        prefix = long_prefix if i % 3 == 0 else short_prefix if i % 3 == 1 else []
        prompts.append(prefix + tail)
    return prompts


def _hf_greedy(path: Path, prompt: list[int], max_new: int, eos: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = _hf_greedy.cache.get(path) or AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _hf_greedy.cache[path] = model
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


_hf_greedy.cache = {}


def test_greedy_under_load_matches_transformers(tiny_glm4: Path, make_engine_config) -> None:
    """≥32 concurrent requests, prefix hits, chunked prefill and preemption; each equals generate() alone."""
    config = make_engine_config(
        tiny_glm4,
        cache={"num_blocks": 40, "block_size": 4},  # 160 slots for ~36 requests of up to ~130 tokens: preemption
        scheduler={"max_num_batched_tokens": 24, "max_num_seqs": 16},  # long prompts are split over steps
    )
    llm = LLM(config)
    vocab = llm.core.arch.vocab_size
    prompts = _mixed_prompts(vocab, 36, seed=1)
    max_tokens = [random.Random(i).randint(4, 24) for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    results = llm.generate(prompts, params)
    stats = llm.core.stats()
    assert stats.num_preemptions > 0, "the tiny block pool was meant to force preemption"
    assert stats.prefix_cache_hits > 0, "shared prefixes were meant to hit the prefix cache"
    assert max(map(len, prompts)) > 24, "some prompt must be longer than the token budget (chunked prefill)"
    eos = sorted(llm.core.eos_token_ids)
    for prompt, m, res in zip(prompts, max_tokens, results, strict=True):
        expected = _hf_greedy(tiny_glm4, prompt, m, eos)
        assert res.sequences[0].token_ids == expected
        assert res.usage is not None and res.usage.completion_tokens == len(expected)
    assert llm.core.kv_cache.num_free_blocks == llm.core.kv_cache.num_usable_blocks


def test_greedy_text_matches_transformers_decode(tiny_glm4: Path, make_engine_config) -> None:
    llm = LLM(make_engine_config(tiny_glm4))
    res = llm.generate(["Open-AutoGLM serves GLM models"], SamplingParams(max_tokens=12, temperature=0))[0]
    seq = res.sequences[0]
    assert seq.text == llm.tokenizer.decode(seq.token_ids)
    assert res.usage.prompt_tokens == len(llm.tokenizer.encode("Open-AutoGLM serves GLM models"))


def _seeded(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=seed)


def test_seeded_sampling_is_reproducible_across_runs_and_batches(tiny_glm4: Path, make_engine_config) -> None:
    config = make_engine_config(tiny_glm4)
    llm = LLM(config)
    prompt = "a seeded request"
    alone = llm.generate([prompt], _seeded(1234))[0].sequences[0].token_ids
    again = LLM(config).generate([prompt], _seeded(1234))[0].sequences[0].token_ids
    assert alone == again
    others = _mixed_prompts(llm.core.arch.vocab_size, 10, seed=7)
    batch = [*others[:5], prompt, *others[5:]]
    params = [SamplingParams(max_tokens=20, temperature=1.0) for _ in others[:5]]
    params += [_seeded(1234)] + [SamplingParams(max_tokens=8, temperature=0.7, seed=9) for _ in others[5:]]
    in_batch = llm.generate(batch, params)[5].sequences[0].token_ids
    assert in_batch == alone
    assert llm.generate([prompt], _seeded(4321))[0].sequences[0].token_ids != alone


def test_n_sequences_share_the_prompt_blocks(tiny_glm4: Path, make_engine_config) -> None:
    llm = LLM(make_engine_config(tiny_glm4, cache={"block_size": 4}))
    prompt = list(range(10, 74))  # 64 tokens = 16 full blocks
    res = llm.generate([prompt], SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=5))[0]
    assert [s.index for s in res.sequences] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in res.sequences}) > 1, "the n sequences should differ"
    assert res.usage.prompt_tokens == 64 and res.usage.completion_tokens == 24
    # Sequences 1..3 found the prompt's full blocks (all but the last token's block) in the prefix cache.
    assert llm.core.kv_cache.prefix_cache_hits >= 3 * 60


def test_stop_strings_and_ids_and_lengths(tiny_glm4: Path, make_engine_config) -> None:
    llm = LLM(make_engine_config(tiny_glm4))
    base = llm.generate(["stop test"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    seq = base.sequences[0]
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.token_ids) == 24
    stop_id = seq.token_ids[5]
    by_id = llm.generate(["stop test"], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]))[0]
    first = seq.token_ids.index(stop_id)
    assert by_id.sequences[0].token_ids == seq.token_ids[: first + 1]
    assert by_id.sequences[0].stop_reason == stop_id
    text = seq.text
    # A stop string from the second half of the text, free of whitespace and U+FFFD, so it is unambiguous.
    windows = (text[i : i + 3] for i in range(len(text) // 2, len(text) - 3))
    stop_str = next(w for w in windows if w.strip() == w and "\ufffd" not in w and len(w.split()) == 1)
    by_str = llm.generate(["stop test"], SamplingParams(max_tokens=24, temperature=0, stop=[stop_str]))[0]
    assert by_str.sequences[0].text == text[: text.index(stop_str)]
    assert by_str.sequences[0].stop_reason == stop_str


def test_logprobs_are_the_models_log_softmax(tiny_glm4: Path, make_engine_config) -> None:
    llm = LLM(make_engine_config(tiny_glm4))
    res = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0, logprobs=3))[0]
    lps = res.sequences[0].logprobs
    assert lps is not None and len(lps) == 3
    for entry, token in zip(lps, res.sequences[0].token_ids, strict=True):
        assert entry.token_id == token
        assert entry.top[0][0] == token  # greedy picks the most likely token
        assert len(entry.top) == 3 and entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]
        assert entry.logprob == pytest.approx(entry.top[0][2])


# ---- abort storm (test 4) ---------------------------------------------------------------------------------


async def _consume(engine: AsyncEngine, req: GenerationRequest, abort_after: int | None) -> CompletedRequest:
    done = CompletedRequest(req.request_id)
    agen = engine.generate(req)
    try:
        async for chunk in agen:
            done.add(chunk)
            if abort_after is not None and sum(len(s.token_ids) for s in done.sequences) >= abort_after:
                break
    finally:
        await agen.aclose()
    return done


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_abort_storm_returns_every_block(tiny_glm4: Path, make_engine_config, async_scheduling: bool) -> None:
    """Async scheduling (greedy, so its steps defer their tokens) aborts requests whose tokens are on the device."""
    config = make_engine_config(tiny_glm4, cache={"num_blocks": 64, "block_size": 4}, scheduler={"max_num_seqs": 8})
    engine = AsyncEngine.from_config(config.model_copy(update={"async_scheduling": async_scheduling}))
    try:
        initial = engine.stats().num_free_blocks
        rng = random.Random(3)
        prompts = _mixed_prompts(engine.core.arch.vocab_size, 40, seed=2)
        tasks = []
        for i, p in enumerate(prompts):
            n = rng.choice([1, 1, 2])
            temperature = 0.0 if async_scheduling else 1.0
            params = SamplingParams(n=n, max_tokens=rng.randint(4, 30), temperature=temperature, ignore_eos=True)
            req = GenerationRequest(f"storm-{i}", prompt_token_ids=p, sampling=params)
            tasks.append(asyncio.create_task(_consume(engine, req, rng.choice([None, 0, 1, 3, 8]))))
        # Cancel some outright while they wait or run.
        await asyncio.sleep(0.05)
        for t in rng.sample(tasks, 8):
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        finished = [r for r in results if isinstance(r, CompletedRequest) and r.finished]
        assert finished, "some requests should have run to completion"
        for _ in range(100):
            stats = engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        stats = engine.stats()
        assert (stats.num_running, stats.num_waiting) == (0, 0)
        assert stats.num_free_blocks == initial
        assert engine.core.kv_cache.usage == 0.0
        assert (engine.core.num_deferred_steps > 0) == async_scheduling
    finally:
        await engine.shutdown()


# ---- bad input and fault isolation (test 5) ----------------------------------------------------------------

BAD_INPUTS = [
    ({"prompt": ""}, InvalidRequestError, "prompt"),
    ({"prompt_token_ids": []}, InvalidRequestError, "prompt"),
    ({"prompt_token_ids": [1] * 600}, ContextLengthExceededError, "prompt"),
    ({"prompt": "hi", "sampling": SamplingParams(max_tokens=0)}, InvalidRequestError, "max_tokens"),
    ({"prompt": "hi", "sampling": SamplingParams(max_tokens=5000)}, ContextLengthExceededError, "max_tokens"),
    ({"prompt": "hi", "sampling": SamplingParams(temperature=-0.5)}, InvalidRequestError, "temperature"),
    ({"prompt": "hi", "sampling": SamplingParams(top_p=0.0)}, InvalidRequestError, "top_p"),
    ({"prompt": "hi", "sampling": SamplingParams(top_p=1.5)}, InvalidRequestError, "top_p"),
    ({"prompt_token_ids": [1, 10**9]}, InvalidRequestError, "prompt"),
    ({"prompt_token_ids": [-1, 2]}, InvalidRequestError, "prompt"),
    ({"prompt": "hi", "sampling": SamplingParams(n=17)}, InvalidRequestError, "n"),
    ({"prompt": "hi", "sampling": SamplingParams(logprobs=100)}, InvalidRequestError, "logprobs"),
    ({"messages": []}, InvalidRequestError, "messages"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, InvalidRequestError, "prompt"),
]


@pytest.mark.parametrize(("fields", "error", "param"), BAD_INPUTS)
async def test_bad_input_is_refused_before_scheduling(
    tiny_glm4: Path, make_engine_config, fields, error, param, _shared_async_engine
) -> None:
    engine = _shared_async_engine
    before = engine.stats()
    with pytest.raises(error) as info:
        async for _ in engine.generate(GenerationRequest(request_id="bad", **fields)):
            pass
    assert info.value.param == param
    assert param in info.value.message or param.rstrip("s") in info.value.message
    after = engine.stats()
    assert (after.num_waiting, after.num_running, after.num_free_blocks) == (0, 0, before.num_free_blocks)


@pytest.fixture(scope="module")
def _shared_async_engine(tiny_glm4: Path, make_engine_config):
    engine = AsyncEngine.from_config(make_engine_config(tiny_glm4))
    yield engine
    asyncio.run(engine.shutdown())


def test_faulty_request_fails_alone(tiny_glm4: Path, make_engine_config) -> None:
    core = EngineCore(make_engine_config(tiny_glm4))
    llm = LLM.from_core(core)
    initial_free = core.kv_cache.num_free_blocks

    def boom(_out: list[int], _row: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected fault")

    reqs = [GenerationRequest(f"r{i}", prompt=f"request {i}", sampling=SamplingParams(max_tokens=6)) for i in range(4)]
    processed = [core.input_processor.process(r) for r in reqs]
    for p in processed:
        core.add_request(p)
    core.scheduler.get_request("r2").logits_processors.append(boom)
    results = {p.request_id: CompletedRequest(p.request_id) for p in processed}
    while core.has_unfinished():
        for chunk in core.step():
            results[chunk.request_id].add(chunk)
    assert results["r2"].sequences[0].finish_reason is FinishReason.ERROR
    assert "injected fault" in (results["r2"].error or "")
    for rid in ("r0", "r1", "r3"):
        assert results[rid].sequences[0].finish_reason is FinishReason.LENGTH
        assert len(results[rid].sequences[0].token_ids) == 6
    # A model fault fails that step's requests; the engine keeps serving afterwards.
    real_forward = core.runner.model.forward
    core.runner.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected model fault"))
    failed = llm.generate(["x"], SamplingParams(max_tokens=3))[0]
    assert failed.sequences[0].finish_reason is FinishReason.ERROR and "model fault" in failed.error
    core.runner.model.forward = real_forward
    ok = llm.generate(["x"], SamplingParams(max_tokens=3))[0]
    assert ok.sequences[0].finish_reason is FinishReason.LENGTH
    assert core.kv_cache.num_free_blocks == initial_free
