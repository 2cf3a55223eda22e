"""Internal GenerationRequest → an OpenAI chat/completions or completions request body.

Standard OpenAI fields are always sent; Open-AutoGLM's extensions (``top_k``, ``min_p``, … with vLLM's names,
which vLLM, SGLang and Open-AutoGLM servers accept) only when the request sets them away from their defaults,
so a plain OpenAI endpoint sees them only when the client asked for something it cannot honour silently.
GLM's ``observation`` role (a tool's result) becomes OpenAI's ``tool`` role.
"""

from __future__ import annotations

from typing import Any

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.request import ChatMessage, GenerationRequest
from openautoglm.protocol.sampling import SamplingParams

CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TOOL_ROLES = frozenset({"tool", "observation"})
_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id")
_DEFAULTS = SamplingParams()
_EXTENSIONS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def openai_request(request: GenerationRequest, *, model: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """``(path relative to the base URL, JSON body)`` for ``request`` sent to a backend that calls it ``model``."""
    request.validate_prompt()
    chat = request.messages is not None
    body: dict[str, Any] = {"model": model}
    if chat:
        body["messages"] = [openai_message(m, i) for i, m in enumerate(request.messages or [])]
    else:
        body["prompt"] = request.prompt if request.prompt is not None else list(request.prompt_token_ids or [])
    body.update(sampling_fields(request.sampling, chat=chat))
    if request.priority:
        body["priority"] = request.priority
    if chat and request.chat_template_kwargs:
        body["chat_template_kwargs"] = dict(request.chat_template_kwargs)
    body.update(structured_fields(request, chat=chat))
    user = request.metadata.get("user")
    if isinstance(user, str):
        body["user"] = user
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return (CHAT_PATH if chat else COMPLETIONS_PATH), body


def openai_message(msg: ChatMessage, index: int) -> dict[str, Any]:
    role = msg.get("role")
    if role in _TOOL_ROLES:
        out: dict[str, Any] = {"role": "tool"}
    elif role in _ROLES:
        out = {"role": _ROLES[role]}
    else:
        allowed = sorted({*_ROLES, *_TOOL_ROLES})
        raise InvalidRequestError(
            f"messages.{index}.role must be one of {allowed}, got {role!r}", param=f"messages.{index}.role"
        )
    content = msg.get("content")
    out["content"] = "" if content is None else content
    for key in _MESSAGE_FIELDS:
        if msg.get(key) is not None:
            out[key] = msg[key]
    return out


def sampling_fields(params: SamplingParams, *, chat: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.max_tokens is not None:
        out["max_tokens"] = params.max_tokens
    if params.presence_penalty:
        out["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        out["frequency_penalty"] = params.frequency_penalty
    if params.seed is not None:
        out["seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    if params.logprobs is not None:
        if chat:
            out["logprobs"] = True
            out["top_logprobs"] = params.logprobs
        else:
            out["logprobs"] = params.logprobs
    for name in _EXTENSIONS:
        value = getattr(params, name)
        if value != getattr(_DEFAULTS, name):
            out[name] = list(value) if isinstance(value, list) else value
    return out


def structured_fields(request: GenerationRequest, *, chat: bool) -> dict[str, Any]:
    """Tools and output constraints as the client gave them: the backend enforces them itself. A forced tool
    call travels as ``tool_choice``, not as the grammar the local engine would build for it."""
    out: dict[str, Any] = {}
    if chat and request.tools is not None:
        out["tools"] = request.tools
    if chat and request.tool_choice is not None:
        out["tool_choice"] = request.tool_choice
    g = request.guided
    if g is None or g.tool_call is not None:
        return out
    if g.json_object or (g.json_schema is not None and g.param == "response_format"):
        if not chat:
            out["guided_json"] = g.json_schema if g.json_schema is not None else {"type": "object"}
        elif g.json_object:
            out["response_format"] = {"type": "json_object"}
        else:
            schema = {"name": "response", "schema": g.json_schema, "strict": g.strict}
            out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif g.json_schema is not None:
        out["guided_json"] = g.json_schema
    elif g.choice is not None:
        out["guided_choice"] = list(g.choice)
    elif g.regex is not None:
        out["guided_regex"] = g.regex
    elif g.grammar is not None:
        out["guided_grammar"] = g.grammar
    return out
