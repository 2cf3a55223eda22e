"""The one place where Open-AutoGLM errors become gRPC statuses."""

from __future__ import annotations

import logging

import grpc

from openautoglm.protocol.errors import AutoGLMError, InternalError, RateLimitError, ServiceUnavailableError

log = logging.getLogger(__name__)


def as_autoglm_error(exc: Exception) -> AutoGLMError:
    """The error itself when it is an AutoGLMError; any other exception is a bug: logged, then INTERNAL."""
    if isinstance(exc, AutoGLMError):
        return exc
    log.error("Open-AutoGLM gRPC: unexpected %s", type(exc).__name__, exc_info=exc)
    return InternalError(f"internal error ({type(exc).__name__}); the server log has the details")


def status_code(exc: AutoGLMError) -> grpc.StatusCode:
    """The gRPC status code of an error, from the ``grpc_code`` name its class carries."""
    code = getattr(grpc.StatusCode, exc.grpc_code, None)
    if not isinstance(code, grpc.StatusCode):
        # A misspelt grpc_code is a bug in Open-AutoGLM; still answer, as an internal error.
        return grpc.StatusCode.INTERNAL
    return code


def trailing_metadata(exc: AutoGLMError) -> tuple[tuple[str, str], ...]:
    """Metadata sent with the status: ``retry-after`` (seconds) when the error says when to retry."""
    if isinstance(exc, (RateLimitError, ServiceUnavailableError)) and exc.retry_after is not None:
        return (("retry-after", str(max(0, round(exc.retry_after)))),)
    return ()


def stream_error_message(exc: AutoGLMError) -> str:
    """A ModelStreamInfer ``error_message``: the status name first, as a stream response has no status."""
    return f"[{status_code(exc).name}] {exc.message}"


async def abort(context: grpc.aio.ServicerContext, exc: AutoGLMError) -> None:
    """End the call with the error's status; ``context.abort`` raises, so this never returns."""
    metadata = trailing_metadata(exc)
    if metadata:
        context.set_trailing_metadata(metadata)
    await context.abort(status_code(exc), exc.message)
