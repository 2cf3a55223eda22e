"""OpenAI requests → internal GenerationRequests: sampling parameters, chat messages, completion prompts.

Only fields the client set override SamplingParams' defaults; everything ends in ``SamplingParams.validate``
so a bad value is a 400 naming the parameter before the engine sees the request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from openautoglm.protocol.errors import InvalidRequestError, UnsupportedMediaTypeError
from openautoglm.protocol.openai import (
    AudioPart,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImagePart,
    TextPart,
)
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.http.guided_convert import guided_spec, tool_settings

# Checks one image URL (a data: URI) against the media limits; raises 400/413/415. ``param`` names the part.
ImageCheck = Callable[[str, str], None]

_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt"})
_PASSTHROUGH = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest, *, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    if req.logit_bias:
        raise InvalidRequestError("logit_bias is not supported by Open-AutoGLM; leave it out", param="logit_bias")
    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs)
    for name in _PASSTHROUGH:
        value = getattr(req, name)
        if value is not None:
            setattr(params, name, value)
    if req.stop is not None:
        params.stop = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return params.validate()


def _metadata(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    return {"user": req.user} if req.user is not None else {}


# --- chat --------------------------------------------------------------------------------------------------


def chat_request(
    req: ChatCompletionRequest,
    request_id: str,
    *,
    model: str,
    modalities: frozenset[str],
    image_check: ImageCheck | None = None,
) -> GenerationRequest:
    """Build the engine request; 415 when a message carries a modality the model does not accept."""
    tools = tool_settings(req, guided_spec(req))
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise InvalidRequestError(f"top_logprobs must be >= 0, got {req.top_logprobs}", param="top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:
        sampling = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs)
    except InvalidRequestError as exc:
        if exc.param == "max_tokens" and req.max_completion_tokens is not None:
            exc.param = "max_completion_tokens"
            exc.message = exc.message.replace("max_tokens", "max_completion_tokens")
        raise
    messages = chat_messages(req.messages, model=model, modalities=modalities, image_check=image_check)
    template_kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & template_kwargs.keys())
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs must not set {', '.join(reserved)}; the server sets them",
            param="chat_template_kwargs",
        )
    return GenerationRequest(
        request_id=request_id,
        messages=messages,
        sampling=sampling,
        priority=req.priority or 0,
        model=model,
        chat_template_kwargs=template_kwargs,
        metadata=_metadata(req),
        guided=tools.guided,
        tools=tools.tools,
        tool_choice=req.tool_choice,
    )


def chat_messages(
    messages: list[ChatMessage],
    *,
    model: str,
    modalities: frozenset[str],
    image_check: ImageCheck | None = None,
) -> list[dict[str, Any]]:
    """OpenAI messages → the engine's message dicts; media parts are checked, text-only content joined."""
    return [_message(m, i, model, modalities, image_check) for i, m in enumerate(messages)]


def has_media(messages: list[ChatMessage]) -> bool:
    return any(isinstance(m.content, list) and any(not isinstance(p, TextPart) for p in m.content) for m in messages)


def _message(
    msg: ChatMessage, i: int, model: str, modalities: frozenset[str], image_check: ImageCheck | None
) -> dict[str, Any]:
    role = "system" if msg.role == "developer" else msg.role  # GLM chat templates know no developer role
    out: dict[str, Any] = {"role": role}
    if msg.content is None:
        if msg.role not in ("assistant", "tool"):
            raise InvalidRequestError(
                f"messages.{i}.content is required for role {msg.role!r}", param=f"messages.{i}.content"
            )
        out["content"] = ""
    elif isinstance(msg.content, str):
        out["content"] = msg.content
    else:
        out["content"] = _content_parts(msg, i, model, modalities, image_check)
    if msg.name is not None:
        out["name"] = msg.name
    if msg.tool_calls:
        out["tool_calls"] = msg.tool_calls
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    return out


def _content_parts(
    msg: ChatMessage, i: int, model: str, modalities: frozenset[str], image_check: ImageCheck | None
) -> str | list[dict[str, Any]]:
    """Text-only content becomes one string (joined by newlines); media parts are checked, then kept."""
    assert isinstance(msg.content, list)
    parts: list[dict[str, Any]] = []
    has_media = False
    for j, part in enumerate(msg.content):
        param = f"messages.{i}.content.{j}"
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
            continue
        has_media = True
        if isinstance(part, ImagePart):
            if image_check is not None:
                image_check(part.image_url.url, param)
            _require_modality("image", modalities, model, param)
        elif isinstance(part, AudioPart):
            _require_modality("audio", modalities, model, param)
        parts.append(part.model_dump(exclude_none=True))
    if not has_media:
        return "\n".join(p["text"] for p in parts)
    return parts


def _require_modality(modality: str, modalities: frozenset[str], model: str, param: str) -> None:
    if modality not in modalities:
        accepted = ", ".join(sorted(modalities))
        raise UnsupportedMediaTypeError(
            f"model {model!r} accepts only {accepted} input; {param} is {modality}",
            param=param,
            code="unsupported_modality",
        )


# --- completions -------------------------------------------------------------------------------------------


def completion_requests(req: CompletionRequest, request_id: str, *, model: str) -> list[GenerationRequest]:
    """One engine request per prompt; with several prompts their ids get ``-0``, ``-1``… suffixes."""
    if req.suffix is not None:
        raise InvalidRequestError("suffix is not supported by Open-AutoGLM; leave it out", param="suffix")
    n = req.n if req.n is not None else 1
    if req.best_of is not None and req.best_of != n:
        raise InvalidRequestError(f"best_of must equal n ({n}) or be left out, got {req.best_of}", param="best_of")
    if req.echo and req.logprobs is not None:
        raise InvalidRequestError(
            "echo together with logprobs needs prompt logprobs, which Open-AutoGLM does not compute",
            param="echo",
        )
    if req.logprobs is not None and req.logprobs < 0:
        raise InvalidRequestError(f"logprobs must be >= 0, got {req.logprobs}", param="logprobs")
    prompts = _prompts(req.prompt)
    sampling = sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs)
    guided = guided_spec(req)
    out = []
    for k, prompt in enumerate(prompts):
        rid = request_id if len(prompts) == 1 else f"{request_id}-{k}"
        gen = GenerationRequest(
            request_id=rid,
            sampling=_copy(sampling),
            priority=req.priority or 0,
            model=model,
            metadata=_metadata(req),
            guided=guided,
        )
        if isinstance(prompt, str):
            gen.prompt = prompt
        else:
            gen.prompt_token_ids = prompt
        gen.validate_prompt()
        out.append(gen)
    return out


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]  # one prompt given as token ids
    return prompt  # type: ignore[return-value]


def _copy(params: SamplingParams) -> SamplingParams:
    """Each engine request owns its SamplingParams (the engine may attach per-request state)."""
    return dataclasses.replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
