"""Our GLM / GLM-4 implementations against transformers' as the oracle (issue 2, test 1).

Each case saves a random tiny checkpoint with transformers, loads it through ``load_model`` and runs it
through the paged KV cache and the reference attention backend: a whole prompt, a prefill continued token by
token, and mixed batches of decodes, fresh prefills and chunked prefills. Every logit must equal
transformers' logits on the whole sequence in float32 (max abs diff < 1e-4). The reference backend is also
checked on its own against dense attention.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM, PreTrainedModel

from openautoglm.config.settings import ModelConfig
from openautoglm.engine.attention.base import ForwardContext
from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata
from openautoglm.engine.loader import load_model
from openautoglm.engine.models.base import CausalLM, ModelArchConfig
from openautoglm.engine.models.registry import get_model_class, supported_architectures
from openautoglm.protocol.errors import InternalError, ModelLoadError

TOL = 1e-4
VOCAB = 96


@dataclass(frozen=True)
class Case:
    arch: str  # "glm" | "glm4"
    partial_rotary_factor: float
    attention_bias: bool
    tied: bool
    head_dim: int  # hidden 64 / 4 heads = 16 is the "natural" size
    kv_heads: int
    rope_theta: float
    old_config: bool  # top-level rope_theta / partial_rotary_factor instead of rope_parameters


CASES = {
    "glm-prf0.5-bias-untied-hd24-gqa": Case("glm", 0.5, True, False, 24, 2, 10000.0, False),
    "glm-prf1-nobias-tied-mha-oldcfg": Case("glm", 1.0, False, True, 16, 4, 500.0, True),
    "glm4-prf0.5-bias-tied-hd32-mqa-oldcfg": Case("glm4", 0.5, True, True, 32, 1, 10000.0, True),
    "glm4-prf1-nobias-untied-gqa": Case("glm4", 1.0, False, False, 16, 2, 500.0, False),
    "glm4-prf0.5-nobias-untied-hd20": Case("glm4", 0.5, False, False, 20, 2, 2000.0, False),
}


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Wide weights, non-zero biases, non-unit norms: a wrong bias, norm or rotation shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_((0.2 if p.dim() > 1 else 0.3) * noise)


def build_hf_checkpoint(path: Path, case: Case, seed: int = 0) -> PreTrainedModel:
    """Save a random transformers model for ``case`` in ``path``; return that model (the oracle)."""
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=case.kv_heads, head_dim=case.head_dim, max_position_embeddings=128,
        attention_bias=case.attention_bias, tie_word_embeddings=case.tied, pad_token_id=0, eos_token_id=[1],
        rope_parameters={"rope_type": "default", "rope_theta": case.rope_theta,
                         "partial_rotary_factor": case.partial_rotary_factor},
    )  # fmt: skip
    config_cls, model_cls = (GlmConfig, GlmForCausalLM) if case.arch == "glm" else (Glm4Config, Glm4ForCausalLM)
    model = model_cls(config_cls(**fields)).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    if case.old_config:  # the spelling of checkpoints published before transformers 5
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        (path / "config.json").write_text(json.dumps(cfg))
    return model


class PagedRunner:
    """A minimal runner: scattered block allocation, metadata, one forward per step, logits per chunk."""

    def __init__(self, model: CausalLM, arch: ModelArchConfig, block_size: int = 4, num_blocks: int = 48) -> None:
        self.model, self.block_size = model, block_size
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.kv_caches = [torch.zeros(shape) for _ in range(arch.num_hidden_layers)]
        self.free = list(range(num_blocks))
        random.Random(1).shuffle(self.free)  # non-contiguous, unordered block tables
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.backend = ReferenceAttentionBackend()

    @torch.inference_mode()
    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        query_lens, context_lens, tables, ids, positions = [], [], [], [], []
        for seq, tokens in chunks:
            ctx = self.lens.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < ctx + len(tokens):
                table.append(self.free.pop())
            query_lens.append(len(tokens))
            context_lens.append(ctx)
            tables.append(table)
            ids += tokens
            positions += range(ctx, ctx + len(tokens))
            self.lens[seq] = ctx + len(tokens)
        metadata = build_metadata(query_lens, context_lens, tables, self.block_size, "cpu")
        ctx_ = ForwardContext(metadata=metadata, kv_caches=self.kv_caches, backend=self.backend)
        hidden = self.model.forward(torch.tensor(ids), torch.tensor(positions), ctx_)
        return list(self.model.compute_logits(hidden).split(query_lens))


@dataclass
class Loaded:
    ours: CausalLM
    arch: ModelArchConfig
    oracle: PreTrainedModel

    @torch.inference_mode()
    def reference(self, tokens: list[int]) -> torch.Tensor:
        return self.oracle(torch.tensor([tokens])).logits[0].float()

    def runner(self) -> PagedRunner:
        return PagedRunner(self.ours, self.arch)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    case = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    oracle = build_hf_checkpoint(path, case)
    result = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32)
    return Loaded(result.model, result.arch, oracle)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.std() > 0.3, "oracle logits too flat for the comparison to mean anything"
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"max abs diff {diff:.3g} >= {TOL}"


def test_arch_config_read_from_either_spelling(loaded: Loaded) -> None:
    cfg = loaded.oracle.config
    assert loaded.arch.rope_theta == cfg.rope_parameters["rope_theta"]
    assert loaded.arch.partial_rotary_factor == cfg.rope_parameters["partial_rotary_factor"]
    assert loaded.arch.head_dim == cfg.head_dim


def test_prefill_logits_match_transformers(loaded: Loaded) -> None:
    prompt = _prompt(23, seed=1)
    (logits,) = loaded.runner().step([(0, prompt)])
    _assert_close(logits, loaded.reference(prompt))


def test_decode_through_paged_cache_matches_transformers(loaded: Loaded) -> None:
    prompt = _prompt(19, seed=2)
    runner = loaded.runner()
    chunks = runner.step([(0, prompt[:7])])
    chunks += [runner.step([(0, [tok])])[0] for tok in prompt[7:]]
    _assert_close(torch.cat(chunks), loaded.reference(prompt))


@pytest.mark.parametrize("decodes_first", [True, False], ids=["decodes-first", "decodes-mixed-in"])
def test_mixed_batch_matches_per_sequence(loaded: Loaded, decodes_first: bool) -> None:
    """Decodes, a fresh prefill and chunked prefills with earlier context, all in one forward."""
    prompts = {s: _prompt(n, seed=10 + s) for s, n in enumerate([12, 9, 15, 13])}
    runner = loaded.runner()
    got: dict[int, list[torch.Tensor]] = {s: [] for s in prompts}

    def step(plan: list[tuple[int, int, int]]) -> None:
        order = sorted(plan, key=lambda p: p[2] - p[1] != 1) if decodes_first else plan
        chunks = [(s, prompts[s][a:b]) for s, a, b in order]
        for (s, _, _), logits in zip(order, runner.step(chunks), strict=True):
            got[s].append(logits)

    step([(0, 0, 9), (1, 0, 5), (2, 0, 6)])  # three prefills
    step([(2, 6, 13), (0, 9, 10), (3, 0, 11), (1, 5, 6)])  # chunk with context, decode, fresh prefill, decode
    step([(1, 6, 9), (0, 10, 11), (2, 13, 14), (3, 11, 12)])  # chunk, then decodes
    step([(0, 11, 12), (2, 14, 15), (3, 12, 13)])  # decodes only
    for s, prompt in prompts.items():
        n = sum(len(t) for t in got[s])
        _assert_close(torch.cat(got[s]), loaded.reference(prompt)[:n])


def test_logits_bfloat16_track_float32(tmp_path: Path) -> None:
    """The bfloat16 path (norm cast order, rotary table dtype) stays near the float32 result."""
    case = CASES["glm4-prf0.5-nobias-untied-hd20"]
    build_hf_checkpoint(tmp_path, case)
    prompt = _prompt(17, seed=3)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        res = load_model(ModelConfig(model=str(tmp_path)), torch.device("cpu"), dtype)
        (out[dtype],) = PagedRunner(res.model, res.arch).step([(0, prompt)])
        assert out[dtype].dtype == torch.float32  # compute_logits always returns float32
    scale = out[torch.float32].abs().max().item()
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max().item() < 0.05 * scale


def test_registry_maps_architectures() -> None:
    assert supported_architectures() == ["Glm4ForCausalLM", "GlmForCausalLM"]
    assert get_model_class("GlmForCausalLM").__name__ == "GlmForCausalLM"
    assert get_model_class("Glm4ForCausalLM").__name__ == "Glm4ForCausalLM"


def test_registry_unknown_architecture_names_supported_ones() -> None:
    with pytest.raises(ModelLoadError) as err:
        get_model_class("ChatGLMForConditionalGeneration")
    msg = str(err.value)
    assert "ChatGLMForConditionalGeneration" in msg
    assert "GlmForCausalLM" in msg and "Glm4ForCausalLM" in msg


# --- the reference backend on its own ------------------------------------------------------------------


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, scale: float) -> torch.Tensor:
    """Naive causal attention of q [Lq, H, D] at positions context.. over k/v [L, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    allowed = torch.arange(k.shape[0])[None, :] <= (context + torch.arange(q.shape[0]))[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 6])
def test_reference_backend_matches_dense_attention(num_kv_heads: int) -> None:
    torch.manual_seed(0)
    heads, dim, block_size, num_blocks, scale = 6, 8, 4, 40, 0.3
    seqs = [
        (5, 1),
        (9, 1),
        (0, 1),
        (6, 7),
        (0, 11),
        (3, 2),
        (4, 1),
    ]  # (context, query); last decode out of order
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, dim)
    free = torch.randperm(num_blocks).tolist()
    tables, keys, values = [], [], []
    for c, q in seqs:
        tables.append([free.pop() for _ in range(-(-(c + q) // block_size))])
        keys.append(torch.randn(c + q, num_kv_heads, dim))
        values.append(torch.randn(c + q, num_kv_heads, dim))
        for p in range(c):  # earlier context, as earlier steps would have written it
            cache[0, tables[-1][p // block_size], p % block_size] = keys[-1][p]
            cache[1, tables[-1][p // block_size], p % block_size] = values[-1][p]
    metadata = build_metadata([q for _, q in seqs], [c for c, _ in seqs], tables, block_size)
    assert metadata.num_decodes == 3
    queries = [torch.randn(q, heads, dim) for _, q in seqs]
    out = ReferenceAttentionBackend().forward(
        torch.cat(queries),
        torch.cat([k[c:] for (c, _), k in zip(seqs, keys, strict=True)]),
        torch.cat([v[c:] for (c, _), v in zip(seqs, values, strict=True)]),
        cache,
        metadata,
        scale,
    )
    for (c, _), q, k, v, got in zip(seqs, queries, keys, values, out.split([q for _, q in seqs]), strict=True):
        torch.testing.assert_close(got, _dense_attention(q, k, v, c, scale), atol=1e-5, rtol=1e-5)
    for (c, q), table, k in zip(seqs, tables, keys, strict=True):  # the new keys were written to their slots
        slots = [table[p // block_size] * block_size + p % block_size for p in range(c, c + q)]
        torch.testing.assert_close(cache[0].flatten(0, 1)[slots], k[c:])


def test_build_metadata_slots_and_decodes() -> None:
    md = build_metadata([1, 1, 3], [4, 0, 2], [[7, 2], [5], [9, 3]], block_size=4)
    assert md.num_decodes == 2 and md.num_tokens == 5 and md.num_seqs == 3
    assert md.slot_mapping.tolist() == [2 * 4 + 0, 5 * 4 + 0, 9 * 4 + 2, 9 * 4 + 3, 3 * 4 + 0]
    assert md.query_start_loc.tolist() == [0, 1, 2, 5]
    assert md.seq_lens.tolist() == [5, 1, 5] == md.seq_lens_cpu
    assert md.block_tables.tolist() == [[7, 2], [5, 0], [9, 3]]
    assert (md.max_query_len, md.max_seq_len) == (3, 5)


def test_build_metadata_rejects_too_few_blocks() -> None:
    with pytest.raises(InternalError, match="sequence 0"):
        build_metadata([5], [0], [[1]], block_size=4)
