"""The tokenizer of a checkpoint: ``tokenizer.json`` through the ``tokenizers`` library, plus what the Hugging
Face files around it say (special tokens, chat template, GLM's eos list), and chat template rendering.

Chat templates are untrusted code from the checkpoint: they run in jinja2's immutable sandbox with the helpers
Hugging Face templates expect (``raise_exception``, ``tojson``, ``strftime_now``, loop controls,
``generation`` blocks), and render exactly what transformers' ``apply_chat_template(tokenize=False)`` renders.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from openautoglm.engine.detokenizer import DetokenizerStep, IncrementalDetokenizer
from openautoglm.protocol.errors import ConfigError, InvalidRequestError, ModelLoadError

__all__ = ["DetokenizerStep", "IncrementalDetokenizer", "Tokenizer"]

# The named special tokens Hugging Face passes to chat templates (bos_token, eos_token, …).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte → the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_OF_CHAR = _bytes_to_unicode()


class Tokenizer:
    """A checkpoint's tokenizer. Build it with ``Tokenizer.from_pretrained(checkpoint_dir)``.

    Thread-safe for concurrent use (the engine thread detokenizes while the server encodes).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        name_or_path: str = "",
        special_tokens: Mapping[str, str] | None = None,
        extra_special_tokens: Iterable[str] = (),
        chat_templates: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        # A tokenizer.json may carry truncation and padding settings; the engine wants neither.
        backend.no_truncation()
        backend.no_padding()
        self._tok = backend
        self.name_or_path = name_or_path
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        # The ids the tokenizers library skips when decoding with skip_special_tokens.
        self.skipped_special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        named = [*self.special_tokens.values(), *extra_special_tokens]
        named_ids = {i for i in (backend.token_to_id(t) for t in named) if i is not None}
        self.all_special_ids: frozenset[int] = self.skipped_special_ids | named_ids
        eos = frozenset(int(i) for i in eos_token_ids)
        if not eos and (eos_id := self.token_to_id(self.special_tokens.get("eos_token"))) is not None:
            eos = frozenset({eos_id})
        self.eos_token_ids: frozenset[int] = eos
        self.pad_token_id: int | None = self.token_to_id(self.special_tokens.get("pad_token"))
        # Byte-level BPE (GLM, GPT-2 style): a token is a byte string and decoding concatenates bytes, which
        # lets the detokenizer work on bytes. Other decoders go through the slower offsets path.
        self.is_byte_level: bool = isinstance(backend.decoder, decoders.ByteLevel)
        self._token_bytes: dict[int, bytes] = {}
        self._chat = _ChatTemplates(chat_templates or {}, name_or_path)

    # ----------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, *, chat_template: str | None = None) -> Tokenizer:
        """Load the tokenizer of the checkpoint directory ``path`` (hub ids are resolved by the model loader).

        ``chat_template``, when given, replaces the checkpoint's chat template.
        """
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ModelLoadError(
                f"tokenizer path {root} is not a directory; give the checkpoint directory with tokenizer.json"
            )
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(
                f"{tok_file} not found: Open-AutoGLM needs a fast tokenizer (tokenizer.json); the Hugging "
                "Face format GLM checkpoints (for example THUDM/glm-4-9b-chat-hf, THUDM/GLM-4-9B-0414) "
                "include one"
            )
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception for any parse error
            raise ModelLoadError(f"{tok_file} cannot be parsed as a tokenizer: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        templates = _read_chat_templates(root, config)
        if chat_template is not None:
            templates = {"default": chat_template}
        return cls(
            backend,
            name_or_path=str(root),
            special_tokens=_named_special_tokens(config),
            extra_special_tokens=_extra_special_tokens(config),
            chat_templates=templates,
            eos_token_ids=_eos_token_ids(root),
        )

    # ------------------------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}", param="prompt")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` contributes to decoded text (special tokens included; unknown ids: empty)."""
        b = self._token_bytes.get(i)
        if b is None:
            b = self._compute_token_bytes(i)
            self._token_bytes[i] = b
        return b

    def _compute_token_bytes(self, i: int) -> bytes:
        token = self._tok.id_to_token(i)
        if token is None:
            return b""
        if not self.is_byte_level:
            return self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
        # As tokenizers' ByteLevel decoder does: map each character back to its byte, unless some character is
        # not in the byte alphabet (an added token such as "<|用户|>"), then the token's own UTF-8 bytes.
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    def token_text(self, i: int) -> str:
        """The text of one token for logprobs. A byte-level token that is not whole UTF-8 (part of a
        multi-byte character) is written as OpenAI does: ``bytes:`` then the bytes escaped, for example
        ``bytes:\\xe4\\xbd``."""
        b = self.token_bytes(int(i))
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + b.decode("utf-8", errors="backslashreplace")

    # ----------------------------------------------------------------------------------------- chat template

    @property
    def chat_template(self) -> str | None:
        """The default chat template text, or None when the checkpoint has none."""
        return self._chat.templates.get("default")

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat.templates)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI format; content a string or a list of content parts) with the chat
        template.

        ``kwargs`` are template variables (for example ``enable_thinking``); ``chat_template`` in them picks a
        named template of the checkpoint or gives a template's text; ``documents`` is passed as HF does.
        Raises ``InvalidRequestError`` for malformed messages, when the template rejects them or when the
        model has no chat template.
        """
        override = kwargs.pop("chat_template", None)
        documents = kwargs.pop("documents", None)
        template, list_content = self._chat.select(override, tools)
        convo = _prepare_messages(messages, list_content=list_content)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
            raise InvalidRequestError("tools must be a list of objects (JSON schemas)", param="tools")
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return template.render(
                messages=convo,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateRaised as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InvalidRequestError(
                f"the chat template failed to render these messages: {type(exc).__name__}: {exc}",
                param="messages",
            ) from exc

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


# -------------------------------------------------------------------------------------- checkpoint files


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    named = {k: _token_content(config.get(k)) for k in NAMED_SPECIAL_TOKENS}
    return {k: v for k, v in named.items() if v is not None}


def _extra_special_tokens(config: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        items = value.values() if isinstance(value, Mapping) else value
        out.extend(t for t in (_token_content(v) for v in items) if t is not None)
    return out


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _eos_token_ids(root: Path) -> list[int]:
    """GLM lists several eos ids (end of text, next user turn, tool result); generation_config.json first."""
    for name in ("generation_config.json", "config.json"):
        ids = _as_id_list(_read_json(root / name).get("eos_token_id"))
        if ids:
            return ids
    return []


def _read_chat_templates(root: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates as transformers finds them: chat_template.jinja, chat_template.json, then
    tokenizer_config.json ("chat_template": a string or a list of {name, template});
    additional_chat_templates/*.jinja."""
    templates: dict[str, str] = {}
    raw: Any = config.get("chat_template")
    if (root / "chat_template.json").is_file():
        raw = _read_json(root / "chat_template.json").get("chat_template", raw)
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, Mapping) and isinstance(item.get("template"), str):
                templates[str(item.get("name", "default"))] = item["template"]
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    return templates


# ---------------------------------------------------------------------------------------- chat templates


class _TemplateRaised(jinja2.TemplateError):
    """``raise_exception(...)`` called by a chat template: the messages are not what the template accepts."""


class _GenerationBlock(Extension):
    """``{% generation %}…{% endgeneration %}`` (marks assistant text for training masks): its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares tags as a class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON, as transformers renders.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore names so templates cannot reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _template_dict
    env.globals["namespace"] = _Namespace
    return env


def _iterates_content(ast: jinja2.nodes.Template) -> bool:
    """Whether a template loops over message content (``for part in message.content``): it takes content
    parts. Other templates get content parts flattened to text."""
    for loop in ast.find_all(jinja2.nodes.For):
        node = loop.iter
        while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
            node = node.node
        if isinstance(node, jinja2.nodes.Getattr) and node.attr == "content":
            return True
        is_const = isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const)
        if is_const and node.arg.value == "content":
            return True
        if isinstance(node, jinja2.nodes.Name) and node.name == "content":
            return True
    return False


class _ChatTemplates:
    """A checkpoint's chat templates, compiled once; ``select`` picks one as transformers does."""

    def __init__(self, templates: Mapping[str, str], source: str) -> None:
        self.templates = dict(templates)
        self._env = _make_environment()
        self._compiled: dict[str, tuple[jinja2.Template, bool]] = {}
        for name, text in self.templates.items():
            try:
                self._compiled[name] = self._compile(text)
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(
                    f"chat template {name!r} of {source or 'the tokenizer'} has a syntax error at line "
                    f"{exc.lineno}: {exc.message}"
                ) from exc
        self._compile_override = lru_cache(maxsize=16)(self._compile)

    def _compile(self, text: str) -> tuple[jinja2.Template, bool]:
        return self._env.from_string(text), _iterates_content(self._env.parse(text))

    def select(self, override: Any, tools: list[Any] | None) -> tuple[jinja2.Template, bool]:
        if override is not None:
            if not isinstance(override, str) or not override:
                raise InvalidRequestError("chat_template must be a template name or text", param="chat_template")
            if override in self._compiled:
                return self._compiled[override]
            try:
                return self._compile_override(override)
            except jinja2.TemplateSyntaxError as exc:
                raise InvalidRequestError(
                    f"chat_template has a syntax error at line {exc.lineno}: {exc.message}",
                    param="chat_template",
                ) from exc
        if not self._compiled:
            raise InvalidRequestError(
                "this model has no chat template, so it cannot take chat messages; send a plain prompt "
                "(completions) instead, or configure a chat template",
                param="messages",
            )
        if tools and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        if len(self._compiled) == 1:
            return next(iter(self._compiled.values()))
        raise InvalidRequestError(
            f"this model has several chat templates and none is the default; pick one of "
            f"{sorted(self._compiled)} with chat_template",
            param="chat_template",
        )


# -------------------------------------------------------------------------------------------- messages


def _plain(value: Any) -> Any:
    """A fresh copy built from plain JSON types only, so templates never see (or touch) caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any, *, list_content: bool) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of chat messages", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string", param="messages")
        # As transformers does: keys set to None (OpenAI's content=None, tool_calls=None) are left out.
        msg = {k: _plain(v) for k, v in message.items() if v is not None}
        if "content" in msg:
            msg["content"] = _content(msg["content"], i, list_content=list_content)
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def _content(content: Any, i: int, *, list_content: bool) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{i}].content must be a string or a list of content parts", param="messages"
        )
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InvalidRequestError(f"messages[{i}].content[{j}] must be an object with a type", param="messages")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{i}].content[{j}].text must be a string", param="messages")
    if list_content:
        return content
    # A text-only template gets the text: text parts joined by newlines; other parts it cannot show.
    for j, part in enumerate(content):
        if part["type"] != "text":
            raise InvalidRequestError(
                f"messages[{i}].content[{j}] has type {part['type']!r}, but this model's chat template takes text only",
                param="messages",
            )
    return "\n".join(part["text"] for part in content)
