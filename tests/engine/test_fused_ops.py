"""The fused Triton kernels (engine/models/fused_ops.py) against the torch path of engine/models/layers.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (skipped where Triton is not installed).
There fp16 rounds as on a GPU, so fp16 results must equal the torch path's up to a rare last-bit difference;
the interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest, so bf16 is held to a few bf16
rounding steps there. On a GPU (marker ``gpu``) each op goes through the layers' own dispatch, in bf16 and fp16
over several shapes, against ``torch_ops_only``; and whole models give the same logits with and without the
fused ops, as close to the float32 CPU oracle as the torch path is.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from openautoglm.config.settings import ModelConfig
from openautoglm.engine.attention.base import ForwardContext
from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata
from openautoglm.engine.loader import load_model
from openautoglm.engine.models import layers
from openautoglm.engine.models.base import CausalLM, ModelArchConfig
from openautoglm.engine.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul, apply_rotary, torch_ops_only

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and Triton")

# (tokens, hidden, heads, kv heads, head_dim, rotary_dim, intermediate): GLM-4-9B's shapes, a tiny test
# model's, and odd sizes (non-power-of-two rows and rotary halves, a head count that is no multiple of 8).
SHAPES = [
    (1, 4096, 32, 2, 128, 64, 13696),
    (7, 4096, 32, 2, 128, 64, 13696),
    (5, 64, 4, 2, 16, 8, 96),
    (3, 320, 6, 3, 20, 10, 200),
    (33, 256, 16, 2, 128, 128, 512),
]
SHAPE_IDS = [f"t{s[0]}-h{s[1]}-qh{s[2]}-kv{s[3]}-d{s[4]}-r{s[5]}-i{s[6]}" for s in SHAPES]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape: tuple[int, ...], seed: int, scale: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=_gen(seed))).to(device=device, dtype=dtype)


def _norm(hidden: int, eps: float, seed: int, dtype: torch.dtype, device: str) -> RMSNorm:
    norm = RMSNorm(hidden, eps)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(hidden, generator=_gen(seed)))
    return norm.to(device=device, dtype=dtype)


def _rope(tokens: int, rotary_dim: int, seed: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    positions = torch.randint(0, 8192, (tokens,), generator=_gen(seed)).to(device)
    return RotaryEmbedding(rotary_dim, 8192, 10000.0)(positions, dtype)


def _check(out: torch.Tensor, ref: torch.Tensor, steps: float, mismatch: float) -> None:
    """Within ``steps`` rounding steps of ``ref`` elementwise (of the largest element where sums cancel); at
    most a ``mismatch`` fraction not bit-equal."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "NaN in the fused output"
    eps = torch.finfo(out.dtype).eps
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=steps * eps, atol=steps * eps * scale)
    frac = (out != ref).float().mean().item()
    assert frac <= mismatch, f"{frac:.2%} of elements differ from the torch path (allowed {mismatch:.2%})"


# ---- the checks, shared by the interpreter and the GPU -----------------------------------------------------

Ops = dict[str, Callable[..., Any]]


def check_norms(ops: Ops, shape: tuple[int, ...], dtype: torch.dtype, device: str, tol: tuple[float, float]) -> None:
    tokens, hidden = shape[0], shape[1]
    norm, post = _norm(hidden, 1e-5, 1, dtype, device), _norm(hidden, 1e-6, 2, dtype, device)
    x, residual = _randn((tokens, hidden), 3, 3.0, dtype, device), _randn((tokens, hidden), 4, 1.0, dtype, device)
    with torch.no_grad(), torch_ops_only():
        ref_plain = norm(x)
        ref_add = layers.add_rms_norm(x, residual, norm)
        ref_sandwich = layers.add_rms_norm(x, residual, norm, post)
    with torch.no_grad():
        _check(ops["rms_norm"](x, norm), ref_plain, *tol)
        for got, ref in ((ops["add_rms_norm"](x, residual, norm, None), ref_add),
                         (ops["add_rms_norm"](x, residual, norm, post), ref_sandwich)):  # fmt: skip
            _check(got[0], ref[0], *tol)
            _check(got[1], ref[1], *tol)


def check_rotary(ops: Ops, shape: tuple[int, ...], dtype: torch.dtype, device: str, tol: tuple[float, float]) -> None:
    tokens, _, heads, kv_heads, head_dim, rotary_dim, _ = shape
    width = (heads + 2 * kv_heads) * head_dim
    qkv = _randn((tokens, width), 5, 2.0, dtype, device)
    cos, sin = _rope(tokens, rotary_dim, 6, dtype, device)
    qk_size = (heads + kv_heads) * head_dim
    with torch_ops_only():
        ref = apply_rotary(qkv[:, :qk_size].view(tokens, heads + kv_heads, head_dim), cos, sin)
    fused = qkv.clone()
    qk = fused[:, :qk_size].view(tokens, heads + kv_heads, head_dim)  # the strided view GlmAttention rotates
    ops["rotary"](qk, cos, sin)
    _check(qk, ref, *tol)
    assert torch.equal(fused[:, qk_size:], qkv[:, qk_size:]), "the v heads must stay as they were"
    assert torch.equal(qk[..., rotary_dim:], ref[..., rotary_dim:]), "dims past rotary_dim must stay as they were"


def check_silu(ops: Ops, shape: tuple[int, ...], dtype: torch.dtype, device: str, tol: tuple[float, float]) -> None:
    tokens, inter = shape[0], shape[6]
    x = _randn((tokens, 2 * inter), 7, 4.0, dtype, device)
    with torch_ops_only():
        ref = SiluAndMul()(x)
    _check(ops["silu_and_mul"](x), ref, *tol)


# The one-token GEMV: (out, in, config, bias): masks on both axes, a K shorter than one block, one row per program.
GEMV_CASES = [
    (37, 300, {"block_n": 4, "block_k": 128}, True),
    (64, 1000, {"block_n": 1, "block_k": 256}, False),
    (5, 96, {"block_n": 2, "block_k": 512, "num_warps": 2}, True),
]
GEMV_IDS = [f"n{c[0]}-k{c[1]}-bn{c[2]['block_n']}" for c in GEMV_CASES]


def check_gemv(
    mod: ModuleType, case: tuple[int, int, dict[str, int], bool], dtype: torch.dtype, device: str, steps: float
) -> None:
    """Within ``steps`` rounding steps of the exact product rounded once (float64 here)."""
    n, k, config, with_bias = case
    x = _randn((1, k), 20, 1.0, dtype, device)
    w = _randn((n, k), 21, 0.05, dtype, device)
    b = _randn((n,), 22, 1.0, dtype, device) if with_bias else None
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    _check(mod.gemv(x, w, b, mod.GemvConfig(**config)), exact.to(dtype), steps, 1.0)


def check_gemv_silu(
    mod: ModuleType, case: tuple[int, int, dict[str, int], bool], dtype: torch.dtype, device: str
) -> None:
    """The fused [gate | up] GEMV equals the GEMV followed by the SiLU-and-mul kernel, bit for bit."""
    n, k, config, with_bias = case
    x = _randn((1, k), 23, 1.0, dtype, device)
    w = _randn((2 * n, k), 24, 0.05, dtype, device)
    b = _randn((2 * n,), 25, 1.0, dtype, device) if with_bias else None
    cfg = mod.GemvConfig(**config)
    fused = mod.gemv(x, w, b, cfg, silu=True)
    assert fused.shape == (1, n)
    assert torch.equal(fused, mod.silu_and_mul(mod.gemv(x, w, b, cfg)))


def _direct_ops(mod: ModuleType) -> Ops:
    """The kernels' own entry points (no dispatch), with the layers' argument shapes."""

    def add_norm(x: torch.Tensor, res: torch.Tensor, norm: RMSNorm, post: RMSNorm | None) -> Any:
        extra = () if post is None else (post.weight, post.eps)
        return mod.add_rms_norm(x, res, norm.weight, norm.eps, *extra)

    return {
        "rms_norm": lambda x, norm: mod.rms_norm(x, norm.weight, norm.eps),
        "add_rms_norm": add_norm,
        "rotary": mod.rotary_,
        "silu_and_mul": mod.silu_and_mul,
    }


# ---- Triton's interpreter on the CPU -----------------------------------------------------------------------
# Triton decides interpreted or compiled as it decorates, its own library functions included, so the cases
# run in a child pytest started with TRITON_INTERPRET=1 (``test_kernels_in_interpreter``).

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# fp16: exact rounding, so a rare last-bit difference (sums in another order, exp); bf16: truncation.
INTERPRETER_TOL = {torch.float16: (1.0, 0.002), torch.bfloat16: (3.0, 1.0)}


@pytest.mark.skipif(not INTERPRETING, reason="runs in the child of test_kernels_in_interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("check", [check_norms, check_rotary, check_silu], ids=["norms", "rotary", "silu"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_interpreted_case(check: Callable[..., None], shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from openautoglm.engine.models import fused_ops

    check(_direct_ops(fused_ops), shape, dtype, "cpu", INTERPRETER_TOL[dtype])


@pytest.mark.skipif(not INTERPRETING, reason="runs in the child of test_kernels_in_interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GEMV_CASES, ids=GEMV_IDS)
def test_interpreted_gemv(case: tuple[int, int, dict[str, int], bool], dtype: torch.dtype) -> None:
    from openautoglm.engine.models import fused_ops

    check_gemv(fused_ops, case, dtype, "cpu", 1.0 if dtype == torch.float16 else 2.0)
    check_gemv_silu(fused_ops, case, dtype, "cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRETING, reason="already interpreting")
def test_kernels_in_interpreter() -> None:
    """Every kernel in Triton's interpreter on CPU tensors, against the torch path."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cases = "test_interpreted_case or test_interpreted_gemv"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", cases]
    done = subprocess.run(cmd, cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert f"{3 * 2 * (len(SHAPES) - 1) + 2 * len(GEMV_CASES)} passed" in tail, tail


def test_cpu_path_never_dispatches_to_kernels() -> None:
    """The CPU path is the oracle: bf16 on the CPU still runs torch ops (the rotary returns a new tensor)."""
    x = _randn((3, 4, 16), 8, 1.0, torch.bfloat16, "cpu")
    cos, sin = _rope(3, 8, 9, torch.bfloat16, "cpu")
    assert apply_rotary(x, cos, sin) is not x


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_programmatic_launch_only_inside_an_active_block_where_the_gpu_has_it() -> None:
    """Kernels take the launch attribute inside ``pdl.active`` only (the runner's graph captures), only when
    enabled, and never on a device without it (this CPU: the setting is ignored)."""
    from openautoglm.engine import pdl

    on = {"PDL": True, "launch_pdl": True} if pdl.supported() else {"PDL": False}
    try:
        pdl.configure(True)
        assert pdl.enabled() is pdl.supported() and pdl.launch() == {"PDL": False}
        with pdl.active():
            assert pdl.launch() == on
            with pdl.active(False):
                assert pdl.launch() == {"PDL": False}
            assert pdl.launch() == on
        assert pdl.launch() == {"PDL": False}
        pdl.configure(False)
        with pdl.active():
            assert pdl.launch() == {"PDL": False}
    finally:
        pdl.configure(None)


# ---- the GPU -----------------------------------------------------------------------------------------------

# Same rounding as the torch path: differences come only from float32 sums in another order, rsqrt and exp.
GPU_TOL = (1.0, 0.01)


def _dispatched_ops() -> Ops:
    """The layers' own entry points: on CUDA in bf16/fp16 they must take the fused kernels."""
    return {
        "rms_norm": lambda x, norm: norm(x),
        "add_rms_norm": layers.add_rms_norm,
        "rotary": lambda qk, cos, sin: apply_rotary(qk, cos, sin),
        "silu_and_mul": lambda x: SiluAndMul()(x),
    }


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("entry", ["kernels", "layers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("check", [check_norms, check_rotary, check_silu], ids=["norms", "rotary", "silu"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fused_ops_on_gpu_match_torch_path(
    check: Callable[..., None], shape: tuple[int, ...], dtype: torch.dtype, entry: str
) -> None:
    from openautoglm.engine.models import fused_ops

    ops = _direct_ops(fused_ops) if entry == "kernels" else _dispatched_ops()
    check(ops, shape, dtype, "cuda", GPU_TOL)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GEMV_CASES, ids=GEMV_IDS)
def test_gemv_on_gpu(case: tuple[int, int, dict[str, int], bool], dtype: torch.dtype) -> None:
    from openautoglm.engine.models import fused_ops

    check_gemv(fused_ops, case, dtype, "cuda", 1.0)
    check_gemv_silu(fused_ops, case, dtype, "cuda")


@pytest.mark.gpu
@requires_gpu
def test_linear_takes_the_gemv_for_tuned_shapes_only() -> None:
    """One bf16 row of a tuned shape takes the GEMV (bit-equal to it, close to the exact product); two rows, float32
    or an untuned shape take cuBLAS."""
    from openautoglm.engine.models import fused_ops

    for (n, k), config in fused_ops.GEMV_TUNED.items():
        x = _randn((2, k), n, 1.0, torch.bfloat16, "cuda")
        w = _randn((n, k), k, 0.02, torch.bfloat16, "cuda")
        one = layers.linear(x[:1], w)
        assert torch.equal(one, fused_ops.gemv(x[:1], w, None, config)), (n, k)
        _check(one, (x[:1].double() @ w.double().T).to(torch.bfloat16), 1.0, 1.0)
        assert torch.equal(layers.linear(x, w), torch.nn.functional.linear(x, w))
    x, w = _randn((1, 96), 1, 1.0, torch.bfloat16, "cuda"), _randn((40, 96), 2, 1.0, torch.bfloat16, "cuda")
    assert torch.equal(layers.linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.gpu
@requires_gpu
def test_gate_up_takes_the_silu_gemv_for_one_token_only() -> None:
    """GLM-4-9B's gate_up (a tuned shape): one token gets silu(gate) * up from one kernel, equal to the GEMV and
    the SiLU-and-mul kernel; two tokens (and an untuned shape) get None, so the MLP multiplies first."""
    from openautoglm.engine.models import fused_ops

    proj = layers.Linear(4096, 2 * 13696, bias=False).to("cuda", torch.bfloat16)
    x = _randn((2, 4096), 3, 1.0, torch.bfloat16, "cuda")
    one = proj.forward_silu(x[:1])
    assert one is not None and torch.equal(one, fused_ops.silu_and_mul(proj(x[:1])))
    assert proj.forward_silu(x) is None
    assert layers.Linear(96, 80, bias=False).to("cuda", torch.bfloat16).forward_silu(x[:1, :96]) is None


@pytest.mark.gpu
@requires_gpu
def test_gpu_dispatch_takes_the_fused_rotary_in_place() -> None:
    x = _randn((4, 6, 128), 10, 1.0, torch.bfloat16, "cuda")
    cos, sin = _rope(4, 64, 11, torch.bfloat16, "cuda")
    assert apply_rotary(x, cos, sin) is x
    with torch_ops_only():
        assert apply_rotary(x, cos, sin) is not x


# ---- whole models ------------------------------------------------------------------------------------------


@torch.inference_mode()
def _logits(model: CausalLM, arch: ModelArchConfig, prompt: list[int], device: str, dtype: torch.dtype) -> torch.Tensor:
    """Logits of every position: a prefill of all but the last 4 tokens, then 4 single-token decodes."""
    block_size = 16
    blocks = list(range(1, 1 + -(-len(prompt) // block_size)))
    shape = (2, len(blocks) + 1, block_size, arch.num_key_value_heads, arch.head_dim)
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_hidden_layers)]
    backend = ReferenceAttentionBackend()
    out, start = [], 0
    for end in [len(prompt) - 4, *range(len(prompt) - 3, len(prompt) + 1)]:
        md = build_metadata([end - start], [start], [blocks], block_size, device)
        ctx = ForwardContext(metadata=md, kv_caches=caches, backend=backend)
        ids = torch.tensor(prompt[start:end], device=device)
        hidden = model.forward(ids, torch.arange(start, end, device=device), ctx)
        out.append(model.compute_logits(hidden).cpu())
        start = end
    return torch.cat(out)


@pytest.fixture(scope="module", params=["Glm4ForCausalLM", "GlmForCausalLM"])
def wide_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, checkpoint_factory: Any
) -> Path:
    """GLM-4-9B's head layout (16 query heads on 2 kv heads of 128 dims, half of each rotated), small widths.

    Weights drawn at 0.1, not the fixtures' usual 0.3: there a last-bit difference in 1% of one norm's outputs
    already moves the logits by 10%, here by 2%, while a wrong rotary or norm still moves them by ~100%.
    """
    return checkpoint_factory(
        tmp_path_factory.mktemp("fused") / request.param, demo_dir, arch=request.param, hidden_size=256,
        intermediate_size=512, num_attention_heads=16, num_key_value_heads=2, head_dim=128, num_hidden_layers=3,
        max_position_embeddings=2048, initializer_range=0.1,
    )  # fmt: skip


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_logits_with_and_without_fused_ops(
    wide_model: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openautoglm.engine.models import fused_ops

    oracle = load_model(ModelConfig(model=str(wide_model)), torch.device("cpu"), torch.float32)
    loaded = load_model(ModelConfig(model=str(wide_model)), torch.device("cuda"), dtype)
    # The decode steps' linears take the GEMV too: tune it for this model's shapes.
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.Linear):
            monkeypatch.setitem(fused_ops.GEMV_TUNED, tuple(module.weight.shape), fused_ops.GemvConfig(1, 256))
    rng = random.Random(0)
    prompt = [rng.randrange(1, oracle.arch.vocab_size - 64) for _ in range(70)]
    ref = _logits(oracle.model, oracle.arch, prompt, "cpu", torch.float32)
    fused = _logits(loaded.model, loaded.arch, prompt, "cuda", dtype)
    with torch_ops_only():
        plain = _logits(loaded.model, loaded.arch, prompt, "cuda", dtype)
    assert not fused.isnan().any()

    def rel(a: torch.Tensor) -> float:
        return ((a - ref).norm() / ref.norm()).item()

    # The fused path computes the torch path's numbers (up to rare last-bit differences), so its logits stay
    # near the torch path's and as near to the float32 oracle.
    assert ((fused - plain).norm() / plain.norm()).item() < 0.05
    assert rel(fused) <= 1.5 * rel(plain) + 5e-3, f"fused {rel(fused):.3g}, torch path {rel(plain):.3g}"
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean().item() >= 0.9
    print(f"logits vs the fp32 oracle: fused {rel(fused):.4f}, torch path {rel(plain):.4f}; "
          f"fused vs torch path {((fused - plain).norm() / plain.norm()).item():.2e}")  # fmt: skip


def _kernel_names(model: CausalLM, arch: ModelArchConfig) -> list[str]:
    """Names of the GPU kernels that a 1-token prefill and 4 single-token decodes of ``model`` launch."""
    from torch.profiler import ProfilerActivity, profile

    _logits(model, arch, list(range(1, 21)), "cuda", torch.bfloat16)  # compile and warm up first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _logits(model, arch, list(range(1, 6)), "cuda", torch.bfloat16)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.gpu
@requires_gpu
def test_fused_path_launches_fewer_kernels(wide_model: Path) -> None:
    """The point of the fusion: far fewer launches per layer, and the fused kernels among them."""
    loaded = load_model(ModelConfig(model=str(wide_model)), torch.device("cuda"), torch.bfloat16)
    fused = _kernel_names(loaded.model, loaded.arch)
    with torch_ops_only():
        plain = _kernel_names(loaded.model, loaded.arch)
    print(f"kernels for a 1-token prefill + 4 decodes: fused {len(fused)}, torch path {len(plain)}")
    assert any("_add_rms_norm_kernel" in n for n in fused) and any("_rotary_kernel" in n for n in fused)
    assert any("_silu_and_mul_kernel" in n for n in fused)
    assert not any("_rotary_kernel" in n for n in plain)
    assert len(fused) < 0.7 * len(plain)
