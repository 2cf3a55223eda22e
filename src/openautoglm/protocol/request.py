"""The internal request every layer below the transports speaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.guided import GuidedDecoding
from openautoglm.protocol.sampling import SamplingParams

ChatMessage = dict[str, Any]  # {"role": ..., "content": str | list of parts, ...}, as in the OpenAI API


@dataclass(slots=True)
class GenerationRequest:
    """Exactly one of ``prompt``, ``prompt_token_ids`` or ``messages`` is set."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first under the priority policy
    model: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # user, tenant, trace ids: carried, never interpreted
    guided: GuidedDecoding | None = None  # constrained decoding (structured outputs, forced tool calls)
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, rendered by the chat template
    tool_choice: str | dict[str, Any] | None = None  # as the client sent it (remote backends get it as is)

    def validate_prompt(self) -> None:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise InvalidRequestError(
                "exactly one of prompt, prompt_token_ids or messages must be given", param="prompt"
            )
        if self.prompt is not None and not self.prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids must not be empty", param="prompt")
        if self.messages is not None and not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
