"""Built-in named architecture configs: the published config.json of well-known GLM checkpoints.

``--load-format dummy --model glm-4-9b-0414`` builds that architecture with random weights directly on the
device, no weight files and no download: for benchmarks and capacity planning. The values are those of the
checkpoints' published config.json on the Hugging Face hub (THUDM/GLM-4-9B-0414 and THUDM/glm-4-9b-chat-hf,
also the defaults of transformers' ``Glm4Config`` / ``GlmConfig`` apart from GLM-4-0414's 32K context and
1e-5 norm epsilon).

Named configs carry no tokenizer; a dummy load pairs them with the demo tokenizer, so generated text is
meaningless (most sampled ids lie outside its small vocabulary and decode to nothing).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from openautoglm.protocol.errors import ModelLoadError

# GLM-4's end-of-text, <|user|> and <|observation|> tokens: generation stops on any of them.
GLM4_EOS_TOKEN_IDS = [151329, 151336, 151338]
GLM4_PAD_TOKEN_ID = 151329

_GLM4_9B_SHAPES: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "attention_bias": True,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "eos_token_id": GLM4_EOS_TOKEN_IDS,
    "pad_token_id": GLM4_PAD_TOKEN_ID,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # THUDM/GLM-4-9B-0414 (GLM-4-0414: sandwich norms around attention and MLP).
    "glm-4-9b-0414": {
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        **_GLM4_9B_SHAPES,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
    },
    # THUDM/glm-4-9b-chat-hf (the transformers-native conversion of glm-4-9b-chat, 128K context).
    "glm-4-9b-chat-hf": {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        **_GLM4_9B_SHAPES,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1.5625e-07,
    },
}


def named_config_names() -> list[str]:
    return sorted(NAMED_CONFIGS)


def is_named_config(name: str) -> bool:
    return name in NAMED_CONFIGS


def named_config(name: str) -> dict[str, Any]:
    """A fresh copy of the config.json dict of the named architecture; unknown names list the known ones."""
    try:
        return deepcopy(NAMED_CONFIGS[name])
    except KeyError:
        raise ModelLoadError(
            f"no built-in named config {name!r}; built-in: {', '.join(named_config_names())}"
        ) from None


def scaled_down(
    config: dict[str, Any],
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    vocab_size: int | None = None,
    max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    """A smaller model of the same family (architecture, norms, rotary fraction, bias, eos ids) for tests.

    ``head_dim`` follows ``hidden_size / num_attention_heads``; the vocabulary stays unless given.
    """
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ModelLoadError(
            f"scaled_down: hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
            f"({num_attention_heads}), itself a multiple of num_key_value_heads ({num_key_value_heads})"
        )
    out = deepcopy(config)
    out.update(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        intermediate_size=intermediate_size,
    )
    if vocab_size is not None:
        out["vocab_size"] = vocab_size
    if max_position_embeddings is not None:
        out["max_position_embeddings"] = max_position_embeddings
    return out
