"""The built-in demo checkpoint: a tiny Glm4 model in exactly the Hugging Face layout, seeded random weights.

It lets every command run with no model given and no download, and it goes through the same loader, tokenizer
and chat template as a real GLM checkpoint. Its output is random text.

Writing is deterministic (the same seed gives byte-identical files) and atomic (the files are written to a
temporary directory beside the target, which is then renamed into place), so processes that race on a first
use never see half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from openautoglm.protocol.errors import ConfigError

# Bump when the demo checkpoint's contents change, so caches written by older versions are not reused.
DEMO_FORMAT_VERSION = 1
DEMO_DIR_NAME = f"demo-glm4-v{DEMO_FORMAT_VERSION}"

# GLM-4's special tokens, in the order the real tokenizer numbers them (after the byte-level vocabulary).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
# GLM stops on end-of-text and on the tokens that open the next user or tool turn.
GLM_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
DEMO_VOCAB_SIZE = 1536  # byte-level BPE vocabulary plus the special tokens

# The pre-tokenization split used by GLM-4's tokenizer (the cl100k pattern): contractions, letter runs with
# one leading non-letter, digit groups of at most three, punctuation runs, newlines, whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The demo's GLM-4 chat template (written for Open-AutoGLM; it renders the prompt format of GLM-4 chat
# models): [gMASK]<sop>, then <|system|> / <|user|> / <|assistant|> / <|observation|> turns, each role tag
# followed by a newline and the text; an assistant tool call is the tool name after the role tag, then its
# JSON arguments.
GLM4_CHAT_TEMPLATE = """[gMASK]<sop>
{%- if tools %}<|system|>
# Available tools
{%- for tool in tools %}
{%- set fn = tool.function if tool.function is defined else tool %}

## {{ fn.name }}

{{ fn | tojson(indent=4) }}
Call this tool by replying with its name on the first line and its arguments as JSON after it.
{%- endfor %}
{%- endif %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'system' %}<|system|>
{{ content }}
{%- elif message.role == 'user' %}<|user|>
{{ content }}
{%- elif message.role == 'assistant' %}
{%- if message.tool_calls %}
{%- for call in message.tool_calls %}
{%- set fn = call.function if call.function is defined else call %}<|assistant|>{{ fn.name }}
{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}
{%- endfor %}
{%- else %}<|assistant|>
{{ content }}
{%- endif %}
{%- elif message.role == 'tool' or message.role == 'observation' %}<|observation|>
{{ content }}
{%- else %}
{{- raise_exception('chat message role must be system, user, assistant or tool, got ' ~ message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

_README = """# Open-AutoGLM demo checkpoint

This directory holds a tiny GLM-4 model (`Glm4ForCausalLM`: 2 layers, hidden size 128, a {vocab}-token
byte-level BPE vocabulary) in the Hugging Face layout, written by Open-AutoGLM with seeded random weights
(seed {seed}). It exists so that every Open-AutoGLM command runs with no download, through the same loader,
tokenizer and GLM-4 chat template as a real checkpoint.

**Its output is random text.** It is for trying Open-AutoGLM out and for tests, not for answers.

To serve a real GLM model, point Open-AutoGLM at a checkpoint directory or a Hugging Face hub id:

    autoglm generate --model /path/to/checkpoint "Hello"
    autoglm generate --model THUDM/glm-4-9b-chat-hf "Hello"

Any Hugging Face checkpoint of `GlmForCausalLM` (glm-4-9b-chat-hf, glm-edge) or `Glm4ForCausalLM`
(GLM-4-9B-0414, GLM-Z1) works. This directory can be deleted at any time; it is written again when needed.
"""

_CORPUS_EN = """\
Open-AutoGLM serves language models of the GLM family. A client sends a request over HTTP or gRPC;
the server checks the key, applies the rate limits, looks in the response cache and puts the request
in a queue. The router picks a backend, and the engine schedules the request together with all the
others that are running. Every step, the scheduler decides which sequences run, the model computes
the next token for each of them, and the sampler chooses a token from the probabilities. Tokens are
turned back into text as they arrive and streamed to the client.

The key-value cache is split into blocks of sixteen tokens. A sequence owns a table of blocks; when
two requests share the same beginning, they share the same blocks, and the second one skips the work
the first one already did. When the cache runs out of free blocks, the request with the lowest
priority is preempted and computed again later.

Hello! How are you today? I am fine, thank you. What is the weather like in Beijing? It is sunny and
warm, with a light wind from the north. Please write a short poem about the sea. The sea is wide and
blue, the waves are slow, the boats come home at night. Can you translate this sentence into
Chinese? Of course, here is the translation.

Question: what is twelve times seven? Answer: 12 * 7 = 84. Question: how many days are there in a
leap year? Answer: 366 days. The meeting starts at 09:30 on 2024-05-17 and ends at 11:45. The price
is $19.99, or 20% off. Call me at +86 10 1234 5678 or send an e-mail to someone@example.com before
Friday.

Machine learning models learn patterns from data. A transformer reads a sequence of tokens and
predicts the next one. Attention lets every position look at the positions before it. Training
adjusts the weights so that the predicted probabilities match the text; inference uses the trained
weights to generate new text, one token at a time. Larger models know more, but they need more
memory and more time for each token they produce.
"""

_CORPUS_ZH = """\
你好！很高兴认识你。今天天气很好，我们去公园散步吧。北京是中国的首都，有很多历史悠久的名胜古迹。
人工智能正在改变我们的生活和工作方式。大语言模型可以回答问题、写文章、翻译语言，还可以帮助程序员写代码。
请用简单的语言解释一下什么是机器学习。机器学习是让计算机从数据中学习规律，然后用这些规律来做预测。
春天来了，花开了，鸟儿在树上唱歌。我喜欢喝茶，也喜欢看书。你最喜欢的季节是什么？为什么？
谢谢你的帮助！不客气，有问题随时问我。这个问题的答案是四十二。
"""

_CORPUS_CODE = """\
def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def increment(self, step: int = 1) -> int:
        self.count += step
        return self.count


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

{"model": "glm-4", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0.7, "stream": true}
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC LIMIT 10;
"""

_CORPUS_MISC = """\
Emoji and symbols: 😀 😂 🎉 🚀 ❤️ 👍 ✅ ⚠️ → ← ≤ ≥ ± × ÷ ∞ π ° € £ ¥ © ®.
Other scripts: Привет, как дела? こんにちは、元気ですか。안녕하세요.
Γειά σου κόσμε. مرحبا بالعالم. नमस्ते दुनिया.
Accents: café, naïve, résumé, façade, jalapeño, Zürich, São Paulo, Kraków, Ångström.
"""


def demo_corpus() -> str:
    """The demo tokenizer's built-in training text: English prose, Chinese, code, numbers, other scripts."""
    return _CORPUS_EN + _CORPUS_ZH + _CORPUS_CODE + _CORPUS_MISC


def _corpus_lines(repeat: int = 3) -> Iterator[str]:
    # Repeating the text makes its frequent pairs merge first; the line order is fixed, so training is too.
    for _ in range(repeat):
        yield from demo_corpus().splitlines(keepends=True)


def build_demo_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE) -> HFTokenizer:
    """Train the demo's byte-level BPE tokenizer (deterministically); GLM's special tokens follow it."""
    base_size = vocab_size - len(GLM_SPECIAL_TOKENS)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    got = tok.get_vocab_size()
    if got != base_size:
        raise ConfigError(f"the demo corpus trains {got} tokens, not the {base_size} the demo tokenizer needs")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIAL_TOKENS])
    gmask, sop = tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")
    # Like GLM-4's tokenizer: encoding with special tokens prefixes [gMASK]<sop>.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="[gMASK]:0 <sop>:0 $A:0",
                pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
                special_tokens=[("[gMASK]", gmask), ("<sop>", sop)],
            ),
        ]
    )
    return tok


def demo_hf_config(vocab_size: int, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    """config.json of the demo model, with the fields (legacy rope fields too) of GLM-4-0414 checkpoints."""
    return {
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def random_state_dict(hf_config: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Seeded random weights under the exact Hugging Face tensor names of ``GlmForCausalLM`` or
    ``Glm4ForCausalLM``.

    Matrices and biases have std 0.02 (the GLM initializer range); norm weights are 1 plus small noise so that
    a missing or misplaced norm shows up in logits comparisons.
    """
    arch = (hf_config.get("architectures") or ["Glm4ForCausalLM"])[0]
    if arch not in ("GlmForCausalLM", "Glm4ForCausalLM"):
        raise ConfigError(
            f"random checkpoints support GlmForCausalLM and Glm4ForCausalLM, got architectures[0]={arch!r}"
        )
    shapes = _tensor_shapes(hf_config, post_norms=arch == "Glm4ForCausalLM")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float32)
        else:
            t = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float32)
        out[name] = t.to(dtype).contiguous()
    return out


def _tensor_shapes(c: dict[str, Any], *, post_norms: bool) -> list[tuple[str, tuple[int, ...]]]:
    hidden, vocab, inter = int(c["hidden_size"]), int(c["vocab_size"]), int(c["intermediate_size"])
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    bias = bool(c.get("attention_bias", True))
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(int(c["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes.append((p + "input_layernorm.weight", (hidden,)))
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            shapes.append((f"{p}self_attn.{proj}.weight", (n * head_dim, hidden)))
            if bias:
                shapes.append((f"{p}self_attn.{proj}.bias", (n * head_dim,)))
        shapes.append((p + "self_attn.o_proj.weight", (hidden, heads * head_dim)))
        if post_norms:
            shapes.append((p + "post_self_attn_layernorm.weight", (hidden,)))
        shapes.append((p + "post_attention_layernorm.weight", (hidden,)))
        shapes.append((p + "mlp.gate_up_proj.weight", (2 * inter, hidden)))
        shapes.append((p + "mlp.down_proj.weight", (hidden, inter)))
        if post_norms:
            shapes.append((p + "post_mlp_layernorm.weight", (hidden,)))
    shapes.append(("model.norm.weight", (hidden,)))
    if not c.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def write_random_checkpoint(
    path: Path, hf_config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write config.json and model.safetensors of a random GLM checkpoint into the directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", hf_config)
    save_file(random_state_dict(hf_config, seed, dtype), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def _tokenizer_config(tok: HFTokenizer) -> dict[str, Any]:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in GLM_SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in GLM_SPECIAL_TOKENS if t != "<|endoftext|>"],
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "padding_side": "left",
        "chat_template": GLM4_CHAT_TEMPLATE,
    }


def _write_files(path: Path, seed: int) -> None:
    tok = build_demo_tokenizer()
    vocab = tok.get_vocab_size()
    eos_ids = [tok.token_to_id(t) for t in GLM_EOS_TOKENS]
    pad_id = tok.token_to_id("<|endoftext|>")
    write_random_checkpoint(path, demo_hf_config(vocab, eos_ids, pad_id), seed)
    _write_json(path / "generation_config.json", {"eos_token_id": eos_ids, "pad_token_id": pad_id})
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(path / "tokenizer_config.json", _tokenizer_config(tok))
    (path / "README.md").write_text(_README.format(vocab=vocab, seed=seed), encoding="utf-8")


DEMO_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)


def write_demo_model(path: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write the demo checkpoint into the new (or empty) directory ``path`` and return it.

    With ``overwrite``, an existing directory is replaced. Raises ``ConfigError`` when ``path`` exists, is not
    empty and ``overwrite`` is not set.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"demo model path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"demo model directory {path} is not empty; choose a new directory or overwrite it")
    tmp = _write_to_temp(path, seed)
    try:
        _move_into_place(tmp, path, overwrite=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _write_to_temp(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_files(tmp, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _move_into_place(tmp: Path, path: Path, *, overwrite: bool) -> None:
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(path)
        # A directory cannot be replaced atomically: move the old one aside first, then drop it.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "checkpoint")
        os.replace(tmp, path)
        shutil.rmtree(old)
        return
    # rename(2) replaces an empty directory, fails on a non-empty one: the racing writer that came first wins.
    os.replace(tmp, path)


def is_complete_demo_dir(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in DEMO_FILES)


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "openautoglm"


def ensure_demo_model(root: Path | None = None) -> Path:
    """The demo checkpoint under ``root`` (default ``~/.cache/openautoglm``), written on first use."""
    root = Path(root).expanduser() if root is not None else default_cache_root()
    path = (root / DEMO_DIR_NAME).absolute()
    if is_complete_demo_dir(path):
        return path
    if path.is_dir() and any(path.iterdir()):
        # Someone removed files from it: write a fresh copy over it.
        return write_demo_model(path, overwrite=True)
    tmp = _write_to_temp(path, seed=0)
    try:
        _move_into_place(tmp, path, overwrite=False)
    except OSError:
        # Another process renamed its copy into place first; its copy is complete (rename is atomic).
        if not is_complete_demo_dir(path):
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
