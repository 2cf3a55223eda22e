"""Prompt templates: the admin API under ``/admin/templates`` (scope admin; every change audited) and
``apply_prompt_template``, which renders a request's ``prompt_template`` reference into its prompt or messages."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from openautoglm.gateway.keys import Actor
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorResponse,
    PromptTemplateRef,
)
from openautoglm.server.http.auth import identity_of
from openautoglm.server.http.parsing import parse_body
from openautoglm.server.http.responses import OrjsonResponse
from openautoglm.store.templates import PromptTemplate, PromptTemplateRepository
from openautoglm.tasks.templating import compile_template, render_template, template_variables

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Invalid template or variables"),
        (401, "Missing or invalid credentials"),
        (403, "The caller lacks the route's scope"),
        (404, "No such template or version"),
    )
}
router = APIRouter(tags=["Admin"], responses=_ERRORS)
B = TypeVar("B", ChatCompletionRequest, CompletionRequest)


class TemplateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    template: str = Field(min_length=1)
    description: str | None = Field(None, max_length=2000)


class TemplateRender(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1)
    variables: dict[str, Any] = Field(default_factory=dict)


def _actor(request: Request) -> Actor:
    identity = identity_of(request.scope)
    client = request.client.host if request.client else None
    return Actor(identity.subject if identity else "anonymous", request.state.request_id, client)


def _repo(request: Request) -> PromptTemplateRepository:
    return PromptTemplateRepository(request.app.state.gateway.db)


async def create_template(request: Request, body: TemplateCreate) -> PromptTemplate:
    compile_template(body.template)  # a template that cannot compile is never stored
    actor = _actor(request)
    saved = await asyncio.to_thread(
        _repo(request).add_version,
        body.name,
        body.template,
        template_variables(body.template),
        description=body.description,
        created_by=actor.name,
    )
    await request.app.state.gateway.auditor.record(
        actor.name, "template.create", f"template:{saved.name}@{saved.version}", "ok",
        request_id=actor.request_id, client=actor.client, detail={"version": saved.version},
    )  # fmt: skip
    return saved


@router.post("/admin/templates", status_code=201)
async def post_template(request: Request) -> Response:
    saved = await create_template(request, await parse_body(request, TemplateCreate))
    return OrjsonResponse(saved.public(), status_code=201)


@router.get("/admin/templates")
async def list_templates(request: Request) -> Response:
    rows = await asyncio.to_thread(_repo(request).list)
    return OrjsonResponse({"object": "list", "data": [t.public(with_text=False) for t in rows]})


@router.get("/admin/templates/{name}")
async def show_template(name: str, request: Request, version: int | None = None) -> Response:
    if version is not None:
        return OrjsonResponse((await asyncio.to_thread(_repo(request).get, name, version)).public())
    rows = await asyncio.to_thread(_repo(request).list, name)
    if not rows:
        await asyncio.to_thread(_repo(request).get, name)  # the 404
    return OrjsonResponse({"object": "list", "data": [t.public() for t in rows]})


@router.post("/admin/templates/{name}/render")
async def render(name: str, request: Request) -> Response:
    body = await parse_body(request, TemplateRender)
    tpl = await asyncio.to_thread(_repo(request).get, name, body.version)
    text = await asyncio.to_thread(render_template, tpl.template, body.variables)
    return OrjsonResponse({"name": tpl.name, "version": tpl.version, "text": text})


async def render_reference(request: Request, ref: PromptTemplateRef) -> str:
    tpl = await asyncio.to_thread(_repo(request).get, ref.name, ref.version)
    return await asyncio.to_thread(render_template, tpl.template, ref.variables or {})


async def apply_prompt_template(request: Request, body: B) -> B:
    """The rendered template is the managed start of the prompt: a chat request gets it as a first system
    message, a completion request's text prompts get it prepended."""
    ref = body.prompt_template
    if ref is None:
        return body
    text = await render_reference(request, ref)
    if isinstance(body, ChatCompletionRequest):
        return body.model_copy(update={"messages": [ChatMessage(role="system", content=text), *body.messages]})
    prompt = body.prompt
    if isinstance(prompt, str):
        return body.model_copy(update={"prompt": text + prompt})
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return body.model_copy(update={"prompt": [text + p for p in prompt]})
    raise InvalidRequestError("prompt_template works with text prompts, not token ids", param="prompt_template")
