"""``Glm4ForCausalLM`` (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1): GLM with sandwich norms.

Each decoder layer adds ``post_self_attn_layernorm`` on the attention output and ``post_mlp_layernorm`` on the
MLP output before the residual adds; everything else is ``GlmForCausalLM``.
"""

from __future__ import annotations

from typing import ClassVar

from openautoglm.engine.models.glm import GlmForCausalLM


class Glm4ForCausalLM(GlmForCausalLM):
    sandwich_norm: ClassVar[bool] = True
