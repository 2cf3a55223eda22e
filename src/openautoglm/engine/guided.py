"""Guided decoding in the local engine, with xgrammar.

``GuidedCompiler`` turns a ``GuidedDecoding`` into an xgrammar ``CompiledGrammar``. It runs where requests are
validated (the input processor, on the caller's thread), never in the step loop, and caches by the spec's hash.
``GrammarProcessor`` is the per-sequence logits processor the sampler calls: it feeds the grammar matcher the
tokens appended since its last call, then masks every token the grammar does not allow next. When the grammar
is complete only the stop (EOS) tokens remain allowed, so the sequence ends there.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from openautoglm.engine.tokenizer import Tokenizer
from openautoglm.protocol.errors import EngineError, InvalidRequestError
from openautoglm.protocol.guided import GuidedDecoding

# Tool-call text: the function name on the first line, the arguments as JSON after it (GLM-4's format).
TOOL_NAME_SEPARATOR = "\n"


_JSON_KINDS = frozenset({"json_object", "json_schema", "tool_call"})
# Control characters JSON forbids unescaped in strings, which xgrammar's JSON grammar lets through; "\n" stays
# (the tool-call separator; xgrammar already keeps it out of JSON strings).
_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f]")


def tokenizer_info(
    tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int], *, json_only: bool = False
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: each token as the bytes it decodes to. Special tokens and ids past
    the tokenizer (a larger LM head) get no bytes, so no grammar ever allows them; with ``json_only``, neither
    do tokens holding control characters (compact JSON never needs them)."""
    special = tokenizer.all_special_ids
    vocab = [b"" if i in special or i >= tokenizer.vocab_size else tokenizer.token_bytes(i) for i in range(vocab_size)]
    if json_only:
        vocab = [b"" if _CONTROL.search(b) else b for b in vocab]
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_token_ids)


@dataclass(slots=True)
class GuidedStats:
    compiles: int = 0
    cache_hits: int = 0
    compile_seconds: float = 0.0


class GuidedCompiler:
    """Compiles and caches grammars for one vocabulary. Thread-safe."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int], *, cache_size: int = 256
    ) -> None:
        if not stop_token_ids:
            raise EngineError("guided decoding needs at least one EOS token id to end a completed grammar")
        stops = sorted(stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(
            tokenizer_info(tokenizer, vocab_size, stops), max_threads=1, cache_enabled=False
        )
        self._json_compiler = xgr.GrammarCompiler(
            tokenizer_info(tokenizer, vocab_size, stops, json_only=True), max_threads=1, cache_enabled=False
        )
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.stats = GuidedStats()

    def compile(self, spec: GuidedDecoding) -> xgr.CompiledGrammar:
        spec.validate()
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return hit
        start = time.perf_counter()
        compiler = self._json_compiler if spec.kind in _JSON_KINDS else self._compiler
        compiled = compiler.compile_grammar(build_grammar(spec))
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += elapsed
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def processor_factory(self, spec: GuidedDecoding) -> ProcessorFactory:
        return ProcessorFactory(self.compile(spec))


def build_grammar(spec: GuidedDecoding) -> xgr.Grammar:
    """The xgrammar Grammar of a spec; a bad schema, regex or grammar is a 400 naming the part."""
    kind = spec.kind
    try:
        if kind == "json_object":
            return _json_schema_grammar({"type": "object"}, strict=False)
        if kind == "json_schema":
            assert spec.json_schema is not None
            return _json_schema_grammar(spec.json_schema, strict=spec.strict)
        if kind == "choice":
            assert spec.choice is not None
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alts}")
        if kind == "regex":
            assert spec.regex is not None
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "grammar":
            assert spec.grammar is not None
            return xgr.Grammar.from_ebnf(spec.grammar)
        assert spec.tool_call is not None
        return tool_call_grammar(spec.tool_call)
    except InvalidRequestError:
        raise
    except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError) as exc:
        what = {"json_schema": "json_schema", "regex": "guided_regex", "grammar": "guided_grammar"}.get(kind, kind)
        raise InvalidRequestError(
            f"{what} cannot be compiled into a grammar: {_first_line(exc)}", param=spec.param
        ) from exc


def _json_schema_grammar(schema: dict[str, Any], *, strict: bool) -> xgr.Grammar:
    # Compact JSON: free whitespace would let a model pad its answer without end.
    return xgr.Grammar.from_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=strict
    )


def tool_call_grammar(functions: tuple[dict[str, Any], ...]) -> xgr.Grammar:
    """One tool call in GLM's format: a function's name, a newline, arguments valid for its parameters."""
    alts = []
    for i, fn in enumerate(functions):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        try:
            args = _json_schema_grammar(params, strict=True)
        except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError) as exc:
            raise InvalidRequestError(
                f"tools.{i}.function.parameters cannot be compiled into a grammar: {_first_line(exc)}",
                param="tools",
            ) from exc
        name = json.dumps(fn["name"] + TOOL_NAME_SEPARATOR, ensure_ascii=False)
        alts.append(xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {name}"), args))
    return alts[0] if len(alts) == 1 else xgr.Grammar.union(*alts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ProcessorFactory:
    """Makes one ``GrammarProcessor`` per sequence from a compiled grammar. Picklable (the grammar travels as
    its serialized JSON), so it can cross to an engine in another process."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.compiled = compiled

    def __call__(self) -> GrammarProcessor:
        return GrammarProcessor(self.compiled)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_factory, (self.compiled.serialize_json(), self.compiled.tokenizer_info.serialize_json()))


def _restore_factory(grammar_json: str, info_json: str) -> ProcessorFactory:
    info = _info_from_json(info_json)
    return ProcessorFactory(xgr.CompiledGrammar.deserialize_json(grammar_json, info))


_INFOS: dict[int, xgr.TokenizerInfo] = {}


def _info_from_json(info_json: str) -> xgr.TokenizerInfo:
    key = hash(info_json)
    info = _INFOS.get(key)
    if info is None:
        info = _INFOS[key] = xgr.TokenizerInfo.deserialize_json(info_json)
    return info


class GrammarProcessor:
    """The logits processor of one sequence. Stateful: it accepts into its matcher the output tokens appended
    since its last call (outputs only grow, also across preemption and recompute), so calling it again for
    the same step (the sampler's row-by-row retry) changes nothing."""

    __slots__ = ("_bitmask", "_matcher", "_num_accepted", "_vocab_size")

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = compiled.tokenizer_info.vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)
        self._num_accepted = 0

    @property
    def is_completed(self) -> bool:
        return self._matcher.is_completed()

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.advance(output_token_ids)
        self._matcher.fill_next_token_bitmask(self._bitmask)
        mask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), mask, vocab_size=self._vocab_size)
        return logits

    def advance(self, output_token_ids: list[int]) -> None:
        if len(output_token_ids) < self._num_accepted:
            raise EngineError(
                f"guided decoding saw the output shrink from {self._num_accepted} to {len(output_token_ids)} tokens"
            )
        for token in output_token_ids[self._num_accepted :]:
            if not self._matcher.accept_token(token):
                raise EngineError(f"guided decoding: token {token} is not allowed by the grammar at this point")
            self._num_accepted += 1
