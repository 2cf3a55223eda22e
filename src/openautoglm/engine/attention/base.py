"""The attention seam.

The KV cache of one layer is one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (keys, values).
A token's slot is ``block_id * block_size + offset``. Each step, the runner flattens the scheduled tokens of all
sequences into one ragged batch (``query_start_loc`` gives each sequence's span) and builds ``AttentionMetadata``
once; every attention layer then calls ``backend.forward`` with its own q/k/v and cache tensor. The backend writes
the new keys/values to their slots *before* attending, so a sequence can attend to tokens written in this same
step (chunked prefill and prefix sharing within a step rely on it).

Models rotate query and key themselves, except where the backend says ``fuses_rotary``: the model then hands
them over unrotated with the step's ``Rotary`` and the backend rotates them in the kernel that writes the cache
(one kernel per layer fewer on the GPU decode path). The model asks for the capability, never for a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    num_seqs: int
    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: offsets of each sequence's new tokens in the batch
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that loop in Python (the reference one); GPU kernels ignore them.
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Sequences are ordered decodes first: the first num_decodes have query_len == 1.
    num_decodes: int = 0


@dataclass(slots=True, frozen=True)
class Rotary:
    """GLM's rotary position embedding for a backend to apply: pairs (x[2i], x[2i+1]) of the first
    ``2 * cos.shape[-1]`` dims of every query and key head turn by the token's angle; the other dims pass."""

    cos: torch.Tensor  # [num_tokens, 1, rotary_dim / 2]
    sin: torch.Tensor  # [num_tokens, 1, rotary_dim / 2]


class AttentionBackend(ABC):
    """Causal attention over a paged KV cache for a ragged batch of sequences."""

    name: str = "abstract"
    fuses_rotary: bool = False  # True: ``forward`` takes ``rotary`` and rotates query and key itself

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        rotary: Rotary | None = None,  # only where ``fuses_rotary``
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write key/value into ``kv_cache`` at ``metadata.slot_mapping``, then attend causally; with ``rotary``,
        rotate query and key first."""


@dataclass(slots=True)
class ForwardContext:
    """Everything a model's attention layers need for one step, passed explicitly down ``model.forward``."""

    metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one per layer
    backend: AttentionBackend
