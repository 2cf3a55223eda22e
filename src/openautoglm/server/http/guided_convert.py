"""OpenAI structured-output and tool fields → the internal ``GuidedDecoding`` and tool settings.

``response_format`` (``json_object``, ``json_schema``) and the extensions ``guided_json``, ``guided_choice``,
``guided_regex``, ``guided_grammar`` (vLLM's names) pick at most one constraint. ``tool_choice`` ``required`` or a
named function is enforced the same way: a grammar for GLM's tool-call text over the allowed functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.guided import GuidedDecoding
from openautoglm.protocol.openai import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """What a chat request asks of tools: the definitions to render, the constraint, whether to parse calls."""

    tools: list[dict[str, Any]] | None
    functions: dict[str, dict[str, Any]]  # name → {"name", "parameters", …}
    guided: GuidedDecoding | None
    parse: bool  # look for a tool call in the output
    forced: bool  # the output is a tool call (required or named)


def guided_spec(req: ChatCompletionRequest | CompletionRequest) -> GuidedDecoding | None:
    """The constraint the request asks for, or None; 400 naming the field when it asks for two."""
    found: list[GuidedDecoding] = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type == "json_object":
        found.append(GuidedDecoding(json_object=True, param="response_format"))
    elif rf is not None and rf.type == "json_schema":
        found.append(_response_format_schema(rf.json_schema, getattr(rf, "strict", None)))
    if req.guided_json is not None:
        schema = req.guided_json
        if not isinstance(schema, dict):
            raise InvalidRequestError("guided_json must be a JSON Schema object", param="guided_json")
        found.append(GuidedDecoding(json_schema=schema, param="guided_json"))
    if req.guided_choice is not None:
        found.append(GuidedDecoding(choice=tuple(req.guided_choice), param="guided_choice"))
    if req.guided_regex is not None:
        found.append(GuidedDecoding(regex=req.guided_regex, param="guided_regex"))
    if req.guided_grammar is not None:
        found.append(GuidedDecoding(grammar=req.guided_grammar, param="guided_grammar"))
    if len(found) > 1:
        names = ", ".join(g.param for g in found)
        raise InvalidRequestError(
            f"give at most one of {names}; they are alternative constraints", param=found[1].param
        )
    return found[0].validate() if found else None


def _response_format_schema(body: dict[str, Any] | None, outer_strict: bool | None) -> GuidedDecoding:
    """OpenAI: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``; a bare schema in
    ``json_schema`` is accepted too."""
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "response_format.json_schema is required for type json_schema: {'name': ..., 'schema': {...}}",
            param="response_format.json_schema",
        )
    schema = body.get("schema", body if "name" not in body else None)
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON Schema object", param="response_format.json_schema"
        )
    strict = body.get("strict", outer_strict)
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError("response_format.json_schema.strict must be a boolean", param="response_format")
    return GuidedDecoding(
        json_schema=schema, strict=bool(strict) if strict is not None else False, param="response_format"
    )


def tool_settings(req: ChatCompletionRequest, guided: GuidedDecoding | None) -> ToolSettings:
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return ToolSettings(None, {}, guided, parse=False, forced=False)
    functions = _functions(req.tools)
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if choice == "none":
        return ToolSettings(None, functions, guided, parse=False, forced=False)
    if choice == "auto":
        return ToolSettings(req.tools, functions, guided, parse=True, forced=False)
    if choice == "required":
        allowed = list(functions.values())
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise InvalidRequestError(
                f"tool_choice names function {name!r}, which is not among tools ({', '.join(functions)})",
                param="tool_choice",
            )
        allowed = [functions[name]]
    else:
        raise InvalidRequestError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if guided is not None:
        raise InvalidRequestError(
            f"{guided.param} cannot be combined with tool_choice {choice!r}: the output is a tool call",
            param="tool_choice",
        )
    spec = GuidedDecoding(
        tool_call=tuple({"name": f["name"], "parameters": f.get("parameters") or {}} for f in allowed), param="tools"
    ).validate()
    return ToolSettings(req.tools, functions, spec, parse=True, forced=True)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f"tools.{i} must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"tools.{i}.function.name must be a non-empty string", param="tools")
        if "\n" in fn["name"]:
            raise InvalidRequestError(f"tools.{i}.function.name must not contain a newline", param="tools")
        if fn["name"] in out:
            raise InvalidRequestError(f"tools.{i}.function.name {fn['name']!r} is given twice", param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"tools.{i}.function.parameters must be a JSON Schema object", param="tools")
        out[fn["name"]] = fn
    return out
