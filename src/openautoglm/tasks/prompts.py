"""Deterministic prompt builders for the task endpoints (classify, extract, summarize, translate).

Each builder turns a task specification into a ``TaskPlan``: chat messages (instructions derived from the labels
or the schema's field names and descriptions, optional few-shot examples), the guided-decoding constraint that
makes the answer's shape right whatever the model does, the sampling limits, and ``parse`` turning the answer
text into the structured result. The same specification always builds the same plan.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.guided import GuidedDecoding

TASKS = ("classify", "extract", "summarize", "translate")
MAX_LABELS = 256
# Bounds added to an extraction schema where it sets none, so every answer ends within the token budget; an
# answer within the bounds is still valid against the caller's schema.
DEFAULT_MAX_STRING = 200
DEFAULT_MAX_ITEMS = 16
STYLES = {
    "paragraph": "Write the summary as one short paragraph.",
    "bullets": "Write the summary as a few short bullet points, one per line, each starting with '- '.",
    "headline": "Write the summary as a single headline.",
}


@dataclass(frozen=True, slots=True)
class TaskPlan:
    task: str
    messages: list[dict[str, str]]
    guided: GuidedDecoding | None
    max_tokens: int | None  # None: the grammar bounds the answer
    parse: Callable[[str], dict[str, Any]]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _examples(
    examples: list[dict[str, Any]] | None, render: Callable[[dict[str, Any]], tuple[str, str]]
) -> list[dict[str, str]]:
    """Few-shot examples as user/assistant turns, in the order given."""
    out: list[dict[str, str]] = []
    for i, ex in enumerate(examples or []):
        if not isinstance(ex, dict) or not isinstance(ex.get("text"), str):
            raise InvalidRequestError(f"examples.{i} must be an object with a text string", param=f"examples.{i}")
        user, answer = render(ex)
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


def _text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("text must be a non-empty string", param="text")
    return text


# --- classify ----------------------------------------------------------------------------------------------


def classify(
    text: str,
    labels: list[str],
    *,
    multi_label: bool = False,
    descriptions: dict[str, str] | None = None,
    examples: list[dict[str, Any]] | None = None,
) -> TaskPlan:
    _text(text)
    if not labels or len(labels) > MAX_LABELS or not all(isinstance(x, str) and x.strip() for x in labels):
        raise InvalidRequestError(f"labels must be 1 to {MAX_LABELS} non-empty strings", param="labels")
    if len(set(labels)) != len(labels):
        raise InvalidRequestError("labels must be distinct", param="labels")
    descriptions = descriptions or {}
    unknown = sorted(set(descriptions) - set(labels))
    if unknown:
        raise InvalidRequestError(f"descriptions names labels that are not in labels: {unknown}", param="descriptions")
    lines = [f"- {label}" + (f": {descriptions[label]}" if label in descriptions else "") for label in labels]
    if multi_label:
        rule = "Answer with a JSON array of every label that applies (at least one), using the labels exactly."
    else:
        rule = "Answer with exactly one label, written exactly as listed, and nothing else."
    system = "You are a text classifier. The labels are:\n" + "\n".join(lines) + "\n" + rule

    def answer(ex: dict[str, Any]) -> tuple[str, str]:
        given = ex.get("labels") if multi_label else ex.get("label")
        many_ok = isinstance(given, list) and bool(given) and all(g in labels for g in given)
        ok = many_ok if multi_label else given in labels
        if not ok:
            raise InvalidRequestError(
                f"an example's {'labels' if multi_label else 'label'} must be among labels", param="examples"
            )
        return f"Text:\n{ex['text']}", _json(given) if multi_label else str(given)

    messages = [
        {"role": "system", "content": system},
        *_examples(examples, answer),
        {"role": "user", "content": f"Text:\n{text}"},
    ]
    if multi_label:
        schema = {"type": "array", "items": {"enum": list(labels)}, "minItems": 1, "maxItems": len(labels)}
        guided = GuidedDecoding(json_schema=schema, param="labels")

        def parse_multi(out: str) -> dict[str, Any]:
            return {"labels": list(dict.fromkeys(json.loads(out)))}

        return TaskPlan("classify", messages, guided, None, parse_multi)
    guided = GuidedDecoding(choice=tuple(labels), param="labels")
    return TaskPlan("classify", messages, guided, None, lambda out: {"label": out})


# --- extract -----------------------------------------------------------------------------------------------


def bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with a maxLength on every string and a maxItems on every array that has none."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            types = node.get("type")
            types = types if isinstance(types, list) else [types]
            if "string" in types and "maxLength" not in node and "enum" not in node and "const" not in node:
                node["maxLength"] = max(DEFAULT_MAX_STRING, node.get("minLength", 0))
            if "array" in types and "maxItems" not in node:
                node["maxItems"] = max(DEFAULT_MAX_ITEMS, node.get("minItems", 0))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


def _field_lines(schema: dict[str, Any]) -> list[str]:
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = set(schema.get("required") or [])
    lines = []
    for name, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        kind = prop.get("type", "value")
        kind = "/".join(kind) if isinstance(kind, list) else kind
        need = "required" if name in required else "optional"
        desc = f": {prop['description']}" if isinstance(prop.get("description"), str) else ""
        lines.append(f"- {name} ({kind}, {need}){desc}")
    return lines


def extract(text: str, schema: dict[str, Any], *, examples: list[dict[str, Any]] | None = None) -> TaskPlan:
    _text(text)
    if not isinstance(schema, dict) or not schema:
        raise InvalidRequestError("schema must be a non-empty JSON Schema object", param="schema")
    fields = _field_lines(schema)
    system = (
        "You extract structured data from text. Answer with one JSON value valid against this JSON Schema, and "
        "nothing else. Use null or leave out optional fields the text does not give.\n"
        + (("Fields:\n" + "\n".join(fields) + "\n") if fields else "")
        + "Schema:\n"
        + _json(schema)
    )

    def answer(ex: dict[str, Any]) -> tuple[str, str]:
        if "data" not in ex:
            raise InvalidRequestError("an extraction example needs data (the expected value)", param="examples")
        return f"Text:\n{ex['text']}", _json(ex["data"])

    messages = [
        {"role": "system", "content": system},
        *_examples(examples, answer),
        {"role": "user", "content": f"Text:\n{text}"},
    ]
    guided = GuidedDecoding(json_schema=bounded_schema(schema), strict=True, param="schema")
    return TaskPlan("extract", messages, guided, None, lambda out: {"data": json.loads(out, parse_int=_json_int)})


def _json_int(text: str) -> int | float:
    """JSON integers beyond 64 bits become floats (JSON has one number type; responses are encoded in 64 bits)."""
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(value)


# --- summarize and translate -------------------------------------------------------------------------------


def summarize(
    text: str, *, max_words: int = 60, style: str = "paragraph", examples: list[dict[str, Any]] | None = None
) -> TaskPlan:
    _text(text)
    if style not in STYLES:
        raise InvalidRequestError(f"style must be one of {', '.join(STYLES)}, got {style!r}", param="style")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or not 1 <= max_words <= 2000:
        raise InvalidRequestError(f"max_words must be an integer in [1, 2000], got {max_words!r}", param="max_words")
    system = f"You summarize text. Use at most {max_words} words. {STYLES[style]} Answer with the summary only."

    def answer(ex: dict[str, Any]) -> tuple[str, str]:
        if not isinstance(ex.get("summary"), str):
            raise InvalidRequestError("a summarization example needs a summary string", param="examples")
        return f"Text:\n{ex['text']}", ex["summary"]

    messages = [
        {"role": "system", "content": system},
        *_examples(examples, answer),
        {"role": "user", "content": f"Text:\n{text}"},
    ]
    # At most about two tokens a word; a non-empty line of text (no control characters but newlines).
    guided = GuidedDecoding(regex=r"[^\x00-\x09\x0b-\x1f\s][^\x00-\x09\x0b-\x1f]*", param="text")
    return TaskPlan("summarize", messages, guided, 2 * max_words + 8, lambda out: {"summary": out.strip()})


def translate(
    text: str, target_language: str, *, source_language: str | None = None, examples: list[dict[str, Any]] | None = None
) -> TaskPlan:
    _text(text)
    if not isinstance(target_language, str) or not target_language.strip():
        raise InvalidRequestError("target_language must be a non-empty string", param="target_language")
    source = f" from {source_language}" if source_language else ""
    system = (
        f"You translate text{source} into {target_language}. "
        "Answer with the translation only, keeping the meaning and tone."
    )

    def answer(ex: dict[str, Any]) -> tuple[str, str]:
        if not isinstance(ex.get("translation"), str):
            raise InvalidRequestError("a translation example needs a translation string", param="examples")
        return f"Text:\n{ex['text']}", ex["translation"]

    messages = [
        {"role": "system", "content": system},
        *_examples(examples, answer),
        {"role": "user", "content": f"Text:\n{text}"},
    ]
    guided = GuidedDecoding(regex=r"[^\x00-\x09\x0b-\x1f\s][^\x00-\x09\x0b-\x1f]*", param="text")
    budget = min(4096, 3 * len(text) + 16)
    return TaskPlan(
        "translate",
        messages,
        guided,
        budget,
        lambda out: {"translation": out.strip(), "target_language": target_language},
    )
