"""The app factory: ``create_app(settings, engine)`` wires routers, error handlers, middleware and metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.middleware.cors import CORSMiddleware

import openautoglm
from openautoglm.config.settings import Settings
from openautoglm.gateway.service import Gateway
from openautoglm.observability import diagnostics, tracing
from openautoglm.protocol.multimodal import InferRequest
from openautoglm.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from openautoglm.server.http import admin, health, metrics, openai, router_admin, tasks, templates_admin
from openautoglm.server.http.auth import AuthMiddleware, check_scope_table
from openautoglm.server.http.errors import install_error_handlers
from openautoglm.server.http.guided_metrics import GuidedCollector
from openautoglm.server.http.infer import router as infer_router
from openautoglm.server.http.metrics import ServerMetrics
from openautoglm.server.http.middleware import (
    GzipResponseMiddleware,
    RequestBodyMiddleware,
    RequestContextMiddleware,
)
from openautoglm.server.http.responses import OrjsonResponse
from openautoglm.server.http.router_metrics import RouterCollector
from openautoglm.server.http.state import ServerState

# Bodies the routes parse themselves (see parsing.py) and the stream chunks: the OpenAPI document gets their
# schemas here.
_BODY_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
    InferRequest,
    *tasks.TASK_BODIES,
)


def create_app(settings: Settings, engine: Any, gateway: Gateway | None = None) -> FastAPI:
    """An app serving ``engine`` (an AsyncEngine, already loaded). ``app.state`` holds settings, engine,
    server_state (drain, in-flight), metrics and the gateway (built from ``settings`` unless given: auth, keys,
    audit) for the routers and for serve.py."""
    cfg = settings.server
    state = ServerState()
    app = FastAPI(
        title="Open-AutoGLM",
        version=getattr(openautoglm, "__version__", "0"),
        description="OpenAI-compatible and native APIs serving GLM-family models.",
        default_response_class=OrjsonResponse,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.server_state = state
    app.state.metrics = ServerMetrics(engine.stats, engine.model_name, state)
    app.state.metrics.registry.register(GuidedCollector(engine, engine.model_name))
    app.state.metrics.registry.register(RouterCollector(app.state))
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    app.state.gateway = gateway if gateway is not None else Gateway(settings)
    app.state.metrics.registry.register(app.state.gateway.traffic.metrics)  # limits, queues, cache in /metrics
    diagnostics.install(app, settings)  # telemetry and detection metrics, app.state.load_shed
    app.state.gateway.traffic.load_shed = app.state.load_shed  # the detectors' shed action acts at admission
    routers = (health.router, metrics.router, openai.router, infer_router, admin.router, router_admin.router)
    for router in (*routers, diagnostics.router):
        app.include_router(router)
    app.include_router(tasks.router)
    app.include_router(templates_admin.router)
    check_scope_table(app)  # a route without a scope would be unprotected: refuse to start instead
    # add_middleware wraps from the inside out: the last one added runs first. Auth runs innermost, so its
    # refusals still get request ids, access-log lines, CORS headers and drain handling.
    app.add_middleware(AuthMiddleware, fastapi_app=app, gateway=app.state.gateway)
    app.add_middleware(
        RequestBodyMiddleware,
        max_body_bytes=cfg.max_body_bytes,
        max_decompressed_bytes=cfg.max_decompressed_bytes,
    )
    app.add_middleware(GzipResponseMiddleware, min_bytes=cfg.gzip_min_bytes)
    if cfg.cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors.allow_origins,
            allow_credentials=cfg.cors.allow_credentials,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[cfg.request_id_header, "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, config=cfg, state=state, metrics=app.state.metrics)
    tracing.instrument_app(app, settings.observability.tracing)  # outermost: the request's server span
    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODY_MODELS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
