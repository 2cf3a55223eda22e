"""The one place where errors become HTTP responses: every body is the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` and every status comes from the AutoGLMError hierarchy."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from openautoglm.protocol.errors import (
    AuthenticationError,
    AutoGLMError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from openautoglm.server.http.responses import OrjsonResponse

logger = logging.getLogger("openautoglm.server")

_BY_STATUS: dict[int, type[AutoGLMError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
DEFAULT_RETRY_AFTER_S = 1


def error_response(exc: AutoGLMError, headers: dict[str, str] | None = None) -> Response:
    """The HTTP response for ``exc``: its status, the OpenAI body and, on 429/503, a Retry-After header."""
    out = dict(headers or {})
    if exc.http_status in (429, 503):
        retry_after = getattr(exc, "retry_after", None)
        seconds = DEFAULT_RETRY_AFTER_S if retry_after is None else max(1, math.ceil(retry_after))
        out["Retry-After"] = str(seconds)
    return OrjsonResponse(exc.to_openai(), status_code=exc.http_status, headers=out)


def from_http_status(status: int, detail: str) -> AutoGLMError:
    """The error class for a status produced by the framework itself (unknown route, wrong method…)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequestError if 400 <= status < 500 else InternalError
    err = cls(detail)
    err.http_status = status  # keep the framework's exact status when it has no class of its own (e.g. 408)
    return err


def from_validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequestError:
    """The first schema violation as a 400 naming the parameter: ``temperature: Input should be a number``.

    A value matching no member of a union (``stop: 5``) gives one error per member: the deepest ones (the
    member that came closest) are reported, merged into one message, without the members' type labels."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("request body is invalid")
    if errors[0].get("type") == "json_invalid":
        return InvalidRequestError(f"request body is not valid JSON: {errors[0].get('msg')}")
    paths = [_param_path(e.get("loc", ())) for e in errors]
    field = paths[0][:1]
    group = [i for i, p in enumerate(paths) if p[:1] == field]
    deepest = max(len(paths[i]) for i in group)
    path = next(paths[i] for i in group if len(paths[i]) == deepest)
    chosen = [errors[i] for i in group if paths[i] == path]
    message = " or ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in chosen))
    if "input" in chosen[0] and chosen[0].get("type") != "missing":
        message += f", got {_short_repr(chosen[0]['input'])}"
    others = len(errors) - len(group)
    if others:
        message += f" (and {others} more error{'s' if others > 1 else ''})"
    param = ".".join(path) or None
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param)


# pydantic puts the label of the union member it tried into an error's location ("str", "list[str]",
# "tagged-union[...]", a model name); parameters are named without them.
_TYPE_LABEL = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*|.*[\[\-].*)$")


def _param_path(loc: Any) -> tuple[str, ...]:
    return tuple(str(p) for p in loc if p != "body" and not (isinstance(p, str) and _TYPE_LABEL.match(p)))


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _on_autoglm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AutoGLMError)
    if exc.http_status >= 500 and not isinstance(exc, ServiceUnavailableError):
        logger.error("request failed: %s: %s", type(exc).__name__, exc.message)
    return error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, AutoGLMError):
        # FastAPI wraps whatever fails while it reads a body (our 413 for one) in a generic 400: unwrap it.
        return error_response(exc.__cause__)
    if exc.status_code == 404:
        err: AutoGLMError = NotFoundError(f"no route {request.method} {request.url.path}", code="route_not_found")
    elif exc.status_code == 405:
        err = MethodNotAllowedError(f"method {request.method} is not allowed on {request.url.path}")
    else:
        err = from_http_status(exc.status_code, str(exc.detail))
    return error_response(err, headers=dict(exc.headers or {}))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation_error(exc))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError("internal server error; the server log has the details"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AutoGLMError, _on_autoglm_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
