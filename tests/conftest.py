"""Shared fixtures: the demo checkpoint and tiny random GLM checkpoints written through transformers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from openautoglm.config.settings import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openautoglm.engine.loader.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo-model", seed=0)


def make_checkpoint(path: Path, tokenizer_from: Path, arch: str = "Glm4ForCausalLM", **overrides: Any) -> Path:
    """A tiny random GLM checkpoint saved by transformers itself, with the demo tokenizer.

    The weights are drawn wider than a trained model's (initializer_range 0.3) so greedy decisions have clear
    margins and float rounding between implementations cannot flip an argmax.
    """
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    tok_cfg = (tokenizer_from / "config.json").read_text()
    import json

    vocab = json.loads(tok_cfg)["vocab_size"]
    fields: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.3,
        attention_bias=True, tie_word_embeddings=False, eos_token_id=json.loads(tok_cfg).get("eos_token_id"),
        pad_token_id=0,
    )  # fmt: skip
    fields.update(overrides)
    config_cls, model_cls = (Glm4Config, Glm4ForCausalLM) if arch == "Glm4ForCausalLM" else (GlmConfig, GlmForCausalLM)
    torch.manual_seed(0)
    model = model_cls(config_cls(**fields)).eval()
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "glm4", demo_dir)


def engine_config(model: Path | str, **sections: dict[str, Any]) -> EngineConfig:
    """An EngineConfig for tests: float32 on CPU, small pools unless told otherwise."""
    return EngineConfig(
        model=ModelConfig(model=str(model), device="cpu", dtype="float32", **sections.get("model", {})),
        cache=CacheConfig(**({"num_blocks": 512} | sections.get("cache", {}))),
        scheduler=SchedulerConfig(**sections.get("scheduler", {})),
    )


@pytest.fixture(scope="session")
def make_engine_config():
    return engine_config


@pytest.fixture(scope="session")
def checkpoint_factory():
    return make_checkpoint
