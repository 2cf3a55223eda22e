"""Liveness and readiness, plain and KServe v2 style. Probes keep answering while the server drains."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from openautoglm.protocol.errors import ServiceUnavailableError
from openautoglm.server.http.errors import error_response
from openautoglm.server.http.responses import OrjsonResponse

router = APIRouter(tags=["Health"])


def not_ready_reason(request: Request) -> ServiceUnavailableError | None:
    """Why the server should get no traffic now, or None when it is ready."""
    app_state = request.app.state
    retry_after = app_state.settings.server.retry_after
    if app_state.server_state.draining:
        return ServiceUnavailableError(
            "not ready: Open-AutoGLM is draining (shutting down)", retry_after=retry_after, code="draining"
        )
    if not app_state.engine.is_healthy():
        return ServiceUnavailableError(
            "not ready: the engine step loop is not running; see the server log",
            retry_after=retry_after,
            code="engine_unhealthy",
        )
    return None


@router.get("/healthz")
async def healthz() -> Response:
    """Liveness: the process and its event loop respond."""
    return OrjsonResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Readiness: model loaded, engine step loop alive, not draining; 503 with the reason otherwise."""
    reason = not_ready_reason(request)
    if reason is not None:
        return error_response(reason)
    return OrjsonResponse({"status": "ready", "model": request.app.state.engine.model_name})


@router.get("/v2/health/live")
async def v2_live() -> Response:
    return OrjsonResponse({"live": True})


@router.get("/v2/health/ready")
async def v2_ready(request: Request) -> Response:
    reason = not_ready_reason(request)
    if reason is not None:
        return error_response(reason)
    return OrjsonResponse({"ready": True})
