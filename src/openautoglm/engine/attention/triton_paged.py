"""Triton paged attention for CUDA GPUs: bf16/fp16 storage, fp32 accumulation.

Kernels over the cache layout of ``attention/base.py`` (``[2, num_blocks, block_size, kv_heads, dim]``):

- ``reshape_and_cache``: one program per new token copies its keys and values into their cache slot; a slot
  below 0 is skipped. ``rotate_and_cache`` does the same with GLM's rotary folded in (``fuses_rotary``): it
  rotates the query heads in place and writes the keys rotated, one kernel where the model's rotary and the
  cache write were two.
- decode (query_len 1, GQA): one program per (sequence, kv head, split) holds every query head of that kv
  head's group as the rows of one matrix product, so each cached key and value is read once per group.
  Long contexts are split along the keys (flash-decoding); a second kernel merges the splits by their
  log-sum-exp. The number of splits depends only on the batch size, never on sequence lengths, so a CUDA
  graph captured for a batch size replays for any lengths and eager and graph runs compute alike.
- chunked prefill: one program per (query head, block of query rows, sequence) streams the sequence's keys
  from the paged cache (earlier chunks and prefix-cache hits included) under the causal mask, with an online
  softmax.

The backend writes the step's keys and values before attending, as the seam requires, and reads them back
from the cache, so a chunk sees exactly what later steps will see.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from openautoglm.engine import pdl
from openautoglm.engine.attention.base import AttentionBackend, AttentionMetadata, Rotary
from openautoglm.engine.rotary_math import rotate_pairs
from openautoglm.protocol.errors import EngineError, InternalError

_LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_SPLITS = 16


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    v_offset,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
        k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(cache_ptr + v_offset + dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_and_cache_kernel(
    q_ptr,
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    v_offset,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # Program (token, j): j < cdiv(NUM_HEADS, BLOCK_H) rotates a block of query heads in place; the last j
    # rotates the token's keys into its cache slot and copies its values there (slot < 0: skipped).
    pdl.begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    pairs = tl.arange(0, BLOCK_HALF)
    pmask = pairs < HALF
    dtype = cache_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + t * stride_cos + pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_sin + pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
    if j * BLOCK_H < NUM_HEADS:
        heads = j * BLOCK_H + tl.arange(0, BLOCK_H)
        qp = q_ptr + t * stride_qt + heads[:, None] * stride_qh + 2 * pairs[None, :]
        mask = (heads[:, None] < NUM_HEADS) & pmask[None, :]
        o1, o2 = rotate_pairs(tl.load(qp, mask=mask), tl.load(qp + 1, mask=mask), cos, sin, dtype)
        tl.store(qp, o1.to(dtype), mask=mask)
        tl.store(qp + 1, o2.to(dtype), mask=mask)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h = tl.arange(0, BLOCK_KV)[:, None]
            dst = cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM
            kp = key_ptr + t * stride_kt + h * stride_kh
            mask = (h < NUM_KV_HEADS) & pmask[None, :]
            k1 = tl.load(kp + 2 * pairs[None, :], mask=mask)
            k2 = tl.load(kp + 2 * pairs[None, :] + 1, mask=mask)
            o1, o2 = rotate_pairs(k1, k2, cos, sin, dtype)
            tl.store(dst + 2 * pairs[None, :], o1.to(dtype), mask=mask)
            tl.store(dst + 2 * pairs[None, :] + 1, o2.to(dtype), mask=mask)
            d = tl.arange(0, BLOCK_D)[None, :]
            row = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
            rest = row & (d >= 2 * HALF)  # the dims the rotary passes through
            tl.store(dst + d, tl.load(kp + d, mask=rest).to(dtype), mask=rest)
            v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=row)
            tl.store(dst + v_offset + d, v.to(dtype), mask=row)


@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,  # [B, H, D] when NUM_SPLITS == 1, else partial outputs [B, H, NUM_SPLITS, D] fp32
    lse_ptr,  # [B, H, NUM_SPLITS] fp32 (log2 units); unused when NUM_SPLITS == 1
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    v_offset,
    NUM_SPLITS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_mask = t < end
        blk = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + t % BLOCK_SIZE
        off = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + v_offset + off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    has = denom > 0.0
    out = acc / tl.where(has, denom, 1.0)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = (b.to(tl.int64) * (NUM_KV_HEADS * GROUP) + heads) * NUM_SPLITS + split
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=o_mask)
        tl.store(lse_ptr + row, tl.where(has, m + tl.log2(tl.where(has, denom, 1.0)), float("-inf")), mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr,  # [B, H, NUM_SPLITS, D] fp32
    lse_ptr,  # [B, H, NUM_SPLITS] fp32
    out_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.begin(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * NUM_HEADS + h
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + s)
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds keys, so the max is finite
    part = tl.load(
        part_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0
    )
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    dst = out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    out_ptr,
    qk_scale,
    first_seq,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    v_offset,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    h = tl.program_id(0)
    mblk = tl.program_id(1)
    i = tl.program_id(2) + first_seq
    q_start = tl.load(query_start_ptr + i)
    q_len = tl.load(query_start_ptr + i + 1) - q_start
    if mblk * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + i)
        context = seq_len - q_len
        rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = rows < q_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        tok = (q_start + rows).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        kvh = h // GROUP
        # Keys the last row of this block may see; every row sees at least key 0, so no row is all -inf.
        kv_end = context + tl.minimum((mblk + 1) * BLOCK_M, q_len)
        q_pos = context + rows
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = block_tables_ptr + i.to(tl.int64) * stride_bt
        for n0 in range(0, kv_end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            t_mask = t < kv_end
            blk = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
            slot = blk * BLOCK_SIZE + t % BLOCK_SIZE
            off = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(cache_ptr + off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where((t[None, :] <= q_pos[:, None]) & t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            denom = denom * alpha + tl.sum(p, 1)
            v = tl.load(cache_ptr + v_offset + off, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
        dst = out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Key splits for a decode batch: enough programs to fill the GPU about twice. A function of the batch size
    (rounded up to a power of two) alone, so a graph bucket and an eager batch of that size agree."""
    splits = max(1, min(MAX_SPLITS, (2 * num_sms) // (_pow2(num_seqs) * num_kv_heads)))
    return 1 << (splits.bit_length() - 1)  # a power of two, as the graph buckets are


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``key``/``value [T, kv_heads, dim]`` into ``kv_cache`` at ``slots [T]`` (slots < 0 skipped)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, kv_cache, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv_cache[0].numel(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=_pow2(num_kv_heads), BLOCK_D=_pow2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, **pdl.launch(),
    )  # fmt: skip


def rotate_and_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    rotary: Rotary,
) -> None:
    """Rotate ``query [T, heads, dim]`` in place and write the rotated ``key`` and ``value [T, kv_heads, dim]``
    into ``kv_cache`` at ``slots [T]`` (slots < 0 skipped), in one launch: ``reshape_and_cache`` with the
    rotary of the query and key heads folded in. ``key`` itself is left as it came."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    cos, sin = rotary.cos, rotary.sin
    if key.stride(2) != 1 or value.stride(2) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise InternalError("rotate_and_cache: key, value, cos and sin need a unit stride in their last dimension")
    if num_tokens == 0:
        return
    half = cos.shape[-1]
    block_h = min(8, _pow2(num_heads))
    _rotate_and_cache_kernel[(num_tokens, triton.cdiv(num_heads, block_h) + 1)](
        query, key, value, kv_cache, slots, cos, sin,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0), sin.stride(0), kv_cache[0].numel(),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half, BLOCK_H=block_h,
        BLOCK_KV=_pow2(num_kv_heads), BLOCK_HALF=_pow2(half), BLOCK_D=_pow2(head_dim),
        num_warps=2, enable_fp_fusion=False, **pdl.launch(),
    )  # fmt: skip


class TritonPagedAttentionBackend(AttentionBackend):
    """Paged attention with Triton kernels; decodes first, then prefill chunks, as ``AttentionMetadata`` orders
    them. The query/key/value views may be strided (slices of a fused projection) with contiguous head dims."""

    name = "triton"
    fuses_rotary = True

    def __init__(self, device: torch.device, *, block_n_decode: int = 64, block_m: int = 64, block_n: int = 64):
        self.device = device
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        self.block_n_decode = block_n_decode
        self.block_m = block_m
        self.block_n = block_n

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        if kv_cache.dtype not in SUPPORTED_DTYPES or query.dtype != kv_cache.dtype:
            raise EngineError(
                f"the Triton attention backend needs bfloat16 or float16 query and KV cache of one dtype, got "
                f"{query.dtype} and {kv_cache.dtype}; use attention_backend 'reference' for other dtypes"
            )
        if query.stride(2) != 1:
            query = query.contiguous()
        n = metadata.num_tokens
        if rotary is None:
            reshape_and_cache(key[:n], value[:n], kv_cache, metadata.slot_mapping[:n])
        else:
            rotate_and_cache(query[:n], key[:n], value[:n], kv_cache, metadata.slot_mapping[:n], rotary)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        nd = metadata.num_decodes
        if nd:
            self.decode(query, kv_cache, metadata.block_tables, metadata.seq_lens, nd, scale, out)
        num_prefills = metadata.num_seqs - nd
        if num_prefills:
            self.prefill(query, kv_cache, metadata, scale, out)
        return out

    def decode(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        num_seqs: int,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Attention of the first ``num_seqs`` query rows (one token each) into ``out``."""
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_heads = query.shape[1]
        group = num_heads // num_kv_heads
        splits = decode_splits(num_seqs, num_kv_heads, self.num_sms)
        common = dict(
            NUM_SPLITS=splits, NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
            BLOCK_G=max(16, _pow2(group)), BLOCK_D=max(16, _pow2(head_dim)), BLOCK_N=self.block_n_decode,
            BLOCK_SIZE=block_size, num_warps=4, num_stages=2, **pdl.launch(),
        )  # fmt: skip
        grid = (num_seqs, num_kv_heads, splits)
        qk_scale = scale * _LOG2E
        if splits == 1:
            _decode_kernel[grid](
                query, kv_cache, block_tables, seq_lens, out, out, qk_scale,
                query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
                kv_cache[0].numel(), **common,
            )  # fmt: skip
            return
        part = torch.empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32, device=query.device)
        lse = torch.empty((num_seqs, num_heads, splits), dtype=torch.float32, device=query.device)
        _decode_kernel[grid](
            query, kv_cache, block_tables, seq_lens, part, lse, qk_scale,
            query.stride(0), query.stride(1), 0, 0, block_tables.stride(0), kv_cache[0].numel(), **common,
        )  # fmt: skip
        _merge_splits_kernel[(num_seqs, num_heads)](
            part, lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=splits, HEAD_DIM=head_dim, BLOCK_D=max(16, _pow2(head_dim)),
            num_warps=1 if head_dim <= 64 else 2, **pdl.launch(),
        )  # fmt: skip

    def prefill(
        self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float, out: torch.Tensor
    ) -> None:
        """Causal attention of the sequences after the decodes (chunks over earlier cached keys) into ``out``."""
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_heads = query.shape[1]
        num_prefills = md.num_seqs - md.num_decodes
        block_m = self.block_m if md.max_query_len > 16 else 16
        grid = (num_heads, math.ceil(md.max_query_len / block_m), num_prefills)
        _prefill_kernel[grid](
            query, kv_cache, md.block_tables, md.seq_lens, md.query_start_loc, out, scale * _LOG2E,
            md.num_decodes, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            md.block_tables.stride(0), kv_cache[0].numel(),
            NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m,
            BLOCK_D=max(16, _pow2(head_dim)), BLOCK_N=self.block_n, BLOCK_SIZE=block_size,
            num_warps=4 if head_dim <= 64 else 8, num_stages=2,
        )  # fmt: skip
