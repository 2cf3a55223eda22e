"""The Triton paged-attention kernels against the reference backend (float32 on upcast inputs), on random data.

Each case draws a fresh batch: sequences with and without cached context, decodes long enough to use every key
split, block tables shuffled over the pool, the output poisoned with NaN beforehand so an unwritten element
fails. bf16/fp16 storage with fp32 accumulation lands near 1e-3 relative error; 1e-2 is the bound.
"""

from __future__ import annotations

import random

import pytest
import torch

from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REL_ERR = 1e-2


def _case(
    seqs: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[float, float]:
    """(relative error of the attention output, max abs error of the written cache) for ``seqs`` of
    (context_len, query_len), decodes first."""
    from openautoglm.engine.attention.triton_paged import TritonPagedAttentionBackend

    rng = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-(c + q) // block_size) for c, q in seqs]
    num_blocks = 1 + sum(need) + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    md = build_metadata([q for _, q in seqs], [c for c, _ in seqs], tables, block_size, "cuda")
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    num_tokens = sum(q for _, q in seqs)
    # q/k/v as the model hands them over: strided views of one fused projection.
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    scale = head_dim**-0.5
    ref_cache = cache.double().float()
    ref = ReferenceAttentionBackend().forward(q.float(), k.float(), v.float(), ref_cache, md, scale)
    backend = TritonPagedAttentionBackend(torch.device("cuda"))
    out = backend.forward(q, k, v, cache, md, scale)
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


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), CASES)
def test_mixed_batches_match_reference(
    heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    rng = random.Random(heads * 1000 + block_size)
    for trial in range(3):
        decodes = [(rng.randint(1, 3000), 1) for _ in range(rng.randint(0, 6))]
        prefills = [(0, rng.randint(1, 300)), (rng.randint(1, 700), rng.randint(2, 200)), (rng.randint(1, 64), 1 + 64)]
        seqs = decodes + prefills[: rng.randint(1, 3)]
        rel, cache_err = _case(seqs, heads, kv_heads, head_dim, block_size, dtype, seed=trial)
        assert rel < REL_ERR, f"{seqs}: relative error {rel:.2e}"
        assert cache_err == 0.0, f"{seqs}: the cache write changed values by {cache_err}"


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_batches_use_every_split_count(batch: int, dtype: torch.dtype) -> None:
    """Batch sizes from 1 to 200 give 16 down to 1 key splits; lengths from 1 (one key) to 8k."""
    rng = random.Random(batch)
    seqs = [(rng.choice([0, 1, 15, 16, 17, 1000, 8191]), 1) for _ in range(batch)]
    rel, cache_err = _case(seqs, 32, 2, 128, 16, dtype, seed=batch)
    assert rel < REL_ERR and cache_err == 0.0


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


def test_reshape_and_cache_skips_negative_slots() -> None:
    from openautoglm.engine.attention.triton_paged import reshape_and_cache

    cache = torch.zeros(2, 4, 8, 2, 64, dtype=torch.float16, device="cuda")
    key = torch.randn(3, 2, 64, device="cuda").half()
    value = torch.randn(3, 2, 64, device="cuda").half()
    reshape_and_cache(key, value, cache, torch.tensor([9, -1, 31], device="cuda"))
    flat = cache.view(2, -1, 2, 64)
    assert torch.equal(flat[0, 9], key[0]) and torch.equal(flat[1, 31], value[2])
    assert int((flat.abs().sum((-1, -2)) != 0).sum()) == 4  # slots 9 and 31, keys and values; nothing else
