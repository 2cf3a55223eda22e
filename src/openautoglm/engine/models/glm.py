"""``GlmForCausalLM`` (glm-4-9b-chat-hf, glm-edge), Open-AutoGLM's own implementation.

Module and parameter names follow the Hugging Face checkpoints, except that q/k/v are fused into ``qkv_proj``
as they load. ``Glm4ForCausalLM`` (glm4.py) is this model with sandwich norms switched on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from openautoglm.engine.attention.base import ForwardContext
from openautoglm.engine.models.base import ModelArchConfig
from openautoglm.engine.models.layers import (
    Attention,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    add_rms_norm,
    apply_rotary,
    linear,
)
from openautoglm.engine.parallel.context import TensorParallel
from openautoglm.engine.parallel.sharding import Shard, head_layout, split
from openautoglm.protocol.errors import ModelLoadError

NO_TP = TensorParallel()  # one rank: the whole model

# Checkpoint projections that load into one slice of a fused parameter: name -> (fused name, slice index).
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
_QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def check_supported(config: ModelArchConfig) -> None:
    """Refuse configurations this implementation would silently get wrong."""
    if config.hidden_act != "silu":
        raise ModelLoadError(f"hidden_act {config.hidden_act!r} is not supported; GLM uses 'silu'")
    rope = config.raw.get("rope_parameters") or config.raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelLoadError(f"rope_type {rope_type!r} is not supported; only 'default' is")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ModelLoadError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )
    if not 0 < config.rotary_dim <= config.head_dim or config.rotary_dim % 2:
        raise ModelLoadError(
            f"head_dim * partial_rotary_factor = {config.rotary_dim} must be even and within "
            f"(0, head_dim={config.head_dim}]"
        )


class GlmAttention(nn.Module):
    """Column-parallel qkv (this rank's query heads and the KV heads they use), row-parallel o_proj: the output
    is this rank's part of the sum, which the decoder layer all-reduces with the norms after it."""

    def __init__(self, config: ModelArchConfig, layer_idx: int, tp: TensorParallel = NO_TP) -> None:
        super().__init__()
        heads = head_layout(config.num_attention_heads, config.num_key_value_heads, tp.rank, tp.size)
        self.num_heads = heads.num_q
        self.num_kv_heads = heads.num_kv
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(h)
        n, qk_size = qkv.shape[0], self.q_size + self.kv_size
        qk = qkv[:, :qk_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        rotary = self.attn.backend_rotary(ctx, qk, cos, sin)
        if rotary is None:  # q and k sit side by side in the fused output: rotate them with one call
            qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, qk_size:].view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, ctx, rotary))


class GlmMLP(nn.Module):
    """Column-parallel gate_up (this rank's gate and up features), row-parallel down_proj (a partial sum, as
    ``GlmAttention``'s output)."""

    def __init__(self, config: ModelArchConfig, tp: TensorParallel = NO_TP) -> None:
        super().__init__()
        inter = config.intermediate_size // tp.size
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, bias=False)
        self.down_proj = Linear(inter, config.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj.forward_silu(x)  # one token on the GPU: SiLU-and-mul in the GEMV's epilogue
        return self.down_proj(self.act(self.gate_up_proj(x)) if h is None else h)


class GlmDecoderLayer(nn.Module):
    """Pre-norm block; with ``sandwich_norm`` (GLM-4-0414) the attention and MLP outputs are normed again."""

    def __init__(
        self, config: ModelArchConfig, layer_idx: int, sandwich_norm: bool, tp: TensorParallel = NO_TP
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GlmAttention(config, layer_idx, tp)
        self.mlp = GlmMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps) if sandwich_norm else None
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps) if sandwich_norm else None
        self.tp = tp

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
        next_norm: RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is ``input_layernorm(residual)``; returns ``(next_norm(h), h)`` for the new residual stream ``h``.

        Ending on the next layer's input norm lets each residual add run with the norms around it as one kernel.
        """
        a = self.self_attn(x, cos, sin, ctx)
        x, residual = add_rms_norm(a, residual, self.post_attention_layernorm, self.post_self_attn_layernorm, self.tp)
        m = self.mlp(x)
        return add_rms_norm(m, residual, next_norm, self.post_mlp_layernorm, self.tp)


class GlmModel(nn.Module):
    def __init__(self, config: ModelArchConfig, sandwich_norm: bool, tp: TensorParallel = NO_TP) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated on every rank
        self.layers = nn.ModuleList(
            GlmDecoderLayer(config, i, sandwich_norm, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rope_theta)
        # Each layer with the norm it ends on (the next layer's input norm, the final norm last), paired once
        # here rather than on every step; a plain tuple, so nothing is registered twice.
        layers = list(self.layers)
        self._chain = tuple(zip(layers, [*(layer.input_layernorm for layer in layers[1:]), self.norm], strict=True))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, h.dtype)
        x = self.layers[0].input_layernorm(h)
        for layer, next_norm in self._chain:
            x, h = layer(x, h, cos, sin, ctx, next_norm)
        return x


class GlmForCausalLM(nn.Module):
    """GLM-4 (glm-4-9b-chat-hf, glm-edge). Keeps the contract of ``openautoglm.engine.models.base``."""

    sandwich_norm: ClassVar[bool] = False

    def __init__(self, config: ModelArchConfig, tp: TensorParallel = NO_TP) -> None:
        super().__init__()
        check_supported(config)
        self.config = config
        self.tp = tp
        heads = head_layout(config.num_attention_heads, config.num_key_value_heads, tp.rank, tp.size)
        q, kv = heads.num_q * config.head_dim, heads.num_kv * config.head_dim
        self._qkv_slices = (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv))
        self._tensor_shards, self._param_shards = _tp_shards(config, tp)
        self.model = GlmModel(config, self.sandwich_norm, tp)
        # lm_head is vocabulary-parallel: each rank computes the logits of its ceil(V / N) vocabulary rows.
        self._vocab_rows = split(config.vocab_size, tp.rank, tp.size)
        self._vocab_shard = -(-config.vocab_size // tp.size)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, self._vocab_shard, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of every rank's vocabulary rows, gathered on every rank (rank 0 samples from them)."""
        if self.lm_head is not None:
            weight = self.lm_head.weight
        else:
            lo, hi = self._vocab_rows
            weight = self.model.embed_tokens.weight if self.tp.size == 1 else self.model.embed_tokens.weight[lo:hi]
        logits = linear(hidden_states, weight)
        if self.tp.size > 1:
            if logits.shape[1] < self._vocab_shard:  # the last shard of a tied vocabulary that does not split evenly
                logits = F.pad(logits, (0, self._vocab_shard - logits.shape[1]))
            logits = self.tp.all_gather_columns(logits)[:, : self.config.vocab_size]
        return logits.float()

    def param_shards(self) -> dict[str, Shard]:
        """Parameter name -> how this rank's tensor is cut from the single-GPU one (empty with one rank)."""
        return {
            name: shard
            for name, _ in self.named_parameters()
            if (shard := self._param_shards.get(_module_kind(name))) is not None
        }

    def expected_weight_names(self) -> set[str]:
        """The checkpoint tensor names this model needs (q/k/v unfused, as Hugging Face stores them)."""
        names: set[str] = set()
        for pname, _ in self.named_parameters():
            if ".qkv_proj." in pname:
                names.update(pname.replace(".qkv_proj.", f".{part}.") for part in _QKV_PARTS)
            else:
                names.add(pname)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters (converting dtype, device); return the names used."""
        params = dict(self.named_parameters())
        consumed: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (self.lm_head is None and name == "lm_head.weight"):
                consumed.add(name)  # recomputed / tied: nothing to load
                continue
            dst = self._destination(name, params)
            if dst is None:
                continue  # unexpected: the loader reports what was not consumed
            shard = self._tensor_shards.get(_module_kind(name))
            expected = tuple(dst.shape) if shard is None else shard.full_shape(dst.shape)
            if tuple(tensor.shape) != expected:
                raise ModelLoadError(
                    f"tensor {name!r}: shape mismatch, expected {expected} from config.json, "
                    f"found {tuple(tensor.shape)}"
                )
            dst.copy_(tensor if shard is None else shard.take(tensor))
            consumed.add(name)
        return consumed

    def _destination(self, name: str, params: dict[str, nn.Parameter]) -> torch.Tensor | None:
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in _FUSED:
            prefix, module, kind = parts
            fused, index = _FUSED[module]
            param = params.get(f"{prefix}.{fused}.{kind}")
            if param is None:
                return None
            return param.data[self._qkv_slices[index]]
        param = params.get(name)
        return None if param is None else param.data


def _module_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; ``lm_head.weight`` -> ``lm_head``."""
    parts = name.rsplit(".", 2)
    return parts[-2] if len(parts) >= 2 else name


def _tp_shards(config: ModelArchConfig, tp: TensorParallel) -> tuple[dict[str, Shard], dict[str, Shard]]:
    """How this rank's tensors are cut, by module kind: of the checkpoint's tensors (q/k/v apart), and of the
    model's own parameters (q/k/v fused). Both empty with one rank: every tensor is whole."""
    if tp.size == 1:
        return {}, {}
    d = config.head_dim
    heads = head_layout(config.num_attention_heads, config.num_key_value_heads, tp.rank, tp.size)
    q = (heads.q_start * d, (heads.q_start + heads.num_q) * d)
    kv = (heads.kv_start * d, (heads.kv_start + heads.num_kv) * d)
    q_full, kv_full = config.num_attention_heads * d, config.num_key_value_heads * d
    nq, nkv = q[1] - q[0], kv[1] - kv[0]
    inter = config.intermediate_size
    i0, i1 = split(inter, tp.rank, tp.size)
    vocab = config.vocab_size
    tensors = {
        "q_proj": Shard(0, (q,), q_full, nq),
        "k_proj": Shard(0, (kv,), kv_full, nkv),
        "v_proj": Shard(0, (kv,), kv_full, nkv),
        "o_proj": Shard(1, (q,), q_full, nq),
        "gate_up_proj": Shard(0, ((i0, i1), (inter + i0, inter + i1)), 2 * inter, 2 * (i1 - i0)),
        "down_proj": Shard(1, ((i0, i1),), inter, i1 - i0),
        "lm_head": Shard(0, (split(vocab, tp.rank, tp.size),), vocab, -(-vocab // tp.size)),
    }
    k_at, v_at = q_full, q_full + kv_full
    qkv = (q, (k_at + kv[0], k_at + kv[1]), (v_at + kv[0], v_at + kv[1]))
    params = {k: v for k, v in tensors.items() if k not in _QKV_PARTS}
    params["qkv_proj"] = Shard(0, qkv, q_full + 2 * kv_full, nq + 2 * nkv)
    return tensors, params
