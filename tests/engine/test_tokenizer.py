"""The tokenizer layer against transformers as the oracle: encode/decode, chat templates, special ids; and the
incremental detokenizer against whole-sequence decoding (UTF-8 split over tokens, stop strings, flush)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, trainers

from openautoglm.engine.loader.demo import GLM_EOS_TOKENS, GLM_SPECIAL_TOKENS, demo_corpus
from openautoglm.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from openautoglm.protocol.errors import ConfigError, InvalidRequestError, ModelLoadError

HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that exercises byte-level BPE: ASCII, CJK (3-byte UTF-8), emoji (4 bytes, some with joiners), accents.
# Characters outside the demo vocabulary (龘, 𝄞, ...) are split into single-byte tokens.
ALPHABET = st.sampled_from([*"abc xyz,.!?\n\t", *"你好世界中文模型龘鬱", "😀", "🚀", "👍🏽", "𝄞", "é", "ß", "Ω", "—"])
TEXTS = st.lists(ALPHABET, max_size=30).map("".join)
SAMPLES = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "你好，世界！今天天气很好。",
    "emoji 😀🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "def f(x):\n    return x * 2\n\n",
    "<|user|>\nhi<|assistant|>[gMASK]<sop>",
    "numbers 1234567 3.14159 and symbols ∞ ≤ ≥",
    "Привет, こんにちは, مرحبا",
]


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def hf_tok(demo_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_dir))


def _copy_checkpoint(src: Path, dst: Path, **config_changes: Any) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg_file = dst / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        for k, v in config_changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        cfg_file.write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("add_special_tokens", [False, True])
@pytest.mark.parametrize("text", SAMPLES)
def test_encode_and_decode_match_transformers(tok: Tokenizer, hf_tok: Any, text: str, add_special_tokens: bool):
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf_tok.encode(text, add_special_tokens=add_special_tokens)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_glm_special_tokens_and_prefix(tok: Tokenizer, hf_tok: Any):
    ids = tok.encode("hi", add_special_tokens=True)
    assert [tok.id_to_token(i) for i in ids[:2]] == ["[gMASK]", "<sop>"]
    assert tok.eos_token_ids == frozenset(tok.token_to_id(t) for t in GLM_EOS_TOKENS)
    assert tok.all_special_ids == frozenset(hf_tok.all_special_ids)
    assert tok.all_special_ids == frozenset(tok.token_to_id(t) for t in GLM_SPECIAL_TOKENS)
    assert tok.vocab_size == len(hf_tok)
    assert tok.pad_token_id == hf_tok.pad_token_id
    assert tok.id_to_token(tok.vocab_size + 5) is None
    assert tok.encode("<|user|>") == [tok.token_to_id("<|user|>")]


@HYPO
@given(text=TEXTS)
def test_encode_roundtrip_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@HYPO
@given(data=st.data())
def test_decode_of_arbitrary_ids_matches_transformers(tok: Tokenizer, hf_tok: Any, data: st.DataObject):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_eos_ids_come_from_generation_config_then_config_then_tokenizer(demo_dir: Path, tmp_path: Path):
    d = _copy_checkpoint(demo_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == {7, 8}
    (d / "generation_config.json").unlink()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 9}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == {9}
    (d / "config.json").unlink()
    t = Tokenizer.from_pretrained(d)
    assert t.eos_token_ids == {t.token_to_id("<|endoftext|>")}


def test_token_text_is_byte_level_aware(tok: Tokenizer, hf_tok: Any):
    for i in range(tok.vocab_size):
        raw = tok.token_bytes(i)
        text = tok.token_text(i)
        try:
            whole = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert text.startswith("bytes:") and "\\x" in text
            continue
        assert text == whole == hf_tok.decode([i], skip_special_tokens=False)
    for sample in SAMPLES:
        ids = tok.encode(sample)
        assert b"".join(tok.token_bytes(i) for i in ids) == sample.encode("utf-8")


def test_token_bytes_of_added_tokens_follow_the_byte_level_decoder(demo_dir: Path):
    backend = HFTokenizer.from_file(str(demo_dir / "tokenizer.json"))
    backend.add_tokens(["<|中文|>", "a\nb", "Ġx"])
    t = Tokenizer(backend)
    for token in ("<|中文|>", "a\nb", "Ġx"):
        i = t.token_to_id(token)
        assert t.token_bytes(i).decode() == backend.decode([i], skip_special_tokens=False)


def test_loading_errors_name_the_file(tmp_path: Path, demo_dir: Path):
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    d = _copy_checkpoint(demo_dir, tmp_path / "bad")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_pretrained(d)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(d)


# ------------------------------------------------------------------------------------------- chat templates

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好，介绍一下你自己 😀"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nThink step by step."},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok: Any, conversation: list, add_generation_prompt):
    ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("[gMASK]<sop>")


def test_chat_template_glm4_format(tok: Tokenizer):
    out = tok.apply_chat_template(CONVERSATIONS[2])
    assert out == (
        "[gMASK]<sop><|system|>\nBe kind.<|user|>\nWhat is 2+2?<|assistant|>\n4"
        "<|user|>\nAnd 3+3?\nThink step by step.<|assistant|>"
    )


def test_chat_template_with_tools_matches_transformers(tok: Tokenizer, hf_tok: Any):
    for conversation in CONVERSATIONS:
        ours = tok.apply_chat_template(conversation, tools=TOOLS)
        assert ours == hf_tok.apply_chat_template(conversation, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert "## get_weather" in ours


def test_text_only_template_gets_the_text_of_content_parts(tok: Tokenizer, hf_tok: Any):
    parts = [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this 图片"}]
    ours = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": parts}])
    flat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Describe\nthis 图片"}]
    assert ours == hf_tok.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(InvalidRequestError, match="text only") as err:
        tok.apply_chat_template([{"role": "user", "content": parts + image}])
    assert err.value.param == "messages"


LIST_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% else %}[{{ p.type }}]{% endif %}"
    "{% if not loop.last %} {% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_content_aware_template_gets_the_parts(demo_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    d = _copy_checkpoint(demo_dir, tmp_path / "m", chat_template=LIST_TEMPLATE)
    ours, theirs = Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(str(d))
    conversation = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {}}],
        },
        {"role": "assistant", "content": "A cat."},
    ]
    rendered = ours.apply_chat_template(conversation)
    assert rendered == theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert "Look: [image_url]" in rendered


def test_template_helpers_and_variables(demo_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    template = (
        "{{ bos_token or '' }}{{ eos_token }}|{{ strftime_now('%Y') | length }}|"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|"
        "{% generation %}{{ flag }}{% endgeneration %}|{{ dict(a=1) | tojson }}"
    )
    d = _copy_checkpoint(demo_dir, tmp_path / "m", chat_template=template)
    ours, theirs = Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(str(d))
    msgs = [
        {"role": "user", "content": "<a> & é"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "y"},
    ]
    out = ours.apply_chat_template(msgs, flag="on")
    assert out == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, flag="on")
    assert '"<a> & é"' in out and out.endswith('|3|on|{"a": 1}')


def test_chat_template_files_and_named_templates(demo_dir: Path, tmp_path: Path):
    d = _copy_checkpoint(
        demo_dir,
        tmp_path / "m",
        chat_template=[{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}],
    )
    t = Tokenizer.from_pretrained(d)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "D"
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS) == "T"
    assert t.apply_chat_template([{"role": "user", "content": "x"}], chat_template="tool_use") == "T"
    assert t.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages[0].content }}!") == "x!"
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"
    assert (
        Tokenizer.from_pretrained(d, chat_template="O").apply_chat_template([{"role": "user", "content": "x"}]) == "O"
    )


def test_chat_template_errors(tok: Tokenizer, demo_dir: Path, tmp_path: Path):
    with pytest.raises(InvalidRequestError, match="role must be") as err:
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    assert err.value.param == "messages"
    for bad in (
        [],
        "hi",
        [{"content": "no role"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [1]}],
    ):
        with pytest.raises(InvalidRequestError):
            tok.apply_chat_template(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="syntax error") as err:
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    assert err.value.param == "chat_template"

    no_template = Tokenizer.from_pretrained(_copy_checkpoint(demo_dir, tmp_path / "none", chat_template=None))
    assert not no_template.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="syntax error"):
        Tokenizer.from_pretrained(_copy_checkpoint(demo_dir, tmp_path / "syntax", chat_template="{% if %}"))

    escape = "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}"
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=escape)
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% set ns = namespace(_x=1) %}")
    # The sandbox is immutable: a template cannot change the caller's messages.
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(messages, chat_template="{{ messages.append(1) }}")
    assert messages == [{"role": "user", "content": "x"}]


# -------------------------------------------------------------------------------- incremental detokenization


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        out.append(ids[i : i + n])
        i += n
    return out


def _run(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str | None, str]:
    pieces: list[str] = []
    for chunk in chunks:
        step = detok.step(chunk)
        pieces.append(step.text)
        if step.stop_str is not None:
            return pieces, step.stop_str, ""
    return pieces, None, detok.flush()


@HYPO
@given(text=TEXTS, seed=st.integers(0, 2**16))
def test_detokenizer_streams_text_without_broken_characters(tok: Tokenizer, text: str, seed: int):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt_token_ids=tok.encode("prompt 提示"))
    pieces, stop, tail = _run(detok, _chunks(ids, random.Random(seed)))
    assert stop is None
    assert "".join(pieces) + tail == text
    assert all("\ufffd" not in p for p in pieces)


@HYPO
@given(data=st.data(), skip=st.booleans())
def test_detokenizer_equals_whole_decode_for_any_ids(tok: Tokenizer, data: st.DataObject, skip: bool):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    rng = random.Random(data.draw(st.integers(0, 2**16)))
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    emitted, seen = "", []
    for chunk in _chunks(ids, rng):
        emitted += detok.step(chunk).text
        seen += chunk
        # Eager: only an unfinished character at the end (decoded alone as U+FFFD) may be held back.
        so_far = tok.decode(seen, skip_special_tokens=skip)
        assert so_far.startswith(emitted)
        assert set(so_far[len(emitted) :]) <= {"\ufffd"}
    assert emitted + detok.flush() == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_split_multibyte_characters(tok: Tokenizer):
    # Single-byte tokens of "你" (e4 bd a0) and "😀" (f0 9f 98 80): nothing shows until the character ends.
    byte_token: dict[int, int] = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if len(b) == 1 and i not in tok.all_special_ids:
            byte_token[b[0]] = i
    for char in ("你", "😀"):
        detok = IncrementalDetokenizer(tok, [])
        raw = char.encode()
        texts = [detok.step([byte_token[b]]).text for b in raw]
        assert texts == [""] * (len(raw) - 1) + [char]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.step([byte_token[0xE4], byte_token[0xBD]]).text == ""
    assert detok.flush() == "\ufffd"  # the sequence ended mid-character: as decode() renders it


def test_skip_special_tokens(tok: Tokenizer):
    ids = tok.encode("<|assistant|>Hi<|user|>")
    assert "".join(IncrementalDetokenizer(tok, []).step([i]).text for i in ids) == "Hi"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(detok.step([i]).text for i in ids) == "<|assistant|>Hi<|user|>"


STOP_TEXT = "The answer: 你好世界 😀 is final. END of story"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["END", "世界", "😀 is", "final. E", "y"])
def test_stop_strings_split_across_tokens(tok: Tokenizer, stop: str, include: bool):
    ids = tok.encode(STOP_TEXT)
    cut = STOP_TEXT.index(stop) + (len(stop) if include else 0)
    for seed in range(5):
        detok = IncrementalDetokenizer(tok, [], stop=[stop, "never"], include_stop_str_in_output=include)
        pieces, got, tail = _run(detok, _chunks(ids, random.Random(seed)))
        assert got == stop and detok.stop_str == stop
        assert "".join(pieces) + tail == STOP_TEXT[:cut]
        assert detok.step(tok.encode(" more")).text == "" and detok.flush() == ""


def test_stop_string_prefix_is_held_then_released(tok: Tokenizer):
    detok = IncrementalDetokenizer(tok, [], stop=["world peace"])
    out = [detok.step([i]).text for i in tok.encode("hello world")]
    assert "".join(out) == "hello "  # "world" might begin the stop string
    assert detok.flush() == "world"
    detok = IncrementalDetokenizer(tok, [], stop=["world peace"])
    out = [detok.step([i]).text for i in tok.encode("hello world war")]
    assert "".join(out) + detok.flush() == "hello world war"


@HYPO
@given(
    text=st.text(st.sampled_from(list("ab 你😀")), max_size=30),
    stops=st.lists(st.text(st.sampled_from(list("ab 你😀")), min_size=1, max_size=4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    include=st.booleans(),
)
def test_stop_strings_match_a_character_level_oracle(tok: Tokenizer, text: str, stops: list[str], seed: int, include):
    # Oracle: the stop string that ends first in the text (ties: the one that starts first).
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
    pieces, got, tail = _run(detok, _chunks(tok.encode(text), random.Random(seed)))
    if not found:
        assert got is None and "".join(pieces) + tail == text
        return
    end, start, s = min(found)
    assert got == s
    assert "".join(pieces) == text[: end if include else start]
    assert all("\ufffd" not in p for p in pieces)


# ----------------------------------------------------------------- offsets path (non byte-level tokenizers)


@pytest.fixture(scope="module")
def metaspace_tok() -> Tokenizer:
    """A Llama-style tokenizer (▁ for spaces, byte fallback for unseen characters), not byte-level."""
    trained = HFTokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator([line for line in demo_corpus().splitlines() if line.isascii()], trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(tok, special_tokens={"eos_token": "</s>"})


@pytest.mark.parametrize("continuation", [" world", " 你好 😀 done", " ok</s>", "ok 👍🏽 Ω"])
def test_offsets_path_streams_continuations(metaspace_tok: Tokenizer, continuation: str):
    t = metaspace_tok
    assert not t.is_byte_level
    prompt = t.encode("Hello there")
    ids = t.encode(continuation)
    ids = ids[1:] if t.id_to_token(ids[0]) == "▁" else ids
    expected = t.decode(prompt + ids)[len(t.decode(prompt)) :]
    for seed in range(4):
        detok = IncrementalDetokenizer(t, prompt)
        pieces, stop, tail = _run(detok, _chunks(ids, random.Random(seed)))
        assert "".join(pieces) + tail == expected
        assert all("\ufffd" not in p for p in pieces)
    detok = IncrementalDetokenizer(t, prompt, stop=["你好"])
    pieces, stop, _ = _run(detok, [[i] for i in ids])
    assert (stop is not None) == ("你好" in expected)
