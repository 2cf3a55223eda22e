"""Tensor parallelism: tensor_parallel_size 2 against 1 through the real engine, worker processes joined by gloo
on the CPU (NCCL on GPUs, in the ``gpu`` tests at the end).

The oracle is the same engine at tensor_parallel_size 1 (itself checked against transformers elsewhere), and
transformers' own greedy ``generate``: the sharded model must give the single-process logits within float32
rounding and the same greedy tokens, under continuous batching, chunked prefill and prefix hits.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from openautoglm.config.settings import EngineConfig, load_settings
from openautoglm.engine.llm import LLM
from openautoglm.engine.parallel.workers import TensorParallelError
from openautoglm.protocol.errors import ConfigError
from openautoglm.protocol.sampling import SamplingParams

SECTIONS: dict[str, Any] = {"cache": {"num_blocks": 96, "block_size": 4}, "scheduler": {"max_num_batched_tokens": 24}}


def _tp(config: EngineConfig, size: int, **fields: Any) -> EngineConfig:
    return config.model_copy(update={"tensor_parallel_size": size, **fields})


@pytest.fixture
def engines() -> Iterator[list[LLM]]:
    """LLMs a test builds; their worker processes are stopped after it, whatever happened."""
    built: list[LLM] = []
    yield built
    for llm in built:
        llm.core.shutdown()


def _prompts(vocab: int, num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, vocab - 64) for _ in range(13)]  # shared: prefix-cache hits
    return [
        (prefix if i % 2 else []) + [rng.randrange(1, vocab - 64) for _ in range(rng.randint(1, 30))]
        for i in range(num)
    ]


def _run(llm: LLM, prompts: list[list[int]], max_tokens: int = 12) -> list[tuple[list[int], list[Any]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=5)
    return [(r.sequences[0].token_ids, r.sequences[0].logprobs) for r in llm.generate(prompts, params)]


def _assert_same(one: list[tuple[list[int], list[Any]]], two: list[tuple[list[int], list[Any]]]) -> None:
    """Identical greedy tokens; every reported logprob (top 5 of each step) within float32 rounding."""
    for (tokens1, lps1), (tokens2, lps2) in zip(one, two, strict=True):
        assert tokens2 == tokens1
        for a, b in zip(lps1, lps2, strict=True):
            assert [t for t, _, _ in b.top] == [t for t, _, _ in a.top]
            assert max(abs(x[2] - y[2]) for x, y in zip(a.top, b.top, strict=True)) < 1e-4


def test_tp2_matches_tp1_and_transformers(tiny_glm4: Path, make_engine_config, engines: list[LLM]) -> None:
    """Glm4 (sandwich norms), 4 heads over 2 KV heads: each rank one KV head, half the MLP, half the vocabulary."""
    from transformers import AutoModelForCausalLM

    config = make_engine_config(tiny_glm4, **SECTIONS)
    one = LLM(config)
    two = LLM(_tp(config, 2))
    engines.append(two)
    assert len(two.core.workers.procs) == 1 and two.core.runner.kv_caches[0].shape[3] == 1
    prompts = _prompts(one.core.arch.vocab_size, 12, seed=3)
    want = _run(one, prompts)
    got = _run(two, prompts)
    _assert_same(want, got)
    assert two.core.kv_cache.prefix_cache_hits > 0
    hf = AutoModelForCausalLM.from_pretrained(tiny_glm4, dtype=torch.float32).eval()
    for prompt, (tokens, _) in zip(prompts[:3], got, strict=False):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False, eos_token_id=None)
        assert out[0, len(prompt) :].tolist() == tokens


def test_tp2_async_scheduling_matches_tp1(tiny_glm4: Path, make_engine_config, engines: list[LLM]) -> None:
    """Rank 0 fills placeholder ids from its device tokens before broadcasting the step's inputs."""
    config = make_engine_config(tiny_glm4, **SECTIONS)
    one, two = LLM(config), LLM(_tp(config, 2, async_scheduling=True))
    engines.append(two)
    prompts = _prompts(one.core.arch.vocab_size, 12, seed=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [r.sequences[0].token_ids for r in one.generate(prompts, params)]
    assert [r.sequences[0].token_ids for r in two.generate(prompts, params)] == want
    assert two.core.num_deferred_steps > 0


def test_tp2_replicated_kv_head_tied_odd_vocabulary(
    tmp_path: Path, demo_dir: Path, checkpoint_factory, make_engine_config, engines: list[LLM]
) -> None:
    """Glm (no sandwich norms) with one KV head (replicated on both ranks), tied embeddings, and a vocabulary
    that does not split evenly (the last shard is zero-padded)."""
    path = checkpoint_factory(
        tmp_path / "odd", demo_dir, arch="GlmForCausalLM", num_key_value_heads=1, vocab_size=1539,
        tie_word_embeddings=True,
    )  # fmt: skip
    config = make_engine_config(path, **SECTIONS)
    one, two = LLM(config), LLM(_tp(config, 2))
    engines.append(two)
    prompts = _prompts(1539, 8, seed=4)
    _assert_same(_run(one, prompts), _run(two, prompts))


def test_tp2_dummy_weights_are_the_tp1_model(tiny_glm4: Path, make_engine_config, engines: list[LLM]) -> None:
    """Dummy weights of one seed are the same model at every rank count: each shard is cut from the tensor one
    process would draw, and replicated tensors agree across ranks."""
    loaded_config = make_engine_config(tiny_glm4, **SECTIONS)
    model = loaded_config.model.model_copy(update={"load_format": "dummy", "seed": 7})
    config = loaded_config.model_copy(update={"model": model})
    one, two = LLM(config), LLM(_tp(config, 2))
    engines.append(two)
    prompts = _prompts(one.core.arch.vocab_size, 6, seed=5)
    _assert_same(_run(one, prompts), _run(two, prompts))
    loaded = LLM(loaded_config)  # a different model: the test can fail
    assert [t for t, _ in _run(loaded, prompts)] != [t for t, _ in _run(one, prompts)]


def _config_dir(tmp_path: Path, tiny: Path, **fields: Any) -> Path:
    """A checkpoint directory holding only a modified config.json (the sizes are refused before any load)."""
    data = json.loads((tiny / "config.json").read_text()) | fields
    out = tmp_path / "cfg"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize(
    ("fields", "size", "message"),
    [
        ({}, 3, "tensor_parallel_size 3 must divide the model's 4 attention heads"),
        ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8}, 2, "must divide the model's 3 KV heads"),
        ({"intermediate_size": 130}, 4, "must divide the model's intermediate_size 130"),
    ],
)
def test_bad_sizes_are_refused_before_anything_starts(
    tmp_path: Path, tiny_glm4: Path, make_engine_config, fields: dict[str, Any], size: int, message: str
) -> None:
    config = _tp(make_engine_config(_config_dir(tmp_path, tiny_glm4, **fields)), size)
    with pytest.raises(ConfigError, match=message) as err:
        LLM(config)
    assert err.value.param == "tensor_parallel_size"


def test_settings_refuse_zero_and_quantization_with_tp() -> None:
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel_size"):
        load_settings(overrides={"engine": {"tensor_parallel_size": 0}}, environ={})
    with pytest.raises(ConfigError, match="quantization 'int8' cannot be combined with tensor_parallel_size 2"):
        load_settings(overrides={"engine": {"tensor_parallel_size": 2, "model": {"quantization": "int8"}}}, environ={})


def test_lost_worker_stops_the_engine_with_a_clear_error(
    tiny_glm4: Path, make_engine_config, engines: list[LLM]
) -> None:
    llm = LLM(_tp(make_engine_config(tiny_glm4, **SECTIONS), 2))
    engines.append(llm)
    proc = llm.core.workers.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
    assert time.monotonic() - start < 15
    with pytest.raises(TensorParallelError, match="must be restarted"):  # and every later step
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))


def test_workers_exit_cleanly_on_shutdown_and_when_collected(tiny_glm4: Path, make_engine_config) -> None:
    config = _tp(make_engine_config(tiny_glm4, **SECTIONS), 2)
    llm = LLM(config)
    procs = list(llm.core.workers.procs)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    llm.core.shutdown()
    llm.core.shutdown()  # idempotent
    assert [p.exitcode for p in procs] == [0]
    collected = LLM(config)
    procs = list(collected.core.workers.procs)
    del collected
    gc.collect()
    for p in procs:
        p.join(20)
    assert [p.exitcode for p in procs] == [0]


def test_cli_generate_with_tensor_parallel_size(tiny_glm4: Path) -> None:
    from typer.testing import CliRunner

    from openautoglm.cli.main import app

    args = ["generate", "hello", "--model", str(tiny_glm4), "--device", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(app, [*args, "--max-tokens", "4", "--no-stream", "--tensor-parallel-size", "2"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, [*args, "--tensor-parallel-size", "3"])
    assert bad.exit_code == 2 and "tensor_parallel_size 3 must divide" in bad.output


# ---- GPUs (NCCL) ----------------------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _glm9b_dir(tmp_path: Path, layers: int, name: str = "glm-4-9b-0414") -> Path:
    """``name``'s shapes (a GLM-4-9B) with ``layers`` decoder layers: a config.json and a tokenizer, no weights."""
    from openautoglm.engine.loader.demo import ensure_demo_model
    from openautoglm.engine.loader.named import write_named_config_dir
    from openautoglm.engine.models.named_configs import named_config

    config = named_config(name) | {"num_hidden_layers": layers}
    return write_named_config_dir(tmp_path / "glm9b", name, config, ensure_demo_model(tmp_path))


def _gpu_config(path: Path, size: int) -> EngineConfig:
    return EngineConfig.model_validate(
        {
            "model": {"model": str(path), "load_format": "dummy", "device": "cuda", "dtype": "bfloat16", "seed": 1},
            "cache": {"num_blocks": 1024},
            "scheduler": {"max_num_seqs": 16},
            "tensor_parallel_size": size,
        }
    )


@pytest.mark.gpu
@two_gpus
def test_gpu_tp2_greedy_equals_tp1(tmp_path: Path, engines: list[LLM]) -> None:
    """glm-4-9b-0414 shapes (4 layers), dummy weights, bfloat16, Triton attention and CUDA graphs on both (and
    the one-shot all-reduce kernel on two GPUs that reach each other).

    Row-parallel sums round differently in bfloat16, and random weights give bfloat16 logits full of near-ties
    (their top values lie 1/32 apart), so a tie may flip: every sequence must equal the single-GPU one up to its
    first difference, and there the two choices must be a near-tie in the single-GPU logprobs. (Measured on two
    H200s: 3 of 12 sequences equal over 24 tokens; each of the 9 others parted at a near-tie.)"""
    path = _glm9b_dir(tmp_path, 4)
    one, two = LLM(_gpu_config(path, 1)), LLM(_gpu_config(path, 2))
    engines.append(two)
    assert two.core.runner.graph_batch_sizes == one.core.runner.graph_batch_sizes != []
    if torch.cuda.can_device_access_peer(0, 1):  # then the one-shot all-reduce must have passed its check
        assert two.core.workers.tp.fast is not None
    prompts = _prompts(one.core.arch.vocab_size, 12, seed=6)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    want = [r.sequences[0] for r in one.generate(prompts, params)]
    got = [r.sequences[0] for r in two.generate(prompts, params)]
    assert two.core.runner.num_graph_replays > 0
    for w, g in zip(want, got, strict=True):
        if w.token_ids == g.token_ids:
            continue
        i = next(i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids, strict=True)) if a != b)
        top = dict((t, lp) for t, _, lp in w.logprobs[i].top)
        assert g.token_ids[i] in top and top[w.token_ids[i]] - top[g.token_ids[i]] < 0.1, (i, w.logprobs[i])


@pytest.mark.gpu
@two_gpus
@pytest.mark.skipif(
    torch.cuda.device_count() >= 2 and not torch.cuda.can_device_access_peer(0, 1),
    reason="the two GPUs cannot reach each other: no one-shot all-reduce",
)
def test_gpu_one_shot_all_reduce_with_norms_equals_nccl(tmp_path: Path, engines: list[LLM]) -> None:
    """Decode steps whose all-reduces run in the one-shot kernel, with the residual add and norms after them in
    the same kernel, against NCCL's all-reduce and the separate norm kernel: over two ranks both sum each element
    in one rounding, so tokens and logprobs must be equal, not near. glm-4-9b-chat-hf's shapes: no sandwich norms
    (the other test's model has them)."""
    path = _glm9b_dir(tmp_path, 4, "glm-4-9b-chat-hf")
    config = _gpu_config(path, 2)
    fast = LLM(config)
    engines.append(fast)
    assert fast.core.workers.tp.fast is not None
    prompts = _prompts(fast.core.arch.vocab_size, 12, seed=7)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    got = [r.sequences[0] for r in fast.generate(prompts, params)]
    assert fast.core.runner.num_graph_replays > 0
    fast.core.shutdown()
    nccl = LLM(config.model_copy(update={"disable_custom_all_reduce": True}))
    engines.append(nccl)
    assert nccl.core.workers.tp.fast is None
    want = [r.sequences[0] for r in nccl.generate(prompts, params)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [[lp.top for lp in g.logprobs] for g in got] == [[lp.top for lp in w.logprobs] for w in want]


@pytest.mark.gpu
@two_gpus
@pytest.mark.timeout(120)
def test_gpu_lost_worker_mid_decode_fails_instead_of_hanging(tmp_path: Path, engines: list[LLM]) -> None:
    llm = LLM(_gpu_config(_glm9b_dir(tmp_path, 2), 2))
    engines.append(llm)
    proc = llm.core.workers.procs[0]
    params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    stream = llm.stream(_request([5, 6, 7], params))
    next(stream)  # decoding: CUDA graphs with NCCL collectives in flight
    os.kill(proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - start < 60


def _request(prompt: list[int], params: SamplingParams) -> Any:
    from openautoglm.protocol.request import GenerationRequest

    return GenerationRequest("tp-lost", prompt_token_ids=prompt, sampling=params)


@pytest.mark.gpu
@two_gpus
def test_gpu_more_ranks_than_devices_is_refused(tmp_path: Path) -> None:
    count = torch.cuda.device_count()
    size = 1 << count.bit_length()  # a power of two above the device count, which divides 32 heads
    with pytest.raises(ConfigError, match=f"needs {size} CUDA devices"):
        LLM(_gpu_config(_glm9b_dir(tmp_path, 1), size))
