"""Load-time quantization on the CPU: int8 / fp8 round trips against their error bounds, the loader quantizing a
real checkpoint tensor by tensor, quantized logits against the float model, and fp8 and the fast path refused
with the right messages. GPU kernels and speed: tests/engine/gpu/test_quantization_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from openautoglm.config.settings import ModelConfig, load_settings
from openautoglm.engine.attention.base import ForwardContext
from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata
from openautoglm.engine.llm import LLM
from openautoglm.engine.loader import LoadedModel, load_model
from openautoglm.engine.models.base import ModelArchConfig
from openautoglm.engine.models.layers import Linear
from openautoglm.engine.models.registry import get_model_class
from openautoglm.engine.platform import fast_path_decision, fast_path_support, fp8_decision
from openautoglm.engine.quantization import QuantizedLinear, replace_linears
from openautoglm.engine.quantization.fp8 import FP8_MAX, dequantize_fp8, per_token_fp8_quant_torch, quantize_fp8
from openautoglm.engine.quantization.int8 import dequantize_int8, quantize_int8
from openautoglm.protocol.errors import ConfigError, ModelLoadError
from openautoglm.protocol.sampling import SamplingParams

CPU = torch.device("cpu")


def weights(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian rows with a few outliers and an all-zero row: what per-channel scales must cope with."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, 0] = 1.5  # an outlier sets its row's scale, and only its row's
    if rows > 2:
        w[2] = 0.0
    return w.to(dtype)


# --- int8 and fp8 arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 128), (300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_round_trip_is_within_half_a_step(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = weights(*shape, seed=shape[0], dtype=dtype)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    nonzero = amax > 0
    torch.testing.assert_close(s[nonzero], amax[nonzero] / 127)
    assert (q[nonzero].abs().amax(dim=1) == 127).all()  # each row uses the whole range
    err = (dequantize_int8(q, s) - w32).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    if shape[0] > 2:
        assert (q[2] == 0).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("shape", [(7, 33), (64, 128), (300, 1000)])
def test_fp8_weight_round_trip_is_within_e4m3_rounding(shape: tuple[int, int]) -> None:
    w = weights(*shape, seed=shape[1])
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (shape[0],)
    deq = dequantize_fp8(q, s)
    # Normal e4m3 numbers keep 3 mantissa bits: rounding moves a value by at most 2^-4 of itself; below the
    # smallest normal (2^-6 in scaled units) the step is 2^-9, so at most 2^-10 scaled units.
    bound = torch.maximum(w.abs() * 2**-4, s[:, None] * 2**-10) * (1 + 1e-5)
    assert ((deq - w).abs() <= bound).all()
    nonzero = w.abs().amax(dim=1) > 0
    torch.testing.assert_close(deq.abs().amax(dim=1)[nonzero], w.abs().amax(dim=1)[nonzero], rtol=1e-6, atol=0)


def test_per_token_fp8_activations_scale_each_token() -> None:
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    x[1] *= 1000.0
    x[3] = 0.0
    q, s = per_token_fp8_quant_torch(x)
    torch.testing.assert_close(s[:, 0][[0, 1, 2, 4]], x.abs().amax(dim=1)[[0, 1, 2, 4]] / FP8_MAX)
    deq = q.float() * s
    assert ((deq - x).abs() <= torch.maximum(x.abs() * 2**-4, s * 2**-10) * (1 + 1e-5)).all()
    assert (q[3].float() == 0).all() and torch.isfinite(s).all()


def test_int8_linear_is_the_dequantized_linear() -> None:
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(4))
    qlinear = QuantizedLinear.like(linear, "int8")
    qlinear.load_rows(slice(None), linear.weight)
    with torch.no_grad():
        qlinear.bias.copy_(linear.bias)  # type: ignore[union-attr]
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        y = qlinear(x)
        exact = F.linear(x.double(), qlinear.dequantized_weight().double(), linear.bias.double())
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-6)
        full = linear(x)
    assert float((y - full).norm() / full.norm()) < 0.01


# --- the model and the loader --------------------------------------------------------------------------------


def tiny_arch(**overrides: object) -> ModelArchConfig:
    cfg = {
        "architectures": ["Glm4ForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 128, "eos_token_id": [1], "pad_token_id": 0,
    } | overrides  # fmt: skip
    return ModelArchConfig.from_hf_dict(cfg)


@pytest.mark.parametrize("method,storage", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_replace_linears_swaps_exactly_the_decoder_projections(method: str, storage: torch.dtype) -> None:
    arch = tiny_arch()
    with torch.device("meta"):
        plain = get_model_class(arch.architecture)(arch)
        model = get_model_class(arch.architecture)(arch)
    replaced = replace_linears(model, method)
    parts = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert replaced == [f"model.layers.{i}.{p}" for i in range(2) for p in parts]
    modules = dict(model.named_modules())
    assert all(isinstance(modules[p], QuantizedLinear) and modules[p].weight.dtype == storage for p in replaced)
    assert type(modules["lm_head"]) is Linear and type(modules["model.embed_tokens"]) is nn.Embedding
    assert modules["model.layers.0.self_attn.qkv_proj"].bias is not None  # GLM's q/k/v bias stays
    assert model.expected_weight_names() == plain.expected_weight_names()  # type: ignore[operator]
    # Same parameter order as the float model: seeded dummy weights draw the same numbers.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_unknown_method_is_a_config_error() -> None:
    with torch.device("meta"):
        model = get_model_class("Glm4ForCausalLM")(tiny_arch())
    with pytest.raises(ConfigError, match=r"'int4'.*none, int8, fp8"):
        replace_linears(model, "int4")


def load(path: Path, quantization: str = "none", **cfg: object) -> LoadedModel:
    return load_model(ModelConfig(model=str(path), quantization=quantization, **cfg), CPU, torch.float32)  # type: ignore[arg-type]


def test_loader_quantizes_every_checkpoint_tensor_into_place(tiny_glm4: Path) -> None:
    tensors = load_file(tiny_glm4 / "model.safetensors")
    loaded = load(tiny_glm4, "int8")
    modules = dict(loaded.model.named_modules())  # type: ignore[attr-defined]
    for i in range(loaded.arch.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([tensors[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        for name, full in {
            "self_attn.qkv_proj": qkv,
            "self_attn.o_proj": tensors[f"{p}self_attn.o_proj.weight"],
            "mlp.gate_up_proj": tensors[f"{p}mlp.gate_up_proj.weight"],
            "mlp.down_proj": tensors[f"{p}mlp.down_proj.weight"],
        }.items():
            module = modules[p + name]
            q, s = quantize_int8(full)
            assert torch.equal(module.weight, q), name
            assert torch.equal(module.weight_scale, s), name
        bias = torch.cat([tensors[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
        assert torch.equal(modules[p + "self_attn.qkv_proj"].bias, bias)
    assert torch.equal(modules["lm_head"].weight, tensors["lm_head.weight"])  # full precision
    assert torch.equal(modules["model.embed_tokens"].weight, tensors["model.embed_tokens.weight"])


@torch.inference_mode()
def prompt_logits(loaded: LoadedModel, length: int = 48) -> torch.Tensor:
    arch = loaded.arch
    tables = [[0, 1, 2], [3, 4, 5]]
    md = build_metadata([length, length], [0, 0], tables, 16)
    kv = [torch.zeros(2, 6, 16, arch.num_key_value_heads, arch.head_dim) for _ in range(arch.num_hidden_layers)]
    ids = torch.randint(0, arch.vocab_size, (2 * length,), generator=torch.Generator().manual_seed(8))
    pos = torch.arange(length).repeat(2)
    ctx = ForwardContext(metadata=md, kv_caches=kv, backend=ReferenceAttentionBackend())
    return loaded.model.compute_logits(loaded.model.forward(ids, pos, ctx))


def agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    cos = F.cosine_similarity(ref.double(), out.double(), dim=-1)
    return float(cos.mean()), float(cos.min()), float((ref.argmax(-1) == out.argmax(-1)).double().mean())


def test_int8_checkpoint_logits_agree_with_the_float_model(tiny_glm4: Path) -> None:
    # This checkpoint's weights are drawn 15 times wider than a trained model's (initializer_range 0.3), which
    # amplifies any perturbation through the layers: measured cos mean 0.998, min 0.9915, top-1 0.92.
    cos_mean, cos_min, top1 = agreement(prompt_logits(load(tiny_glm4)), prompt_logits(load(tiny_glm4, "int8")))
    assert cos_mean > 0.995 and cos_min > 0.98 and top1 >= 0.85, (cos_mean, cos_min, top1)


def test_int8_dummy_model_is_the_quantized_dummy_float_model(tiny_glm4: Path) -> None:
    plain = load(tiny_glm4, load_format="dummy", seed=3)
    quant = load(tiny_glm4, "int8", load_format="dummy", seed=3)
    float_params = dict(plain.model.named_parameters())  # type: ignore[attr-defined]
    for name, module in quant.model.named_modules():  # type: ignore[attr-defined]
        if isinstance(module, QuantizedLinear):
            q, s = quantize_int8(float_params[f"{name}.weight"])
            assert torch.equal(module.weight, q) and torch.equal(module.weight_scale, s), name
    cos_mean, cos_min, top1 = agreement(prompt_logits(plain), prompt_logits(quant))
    assert cos_mean > 0.9995 and cos_min > 0.999 and top1 >= 0.9, (cos_mean, cos_min, top1)


def test_quantized_tensor_of_the_wrong_shape_names_it(tiny_glm4: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_glm4.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"
    ):
        load(ckpt, "int8")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load(ckpt, "int8")


def test_int8_engine_generates_on_the_cpu(tiny_glm4: Path, make_engine_config) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = LLM(make_engine_config(tiny_glm4), quantization="int8").generate(["Open-AutoGLM quantizes"], params)
    assert out[0].error is None
    out = out[0].sequences[0].token_ids
    assert len(out) == 6 and all(0 <= t < 1536 for t in out)


# --- refusals and the gates ----------------------------------------------------------------------------------


def test_fp8_is_refused_on_the_cpu(tiny_glm4: Path, make_engine_config) -> None:
    with pytest.raises(ConfigError, match=r"'fp8' needs an NVIDIA GPU of compute capability 9\.0.*'cpu'"):
        load(tiny_glm4, "fp8")
    with pytest.raises(ConfigError, match="'fp8'"):
        LLM(make_engine_config(tiny_glm4), quantization="fp8")


def test_fp8_decision_names_the_gpu_and_its_capability() -> None:
    reason = fp8_decision("cuda:0", "NVIDIA A100-SXM4-80GB", (8, 0))
    assert reason is not None
    assert "'NVIDIA A100-SXM4-80GB'" in reason and "compute capability 8.0" in reason and "9.0" in reason
    assert fp8_decision("cuda:0", "NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert fp8_decision("cuda:0", "NVIDIA B200", (10, 0)) is None


def test_fast_path_gate() -> None:
    ok, message = fast_path_decision("Tesla V100-SXM2-16GB", (7, 0), has_triton=True)
    assert not ok and "compute capability 7.0" in message and "7.5 or newer" in message and "reference" in message
    assert fast_path_decision("Tesla T4", (7, 5), has_triton=True)[0]
    assert fast_path_decision("NVIDIA H100 80GB HBM3", (9, 0), has_triton=True)[0]
    ok, message = fast_path_decision("NVIDIA H100 80GB HBM3", (9, 0), has_triton=False)
    assert not ok and "triton" in message
    ok, message = fast_path_support("cpu")
    assert not ok and "not a CUDA GPU" in message


def test_quantization_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"engine\.model\.quantization"):
        load_settings(overrides={"engine": {"model": {"quantization": "int4"}}}, environ={})
    settings = load_settings(environ={"AUTOGLM_ENGINE__MODEL__QUANTIZATION": "int8"})
    assert settings.engine.model.quantization == "int8"
    assert ModelConfig().quantization == "none"


# --- the Triton kernels, interpreted on the CPU -----------------------------------------------------------------

_INTERPRETED = textwrap.dedent(
    """
    import json, torch
    from openautoglm.engine.quantization.int8 import quantize_int8
    from openautoglm.engine.quantization.triton_kernels import Int8Config, int8_dequantize, int8_weight_only_matmul
    g = torch.Generator().manual_seed(0)
    errors = []
    for m, n, k, cfg in [(1, 48, 64, None), (1, 37, 1000, Int8Config("gemv", 1, 4, 256, evict=True)),
                         (1, 40, 512, Int8Config("gemv", 1, 8, 512, packed=False)),
                         (5, 40, 100, Int8Config("mma", 16, 16, 64)), (33, 64, 96, None),
                         (70, 48, 128, None), (20, 48, 128, Int8Config("dequant"))]:
        x = torch.randn(m, k, generator=g)
        q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.02)
        b = torch.randn(n, generator=g)
        y = int8_weight_only_matmul(x, q, s, b, config=cfg)
        ref = x.double() @ (q.double() * s.double()[:, None]).t() + b.double()
        errors.append(float((y.double() - ref).norm() / ref.norm()))
    q, s = quantize_int8(torch.randn(48, 1000, generator=g))
    exact = bool(torch.equal(int8_dequantize(q, s, torch.float32), q.float() * s[:, None]))
    # silu(gate) * up in the GEMV's epilogue: equal to the GEMV, then the SiLU-and-mul kernel
    from openautoglm.engine.models.fused_ops import silu_and_mul
    from openautoglm.engine.quantization.triton_kernels import int8_gemv_silu
    silu_equal = []
    for n, k in [(48, 64), (74, 1000)]:
        x = torch.randn(1, k, generator=g)
        q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.02)
        b = torch.randn(n, generator=g)
        fused = int8_gemv_silu(x, q, s, b)
        unfused = silu_and_mul(int8_weight_only_matmul(x, q, s, b))
        silu_equal.append(fused.shape == (1, n // 2) and bool(torch.equal(fused, unfused)))
    print(json.dumps({"errors": errors, "dequant_exact": exact, "silu_equal": silu_equal}))
    """
)


@pytest.mark.slow
def test_int8_triton_kernels_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": src}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(result["errors"]) < 1e-6 and result["dequant_exact"] and all(result["silu_equal"]), result
