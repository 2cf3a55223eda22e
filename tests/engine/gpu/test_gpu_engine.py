"""The engine on a GPU: CUDA-graph decode against eager decode, the GPU fast path against the CPU reference
path, and GPU-side sampling (seeds, truncation, penalties)."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from openautoglm.config.settings import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from openautoglm.engine.llm import LLM
from openautoglm.protocol.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def gpu_config(
    model: Path, dtype: str = "bfloat16", *, eager: bool = False, **sections: dict[str, Any]
) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(model), device="cuda", dtype=dtype),
        cache=CacheConfig(**({"num_blocks": 512} | sections.get("cache", {}))),
        scheduler=SchedulerConfig(**sections.get("scheduler", {})),
        attention_backend="triton",
        enforce_eager=eager,
    )


@pytest.fixture(scope="module")
def wide_glm4(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, checkpoint_factory) -> Path:
    """A small GLM-4 with the real model's head layout (head_dim 128, 8 query heads per kv head)."""
    return checkpoint_factory(
        tmp_path_factory.mktemp("gpu") / "wide",
        demo_dir,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=2048,
    )


def _prompts(vocab: int, num: int, seed: int, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, vocab - 64) for _ in range(40)]
    return [
        (prefix if i % 3 == 0 else []) + [rng.randrange(1, vocab - 64) for _ in range(rng.randint(1, max_len))]
        for i in range(num)
    ]


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    return [r.sequences[0].token_ids for r in llm.generate(prompts, params)]


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_graph_decode_equals_eager(wide_glm4: Path, batch: int) -> None:
    """Batches of exactly a captured size: the graph replays the eager computation token for token."""
    graphs = LLM(gpu_config(wide_glm4, scheduler={"max_num_batched_tokens": 4096, "max_num_seqs": 32}))
    eager = LLM(gpu_config(wide_glm4, eager=True, scheduler={"max_num_batched_tokens": 4096, "max_num_seqs": 32}))
    assert batch in graphs.core.runner.graph_batch_sizes and not eager.core.runner.graph_batch_sizes
    prompts = _prompts(graphs.core.arch.vocab_size, batch, seed=batch)
    a = _greedy(graphs, prompts, [40] * batch)
    assert graphs.core.runner.num_graph_replays >= 39, "decode steps should have replayed graphs"
    assert a == _greedy(eager, prompts, [40] * batch)


def test_graph_decode_with_padding_and_preemption_equals_eager(wide_glm4: Path) -> None:
    """Ragged batches (padded to the next captured size), chunked prefill, prefix hits and preemption."""
    sections = {"cache": {"num_blocks": 48, "block_size": 16}, "scheduler": {"max_num_batched_tokens": 64}}
    graphs, eager = LLM(gpu_config(wide_glm4, **sections)), LLM(gpu_config(wide_glm4, eager=True, **sections))
    prompts = _prompts(graphs.core.arch.vocab_size, 30, seed=5, max_len=200)
    max_tokens = [random.Random(i).randint(1, 60) for i in range(len(prompts))]
    a = _greedy(graphs, prompts, max_tokens)
    assert graphs.core.stats().num_preemptions > 0 and graphs.core.runner.num_graph_replays > 0
    assert a == _greedy(eager, prompts, max_tokens)
    assert graphs.core.kv_cache.num_free_blocks == graphs.core.kv_cache.num_usable_blocks


def test_async_scheduling_equals_synchronous_steps(wide_glm4: Path) -> None:
    """Steps launched before the previous step's tokens are read (placeholders filled on the device) decode
    exactly what the synchronous loop does, through preemption, stop ids and batches mixing host sampling."""
    sections = {"cache": {"num_blocks": 48, "block_size": 16}, "scheduler": {"max_num_batched_tokens": 64}}
    config = gpu_config(wide_glm4, **sections)
    on, off = LLM(config), LLM(config.model_copy(update={"async_scheduling": False}))
    assert on.core.async_scheduling and not off.core.async_scheduling
    prompts = _prompts(on.core.arch.vocab_size, 30, seed=8, max_len=200)
    params = [
        SamplingParams(max_tokens=random.Random(i).randint(1, 60), temperature=0.0, stop_token_ids=[i + 100])
        if i % 5 else SamplingParams(max_tokens=30, temperature=0.9, top_k=40, seed=i)
        for i in range(len(prompts))
    ]  # fmt: skip
    a = [r.sequences[0].token_ids for r in on.generate(prompts, params)]
    assert a == [r.sequences[0].token_ids for r in off.generate(prompts, params)]
    assert on.core.num_deferred_steps > 0 and off.core.num_deferred_steps == 0
    assert on.core.stats().num_preemptions > 0
    assert on.core.kv_cache.num_free_blocks == on.core.kv_cache.num_usable_blocks


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs compute capability 9.0",
)
def test_programmatic_launch_computes_what_ordered_launches_do(wide_glm4: Path) -> None:
    """Kernels that start while the previous one ends (programmatic dependent launch, in the CUDA graphs) give the
    tokens and logprobs of kernels launched one after the other."""
    from openautoglm.engine import pdl

    sections = {"cache": {"num_blocks": 48, "block_size": 16}, "scheduler": {"max_num_batched_tokens": 64}}
    config = gpu_config(wide_glm4, **sections)
    prompts = _prompts(256, 24, seed=9, max_len=200)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3)
    results = []
    for enabled in (False, True):
        llm = LLM(config.model_copy(update={"programmatic_launch": enabled}))
        assert pdl.enabled() is enabled
        results.append([r.sequences[0] for r in llm.generate(prompts, params)])
        assert llm.core.runner.num_graph_replays > 0
        llm.core.shutdown()
    off, on = results
    assert [s.token_ids for s in on] == [s.token_ids for s in off]
    assert [[lp.top for lp in s.logprobs] for s in on] == [[lp.top for lp in s.logprobs] for s in off]


def test_gpu_greedy_matches_cpu_reference(tiny_glm4: Path, make_engine_config) -> None:
    """The whole fast path (Triton kernels, graphs, pinned inputs, GPU sampling, overlapped steps) in float16
    against the CPU reference path in float32 under continuous batching, prefix hits, chunked prefill and
    preemption. Float16 may flip a near-tie: every GPU token must be the float32 argmax of its context, or
    within a rounding-sized margin of it (checked by teacher forcing), and most sequences equal outright."""
    from transformers import AutoModelForCausalLM

    sections = {"cache": {"num_blocks": 40, "block_size": 4}, "scheduler": {"max_num_batched_tokens": 24}}
    cpu = LLM(make_engine_config(tiny_glm4, **sections))
    gpu = LLM(gpu_config(tiny_glm4, "float16", **sections))
    assert gpu.core.runner.backend.name == "triton"
    prompts = _prompts(cpu.core.arch.vocab_size, 36, seed=1)
    max_tokens = [random.Random(i).randint(4, 24) for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    want = [r.sequences[0].token_ids for r in cpu.generate(prompts, params)]
    got = [r.sequences[0].token_ids for r in gpu.generate(prompts, params)]
    assert gpu.core.stats().num_preemptions > 0
    assert gpu.core.kv_cache.num_free_blocks == gpu.core.kv_cache.num_usable_blocks
    assert sum(g == w for g, w in zip(got, want, strict=True)) >= 0.8 * len(want)
    hf = AutoModelForCausalLM.from_pretrained(tiny_glm4, dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        best = logits.max(-1).values
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert ((best - chosen) <= 1e-2 * best.abs().clamp(min=1.0)).all(), (prompt, tokens)


def test_gpu_sampling_seeds_truncation_and_penalties(wide_glm4: Path) -> None:
    llm = LLM(gpu_config(wide_glm4))
    vocab = llm.core.arch.vocab_size
    prompt = [5, 17, 99, 4, 4, 4]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.8, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].sequences[0].token_ids
    others = _prompts(vocab, 12, seed=3)
    kinds = [
        SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.7, top_p=0.5, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.2, min_p=0.1, frequency_penalty=0.5, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, presence_penalty=1.0, ignore_eos=True),
    ]
    params = [kinds[i % len(kinds)] for i in range(len(others))]
    results = llm.generate([*others[:6], prompt, *others[6:]], [*params[:6], seeded, *params[6:]])
    assert results[6].sequences[0].token_ids == alone, "a seeded request must not depend on its batch"
    assert all(len(r.sequences[0].token_ids) == 20 for i, r in enumerate(results) if i != 6)
    assert llm.generate([prompt], dataclasses.replace(seeded, seed=4321))[0].sequences[0].token_ids != alone
    # top_k 1 is greedy whatever the temperature.
    greedy = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    top1 = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.sequences[0].token_ids == greedy.sequences[0].token_ids


def test_select_backend_prefers_triton_and_explains_fallbacks(caplog: pytest.LogCaptureFixture) -> None:
    from openautoglm.engine.attention.selector import select_backend
    from openautoglm.protocol.errors import ConfigError

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    auto, forced = EngineConfig(), EngineConfig(attention_backend="triton")
    assert select_backend(auto, gpu, torch.bfloat16).name == "triton"
    assert select_backend(auto, gpu, torch.float16).name == "triton"
    assert select_backend(EngineConfig(attention_backend="reference"), gpu, torch.bfloat16).name == "reference"
    with caplog.at_level(logging.WARNING):
        assert select_backend(auto, gpu, torch.float32).name == "reference"
    assert "float32" in caplog.text
    assert select_backend(auto, cpu, torch.float32).name == "reference"
    for device, dtype in ((gpu, torch.float32), (cpu, torch.bfloat16)):
        with pytest.raises(ConfigError, match="attention_backend 'triton'"):
            select_backend(forced, device, dtype)
