"""The memory estimator against hand-computed values, the engine's own model and transformers' models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from openautoglm.cli.main import app
from openautoglm.engine.models.base import ModelArchConfig
from openautoglm.engine.models.named_configs import named_config, scaled_down
from openautoglm.engine.models.registry import get_model_class
from openautoglm.engine.quantization import replace_linears
from openautoglm.engine.runner import kv_cache_bytes_per_block
from openautoglm.ops.estimate import (
    COMMON_GPUS,
    GiB,
    arch_for,
    count_parameters,
    estimate,
    kv_bytes_per_token,
    weight_bytes,
)
from openautoglm.protocol.errors import ConfigError

GLM4_9B = "glm-4-9b-0414"


def test_glm4_9b_parameter_count_and_hand_computed_bytes() -> None:
    arch = arch_for(GLM4_9B)
    assert count_parameters(arch) == 9_400_279_040
    # Hand count: per layer qkv 4096x4608 + bias 4608, o 4096x4096, gate_up 4096x27392, down 13696x4096, 4 norms.
    layer = 4096 * 4608 + 4608 + 4096 * 4096 + 4096 * 27392 + 13696 * 4096 + 4 * 4096
    assert count_parameters(arch) == 40 * layer + 2 * 151552 * 4096 + 4096
    assert weight_bytes(arch, "bfloat16") == 2 * 9_400_279_040
    # int8: the four linears at one byte per weight + a float32 scale per output row; the rest bf16.
    linears = 4096 * 4608 + 4096 * 4096 + 4096 * 27392 + 13696 * 4096
    rows = 4608 + 4096 + 27392 + 4096
    int8 = 40 * (linears + 4 * rows) + 2 * (9_400_279_040 - 40 * linears)
    assert weight_bytes(arch, "bfloat16", "int8") == int8
    # KV: 2 (K, V) x 40 layers x 2 KV heads x 128 x 2 bytes = 40 KiB per token.
    assert kv_bytes_per_token(arch, "bfloat16") == 40 * 1024


def test_concurrency_tensor_parallel_and_blocks() -> None:
    arch = arch_for(GLM4_9B)
    e = estimate(arch, max_model_len=1000, max_num_seqs=8, block_size=16)
    assert e.kv_bytes == 8 * 1008 * 40 * 1024  # each sequence rounded up to whole blocks of 16
    tp2 = estimate(arch, tensor_parallel_size=2)
    norms = (40 * 4 + 1) * 4096 * 2  # replicated on every GPU
    assert 2 * tp2.weight_bytes == weight_bytes(arch, "bfloat16") + norms
    assert tp2.kv_bytes_per_token == 20 * 1024  # one of the two KV heads each
    assert estimate(arch, tensor_parallel_size=4).kv_bytes_per_token == 20 * 1024  # replicated, not split
    with pytest.raises(ConfigError, match="tensor_parallel_size 3"):
        estimate(arch, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="exceeds"):
        estimate(arch, max_model_len=40000)


@pytest.mark.parametrize("name", ["glm-4-9b-0414", "glm-4-9b-chat-hf"])
@pytest.mark.parametrize("quantization", ["none", "int8", "fp8"])
def test_weight_bytes_equal_the_engines_model(name: str, quantization: str) -> None:
    """Build Open-AutoGLM's own model on the meta device (no memory) and count its bytes."""
    arch = arch_for(name)
    with torch.device("meta"):
        model = get_model_class(arch.architecture)(arch).to(dtype=torch.bfloat16)
        if quantization != "none":
            replace_linears(model, quantization)
    tensors = [*model.parameters(), *model.buffers()]
    assert sum(t.numel() * t.element_size() for t in tensors) == weight_bytes(arch, "bfloat16", quantization)


@pytest.mark.parametrize("name", ["glm-4-9b-0414", "glm-4-9b-chat-hf"])
def test_parameter_count_equals_transformers(name: str) -> None:
    import transformers

    cfg = named_config(name)
    config_cls = transformers.Glm4Config if cfg["model_type"] == "glm4" else transformers.GlmConfig
    model_cls = getattr(transformers, cfg["architectures"][0])
    with torch.device("meta"):
        reference = model_cls(config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    assert sum(p.numel() for p in reference.parameters()) == count_parameters(arch_for(name))


def test_kv_per_token_matches_the_runner() -> None:
    arch = ModelArchConfig.from_hf_dict(
        scaled_down(
            named_config(GLM4_9B),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=256,
        )
    )
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert 16 * kv_bytes_per_token(arch, dtype) == kv_cache_bytes_per_block(arch, 16, torch_dtype)


def test_fit_table() -> None:
    arch = arch_for(GLM4_9B)
    e = estimate(arch, max_model_len=8192, max_num_seqs=16)
    gpus = {g.name: g for g in COMMON_GPUS}
    assert e.fits(gpus["NVIDIA H100 80GB"]) and not e.fits(gpus["NVIDIA L4"])
    h100 = gpus["NVIDIA H100 80GB"]
    seqs = e.max_seqs_on(h100)
    per_seq = 8192 * 40 * 1024
    spare = h100.memory_bytes * 0.9 - (e.weight_bytes + e.activation_bytes + e.overhead_bytes)
    assert seqs == math.floor(spare / per_seq)
    assert estimate(arch, quantization="fp8").supported_on(gpus["NVIDIA A100 80GB"]) is not None
    assert estimate(arch, quantization="fp8").supported_on(h100) is None


def test_cli_estimate_json_and_table() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["estimate", "--config-name", GLM4_9B, "--max-model-len", "8192",
                              "--max-num-seqs", "16", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["num_parameters"] == 9_400_279_040 and data["kv_bytes"] == 16 * 8192 * 40 * 1024
    assert {g["gpu"]: g["fits"] for g in data["gpus"]}["NVIDIA H200"] is True
    table = runner.invoke(app, ["estimate", "--config-name", GLM4_9B, "--quantization", "int8"])
    assert table.exit_code == 0 and "total per GPU" in table.output and "NVIDIA H100 80GB" in table.output
    bad = runner.invoke(app, ["estimate", "--config-name", "glm-99b"])
    assert bad.exit_code == 2
    assert (
        f"{weight_bytes(arch_for(GLM4_9B), 'bfloat16') / GiB:.2f} GiB"
        in runner.invoke(app, ["estimate", "--config-name", GLM4_9B]).output
    )
