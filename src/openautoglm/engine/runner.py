"""ModelRunner: turns a scheduled step into batch tensors and attention metadata, runs the model, and returns the
logits of the sequences that sample this step. It owns the KV cache tensors; it decides nothing."""

from __future__ import annotations

import torch

from openautoglm.engine.attention.base import AttentionBackend, ForwardContext
from openautoglm.engine.attention.reference import build_metadata
from openautoglm.engine.models.base import CausalLM, ModelArchConfig
from openautoglm.engine.request import Request
from openautoglm.engine.scheduler import ScheduledRequest


def kv_cache_bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * block_size * arch.num_key_value_heads * arch.head_dim * elem * arch.num_hidden_layers


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        arch: ModelArchConfig,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        # Zeroed, not empty: masked-out slots still enter the reference backend's matmuls, and garbage NaNs there
        # would poison the sums even with zero weight.
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_hidden_layers)]

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> tuple[list[Request], torch.Tensor]:
        """Run one step; return the requests that sample now and their logits rows [len, vocab] (float32)."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        samplers: list[Request] = []
        sample_rows: list[int] = []
        for s in scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            if n == 1:
                input_ids.append(req.token_id_at(start))
            elif start + n <= req.num_prompt_tokens:
                input_ids.extend(req.prompt_token_ids[start : start + n])
            else:
                input_ids.extend(req.all_token_ids[start : start + n])
            query_lens.append(n)
            context_lens.append(start)
            block_tables.append(s.block_ids)
            if start + n == req.num_tokens:
                samplers.append(req)
                sample_rows.append(len(input_ids) - 1)
        metadata = build_metadata(query_lens, context_lens, block_tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions = self._positions(query_lens, context_lens, len(input_ids))
        ctx = ForwardContext(metadata=metadata, kv_caches=self.kv_caches, backend=self.backend)
        hidden = self.model.forward(ids, positions, ctx)
        if not samplers:
            return samplers, hidden.new_empty((0, 0), dtype=torch.float32)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden.index_select(0, rows))

    def _positions(self, query_lens: list[int], context_lens: list[int], num_tokens: int) -> torch.Tensor:
        if num_tokens == len(query_lens):  # all decodes: one position each
            return torch.tensor(context_lens, dtype=torch.long, device=self.device)
        q = torch.tensor(query_lens, dtype=torch.long)
        starts = torch.cumsum(q, 0) - q  # offset of each sequence's first new token in the batch
        shift = torch.repeat_interleave(torch.tensor(context_lens, dtype=torch.long) - starts, q)
        return (torch.arange(num_tokens, dtype=torch.long) + shift).to(self.device)
