"""``POST /v1/infer``: Open-AutoGLM's native multimodal envelope.

Checks run in the order that lets every error name its real cause: the envelope's shape (400), unknown
modalities (415), each media input — base64 (400), format against the bytes (415), size and pixels (413) — and
only then the modalities the model accepts (415 naming them). Text inputs become a prompt, or chat messages
when any input carries ``metadata.role``. Errors are raised as ``AutoGLMError`` subclasses; the app maps them.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from openautoglm.config.media import MediaConfig
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.multimodal import (
    InferOutput,
    InferRequest,
    InferResponse,
    InferStreamChunk,
    InferUsage,
)
from openautoglm.protocol.openai import ErrorResponse
from openautoglm.protocol.outputs import CompletionOutput, RequestOutput
from openautoglm.protocol.request import ChatMessage, GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.http.media import (
    ValidatedMedia,
    check_known_modalities,
    check_modalities,
    validate_media_input,
)
from openautoglm.server.http.openai_output import OutputBase
from openautoglm.server.http.parsing import body_schema, parse_body
from openautoglm.server.http.responses import SSE_DONE, SSE_MEDIA_TYPE, sse_event
from openautoglm.server.http.serving import accept_model, modalities_of, serve_generation

router = APIRouter(tags=["Native"])
_STREAM_DOC = "The result; with stream=true, InferStreamChunk events ending with data: [DONE]"


@router.post(
    "/v1/infer",
    response_model=InferResponse,
    openapi_extra=body_schema(InferRequest),
    summary="Run the native multimodal envelope",
    responses={
        200: {"content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}}, "description": _STREAM_DOC},
        **{
            status: {"model": ErrorResponse, "description": text}
            for status, text in (
                (400, "Malformed envelope, parameters or base64 (never 422)"),
                (404, "Model not served here"),
                (413, "Body or media over the configured byte or pixel limit"),
                (415, "Unknown or refused modality, or a format that does not match the bytes"),
                ("4XX", "Other client errors, in the same error shape"),
                (503, "Draining or engine unavailable; see Retry-After"),
            )
        },
    },
)
async def infer(request: Request) -> Response:
    envelope = await parse_body(request, InferRequest)
    model = accept_model(
        request, envelope.model, lambda: "\n".join(item.data for item in envelope.inputs if item.modality == "text")
    )
    for i, item in enumerate(envelope.inputs):
        check_known_modalities([item.modality], param=f"inputs[{i}].modality")
    media: dict[int, ValidatedMedia] = {}
    if any(item.modality != "text" for item in envelope.inputs):  # decoding images is CPU work
        media = await run_in_threadpool(validate_envelope_media, envelope, request.app.state.settings.server.media)
    check_modalities({item.modality for item in envelope.inputs}, modalities_of(request.app.state, model))
    gen = build_generation_request(envelope, media, request_id=f"infer-{uuid.uuid4().hex}", model=model)
    output = InferOutputs(gen.request_id, model, gen.sampling.n)
    return await serve_generation(request, [gen], output, stream=envelope.stream)


# --- the envelope → a GenerationRequest ---------------------------------------------------------------------


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


# --- the engine's chunks → the response ---------------------------------------------------------------------


class InferOutputs(OutputBase):
    """Engine chunks of one envelope request → an ``InferResponse``, or ``InferStreamChunk`` events."""

    def __init__(self, response_id: str, model: str, n: int) -> None:
        super().__init__(response_id, model)
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._finish: list[CompletionOutput | None] = [None] * n

    def add(self, _k: int, out: RequestOutput) -> None:
        self.account(out)  # raises EngineError when the request failed inside the engine
        for o in out.outputs:
            self._texts[o.index].append(o.text_delta)
            if o.finish_reason is not None:
                self._finish[o.index] = o

    def response(self) -> dict[str, Any]:
        outputs = [_output(i, "".join(texts), self._finish[i]) for i, texts in enumerate(self._texts)]
        usage = InferUsage.from_usage(self.usage)
        body = InferResponse(id=self.response_id, created=self.created, model=self.model, outputs=outputs, usage=usage)
        return body.model_dump()

    def start_events(self) -> list[bytes]:
        return []

    def chunk_events(self, _k: int, out: RequestOutput) -> list[bytes]:
        self.account(out)
        outputs = [_output(o.index, o.text_delta, o) for o in out.outputs if o.text_delta or o.finish_reason]
        if not outputs and not out.finished:
            return []
        usage = InferUsage.from_usage(self.usage) if out.finished else None
        chunk = InferStreamChunk(
            id=self.response_id, created=self.created, model=self.model, outputs=outputs, usage=usage
        )
        return [sse_event(chunk.model_dump(exclude_none=True))]

    def end_events(self) -> list[bytes]:
        return [SSE_DONE]


def _output(index: int, text: str, done: CompletionOutput | None) -> InferOutput:
    finish = done.finish_reason.value if done is not None and done.finish_reason is not None else None
    return InferOutput(index=index, text=text, finish_reason=finish, stop_reason=done.stop_reason if finish else None)
