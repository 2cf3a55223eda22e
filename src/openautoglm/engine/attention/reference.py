"""The reference attention backend: plain torch, correct on CPU and GPU, and the oracle for GPU kernels.

Per step it plans once (the first layer's call): which sequences decode, which blocks and masks each needs.
Every layer then writes its new keys/values into the paged cache and attends: all decodes together in one
batched gather + SDPA, then each prefill (or prefill chunk) with its own SDPA call. The plan is keyed on the
identity of the ``AttentionMetadata`` object, so a runner builds a fresh one each step (``build_metadata``)
and never mutates one it has already passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openautoglm.engine.attention.base import AttentionBackend, AttentionMetadata, Rotary
from openautoglm.protocol.errors import InternalError


@dataclass(slots=True)
class _Prefill:
    start: int  # the sequence's span in the flattened batch
    end: int
    seq_len: int
    blocks: torch.Tensor  # block ids covering seq_len tokens
    mask: torch.Tensor | None  # [query_len, seq_len] bool; None: no earlier context, plain causal


@dataclass(slots=True)
class _Plan:
    metadata: AttentionMetadata
    block_size: int
    num_decodes: int
    decode_blocks: torch.Tensor | None  # [num_decodes, blocks]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, blocks * block_size] bool: slot < seq_len
    prefills: list[_Prefill]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _make_plan(metadata: AttentionMetadata, block_size: int, device: torch.device) -> _Plan:
    query_lens = metadata.query_lens_cpu or torch.diff(metadata.query_start_loc).tolist()
    seq_lens = metadata.seq_lens_cpu or metadata.seq_lens.tolist()
    nd = metadata.num_decodes
    decode_blocks = decode_mask = None
    if nd:
        num_blocks = _cdiv(max(seq_lens[:nd]), block_size)
        decode_blocks = metadata.block_tables[:nd, :num_blocks]
        slots = torch.arange(num_blocks * block_size, device=device)
        decode_mask = (slots[None, :] < metadata.seq_lens[:nd, None])[:, None, None, :]
    prefills = []
    start = nd
    for i in range(nd, metadata.num_seqs):
        q_len, seq_len = query_lens[i], seq_lens[i]
        context = seq_len - q_len
        mask = None
        if context:
            rows = torch.arange(context, seq_len, device=device)
            mask = torch.arange(seq_len, device=device)[None, :] <= rows[:, None]
        blocks = metadata.block_tables[i, : _cdiv(seq_len, block_size)]
        prefills.append(_Prefill(start, start + q_len, seq_len, blocks, mask))
        start += q_len
    return _Plan(metadata, block_size, nd, decode_blocks, decode_mask, prefills)


class ReferenceAttentionBackend(AttentionBackend):
    """Causal attention over the paged KV cache with torch ops only (GQA, chunked prefill, mixed batches)."""

    name = "reference"

    def __init__(self) -> None:
        self._plan: _Plan | None = None

    def _plan_for(self, metadata: AttentionMetadata, block_size: int, device: torch.device) -> _Plan:
        plan = self._plan
        if plan is None or plan.metadata is not metadata or plan.block_size != block_size:
            plan = self._plan = _make_plan(metadata, block_size, device)
        return plan

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
        if rotary is not None:
            raise InternalError("the reference attention backend does not fuse the rotary; rotate before forward")
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        plan = self._plan_for(metadata, block_size, query.device)
        k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
        v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, metadata.slot_mapping, key.to(kv_cache.dtype))
        v_flat.index_copy_(0, metadata.slot_mapping, value.to(kv_cache.dtype))

        nd = plan.num_decodes
        decoded = self._decode(query[:nd], kv_cache, plan, scale) if nd else None
        if not plan.prefills:
            assert decoded is not None
            return decoded
        gqa = query.shape[1] != num_kv_heads
        if decoded is None and len(plan.prefills) == 1:
            return self._prefill(query, key, value, kv_cache, plan.prefills[0], scale, gqa)
        out = torch.empty_like(query)
        if decoded is not None:
            out[:nd] = decoded
        for p in plan.prefills:
            out[p.start : p.end] = self._prefill(query, key, value, kv_cache, p, scale, gqa)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, plan: _Plan, scale: float) -> torch.Tensor:
        """All query_len-1 sequences at once: gather their blocks, mask the slots past each one's length."""
        num_kv_heads = kv_cache.shape[3]
        kv = kv_cache[:, plan.decode_blocks].flatten(2, 3)  # [2, nd, blocks * block_size, kv_heads, dim]
        # Query heads sharing a kv head become that head's "query rows", so GQA needs no repeated keys.
        q = q.unflatten(1, (num_kv_heads, -1))  # [nd, kv_heads, group, dim]
        out = F.scaled_dot_product_attention(
            q, kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=plan.decode_mask, scale=scale
        )
        return out.flatten(1, 2)  # [nd, heads, dim]

    @staticmethod
    def _prefill(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        p: _Prefill,
        scale: float,
        gqa: bool,
    ) -> torch.Tensor:
        q = query[p.start : p.end].transpose(0, 1)  # [heads, q_len, dim]
        if p.mask is None and kv_cache.dtype == key.dtype:
            # No earlier context: the keys are exactly this step's, no need to read them back.
            k, v = key[p.start : p.end], value[p.start : p.end]
        else:
            kv = kv_cache[:, p.blocks].flatten(1, 2)[:, : p.seq_len]  # [2, seq_len, kv_heads, dim]
            k, v = kv[0], kv[1]
        out = F.scaled_dot_product_attention(
            q,
            k.transpose(0, 1).to(q.dtype),
            v.transpose(0, 1).to(q.dtype),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        return out.transpose(0, 1)  # [q_len, heads, dim]


def build_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Attention metadata for one step.

    Sequence ``i`` computes ``query_lens[i]`` new tokens after ``context_lens[i]`` already cached ones, its
    tokens living in the blocks ``block_tables[i]``. Sequences come in batch order; the leading run of
    query_len-1 sequences counts as decodes (runners put decodes first to make that run long).
    """
    n = len(query_lens)
    if n == 0 or len(context_lens) != n or len(block_tables) != n:
        raise InternalError(
            f"build_metadata: query_lens ({n}), context_lens ({len(context_lens)}) and block_tables "
            f"({len(block_tables)}) must have the same non-zero length"
        )
    q_lens, ctx_lens = list(query_lens), list(context_lens)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens, strict=True)]
    for i, (q, c, table) in enumerate(zip(q_lens, ctx_lens, block_tables, strict=True)):
        if q < 1 or c < 0 or len(table) * block_size < q + c:
            raise InternalError(
                f"build_metadata: sequence {i} has query_len {q} (>= 1 allowed), context_len {c} (>= 0) and "
                f"{len(table)} blocks of {block_size}, too few for {q + c} tokens"
            )
    num_decodes = next((i for i, q in enumerate(q_lens) if q != 1), n)
    width = max(1, max(len(t) for t in block_tables))
    tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    q_t = torch.tensor(q_lens, dtype=torch.int64)
    starts = torch.cumsum(q_t, 0) - q_t
    num_tokens = sum(q_lens)
    if num_decodes == n:  # all decodes: one token per sequence at position context_len
        seq_idx = torch.arange(n)
        pos = torch.tensor(ctx_lens, dtype=torch.int64)
    else:
        seq_idx = torch.repeat_interleave(torch.arange(n), q_t)
        pos = torch.arange(num_tokens) + torch.repeat_interleave(torch.tensor(ctx_lens) - starts, q_t)
    slot_mapping = tables[seq_idx, pos // block_size].long() * block_size + pos % block_size
    query_start_loc = torch.zeros(n + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_t, 0)
    return AttentionMetadata(
        num_seqs=n,
        num_tokens=num_tokens,
        slot_mapping=slot_mapping.to(device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        block_tables=tables.to(device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
        num_decodes=num_decodes,
    )
