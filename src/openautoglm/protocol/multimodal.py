"""The native multimodal envelope of Open-AutoGLM (``POST /v1/infer``) and its responses.

A request is a list of typed inputs plus sampling parameters::

    {"model": "demo",
     "inputs": [{"modality": "text", "data": "Describe this", "metadata": {"role": "user"}},
                {"modality": "image", "data": "<base64>", "metadata": {"format": "png"}}],
     "parameters": {"max_tokens": 32, "temperature": 0}}

``modality`` is a free string here on purpose: an unknown modality is refused by the server with 415 (not as a
schema error), and so is a modality the target model does not accept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from openautoglm.protocol.outputs import Usage
from openautoglm.protocol.sampling import SamplingParams

KNOWN_MODALITIES: frozenset[str] = frozenset({"text", "image", "audio"})
Role = Literal["system", "user", "assistant"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InferInputMetadata(BaseModel):
    """Open mapping: ``format`` and ``role`` are interpreted, other keys are carried along and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: str | None = Field(
        None,
        description="Declared format (jpeg, png, webp, gif; wav, mp3, flac, ogg), checked against the bytes",
    )
    role: Role | None = Field(
        None, description="Chat role of a text input; when any input has one, the inputs form chat messages"
    )


class InferInput(_Strict):
    modality: str = Field(..., description="text, image or audio", examples=["text"])
    data: str = Field(..., description="The text itself, or the media bytes in standard base64 (padded)")
    metadata: InferInputMetadata = Field(default_factory=InferInputMetadata)


class InferParameters(_Strict):
    """Sampling settings, each mapped onto the ``SamplingParams`` field of its name (omitted: the default)."""

    n: int | None = None
    max_tokens: int | None = Field(None, description="null: generate up to the end of the context")
    min_tokens: int | None = None
    temperature: float | None = Field(None, description="0 means greedy")
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    def to_sampling_params(self) -> SamplingParams:
        """Fields the client set override the defaults; ``max_tokens: null`` is kept, as "no limit"."""
        given = {name: getattr(self, name) for name in self.model_fields_set}
        given = {k: v for k, v in given.items() if v is not None or k in ("max_tokens", "seed")}
        if isinstance(given.get("stop"), str):
            given["stop"] = [given["stop"]]
        return SamplingParams(**given).validate()


class InferRequest(_Strict):
    model: str | None = Field(None, description="Served model name; default: the model this server runs")
    inputs: list[InferInput] = Field(..., min_length=1)
    parameters: InferParameters = Field(default_factory=InferParameters)
    stream: bool = Field(False, description="Stream chunks as server-sent events, ending with 'data: [DONE]'")


FinishReasonName = Literal["stop", "length", "abort", "error"]


class InferOutput(BaseModel):
    index: int
    modality: Literal["text"] = "text"
    text: str = Field(..., description="The whole text, or in a stream chunk only what is new")
    finish_reason: FinishReasonName | None = None
    stop_reason: str | int | None = None


class InferUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0

    @classmethod
    def from_usage(cls, usage: Usage) -> InferUsage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
        )


class InferResponse(BaseModel):
    id: str
    object: Literal["infer.response"] = "infer.response"
    created: int
    model: str
    outputs: list[InferOutput]
    usage: InferUsage


class InferStreamChunk(BaseModel):
    id: str
    object: Literal["infer.chunk"] = "infer.chunk"
    created: int
    model: str
    outputs: list[InferOutput]
    usage: InferUsage | None = Field(None, description="Set on the last chunk only")
