"""``POST /v1/infer``: Open-AutoGLM's native multimodal envelope.

Checks run in the order that lets every error name its real cause: the envelope's shape (400), unknown
modalities (415), each media input — base64 (400), format against the bytes (415), size and pixels (413) — and
only then the modalities the model accepts (415 naming them). Text inputs become a prompt, or chat messages
when any input carries ``metadata.role``. Errors are raised as ``AutoGLMError`` subclasses; the app maps them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from openautoglm.config.media import MediaConfig
from openautoglm.protocol.errors import (
    AutoGLMError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
)
from openautoglm.protocol.multimodal import (
    InferOutput,
    InferRequest,
    InferResponse,
    InferStreamChunk,
    InferUsage,
)
from openautoglm.protocol.outputs import CompletedRequest, FinishReason, RequestOutput, Usage
from openautoglm.protocol.request import ChatMessage, GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.http.media import (
    ValidatedMedia,
    check_known_modalities,
    check_modalities,
    validate_media_input,
)

_Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class _EnvelopeRoute(APIRoute):
    """Schema errors of the envelope become ``InvalidRequestError`` (400), never FastAPI's 422."""

    def get_route_handler(self) -> _Handler:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise _invalid_envelope(exc) from exc

        return handle


def _invalid_envelope(exc: RequestValidationError) -> InvalidRequestError:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    where = f"{param}: " if param else ""
    return InvalidRequestError(
        f"invalid /v1/infer envelope: {where}{err.get('msg', 'invalid value')}", param=param
    )


router = APIRouter(route_class=_EnvelopeRoute)


@router.post(
    "/v1/infer",
    response_model=InferResponse,
    summary="Run the native multimodal envelope",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "With stream=true: InferStreamChunk events",
        },
        400: {"description": "Malformed envelope, parameters or base64"},
        404: {"description": "Model not served here"},
        413: {"description": "Media over the configured byte or pixel limit"},
        415: {"description": "Unknown or not accepted modality, or a format that does not match the bytes"},
    },
)
async def infer(envelope: InferRequest, request: Request) -> Any:
    engine = request.app.state.engine
    if envelope.model is not None and envelope.model != engine.model_name:
        raise ModelNotFoundError(
            f"model {envelope.model!r} is not served here; this server runs {engine.model_name!r}"
        )
    for i, item in enumerate(envelope.inputs):
        check_known_modalities([item.modality], param=f"inputs[{i}].modality")
    media: dict[int, ValidatedMedia] = {}
    if any(item.modality != "text" for item in envelope.inputs):
        media = await run_in_threadpool(validate_envelope_media, envelope, media_config(request.app.state))
    check_modalities({item.modality for item in envelope.inputs}, engine.modalities)
    gen = build_generation_request(
        envelope, media, request_id=f"infer-{uuid.uuid4().hex}", model=engine.model_name
    )
    http_id = getattr(request.state, "request_id", None)
    if http_id:
        gen.metadata["http_request_id"] = http_id

    stream = engine.generate(gen)
    try:
        first = await stream.__anext__()  # validation errors surface here, before anything is scheduled
    except BaseException:
        await stream.aclose()
        raise
    head = _Head(gen.request_id, engine.model_name)
    if envelope.stream:
        return StreamingResponse(_sse(stream, first, head), media_type="text/event-stream")
    return await _collect(stream, first, head)


def media_config(state: Any) -> MediaConfig:
    """``settings.server.media`` when the app carries settings, else the defaults."""
    media = getattr(getattr(getattr(state, "settings", None), "server", None), "media", None)
    return media if isinstance(media, MediaConfig) else MediaConfig()


def validate_envelope_media(envelope: InferRequest, cfg: MediaConfig) -> dict[int, ValidatedMedia]:
    """Decode and check every image and audio input (CPU work: run off the event loop)."""
    return {
        i: validate_media_input(item.modality, item.data, item.metadata.format, cfg, param=f"inputs[{i}]")
        for i, item in enumerate(envelope.inputs)
        if item.modality != "text"
    }


def build_generation_request(
    envelope: InferRequest, media: dict[int, ValidatedMedia], *, request_id: str, model: str | None
) -> GenerationRequest:
    """Text only and no roles: one prompt (inputs joined by newlines). Otherwise chat messages, where
    consecutive inputs of the same role (default ``user``) form one message; media become content parts."""
    for i, item in enumerate(envelope.inputs):
        if item.modality == "text" and not item.data:
            raise InvalidRequestError(f"inputs[{i}].data must not be empty text", param=f"inputs[{i}].data")
    sampling = _sampling(envelope)
    if not media and not any(item.metadata.role for item in envelope.inputs):
        prompt = "\n".join(item.data for item in envelope.inputs)
        return GenerationRequest(request_id=request_id, prompt=prompt, sampling=sampling, model=model)
    messages: list[ChatMessage] = []
    for i, item in enumerate(envelope.inputs):
        role = item.metadata.role or "user"
        part = {"type": "text", "text": item.data} if item.modality == "text" else _media_part(media[i])
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].append(part)
        else:
            messages.append({"role": role, "content": [part]})
    for message in messages:  # plain strings where possible: every chat template understands those
        if all(part["type"] == "text" for part in message["content"]):
            message["content"] = "\n".join(part["text"] for part in message["content"])
    return GenerationRequest(request_id=request_id, messages=messages, sampling=sampling, model=model)


def _sampling(envelope: InferRequest) -> SamplingParams:
    try:
        return envelope.parameters.to_sampling_params()
    except InvalidRequestError as exc:
        exc.param = f"parameters.{exc.param}" if exc.param else "parameters"
        raise


def _media_part(item: ValidatedMedia) -> dict[str, Any]:
    if item.modality == "image":
        return {"type": "image_url", "image_url": {"url": item.data_uri()}}
    return {
        "type": "input_audio",
        "input_audio": {"data": item.data_uri().partition(",")[2], "format": item.format},
    }


class _Head:
    """What every response and chunk of one request repeats."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())


async def _collect(stream: AsyncIterator[RequestOutput], first: RequestOutput, head: _Head) -> InferResponse:
    done = CompletedRequest(request_id=head.id)
    try:
        done.add(first)
        while not done.finished:
            done.add(await stream.__anext__())
    finally:
        await stream.aclose()  # a no-op when finished; aborts the request if this task was cancelled
    if done.error is not None:
        raise EngineError(f"the request failed inside the engine: {done.error}")
    outputs = [
        InferOutput(
            index=s.index,
            text=s.text,
            finish_reason=s.finish_reason.value if s.finish_reason else None,
            stop_reason=s.stop_reason,
        )
        for s in done.sequences
    ]
    usage = InferUsage.from_usage(done.usage or Usage())  # the engine's last chunk always carries usage
    return InferResponse(id=head.id, created=head.created, model=head.model, outputs=outputs, usage=usage)


async def _sse(
    stream: AsyncIterator[RequestOutput], first: RequestOutput, head: _Head
) -> AsyncIterator[bytes]:
    """One event per engine chunk, then ``data: [DONE]``. Closing early (client gone) aborts the request."""
    chunk = first
    try:
        while True:
            yield _event(_stream_chunk(chunk, head).model_dump_json(exclude_none=True))
            if chunk.finished:
                if chunk.error is not None:
                    error = EngineError(f"the request failed inside the engine: {chunk.error}")
                    yield _event(_json(error.to_openai()))
                break
            chunk = await stream.__anext__()
    except AutoGLMError as exc:  # headers are sent: the error travels as an event
        yield _event(_json(exc.to_openai()))
    finally:
        await stream.aclose()
    yield b"data: [DONE]\n\n"


def _stream_chunk(chunk: RequestOutput, head: _Head) -> InferStreamChunk:
    outputs = [
        InferOutput(
            index=o.index,
            text=o.text_delta,
            finish_reason=o.finish_reason.value if isinstance(o.finish_reason, FinishReason) else None,
            stop_reason=o.stop_reason,
        )
        for o in chunk.outputs
    ]
    usage = InferUsage.from_usage(chunk.usage) if chunk.usage is not None else None
    return InferStreamChunk(id=head.id, created=head.created, model=head.model, outputs=outputs, usage=usage)


def _event(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def _json(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()
