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
from openautoglm.engine.models.layers import Attention, RMSNorm, RotaryEmbedding, SiluAndMul, apply_rotary
from openautoglm.protocol.errors import ModelLoadError

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
    def __init__(self, config: ModelArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(h)
        n, qk_size = qkv.shape[0], self.q_size + self.kv_size
        # q and k sit side by side in the fused output: rotate them with one call.
        qk = apply_rotary(qkv[:, :qk_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, qk_size:].view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, ctx))


class GlmMLP(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GlmDecoderLayer(nn.Module):
    """Pre-norm block; with ``sandwich_norm`` (GLM-4-0414) the attention and MLP outputs are normed again."""

    def __init__(self, config: ModelArchConfig, layer_idx: int, sandwich_norm: bool) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GlmAttention(config, layer_idx)
        self.mlp = GlmMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps) if sandwich_norm else None
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps) if sandwich_norm else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        if self.post_self_attn_layernorm is not None:
            a = self.post_self_attn_layernorm(a)
        h = h + a
        m = self.mlp(self.post_attention_layernorm(h))
        if self.post_mlp_layernorm is not None:
            m = self.post_mlp_layernorm(m)
        return h + m


class GlmModel(nn.Module):
    def __init__(self, config: ModelArchConfig, sandwich_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GlmDecoderLayer(config, i, sandwich_norm) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)


class GlmForCausalLM(nn.Module):
    """GLM-4 (glm-4-9b-chat-hf, glm-edge). Keeps the contract of ``openautoglm.engine.models.base``."""

    sandwich_norm: ClassVar[bool] = False

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        check_supported(config)
        self.config = config
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        self._qkv_slices = (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv))
        self.model = GlmModel(config, self.sandwich_norm)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden_states, weight).float()

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
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ModelLoadError(
                    f"tensor {name!r}: shape mismatch, expected {tuple(dst.shape)} from config.json, "
                    f"found {tuple(tensor.shape)}"
                )
            dst.copy_(tensor)
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
