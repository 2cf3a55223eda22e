"""The Triton paged-attention kernels against the reference backend (float32 on upcast inputs), on random data.

Each case draws a fresh batch: sequences with and without cached context, decodes long enough to use every key
split, block tables shuffled over the pool, the output poisoned with NaN beforehand so an unwritten element
fails. bf16/fp16 storage with fp32 accumulation lands near 1e-3 relative error; 1e-2 is the bound.

Without a GPU, small cases run in Triton's interpreter on CPU tensors (a child pytest with TRITON_INTERPRET=1,
as in test_fused_ops.py), so CI checks the kernels' logic: key splits and their merge, the rotary folded into
the cache write, prefill chunks over cached context.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openautoglm.engine.attention.base import Rotary
from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata
from openautoglm.engine.models.layers import RotaryEmbedding, apply_rotary, torch_ops_only

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in the child of test_attention_in_interpreter")

REL_ERR = 1e-2

if INTERPRETING:
    # Triton 3.6's interpreter holds scalars as one-element arrays and turns them into loop bounds with int(),
    # which NumPy 2.4 refuses for arrays of one dimension: a kernel looping to a loaded length (both attention
    # kernels do) cannot run there. Take the element instead, in this test process only.
    from triton.runtime import interpreter as _interpreter

    _patch_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor: type, scope: object) -> None:
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    _interpreter._patch_lang_tensor = _patch_lang_tensor


def _case(
    seqs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: str = "cuda",
    rotary_dim: int = 0,
) -> tuple[float, float]:
    """(relative error of the attention output, max abs error of the written cache) for ``seqs`` of
    (context_len, query_len), decodes first. With ``rotary_dim``, the backend gets q and k unrotated with the
    rotary (``fuses_rotary``); the reference gets them rotated by the torch path, so the cache must match
    exactly."""
    from openautoglm.engine.attention.triton_paged import TritonPagedAttentionBackend

    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    need = [-(-(c + q) // block_size) for c, q in seqs]
    num_blocks = 1 + sum(need) + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    md = build_metadata([q for _, q in seqs], [c for c, _ in seqs], tables, block_size, device)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    num_tokens = sum(q for _, q in seqs)
    # q/k/v as the model hands them over: strided views of one fused projection.
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, generator=gen, device=device).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    rotary, qr, kr = None, q, k
    if rotary_dim:
        positions = torch.cat([torch.arange(c, c + n, device=device) for c, n in seqs])
        cos, sin = RotaryEmbedding(rotary_dim, 4096, 10000.0)(positions, dtype)
        rotary = Rotary(cos, sin)
        with torch_ops_only():
            qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scale = head_dim**-0.5
    ref_cache = cache.double().float()
    ref = ReferenceAttentionBackend().forward(qr.float(), kr.float(), v.float(), ref_cache, md, scale)
    backend = TritonPagedAttentionBackend(torch.device(device))
    out = backend.forward(q, k, v, cache, md, scale, rotary)
    if device == "cuda":
        torch.cuda.synchronize()
    assert not out.isnan().any(), "NaN in the Triton output"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    return rel, (cache.float() - ref_cache).abs().max().item()


SHAPES = [  # heads, kv_heads, head_dim
    (32, 2, 128),  # GLM-4-9B: 16 query heads per kv head
    (8, 8, 64),  # no GQA
    (12, 4, 64),  # a group of 3 (padded to the matrix tile)
    (16, 2, 128),
    (4, 1, 64),
]


# Every shape at block size 16 in bf16; the GLM-4 shape also at other block sizes and in fp16. (Each distinct
# shape compiles its own kernels, so the grid stays small.)
CASES = [(*shape, 16, torch.bfloat16) for shape in SHAPES] + [
    (32, 2, 128, 8, torch.bfloat16),
    (32, 2, 128, 32, torch.bfloat16),
    (32, 2, 128, 16, torch.float16),
    (8, 8, 64, 1, torch.float16),
]


@gpu
@needs_cuda
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), CASES)
def test_mixed_batches_match_reference(
    heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    rng = random.Random(heads * 1000 + block_size)
    for trial in range(3):
        decodes = [(rng.randint(1, 3000), 1) for _ in range(rng.randint(0, 6))]
        prefills = [(0, rng.randint(1, 300)), (rng.randint(1, 700), rng.randint(2, 200)), (rng.randint(1, 64), 1 + 64)]
        seqs = decodes + prefills[: rng.randint(1, 3)]
        rotary_dim = head_dim // 2 if trial == 2 else 0  # GLM's partial rotary, fused into the cache write
        rel, cache_err = _case(seqs, heads, kv_heads, head_dim, block_size, dtype, trial, rotary_dim=rotary_dim)
        assert rel < REL_ERR, f"{seqs}: relative error {rel:.2e}"
        assert cache_err == 0.0, f"{seqs}: the cache write changed values by {cache_err}"


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 2, 7, 64, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_batches_use_every_split_count(batch: int, dtype: torch.dtype) -> None:
    """Batch sizes from 1 to 200 give 16 down to 1 key splits; lengths from 1 (one key) to 8k."""
    rng = random.Random(batch)
    seqs = [(rng.choice([0, 1, 15, 16, 17, 1000, 8191]), 1) for _ in range(batch)]
    rel, cache_err = _case(seqs, 32, 2, 128, 16, dtype, seed=batch)
    assert rel < REL_ERR and cache_err == 0.0


@gpu
@needs_cuda
@pytest.mark.parametrize("chunk", [1, 5, 64, 257])
def test_chunked_prefill_equals_whole_prefill(chunk: int) -> None:
    """A prompt computed in chunks over earlier cached blocks gives the output of one whole prefill."""
    from openautoglm.engine.attention.triton_paged import TritonPagedAttentionBackend

    heads, kv_heads, dim, bs, total = 16, 2, 128, 16, 700
    gen = torch.Generator(device="cuda").manual_seed(chunk)
    nblocks = -(-total // bs)
    tables = [list(range(1, nblocks + 1))[::-1]]
    qkv = torch.randn(total, heads + 2 * kv_heads, dim, generator=gen, device="cuda").to(torch.bfloat16)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    backend = TritonPagedAttentionBackend(torch.device("cuda"))
    whole_cache = torch.zeros(2, nblocks + 1, bs, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    whole = backend.forward(q, k, v, whole_cache, build_metadata([total], [0], tables, bs, "cuda"), dim**-0.5)
    cache = torch.zeros_like(whole_cache)
    parts = []
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        md = build_metadata([n], [start], tables, bs, "cuda")
        sl = slice(start, start + n)
        parts.append(backend.forward(q[sl], k[sl], v[sl], cache, md, dim**-0.5))
    chunked = torch.cat(parts)
    torch.cuda.synchronize()
    assert torch.equal(cache, whole_cache)
    rel = ((chunked.float() - whole.float()).norm() / whole.float().norm()).item()
    assert rel < 1e-2 and not chunked.isnan().any()


@gpu
@needs_cuda
def test_reshape_and_cache_skips_negative_slots() -> None:
    from openautoglm.engine.attention.triton_paged import reshape_and_cache

    cache = torch.zeros(2, 4, 8, 2, 64, dtype=torch.float16, device="cuda")
    key = torch.randn(3, 2, 64, device="cuda").half()
    value = torch.randn(3, 2, 64, device="cuda").half()
    reshape_and_cache(key, value, cache, torch.tensor([9, -1, 31], device="cuda"))
    flat = cache.view(2, -1, 2, 64)
    assert torch.equal(flat[0, 9], key[0]) and torch.equal(flat[1, 31], value[2])
    assert int((flat.abs().sum((-1, -2)) != 0).sum()) == 4  # slots 9 and 31, keys and values; nothing else


# ---- Triton's interpreter on the CPU (the CPU's backend counts 8 SMs: one sequence's keys split 8 ways) ----
INTERPRETED_CASES = [  # (context_len, query_len) per sequence, decodes first; heads, kv heads, head_dim, block,
    # rotary dims (0: q and k come rotated; else the backend rotates them as it writes the cache)
    ([(0, 1)], 8, 2, 32, 4, 0),  # one key: one split used, seven with nothing to attend
    ([(70, 1)], 8, 2, 32, 4, 16),  # keys over two splits
    ([(300, 1)], 8, 2, 32, 8, 0),  # every split used
    ([(300, 1), (9, 1)], 4, 1, 16, 4, 16),  # two sequences of different lengths, one group of four heads
    ([(40, 1), (0, 9), (20, 5)], 6, 3, 16, 4, 8),  # decode beside prefills with and without cached context
    ([(40, 1), (0, 9), (20, 5)], 6, 3, 20, 4, 10),  # odd head and rotary sizes (masked tails)
]


@interpreted
@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=[str(i) for i in range(len(INTERPRETED_CASES))])
def test_interpreted_attention(case: tuple[list[tuple[int, int]], int, int, int, int, int]) -> None:
    """fp16 only: the interpreter keeps bf16 as raw 16-bit integers, and its matrix products multiply those."""
    seqs, heads, kv_heads, head_dim, block_size, rotary_dim = case
    for seed in range(2):
        rel, cache_err = _case(seqs, heads, kv_heads, head_dim, block_size, torch.float16, seed, "cpu", rotary_dim)
        assert rel < REL_ERR and cache_err == 0.0, f"{seqs}: relative error {rel:.2e}, cache error {cache_err}"


@interpreted
def test_interpreted_rotate_and_cache() -> None:
    """Query heads rotate in place; rotated keys and the values land in their slots, slot -1 (a graph's padding
    token) writes nothing; the key tensor is left as it came."""
    from openautoglm.engine.attention.triton_paged import rotate_and_cache

    gen = torch.Generator().manual_seed(3)
    cache = torch.zeros(2, 4, 8, 2, 16, dtype=torch.float16)
    qkv = torch.randn(3, 5 + 2 + 2, 16, generator=gen).half()
    q, k, v = qkv[:, :5], qkv[:, 5:7], qkv[:, 7:]
    cos, sin = RotaryEmbedding(8, 64, 10000.0)(torch.tensor([4, 0, 17]), torch.float16)
    with torch_ops_only():
        q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_before = k.clone()
    rotate_and_cache(q, k, v, cache, torch.tensor([9, -1, 31]), Rotary(cos, sin))
    flat = cache.view(2, -1, 2, 16)
    assert torch.equal(q, q_rot) and torch.equal(k, k_before)
    assert torch.equal(flat[0, 9], k_rot[0]) and torch.equal(flat[0, 31], k_rot[2])
    assert torch.equal(flat[1, 9], v[0]) and torch.equal(flat[1, 31], v[2])
    written = torch.zeros(32, dtype=torch.bool)
    written[[9, 31]] = True
    assert not flat[:, ~written].any()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRETING, reason="already interpreting")
def test_attention_in_interpreter() -> None:
    """The attention kernels in Triton's interpreter on CPU tensors, against the reference backend."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_interpreted"]
    done = subprocess.run(cmd, cwd=Path(__file__).parents[3], env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert f"{len(INTERPRETED_CASES) + 1} passed" in tail, tail
