"""The checkpoint loader: resolution (directory, hub cache, demo), safetensors reading, dtypes, dummy weights,
and an error naming the file and tensor for every broken checkpoint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM, PreTrainedModel

from openautoglm.config.settings import ModelConfig
from openautoglm.engine.attention.base import ForwardContext
from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata
from openautoglm.engine.loader import LoadedModel, load_model, resolve_checkpoint
from openautoglm.protocol.errors import ModelLoadError

CPU = torch.device("cpu")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_model(arch: str = "glm4", tied: bool = False, seed: int = 0) -> PreTrainedModel:
    config_cls, model_cls = (Glm4Config, Glm4ForCausalLM) if arch == "glm4" else (GlmConfig, GlmForCausalLM)
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=tied,
        pad_token_id=0, eos_token_id=[1],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture
def oracle() -> PreTrainedModel:
    return hf_model()


@pytest.fixture
def ckpt(tmp_path: Path, oracle: PreTrainedModel) -> Path:
    path = tmp_path / "ckpt"
    oracle.save_pretrained(path)
    return path


def load(path: Path, dtype: torch.dtype = torch.float32, **cfg: object) -> LoadedModel:
    return load_model(ModelConfig(model=str(path), **cfg), CPU, dtype)  # type: ignore[arg-type]


def unfused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names, qkv_proj split back into q/k/v."""
    out: dict[str, torch.Tensor] = {}
    cfg = model.config  # type: ignore[attr-defined]
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for name, p in model.named_parameters():
        if ".qkv_proj." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), p.split([q, kv, kv]), strict=True):
                out[name.replace("qkv_proj", part)] = chunk
        else:
            out[name] = p
    return out


def assert_weights(loaded: LoadedModel, oracle: PreTrainedModel, dtype: torch.dtype) -> None:
    ours = unfused(loaded.model)  # type: ignore[arg-type]
    theirs = {
        k: v
        for k, v in oracle.state_dict().items()
        if not (oracle.config.tie_word_embeddings and k == "lm_head.weight")
    }
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == dtype, name
        assert torch.equal(ours[name], tensor.to(dtype)), name


def rewrite(ckpt: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """Rewrite model.safetensors with tensors replaced (or removed, for None)."""
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def load_error(path: Path, **cfg: object) -> str:
    with pytest.raises(ModelLoadError) as err:
        load(path, **cfg)
    return str(err.value)


# --- reading weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,tied", [("glm4", False), ("glm", True)])
def test_single_file_loads_every_tensor(tmp_path: Path, arch: str, tied: bool) -> None:
    oracle = hf_model(arch, tied)
    oracle.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.path == tmp_path.resolve()
    assert loaded.arch.architecture == type(oracle).__name__
    assert_weights(loaded, oracle, torch.float32)
    assert not any(p.requires_grad for p in loaded.model.parameters())  # type: ignore[attr-defined]


def test_sharded_checkpoint_through_index(tmp_path: Path, oracle: PreTrainedModel) -> None:
    oracle.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    assert_weights(load(tmp_path), oracle, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_converted_to_requested_dtype(ckpt: Path, oracle: PreTrainedModel, dtype: torch.dtype) -> None:
    assert_weights(load(ckpt, dtype), oracle, dtype)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path: Path, oracle: PreTrainedModel) -> None:
    oracle.to(torch.bfloat16).save_pretrained(tmp_path)
    assert_weights(load(tmp_path, torch.float32), oracle, torch.float32)


def test_dummy_weights_read_only_config(tmp_path: Path, ckpt: Path) -> None:
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((ckpt / "config.json").read_text())
    a, b = (load(only_config, load_format="dummy", seed=7) for _ in range(2))
    c = load(only_config, load_format="dummy", seed=8)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))  # type: ignore[attr-defined]
    assert all(torch.equal(pa[n], pb[n]) for n in pa)  # seeded: the same weights every time
    assert not torch.equal(pa["model.embed_tokens.weight"], pc["model.embed_tokens.weight"])
    assert torch.equal(pa["model.norm.weight"], torch.ones_like(pa["model.norm.weight"]))
    assert 0.01 < pa["model.embed_tokens.weight"].std().item() < 0.05
    metadata = build_metadata([5], [0], [[0, 1]], 4)
    kv = [torch.zeros(2, 2, 4, 2, 12) for _ in range(2)]
    with torch.inference_mode():
        hidden = a.model.forward(
            torch.arange(5), torch.arange(5), ForwardContext(metadata, kv, ReferenceAttentionBackend())
        )
        assert torch.isfinite(a.model.compute_logits(hidden)).all()


def test_no_progress_output_without_a_terminal(ckpt: Path, capfd: pytest.CaptureFixture[str]) -> None:
    load(ckpt)
    assert capfd.readouterr().err == ""


def test_progress_bar_on_a_terminal(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    load(ckpt)
    assert "Loading weights" in term.getvalue()


# --- broken checkpoints ------------------------------------------------------------------------------------


def test_index_naming_an_absent_shard(tmp_path: Path, oracle: PreTrainedModel) -> None:
    oracle.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    msg = load_error(tmp_path)
    assert shard.name in msg and "missing" in msg and "tensor 'model." in msg


def test_index_listing_a_tensor_its_shard_lacks(tmp_path: Path, oracle: PreTrainedModel) -> None:
    oracle.save_pretrained(tmp_path, max_shard_size="20KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = shard
    index_file.write_text(json.dumps(index))
    msg = load_error(tmp_path)
    assert "model.layers.0.mlp.ghost.weight" in msg and shard in msg


def test_corrupt_index(tmp_path: Path, oracle: PreTrainedModel) -> None:
    oracle.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text("{ not json")
    assert "model.safetensors.index.json" in load_error(tmp_path)


def test_missing_tensor(ckpt: Path) -> None:
    rewrite(ckpt, {"model.layers.1.post_mlp_layernorm.weight": None, "model.layers.0.self_attn.k_proj.bias": None})
    msg = load_error(ckpt)
    assert "missing" in msg and str(ckpt) in msg
    assert "model.layers.1.post_mlp_layernorm.weight" in msg and "model.layers.0.self_attn.k_proj.bias" in msg


def test_unexpected_tensor(ckpt: Path) -> None:
    file = rewrite(ckpt, {"model.layers.0.self_attn.extra_proj.weight": torch.zeros(4, 4)})
    msg = load_error(ckpt)
    assert "unexpected" in msg and "model.layers.0.self_attn.extra_proj.weight" in msg and str(file) in msg


def test_shape_mismatch_names_expected_and_found(ckpt: Path) -> None:
    file = rewrite(ckpt, {"model.layers.1.self_attn.k_proj.weight": torch.zeros(20, 32)})
    msg = load_error(ckpt)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and str(file) in msg
    assert "expected (24, 32)" in msg and "found (20, 32)" in msg


def test_unsupported_tensor_dtype(ckpt: Path) -> None:
    file = rewrite(ckpt, {"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 48, dtype=torch.int8)})
    msg = load_error(ckpt)
    assert "model.layers.0.mlp.down_proj.weight" in msg and str(file) in msg and "I8" in msg


@pytest.mark.parametrize("damage", ["garbage-header", "truncated", "too-small"])
def test_corrupt_safetensors_file(ckpt: Path, damage: str) -> None:
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    broken = {
        "garbage-header": (16).to_bytes(8, "little") + b"\x00not a json hdr" + data[24:],
        "truncated": data[: len(data) - 100],
        "too-small": b"\x01\x02",
    }[damage]
    file.write_bytes(broken)
    msg = load_error(ckpt)
    assert str(file) in msg and "corrupt" in msg


def test_no_safetensors_files(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    msg = load_error(ckpt)
    assert "no *.safetensors" in msg and str(ckpt) in msg


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert "config.json" in msg and "missing" in msg


def test_invalid_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{")
    assert "config.json" in load_error(ckpt)


def _edit_config(ckpt: Path, **changes: object) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_supported(ckpt: Path) -> None:
    _edit_config(ckpt, architectures=["ChatGLMForConditionalGeneration"])
    msg = load_error(ckpt)
    assert "ChatGLMForConditionalGeneration" in msg and "Glm4ForCausalLM" in msg and "GlmForCausalLM" in msg


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ],
)
def test_unsupported_config_values(ckpt: Path, changes: dict[str, object], needle: str) -> None:
    _edit_config(ckpt, **changes)
    assert needle in load_error(ckpt)


def test_unsupported_requested_dtype(ckpt: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(ModelConfig(model=str(ckpt)), CPU, torch.int8)


# --- resolution ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["/nonexistent/ckpt", "./missing-ckpt", "../missing-ckpt", "a/b/c", "bad id!"])
def test_path_that_does_not_exist(model: str) -> None:
    with pytest.raises(ModelLoadError, match="no such checkpoint directory"):
        resolve_checkpoint(ModelConfig(model=model))


def test_file_instead_of_directory(ckpt: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_checkpoint(ModelConfig(model=str(ckpt / "config.json")))


def populate_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay a checkpoint out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("revision", [None, COMMIT])
def test_hub_id_from_offline_cache(tmp_path: Path, ckpt: Path, oracle: PreTrainedModel, revision: str | None) -> None:
    snapshot = populate_hub_cache(tmp_path / "hub", "zai-org/tiny-glm", ckpt)
    cfg = ModelConfig(model="zai-org/tiny-glm", revision=revision, download_dir=str(tmp_path / "hub"))
    assert resolve_checkpoint(cfg) == snapshot
    loaded = load_model(cfg, CPU, torch.float32)
    assert loaded.path == snapshot
    assert_weights(loaded, oracle, torch.float32)


@pytest.mark.usefixtures("offline")
def test_uncached_hub_id_offline_says_how_to_fetch(tmp_path: Path) -> None:
    cfg = ModelConfig(model="zai-org/not-cached", download_dir=str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint(cfg)
    msg = str(err.value)
    assert "zai-org/not-cached" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download zai-org/not-cached" in msg


@pytest.mark.slow
def test_hub_cache_found_through_hf_home(tmp_path: Path, ckpt: Path) -> None:
    """A fresh process with HF_HOME and HF_HUB_OFFLINE=1 in its environment, as a user would run it."""
    populate_hub_cache(tmp_path / "hf" / "hub", "zai-org/tiny-glm", ckpt)
    script = textwrap.dedent(
        """
        import torch
        from openautoglm.config.settings import ModelConfig
        from openautoglm.engine.loader import load_model
        from openautoglm.protocol.errors import ModelLoadError
        print(load_model(ModelConfig(model="zai-org/tiny-glm"), torch.device("cpu"), torch.float32).path)
        try:
            load_model(ModelConfig(model="zai-org/absent"), torch.device("cpu"), torch.float32)
        except ModelLoadError as exc:
            print(exc)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path_line, error_line = out.stdout.strip().splitlines()[-2:]
    assert path_line == str(tmp_path / "hf" / "hub" / "models--zai-org--tiny-glm" / "snapshots" / COMMIT)
    assert "huggingface-cli download zai-org/absent" in error_line


def test_demo_model_resolves_and_loads(tmp_path: Path) -> None:
    loaded = load_model(ModelConfig(model="demo", download_dir=str(tmp_path)), CPU, torch.float32)
    assert loaded.path.parent == tmp_path
    assert loaded.arch.architecture == "Glm4ForCausalLM"
    assert (loaded.path / "tokenizer.json").is_file()
