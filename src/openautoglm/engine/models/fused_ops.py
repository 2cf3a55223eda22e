"""Triton kernels for the GPU decode path: residual-add + RMSNorm, in-place partial rotary, SiLU-and-mul, and a
one-token GEMV for the linears.

At batch 1 a decode step is bound by reading the weights; what sat between the matrix products was ~35 small
kernels per layer (casts, the rotary's unflatten/stack/cat, separate adds), each a few microseconds of launch
and latency. Each kernel here replaces one of those chains with one launch.

Every kernel rounds where the torch path in ``layers.py`` rounds (normalize in float32, cast to the model
dtype, then scale by the weight, as transformers does; products and sums of bf16/fp16 tensors rounded one op
at a time), so the fused path computes the same numbers as the torch path and GPU greedy outputs keep agreeing
with the CPU oracle. That needs ``enable_fp_fusion=False`` at every launch: Triton narrows float32 math on
bf16 values to bf16 instructions and would then contract a product and a sum into one FMA, skipping the
product's rounding (seen in the PTX: ``fma.rn.bf16`` for the rotary's ``x1 * cos - x2 * sin``).

The GEMV (``gemv``) is the exception to "the same numbers": at batch 1 every projection is a pure weight
stream, and for GLM-4-9B's shapes cuBLAS streams at 2.1-2.8 TB/s on an H100 (split-K plus a reduction kernel
for the narrow outputs) where one program per weight row (or few), streaming it once with an evict-first hint
and reducing float32 partial sums once at the end, reaches 2.7-3.2 TB/s. Its sums run in another order than
cuBLAS's, so its outputs differ from the torch path's by float32 rounding before the bf16 cast. It runs only
for shapes in ``GEMV_TUNED`` (measured faster than cuBLAS there; docs/performance.md). With ``silu=True`` it
takes a fused ``[gate | up]`` weight and ends in SiLU-and-mul (``gemv_silu_epilogue``): one kernel fewer per layer,
the same numbers as the GEMV followed by ``silu_and_mul`` (H100, GLM-4-9B shapes: 0.06 ms per decode step).

``layers.py`` imports this module lazily, and other Triton modules (the int8 kernels, the one-shot all-reduce)
import parts of it: it needs Triton, which CPU-only installs of Open-AutoGLM do not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from openautoglm.engine import pdl
from openautoglm.engine.rotary_math import rotate_pairs
from openautoglm.protocol.errors import InternalError


@triton.jit
def _scaled_norm(x, w, n_cols, eps):
    """``w * rms_norm(x)`` of one float32 row, rounded to the weight's (the model's) dtype as the torch path
    rounds it."""
    var = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.rsqrt(var + eps)).to(w.dtype)
    return (w.to(tl.float32) * normed.to(tl.float32)).to(w.dtype)


@triton.jit
def add_norm_epilogue(
    x, r, w, post_w, cols, mask, out_ptrs, res_out_ptrs, n_cols, post_eps, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_POST: tl.constexpr,
):  # fmt: skip
    """Store ``norm(h)`` and ``h = r + post_norm(x)`` of one float32 row ``x`` (``r``: the residual row, float32;
    ``w``, ``post_w``: the norms' weights in the model's dtype). Shared with the all-reduce that ends in a norm."""
    if HAS_POST:
        x = _scaled_norm(x, post_w, n_cols, post_eps).to(tl.float32)
    if HAS_RESIDUAL:
        h = (x + r).to(w.dtype)
        tl.store(res_out_ptrs, h, mask=mask)
        x = h.to(tl.float32)
    tl.store(out_ptrs, _scaled_norm(x, w, n_cols, eps), mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    out_ptr,
    res_out_ptr,
    post_w_ptr,
    w_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    n_cols,
    post_eps,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_POST: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    # One row per program: out = norm(residual + post_norm(x)), res_out = residual + post_norm(x). Every load
    # is issued first: at one token a row is latency, not bandwidth, and the reductions' barriers would
    # otherwise hold the later loads back.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    post_w = w
    if HAS_POST:
        post_w = tl.load(post_w_ptr + cols, mask=mask, other=0.0)
    pdl.begin(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = x
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + row * stride_out + cols
    res_out_ptrs = res_out_ptr + row * stride_res_out + cols
    add_norm_epilogue(
        x, r, w, post_w, cols, mask, out_ptrs, res_out_ptrs, n_cols, post_eps, eps, HAS_RESIDUAL, HAS_POST
    )


@triton.jit
def _rotary_kernel(
    qk_ptr,
    cos_ptr,
    sin_ptr,
    stride_tok,
    stride_head,
    stride_cos,
    stride_sin,
    n_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    # Program (token, head block): rotate pairs (x[2i], x[2i+1]), i < HALF, of BLOCK_H heads in place.
    pdl.begin(PDL)
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_HALF)
    pmask = pairs < HALF
    dtype = qk_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + tok * stride_cos + pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + tok * stride_sin + pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
    offs = tok * stride_tok + heads[:, None].to(tl.int64) * stride_head + 2 * pairs[None, :]
    mask = (heads[:, None] < n_heads) & pmask[None, :]
    x1 = tl.load(qk_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(qk_ptr + offs + 1, mask=mask, other=0.0)
    o1, o2 = rotate_pairs(x1, x2, cos, sin, dtype)
    tl.store(qk_ptr + offs, o1.to(dtype), mask=mask)
    tl.store(qk_ptr + offs + 1, o2.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    silu = tl.div_rn(gate, 1.0 + tl.exp(-gate)).to(dtype)  # F.silu's formula, rounded as F.silu rounds
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up).to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last dim]`` with a unit column stride (a view where the layout allows)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 512))  # 16-byte accesses: 8 bf16 per thread and load


def _launch_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    post_weight: torch.Tensor | None, post_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    n = x.shape[-1]
    rows = _rows(x)
    res = rows if residual is None else _rows(residual)
    out = torch.empty_like(rows)
    res_out = rows if residual is None else torch.empty_like(rows)
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows.shape[0],)](
            rows, res, out, res_out, weight if post_weight is None else post_weight, weight,
            rows.stride(0), res.stride(0), out.stride(0), res_out.stride(0), n, post_eps, eps,
            HAS_RESIDUAL=residual is not None, HAS_POST=post_weight is not None, BLOCK=block,
            num_warps=_norm_warps(block), enable_fp_fusion=False, **pdl.launch(),
        )  # fmt: skip
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rms_norm(x)``, one launch."""
    return _launch_norm(x, None, weight, eps, None, 0.0)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    post_weight: torch.Tensor | None = None,
    post_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(h), h)`` with ``h = residual + post_norm(x)``, one launch.

    ``post_norm`` (GLM-4-0414's sandwich norm, weight ``post_weight``) is skipped when ``post_weight`` is None.
    """
    if residual.shape != x.shape:
        raise InternalError(f"add_rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    return _launch_norm(x, residual, weight, eps, post_weight, post_eps)


def rotary_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first ``2 * cos.shape[-1]`` dims of every head of ``qk [tokens, heads, head_dim]`` in place.

    ``qk`` may be a strided view (the q and k heads of a fused qkv projection); ``cos``/``sin`` are per token
    (``[tokens, 1, rotary_dim / 2]``, any token stride), as ``RotaryEmbedding`` gathers them by position.
    """
    tokens, heads, _ = qk.shape
    half = cos.shape[-1]
    if qk.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise InternalError("rotary_: qk, cos and sin need a unit stride in their last dimension")
    if not tokens:
        return
    block_h = min(8, triton.next_power_of_2(heads))
    _rotary_kernel[(tokens, triton.cdiv(heads, block_h))](
        qk, cos, sin, qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0), heads,
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=2, enable_fp_fusion=False,
        **pdl.launch(),
    )  # fmt: skip


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``x = [gate | up]`` (last dim), one launch."""
    d = x.shape[-1] // 2
    rows = _rows(x)
    out = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = 1024
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
            rows, out, rows.stride(0), out.stride(0), d, BLOCK=block, num_warps=4, enable_fp_fusion=False,
            **pdl.launch(),
        )  # fmt: skip
    return out.view(*x.shape[:-1], d)


# ---- one-token GEMV -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 4
    block_k: int = 1024
    num_warps: int = 4
    num_stages: int = 1
    evict: bool = True


_WIDE = GemvConfig(block_n=1, block_k=1024, num_warps=8)
# (out_features, in_features) -> config: GLM-4-9B's projections on one GPU and their shards over two, where a sweep
# on an H100 measured this kernel faster than cuBLAS (40 layers' weights per shape in one CUDA graph):
# qkv 0.614 -> 0.550 ms, o 0.631 -> 0.497, gate_up 3.160 -> 2.876, down 1.678 -> 1.541, lm_head 0.512 -> 0.391;
# tp2 shards 0.431 -> 0.315, 0.344 -> 0.290, 1.601 -> 1.479, 0.939 -> 0.831, 0.220 -> 0.198.
GEMV_TUNED: dict[tuple[int, int], GemvConfig] = {
    (4608, 4096): _WIDE,  # qkv (with bias)
    (4096, 4096): _WIDE,  # o
    (27392, 4096): _WIDE,  # gate_up
    (4096, 13696): GemvConfig(block_n=4, block_k=2048, num_warps=4),  # down
    (151552, 4096): GemvConfig(block_n=1, block_k=2048, num_warps=8),  # lm_head
    (2304, 4096): _WIDE,  # tensor parallel 2: qkv
    (4096, 2048): GemvConfig(block_n=2, block_k=1024, num_warps=4),  # o
    (13696, 4096): GemvConfig(block_n=1, block_k=2048, num_warps=8),  # gate_up
    (4096, 6848): GemvConfig(block_n=1, block_k=1024, num_warps=4),  # down
    (75776, 4096): GemvConfig(block_n=1, block_k=2048, num_warps=4),  # lm_head
}


@triton.jit
def _gemv_rows(w_ptrs, w, x_ptr, n_mask, rk, K: tl.constexpr, BLOCK_K: tl.constexpr, EVICT: tl.constexpr):
    """Element-wise float32 partial sums of the rows at ``w_ptrs`` times x, from their first tile ``w``."""
    acc = w.to(tl.float32) * tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        x = tl.load(x_ptr + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy=EVICT)
        acc += w.to(tl.float32) * x[None, :]
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,  # output features (with SILU: half the weight's rows)
    stride_wn,
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # int8 weights (quantization): per-output-channel float32 scales
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,  # a fused [gate | up] weight: y = silu(gate) * up (gemv_silu_epilogue)
    EVICT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    first = n_mask[:, None] & (rk < K)[None, :]
    # The first weight tile is read before waiting for the previous kernel (no kernel of a step writes weights).
    w = tl.load(w_ptrs, mask=first, other=0.0, eviction_policy=EVICT)
    if SILU:  # and the up rows' (N rows further down)
        up_ptrs = w_ptr + (N + rn)[:, None].to(tl.int64) * stride_wn + rk[None, :]
        w_up = tl.load(up_ptrs, mask=first, other=0.0, eviction_policy=EVICT)
    pdl.begin(PDL)
    acc = _gemv_rows(w_ptrs, w, x_ptr, n_mask, rk, K, BLOCK_K, EVICT)
    if SILU:
        acc_up = _gemv_rows(up_ptrs, w_up, x_ptr, n_mask, rk, K, BLOCK_K, EVICT)
        gemv_silu_epilogue(acc, acc_up, rn, n_mask, N, s_ptr, b_ptr, y_ptr, HAS_SCALE, HAS_BIAS)
    else:
        gemv_epilogue(acc, rn, n_mask, s_ptr, b_ptr, y_ptr, HAS_SCALE, HAS_BIAS)


@triton.jit
def _gemv_rows_out(acc, rows, n_mask, s_ptr, b_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Reduce the element-wise partial sums of ``rows``, then the per-channel scale and the bias, in float32."""
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rows, mask=n_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def gemv_epilogue(acc, rn, n_mask, s_ptr, b_ptr, y_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A GEMV's end (this one's and the int8 one's): rows ``rn`` reduced, scaled, biased, stored in y's dtype."""
    y = _gemv_rows_out(acc, rn, n_mask, s_ptr, b_ptr, HAS_SCALE, HAS_BIAS)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gemv_silu_epilogue(
    acc, acc_up, rn, n_mask, N, s_ptr, b_ptr, y_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr
):  # fmt: skip
    """The end of a fused [gate | up] GEMV: gate rows ``rn`` and up rows ``N + rn`` rounded to y's dtype as the
    product would store them, then ``_silu_and_mul_kernel``'s arithmetic: the same numbers, one kernel fewer."""
    dtype = y_ptr.dtype.element_ty
    gate = _gemv_rows_out(acc, rn, n_mask, s_ptr, b_ptr, HAS_SCALE, HAS_BIAS).to(dtype).to(tl.float32)
    up = _gemv_rows_out(acc_up, N + rn, n_mask, s_ptr, b_ptr, HAS_SCALE, HAS_BIAS).to(dtype).to(tl.float32)
    silu = tl.div_rn(gate, 1.0 + tl.exp(-gate)).to(dtype)
    tl.store(y_ptr + rn, (silu.to(tl.float32) * up).to(dtype), mask=n_mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig,
    scale: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """``(x @ weight.T) * scale + bias`` for one row ``x`` [1, K] (contiguous) and a weight [N, K] with unit
    stride along K (the scale, for int8 weights, per output channel). ``silu``: the weight is a fused
    ``[gate | up]`` projection (N even) and the result ``silu(gate) * up`` [1, N / 2], as ``silu_and_mul``."""
    n, k = weight.shape
    out = n // 2 if silu else n
    y = torch.empty((1, out), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(out, config.block_n),)](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight, y, out,
        weight.stride(0), K=k, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, SILU=silu,
        EVICT="evict_first" if config.evict else "",
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch(),
    )  # fmt: skip
    return y
