"""The demo checkpoint: the Hugging Face layout that transformers loads and generates from, deterministic and
atomic writing, and the cache directory that ensure_demo_model fills once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from openautoglm.engine.loader.demo import (
    DEMO_DIR_NAME,
    DEMO_FILES,
    DEMO_FORMAT_VERSION,
    GLM_SPECIAL_TOKENS,
    ensure_demo_model,
    random_state_dict,
    write_demo_model,
    write_random_checkpoint,
)
from openautoglm.protocol.errors import ConfigError


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _checkpoint_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_demo_checkpoint_layout(demo_dir: Path):
    assert sorted(p.name for p in demo_dir.iterdir()) == sorted(DEMO_FILES)
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["Glm4ForCausalLM"] and config["model_type"] == "glm4"
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (2, 128, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["partial_rotary_factor"] == 0.5 and config["attention_bias"] and not config["tie_word_embeddings"]
    tok_cfg = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"].startswith("[gMASK]<sop>")
    gen = json.loads((demo_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] and len(gen["eos_token_id"]) == 3
    total = sum(p.stat().st_size for p in demo_dir.iterdir())
    assert 1 << 20 < total < 8 << 20  # a few MB
    readme = (demo_dir / "README.md").read_text()
    assert "random text" in readme and "--model" in readme and "THUDM/glm-4-9b-chat-hf" in readme


def test_demo_checkpoint_loads_and_generates_in_transformers(demo_dir: Path):
    from transformers import AutoTokenizer, Glm4ForCausalLM

    model, info = Glm4ForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    # Every parameter came from the file (nothing left at transformers' own initialization).
    with safe_open(str(demo_dir / "model.safetensors"), framework="pt") as f:
        for name, param in model.state_dict().items():
            assert torch.equal(param, f.get_tensor(name)), name
    tok = AutoTokenizer.from_pretrained(str(demo_dir))
    assert model.config.vocab_size == len(tok)
    assert {tok.convert_ids_to_tokens(i) for i in model.generation_config.eos_token_id} == {
        "<|endoftext|>",
        "<|user|>",
        "<|observation|>",
    }
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello 你好"}], tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0, :2].tolist()) == ["[gMASK]", "<sop>"]
    runs = [model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False) for _ in range(2)]
    assert runs[0].shape == (1, ids.shape[1] + 12) and torch.equal(runs[0], runs[1])
    assert isinstance(tok.decode(runs[0][0, ids.shape[1] :]), str)


CONFIGS: list[dict[str, Any]] = [
    dict(architectures=["Glm4ForCausalLM"], model_type="glm4"),
    dict(architectures=["Glm4ForCausalLM"], model_type="glm4", attention_bias=False, tie_word_embeddings=True),
    dict(architectures=["GlmForCausalLM"], model_type="glm", head_dim=24, partial_rotary_factor=1.0),
    dict(architectures=["GlmForCausalLM"], model_type="glm", num_key_value_heads=4, attention_bias=False),
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_random_checkpoint_has_transformers_tensor_names(tmp_path: Path, overrides: dict[str, Any]):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=[1],
    )  # fmt: skip
    hf_config.update(overrides)
    d = write_random_checkpoint(tmp_path / "ckpt", hf_config, seed=3)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d)))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if hf_config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")  # tied: saved once, as the embedding
    assert _checkpoint_shapes(d) == expected
    _, info = type(reference).from_pretrained(str(d), output_loading_info=True)
    assert not any(info.values()), info
    weights = random_state_dict(hf_config, seed=3)
    assert all(abs(t.std().item() - 0.02) < 0.01 for k, t in weights.items() if not k.endswith("norm.weight"))
    with pytest.raises(ConfigError, match="GlmForCausalLM"):
        random_state_dict({**hf_config, "architectures": ["LlamaForCausalLM"]}, seed=0)


def test_writing_is_deterministic(tmp_path: Path, demo_dir: Path):
    a = write_demo_model(tmp_path / "a", seed=0)
    assert _files(a) == _files(demo_dir)
    b = write_demo_model(tmp_path / "b", seed=1)
    fa, fb = _files(a), _files(b)
    assert fa["model.safetensors"] != fb["model.safetensors"]
    assert fa["tokenizer.json"] == fb["tokenizer.json"] and fa["config.json"] == fb["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary directories left behind


@pytest.mark.slow
def test_writing_is_deterministic_across_processes(tmp_path: Path, demo_dir: Path):
    # Tokenizer training hashes in Rust with per-process random seeds: a fresh interpreter must agree exactly.
    code = "import sys; from pathlib import Path; from openautoglm.engine.loader.demo import write_demo_model; "
    code += "write_demo_model(Path(sys.argv[1]), seed=0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], check=True, timeout=120)
    assert _files(tmp_path / "p") == _files(demo_dir)


def test_write_refuses_a_non_empty_directory_unless_overwriting(tmp_path: Path):
    target = tmp_path / "m"
    target.mkdir()
    write_demo_model(target)  # an empty directory is fine
    (target / "extra.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        write_demo_model(target)
    write_demo_model(target, seed=2, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(DEMO_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        write_demo_model(tmp_path / "file")


def test_ensure_demo_model_is_idempotent_and_repairs(tmp_path: Path, demo_dir: Path):
    path = ensure_demo_model(tmp_path)
    assert path == (tmp_path / DEMO_DIR_NAME).absolute() and f"v{DEMO_FORMAT_VERSION}" in path.name
    assert _files(path) == _files(demo_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_demo_model(tmp_path) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps  # not written again
    (path / "model.safetensors").unlink()
    assert ensure_demo_model(tmp_path) == path
    assert _files(path) == _files(demo_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_DIR_NAME]


def test_concurrent_first_use_sees_a_whole_checkpoint(tmp_path: Path, demo_dir: Path):
    results: list[Path] = []
    errors: list[BaseException] = []

    def use() -> None:
        try:
            p = ensure_demo_model(tmp_path)
            assert sorted(f.name for f in p.iterdir()) == sorted(DEMO_FILES)
            results.append(p)
        except (AssertionError, OSError, ConfigError) as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1 and len(results) == 6
    assert _files(results[0]) == _files(demo_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_DIR_NAME]


def test_demo_tokenizer_has_glm_special_tokens_after_the_vocabulary(demo_dir: Path):
    tokenizer = json.loads((demo_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab = json.loads((demo_dir / "config.json").read_text())["vocab_size"]
    assert list(added) == list(GLM_SPECIAL_TOKENS)
    assert sorted(added.values()) == list(range(vocab - len(GLM_SPECIAL_TOKENS), vocab))
    assert all(t["special"] for t in tokenizer["added_tokens"])
    assert tokenizer["model"]["type"] == "BPE" and tokenizer["decoder"]["type"] == "ByteLevel"
