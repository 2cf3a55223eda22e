"""Task endpoints: ``POST /v1/tasks/classify|extract|summarize|translate``.

Each builds its prompt from the task specification (tasks/prompts.py), generates under a constraint that makes
the answer's shape right, and returns the structured result with usage; ``"explain": true`` adds the messages it
built.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.openai import ErrorResponse
from openautoglm.protocol.outputs import FinishReason, RequestOutput
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.http.openai_output import OutputBase, usage_dict
from openautoglm.server.http.parsing import body_schema, parse_body
from openautoglm.server.http.serving import accept_model, serve_generation
from openautoglm.tasks import prompts
from openautoglm.tasks.prompts import TaskPlan

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Invalid task specification, or the answer hit the token limit (never 422)"),
        (404, "Unknown model"),
        (413, "Body over the configured limit"),
        (503, "Draining or engine unavailable; see Retry-After"),
    )
}
router = APIRouter(tags=["Tasks"], responses=_ERRORS)


class _TaskBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    text: str = Field(..., description="The text to work on")
    model: str | None = None
    examples: list[dict[str, Any]] | None = Field(None, description="Few-shot examples: {'text', and the answer}")
    explain: bool = Field(False, description="Return the prompt that was built")
    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int | None = Field(None, description="Default: what the task's shape needs")


class ClassifyRequest(_TaskBody):
    labels: list[str]
    multi_label: bool = False
    descriptions: dict[str, str] | None = Field(None, description="label → what it means")


class ExtractRequest(_TaskBody):
    json_schema: dict[str, Any] = Field(..., alias="schema", description="JSON Schema of the value to extract")


class SummarizeRequest(_TaskBody):
    max_words: int = 60
    style: str = Field("paragraph", description="paragraph, bullets or headline")


class TranslateRequest(_TaskBody):
    target_language: str
    source_language: str | None = None


TASK_BODIES: tuple[type[BaseModel], ...] = (ClassifyRequest, ExtractRequest, SummarizeRequest, TranslateRequest)


class TaskOutput(OutputBase):
    """Collects the one answer of a task request and turns it into the structured result."""

    def __init__(self, response_id: str, model: str, plan: TaskPlan, explain: bool) -> None:
        super().__init__(response_id, model)
        self.plan = plan
        self.explain = explain
        self._text: list[str] = []
        self._finish: FinishReason | None = None

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.account(out)
        for o in out.outputs:
            self._text.append(o.text_delta)
            self._finish = o.finish_reason or self._finish

    def response(self) -> dict[str, Any]:
        text = "".join(self._text)
        try:
            result = self.plan.parse(text)
        except (json.JSONDecodeError, ValueError) as exc:
            # The grammar was still open when the token budget or the context ran out: a schema without bounds
            # (maxLength, maxItems, numeric ranges) or a small max_tokens; the client can change either.
            raise InvalidRequestError(
                f"the {self.plan.task} answer reached the token limit before it was complete; raise max_tokens or "
                "bound the schema (maxLength, maxItems, minimum/maximum)",
                param="max_tokens",
            ) from exc
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "task.result",
            "task": self.plan.task,
            "model": self.model,
            "result": result,
            "finish_reason": self._finish.value if self._finish else None,
            "usage": usage_dict(self.usage),
        }
        if self.explain:
            body["prompt"] = {"messages": self.plan.messages, "constraint": _constraint(self.plan)}
        return body

    # Task answers are never streamed.
    def start_events(self) -> list[bytes]:
        return []

    def chunk_events(self, prompt_index: int, out: RequestOutput) -> list[bytes]:
        return []

    def end_events(self) -> list[bytes]:
        return []


def _constraint(plan: TaskPlan) -> dict[str, Any] | None:
    return None if plan.guided is None else json.loads(plan.guided.canonical())


async def _run(request: Request, body: _TaskBody, plan: TaskPlan) -> Response:
    model = accept_model(request, body.model, lambda: body.text)
    rid = f"task-{uuid.uuid4().hex}"
    max_tokens = body.max_tokens if body.max_tokens is not None else plan.max_tokens
    sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, seed=body.seed).validate()
    gen = GenerationRequest(request_id=rid, messages=plan.messages, sampling=sampling, model=model, guided=plan.guided)
    return await serve_generation(request, [gen], TaskOutput(rid, model, plan, body.explain), stream=False)


@router.post("/v1/tasks/classify", openapi_extra=body_schema(ClassifyRequest))
async def classify(request: Request) -> Response:
    body = await parse_body(request, ClassifyRequest)
    plan = prompts.classify(
        body.text, body.labels, multi_label=body.multi_label, descriptions=body.descriptions, examples=body.examples
    )
    return await _run(request, body, plan)


@router.post("/v1/tasks/extract", openapi_extra=body_schema(ExtractRequest))
async def extract(request: Request) -> Response:
    body = await parse_body(request, ExtractRequest)
    return await _run(request, body, prompts.extract(body.text, body.json_schema, examples=body.examples))


@router.post("/v1/tasks/summarize", openapi_extra=body_schema(SummarizeRequest))
async def summarize(request: Request) -> Response:
    body = await parse_body(request, SummarizeRequest)
    plan = prompts.summarize(body.text, max_words=body.max_words, style=body.style, examples=body.examples)
    return await _run(request, body, plan)


@router.post("/v1/tasks/translate", openapi_extra=body_schema(TranslateRequest))
async def translate(request: Request) -> Response:
    body = await parse_body(request, TranslateRequest)
    plan = prompts.translate(
        body.text, body.target_language, source_language=body.source_language, examples=body.examples
    )
    return await _run(request, body, plan)
