"""Serving one generation request, shared by the OpenAI routes and ``/v1/infer``.

``accept_model`` resolves the requested model and notes it (and, when configured, the prompt) for the access
log. ``serve_generation`` runs the engine call: the whole response or an SSE stream, with cleanup on every path,
latency metrics and the access log's outcome and usage. What the response looks like is the output's business
(see ``ServedOutput``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from openautoglm.gateway.access import require_model
from openautoglm.protocol.errors import AutoGLMError, InternalError, ModelNotFoundError
from openautoglm.protocol.outputs import RequestOutput, Usage
from openautoglm.protocol.request import GenerationRequest
from openautoglm.server.http.auth import gateway_context
from openautoglm.server.http.metrics import RequestTimer
from openautoglm.server.http.middleware import RequestInfo
from openautoglm.server.http.responses import SSE_DONE, SSE_HEADERS, OrjsonResponse, SSEResponse, sse_body, sse_event
from openautoglm.server.http.streams import ClientDisconnected, EngineCall, run_unless_disconnected

logger = logging.getLogger("openautoglm.server")


class ServedOutput(Protocol):
    """Engine chunks → a response body (collected) or SSE events (streamed); see openai_output.OutputBase."""

    model: str
    usage: Usage
    aborted: bool

    def add(self, prompt_index: int, out: RequestOutput) -> None: ...
    def response(self) -> dict[str, Any]: ...
    def start_events(self) -> list[bytes]: ...
    def chunk_events(self, prompt_index: int, out: RequestOutput) -> list[bytes]: ...
    def end_events(self) -> list[bytes]: ...


def resolve_model(engine: Any, name: str | None, router: Any = None) -> str:
    """The engine's model, or (with the router on) one of the router's deployments."""
    if name is None or name == engine.model_name:
        return engine.model_name
    if router is not None and name in router.model_names:
        return name
    served = [engine.model_name, *(router.model_names if router is not None else [])]
    raise ModelNotFoundError(f"model {name!r} is not served here; models: {', '.join(dict.fromkeys(served))}")


def generator_for(app_state: Any, model: str | None) -> Any:
    """What runs a request for ``model``: the router when it has a deployment of that name, else the engine."""
    router = getattr(app_state, "router", None)
    if router is not None and model in router.model_names:
        return router
    return app_state.engine


def modalities_of(app_state: Any, model: str) -> frozenset[str]:
    """The input modalities ``model`` takes: a routed deployment's backends decide, else the local engine."""
    generator = generator_for(app_state, model)
    if generator is app_state.engine:
        return frozenset(app_state.engine.modalities)
    return frozenset(generator.deployment(model).capabilities().modalities)


def accept_model(request: Request, name: str | None, prompt_text: Callable[[], str]) -> str:
    """The served model's name (404 for another; 403 for one the caller's key may not use), noted with the
    prompt (only if log_prompts) for the log."""
    app_state = request.app.state
    model = resolve_model(app_state.engine, name, getattr(app_state, "router", None))
    require_model(getattr(request.state, "identity", None), model)
    info: RequestInfo = request.state.info
    info.model = model
    if app_state.settings.server.log_prompts:
        info.prompt = prompt_text()
    return model


async def serve_generation(
    request: Request, gens: list[GenerationRequest], output: ServedOutput, *, stream: bool
) -> Response:
    """Run ``gens`` (one HTTP request's engine requests) and answer with ``output``'s body or SSE events."""
    app_state = request.app.state
    info: RequestInfo = request.state.info
    for gen in gens:
        gen.metadata["http_request_id"] = info.request_id
    timer = app_state.metrics.timer(output.model)
    generator = generator_for(app_state, gens[0].model if gens else None)
    # Response cache, model and token limits, admission queue (gateway/traffic.py) around the engine.
    call = EngineCall(app_state.gateway.traffic.wrap(generator, gateway_context(request.scope)), app_state.server_state)
    try:  # bad input fails here, as a 4xx, before any byte is sent; a client leaving the queue is dropped now
        await run_unless_disconnected(request.receive, call.start(gens))
    except ClientDisconnected:
        info.outcome = "client_disconnected"
        timer.aborted("client_disconnected")
        return Response(status_code=499)
    if stream:
        return SSEResponse(partial(_stream, call, output, timer, info, len(gens)), headers=SSE_HEADERS)
    try:
        await run_unless_disconnected(request.receive, _collect(call, output, timer))
    except ClientDisconnected:
        info.outcome = "client_disconnected"
        timer.aborted("client_disconnected")
        return Response(status_code=499)  # nginx's "client closed request": never seen, but logged
    finally:
        await call.aclose()
        info.usage = output.usage
    _finished(output, timer, info)
    return OrjsonResponse(output.response())


async def _collect(call: EngineCall, output: ServedOutput, timer: RequestTimer) -> None:
    async for k, chunk in call.chunks():
        timer.saw(chunk)
        output.add(k, chunk)


async def _stream(
    call: EngineCall, output: ServedOutput, timer: RequestTimer, info: RequestInfo, num_requests: int, send: Send
) -> None:
    """Send the stream's events, one write per engine chunk: events that are ready together (the opening events
    with the first chunk, the closing ones with the last) go out together. Headers are sent by now, so a failure
    travels as an ``{"error": …}`` event before ``[DONE]``."""
    done = False
    events = output.start_events()
    try:
        unfinished = num_requests
        async for k, chunk in call.chunks():
            timer.saw(chunk)
            events += output.chunk_events(k, chunk)
            unfinished -= chunk.finished
            if events and unfinished:
                await send(sse_body(b"".join(events)))
                events = []
        events += output.end_events()
        await send(sse_body(b"".join(events)))
        done = True
    except AutoGLMError as exc:
        info.outcome = "error"
        await send(sse_body(b"".join([*events, sse_event(exc.to_openai()), SSE_DONE])))
    except OSError:
        raise  # the client left (ASGI 2.4 servers say so on send): nothing more can be sent
    except Exception:
        logger.exception("stream of request %s failed", info.request_id)
        info.outcome = "error"
        error = InternalError("internal server error; the server log has the details")
        await send(sse_body(b"".join([*events, sse_event(error.to_openai()), SSE_DONE])))
    finally:
        await call.aclose()
        info.usage = output.usage
        if done:
            _finished(output, timer, info)
        elif info.outcome is None:
            info.outcome = "client_disconnected"
            timer.aborted("client_disconnected")


def _finished(output: ServedOutput, timer: RequestTimer, info: RequestInfo) -> None:
    timer.finish(output.usage)
    if output.aborted:
        info.outcome = "aborted"
        timer.aborted("aborted")
