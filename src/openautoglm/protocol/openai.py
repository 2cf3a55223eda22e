"""OpenAI-compatible request and response schemas (chat completions, completions, models, tokenize).

Requests ignore unknown fields, as OpenAI does, but are strict about types: ``"temperature": "0.5"`` is an
error (the server answers 400), never silently coerced. Responses are built as plain dicts for speed; these
models document them in the OpenAPI schema and let tests check that what is sent matches what is documented.
Fields after the OpenAI ones (``top_k``, ``min_p``, ``repetition_penalty``…) are Open-AutoGLM extensions with
the names vLLM uses, so clients can pass them through ``extra_body``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# --- chat messages -----------------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(..., description="An https URL or a data: URI (data:image/png;base64,...)")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str = Field(..., description="Base64-encoded audio")
    format: str


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


# A plain union, not a discriminated one: error locations then name the part and field ("content.0.text").
ContentPart = TextPart | ImagePart | AudioPart
Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Request):
    include_usage: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = Field(None, description="{'name', 'schema', 'strict'} as in OpenAI's API")
    strict: bool | None = None


class PromptTemplateRef(_Request):
    name: str
    version: int | None = Field(None, description="Default: the latest version")
    variables: dict[str, Any] | None = None


class _SamplingFields(_Request):
    """Fields shared by chat completions and completions; None means "the default"."""

    model: str | None = Field(None, description="Served model name; default: the model this server runs")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be absent or empty")
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # Open-AutoGLM extensions
    top_k: int | None = Field(None, description="0 or -1: disabled")
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = Field(None, description="Lower runs first under the priority scheduling policy")
    guided_json: dict[str, Any] | None = Field(None, description="Output valid against this JSON Schema")
    guided_choice: list[str] | None = Field(None, description="Output exactly one of these strings")
    guided_regex: str | None = Field(None, description="Output matching this regular expression")
    guided_grammar: str | None = Field(None, description="Output of this EBNF grammar (rule root starts)")
    prompt_template: PromptTemplateRef | None = Field(
        None, description="A stored template rendered before the prompt (completions) or as a first system message"
    )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, description="Deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, description="Default: up to the end of the context")
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Functions the model may call (GLM tool format)")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Variables for the chat template, e.g. {'enable_thinking': false}"
    )


CompletionPrompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: CompletionPrompt = Field(..., description="A string, a list of strings, token ids, or lists of them")
    max_tokens: int | None = Field(16, description="null: generate up to the end of the context")
    logprobs: int | None = Field(None, description="Return log-probabilities of this many alternatives per token")
    echo: bool | None = False
    best_of: int | None = Field(None, description="Only best_of == n is supported")
    suffix: str | None = Field(None, description="Not supported; must be absent")


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(False, description="Default false: prompts are encoded so for generation too")
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# --- responses ---------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


FinishReasonName = Literal["stop", "length", "abort", "error"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (``object`` stays ``text_completion``, as with OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCapabilities(BaseModel):
    modalities: list[str]
    chat: bool = True
    completions: bool = True
    streaming: bool = True
    logprobs: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openautoglm"
    max_model_len: int | None = Field(None, description="Context length; null when routed backends do not say")
    capabilities: ModelCapabilities


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
