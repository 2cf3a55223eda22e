"""Triton kernels for quantized linears (CUDA only; imported lazily, so CPU installs need no Triton).

- ``int8_weight_only_matmul``: ``y = (x @ W_int8^T) * scale + bias``. Programs stream ``BLOCK_N x K`` slabs
  of int8 weights once and accumulate in float32: a CUDA-core GEMV for one token, tensor-core tiles for a few,
  and for many tokens (compute-bound) a one-pass dequantization to the activation dtype followed by cuBLAS.
  The per-output-channel scale factors out of the K sum, so it is applied once in the epilogue.
- ``int8_gemv_silu``: one token through a fused int8 ``[gate | up]`` projection, ``silu(gate) * up`` computed in
  the GEMV's epilogue (one kernel where the MLP launched two).
- ``fp8_gemv``: the W8A8 product for one token on CUDA cores (``_scaled_mm`` pads one row to a full tile).
- ``per_token_fp8_quant``: one pass per row: absolute max, scale = amax / 448, values cast to float8 e4m3.

Integer-to-float conversion instructions run at a quarter of the FMA rate, so the GEMV (and the dequantizer)
read four int8 weights as one int32 word and convert each byte with bit operations and the float "magic
number" trick: one xor per word biases each byte to ``b + 128``, the bits ``0x4B0000uu`` read as float32 are
exactly ``2^23 + uu``, and one subtraction leaves ``b``. (Measured 0 to 25% faster than plain conversion, and
in a sweep on an H100 with 40 layers per graph, 1.3% faster over GLM-4-9B's four projections than sign-extending
shifts; a ``prmt`` byte permute in inline assembly gained another 0.6%, not worth a GPU-only path.)

Shapes are chosen by ``int8_config`` from the problem shape, never autotuned at run time, so the kernels can
be captured in CUDA graphs (no benchmarking inside a capture) and behave the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from openautoglm.engine import pdl
from openautoglm.engine.models.fused_ops import GemvConfig, gemv, gemv_epilogue, gemv_silu_epilogue

FP8_E4M3_MAX = 448.0
_SIGN_BITS = tl.constexpr(-2139062144)  # 0x80808080: xor-ing it biases each int8 byte b to the unsigned b + 128
_MAGIC_BITS = tl.constexpr(0x4B000000)  # float32 bits of 2^23: bits 0x4B0000uu read as float32 are 2^23 + uu
_MAGIC = tl.constexpr(8388736.0)  # 2^23 + 128


@dataclass(frozen=True, slots=True)
class Int8Config:
    """How one int8 product runs. ``path``: "gemv" (one token, CUDA cores, ``block_n`` rows per program),
    "mma" (tensor-core tiles of ``block_m x block_n``) or "dequant" (dequantize, then cuBLAS). ``packed``: the
    GEMV reads int32 words (above); ``evict``: weight loads bypass the caches' keep-lists (streamed once)."""

    path: str
    block_m: int = 16
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    packed: bool = True
    evict: bool = False


# Exact (m, n, k) -> config, filled by ops/bench_quant.py's sweep; consulted before the shape rules below.
TUNED_CONFIGS: dict[tuple[int, int, int], Int8Config] = {}


# One token: launch shapes from sweeps on an H100 inside the engine's batch-1 decode graph (launch attribute on,
# best of two captures of 60 replays, ms per step against the earlier shapes' 4.17): qkv one row of 256 on 2 warps
# (4.11), down one row of 2,048 on 8 warps (4.14); o keeps 8 rows of 2,048 on 4 warps; gate_up, with SiLU-and-mul
# in its epilogue, one row of 1,024 on 4 warps (3.82 against 3.87 with one row of 512 on 2 warps). One row per
# program and at most two words per thread keep x in the weights' layout (more rows or words per thread make
# Triton move x through shared memory on every tile).
_INT8_GEMV: dict[tuple[int, int], Int8Config] = {
    (4608, 4096): Int8Config("gemv", 1, 1, 256, num_warps=2, evict=True),
    (4096, 4096): Int8Config("gemv", 1, 8, 2048, num_warps=4, evict=True),
    (27392, 4096): Int8Config("gemv", 1, 1, 1024, num_warps=4, evict=True),
    (4096, 13696): Int8Config("gemv", 1, 1, 2048, num_warps=8, evict=True),
}


def _int8_gemv_config(n: int, k: int) -> Int8Config:
    """A shape outside the sweep: wide outputs like gate_up, narrow ones like qkv and o."""
    tuned = _INT8_GEMV.get((n, k))
    if tuned is not None:
        return tuned
    return Int8Config("gemv", 1, 1, 512 if n > 8192 else 256, num_warps=2, evict=True)


def int8_config(m: int, n: int, k: int) -> Int8Config:
    """How an ``[m, k] x [n, k]^T`` product runs: the best of ops/bench_quant.py's sweep on an H100 for GLM-4-9B's
    projections (qkv 4608x4096, o 4096x4096, gate_up 27392x4096, down 4096x13696).

    One token is a pure weight stream: a GEMV over 1 to 8 rows per program (thousands of programs, weights read once
    with an evict-first hint). Up to 64 tokens, narrow deep tensor-core tiles keep the grid large. Beyond, the
    product is compute-bound: cuBLAS on a dequantized copy, or wide tiles for the widest projection. There int8
    weight-only is slower than bf16 (10 to 70% at 256 tokens, 5 to 10% at 4096): it pays off in decode.
    """
    tuned = TUNED_CONFIGS.get((m, n, k))
    if tuned is not None:
        return tuned
    if m == 1:
        return _int8_gemv_config(n, k)
    if m <= 16:
        return Int8Config("mma", 16, 32, 256, num_warps=4, num_stages=4)
    if m <= 64:
        wide = n > 4096
        return Int8Config("mma", 64, 64 if wide else 32, 128 if wide else 256, num_warps=4, num_stages=4)
    if m <= 512 and n > 8192:
        return Int8Config("mma", 128, 128, 64, num_warps=8, num_stages=3)
    return Int8Config("dequant")


@triton.jit
def _unpack(words):
    """The four int8 lanes of int32 ``words`` as exact float32 (lane i = byte i, little-endian): one xor per word
    biases the bytes, then each lane is a mask, an or and a float subtraction (no conversion instruction)."""
    biased = words ^ _SIGN_BITS
    w0 = ((biased & 0xFF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    w1 = (((biased >> 8) & 0xFF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    w2 = (((biased >> 16) & 0xFF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    w3 = (((biased >> 24) & 0xFF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    return w0, w1, w2, w3


@triton.jit
def _int8_tile_fma(acc, words, x_ptr, kw0, KW: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_K: tl.constexpr):
    """``acc`` plus the float32 products of one ``[BLOCK_N, BLOCK_W]`` tile of int32 words (weight columns
    ``4 * kw0 ...``) with the matching ``4 * BLOCK_W`` values of x, one FMA per weight."""
    rk = 4 * kw0 + tl.arange(0, 4 * BLOCK_W)
    # x in one contiguous load, split into the four byte lanes ([j, a, b] = x[4j + 2a + b]), not four strided
    # loads per word: each kernel's best launch shape, H100, 40 layers per graph, ms: qkv 0.371 against
    # 0.379, o 0.328 against 0.347, gate_up 1.552 against 1.605 (down: 0.944 against 0.932, about even).
    x = tl.load(x_ptr + rk) if EVEN_K else tl.load(x_ptr + rk, mask=rk < 4 * KW, other=0.0)
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_W, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    w0, w1, w2, w3 = _unpack(words)
    acc += w0 * x0[None, :]
    acc += w1 * x1[None, :]
    acc += w2 * x2[None, :]
    acc += w3 * x3[None, :]
    return acc


@triton.jit
def _int8_words(w_ptrs, n_mask, rw, kw0, KW: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, EVICT):
    """One ``[BLOCK_N, BLOCK_W]`` tile of weight words. The masks count words, not bytes: a mask on ``4 * rw``
    cannot be proven constant over neighbouring words, and Triton then loads one word per instruction."""
    if EVEN_N and EVEN_K:
        return tl.load(w_ptrs, eviction_policy=EVICT)
    if EVEN_K:
        return tl.load(w_ptrs, mask=n_mask[:, None], other=0, eviction_policy=EVICT)
    mask = n_mask[:, None] & ((kw0 + rw) < KW)[None, :]
    return tl.load(w_ptrs, mask=mask, other=0, eviction_policy=EVICT)


@triton.jit
def _int8_rows(w_ptrs, words, x_ptr, n_mask, rw, KW: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_N: tl.constexpr,
               EVEN_K: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """Element-wise float32 partial sums of the rows at ``w_ptrs`` times x, from their first tile ``words``;
    reduced once at the end, no cross-thread reduction inside the loop."""
    acc = _int8_tile_fma(tl.zeros(words.shape, tl.float32), words, x_ptr, 0, KW, BLOCK_W, EVEN_K)
    for kw0 in range(BLOCK_W, KW, BLOCK_W):
        words = _int8_words(w_ptrs + kw0, n_mask, rw, kw0, KW, EVEN_N, EVEN_K, EVICT)
        acc = _int8_tile_fma(acc, words, x_ptr, kw0, KW, BLOCK_W, EVEN_K)
    return acc


@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,  # output features (with SILU: half the weight's rows)
    stride_wn,
    KW: tl.constexpr,  # K / 4: the words of a row
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,  # a fused [gate | up] weight: y = silu(gate) * up (fused_ops.gemv_silu_epilogue)
    EVICT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
    PDL: tl.constexpr,
):
    # w_ptr is the int32 view of the weight ([rows, K / 4] words) and stride_wn counts words.
    EVEN_K: tl.constexpr = KW % BLOCK_W == 0
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rw = tl.arange(0, BLOCK_W)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rw[None, :]
    # The first tile is read before waiting for the previous kernel (no kernel of a step writes weights).
    words = _int8_words(w_ptrs, n_mask, rw, 0, KW, EVEN_N, EVEN_K, EVICT)
    if SILU:  # and the up rows' (N rows further down)
        up_ptrs = w_ptr + (N + rn)[:, None] * stride_wn + rw[None, :]
        up_words = _int8_words(up_ptrs, n_mask, rw, 0, KW, EVEN_N, EVEN_K, EVICT)
    pdl.begin(PDL)
    acc = _int8_rows(w_ptrs, words, x_ptr, n_mask, rw, KW, BLOCK_W, EVEN_N, EVEN_K, EVICT)
    if SILU:
        acc_up = _int8_rows(up_ptrs, up_words, x_ptr, n_mask, rw, KW, BLOCK_W, EVEN_N, EVEN_K, EVICT)
        gemv_silu_epilogue(acc, acc_up, rn, n_mask, N, s_ptr, b_ptr, y_ptr, True, HAS_BIAS)
    else:
        gemv_epilogue(acc, rn, n_mask, s_ptr, b_ptr, y_ptr, True, HAS_BIAS)


@triton.jit
def _dot(x, w, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x, w, acc)


@triton.jit
def _int8_mma_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    stride_xm,
    stride_wn,
    stride_ym,
    K: tl.constexpr,  # fixed per layer: a constant trip count lets Triton pipeline the weight stream
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,  # float32 activations: exact float32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None] & k_mask[None, :])
        w = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0)
        # int8 values are exact in bf16/fp16, so the tensor cores see the true weights. (Unpacking int32 words
        # here, as the GEMV does, measured 3 to 10 times slower: the four strided activation loads dominate.)
        acc = _dot(x, w.to(x.dtype), acc, IEEE)
        w_ptrs += BLOCK_K
    acc = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, WORDS, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """``out [N, 4 * WORDS] = int8 weight * scale`` in out's dtype, reading the weight as int32 words."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rr < N)[:, None] & (rw < WORDS)[None, :]
    words = tl.load(w_ptr + rr[:, None] * WORDS + rw[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + rr, mask=rr < N, other=0.0)[:, None]
    # join stacks on a new last axis: [r, j, b, a] holds lane 2b + a of word j, flattened to column 4j + 2b + a.
    w0, w1, w2, w3 = _unpack(words)
    even = tl.join(w0 * s, w2 * s)
    odd = tl.join(w1 * s, w3 * s)
    vals = tl.reshape(tl.join(even, odd), (BLOCK_R, 4 * BLOCK_W))
    cols = 4 * tl.program_id(1) * BLOCK_W + tl.arange(0, 4 * BLOCK_W)
    out_mask = (rr < N)[:, None] & (cols < 4 * WORDS)[None, :]
    tl.store(out_ptr + rr[:, None] * (4 * WORDS) + cols[None, :], vals.to(out_ptr.dtype.element_ty), mask=out_mask)


def int8_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale[:, None]`` in ``dtype``, one pass (``weight`` contiguous, K a multiple of 4)."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    grid = (triton.cdiv(n, 16), triton.cdiv(k // 4, 128))
    _int8_dequant_kernel[grid](weight.view(torch.int32), scale, out, n, k // 4, BLOCK_R=16, BLOCK_W=128, num_warps=4)
    return out


def _packable(weight: torch.Tensor) -> bool:
    return weight.shape[1] % 4 == 0 and weight.is_contiguous() and weight.data_ptr() % 4 == 0


def int8_weight_only_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Int8Config | None = None,
) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16/fp32) times int8 ``weight [N, K]`` with float32 ``scale [N]``, plus ``bias``:
    ``[M, N]`` in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = config or int8_config(m, n, k)
    packed = cfg.packed and _packable(weight)
    if cfg.path == "dequant" and packed:
        return torch.nn.functional.linear(x, int8_dequantize(weight, scale, x.dtype), bias)
    if cfg.path == "gemv" and m == 1:
        return _int8_gemv(x, weight, scale, bias, cfg, silu=False)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bias_arg = bias if bias is not None else scale  # unread when HAS_BIAS is False
    mma = cfg if cfg.path == "mma" else int8_config(min(m, 64), n, k)
    grid = (triton.cdiv(n, mma.block_n), triton.cdiv(m, mma.block_m))
    _int8_mma_kernel[grid](
        x, weight, scale, bias_arg, y, m, n, x.stride(0), weight.stride(0), y.stride(0), K=k,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=mma.block_m, BLOCK_N=mma.block_n,
        BLOCK_K=mma.block_k, num_warps=mma.num_warps, num_stages=mma.num_stages,
    )  # fmt: skip
    return y


def int8_gemv_silu(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``silu(gate) * up`` [1, N / 2] of one token ``x`` [1, K] and a fused int8 ``[gate | up]`` weight [N, K],
    in one GEMV kernel; None where the one-token GEMV does not apply (the caller multiplies, then SiLU-and-mul)."""
    if x.shape[0] != 1 or weight.shape[0] % 2:
        return None
    cfg = int8_config(1, weight.shape[0], x.shape[1])
    if cfg.path != "gemv":
        return None
    x = x if x.stride(1) == 1 else x.contiguous()
    return _int8_gemv(x, weight, scale, bias, cfg, silu=True)


def _int8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: Int8Config,
    silu: bool,
) -> torch.Tensor:
    if not (cfg.packed and _packable(weight)):  # the plain GEMV reads the int8 bytes as they are
        gemv_cfg = GemvConfig(cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.evict)
        return gemv(x, weight, bias, gemv_cfg, scale, silu=silu)
    n, k = weight.shape
    out = n // 2 if silu else n
    y = torch.empty((1, out), dtype=x.dtype, device=x.device)
    w = weight.view(torch.int32)
    _int8_gemv_kernel[(triton.cdiv(out, cfg.block_n),)](
        x, w, scale, bias if bias is not None else scale, y, out, w.stride(0), KW=k // 4,
        HAS_BIAS=bias is not None, SILU=silu, EVICT="evict_first" if cfg.evict else "", BLOCK_N=cfg.block_n,
        BLOCK_W=cfg.block_k // 4, EVEN_N=out % cfg.block_n == 0, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl.launch(),
    )  # fmt: skip
    return y


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    # The floor keeps an all-zero row finite (its values quantize to 0 whatever the scale).
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FP8_MAX
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)  # IEEE division, as torch's reference does
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def per_token_fp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> float8 e4m3 ``[M, K]`` and float32 scales ``[M, 1]`` with ``x ~= q * scale``."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    block = triton.next_power_of_2(k)
    warps = min(16, max(4, block // 1024))
    _per_token_fp8_kernel[(m,)](
        x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, FP8_MAX=FP8_E4M3_MAX, num_warps=warps
    )
    return q, s


@triton.jit
def _fp8_gemv_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    stride_wn,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        x = tl.load(xq_ptr + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_mask, other=0.0) * tl.load(xs_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


FP8_GEMV_BLOCK = (2, 2048, 4)  # (block_n, block_k, num_warps): the best of the sweep on an H100


def fp8_gemv(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One token's W8A8 product: float8 ``xq [1, K]`` with scale ``xs [1, 1]`` times float8 ``weight [N, K]``."""
    n, k = weight.shape
    y = torch.empty((1, n), dtype=out_dtype, device=xq.device)
    block_n, block_k, warps = block or FP8_GEMV_BLOCK
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        xq, xs, weight, scale, bias if bias is not None else scale, y, n, weight.stride(0), K=k,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return y
