"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams and cost a task per request).

- ``RequestContextMiddleware`` (outermost): X-Request-ID, drain refusals, in-flight count, request metrics and
  one structured JSON access-log line per request.
- ``GzipResponseMiddleware``: gzips whole (non-streaming) responses when the client accepts it.
- ``RequestBodyMiddleware`` (innermost): body-size limit (413 from Content-Length before reading anything, or
  as soon as the bytes read pass it) and gzip/deflate request bodies with a decompressed-size limit.
"""

from __future__ import annotations

import gzip
import logging
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openautoglm.config.server import ServerConfig
from openautoglm.protocol.errors import (
    AutoGLMError,
    InternalError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from openautoglm.protocol.outputs import Usage
from openautoglm.server.http.errors import error_response
from openautoglm.server.http.metrics import ServerMetrics
from openautoglm.server.http.state import PROBE_PATHS, ServerState

access_log = logging.getLogger("openautoglm.access")
logger = logging.getLogger("openautoglm.server")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


@dataclass(slots=True)
class RequestInfo:
    """What a route tells the access log and metrics about its request (``request.state.info``)."""

    request_id: str
    model: str | None = None
    usage: Usage | None = None
    prompt: str | None = None  # only filled when server.log_prompts is on
    outcome: str | None = None  # e.g. "client_disconnected", "drain_aborted"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, config: ServerConfig, state: ServerState, metrics: ServerMetrics) -> None:
        self.app = app
        self.config = config
        self.state = state
        self.metrics = metrics
        self.header = config.request_id_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        info = RequestInfo(request_id=self._request_id(scope))
        scope_state = scope.setdefault("state", {})
        scope_state["info"] = info
        scope_state["request_id"] = info.request_id
        probe = scope["path"] in PROBE_PATHS
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)[self.config.request_id_header] = info.request_id
            await send(message)

        if self.state.draining and not probe:
            err = ServiceUnavailableError(
                "Open-AutoGLM is shutting down and accepts no new requests; retry on another replica",
                retry_after=self.config.retry_after,
                code="draining",
            )
            await error_response(err)(scope, receive, send_with_id)
            self._log(scope, info, 503, start, probe)
            return
        if not probe:
            self.state.active_requests += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:
                raise
            # Answer here rather than in Starlette's outer handler so the 500 still carries the request id.
            logger.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], info.request_id)
            status = 500
            await error_response(InternalError("internal server error; the server log has the details"))(
                scope, receive, send_with_id
            )
        finally:
            if not probe:
                self.state.active_requests -= 1
            self._log(scope, info, status, start, probe)

    def _request_id(self, scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == self.header:
                text = value.decode("latin-1")
                if _VALID_REQUEST_ID.match(text):
                    return text
                break  # an unusable id (too long, odd characters) is replaced, never echoed
        return uuid.uuid4().hex

    def _log(self, scope: Scope, info: RequestInfo, status: int, start: float, probe: bool) -> None:
        latency = time.perf_counter() - start
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or "unmatched"
        model = info.model or ""
        self.metrics.requests.labels(route, str(status), model).inc()
        self.metrics.http_latency.labels(route).observe(latency)
        level = logging.DEBUG if probe else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        record: dict[str, Any] = {
            "event": "access",
            "ts": round(time.time(), 3),
            "request_id": info.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "latency_ms": round(latency * 1000, 2),
            "client": scope["client"][0] if scope.get("client") else None,
        }
        if info.model:
            record["model"] = info.model
        if info.usage is not None:
            record["prompt_tokens"] = info.usage.prompt_tokens
            record["completion_tokens"] = info.usage.completion_tokens
            record["cached_tokens"] = info.usage.cached_tokens
        if info.outcome:
            record["outcome"] = info.outcome
        if self.config.log_prompts and info.prompt is not None:
            record["prompt"] = info.prompt
        access_log.log(level, orjson.dumps(record).decode())


class GzipResponseMiddleware:
    """Compress a response sent whole (one body message) when large enough; streams pass untouched."""

    def __init__(self, app: ASGIApp, min_bytes: int) -> None:
        self.app = app
        self.min_bytes = min_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not accepts_gzip(Headers(scope=scope).get("accept-encoding", "")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None

        async def send_maybe_gzipped(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            start, held = held, None
            body = message.get("body", b"")
            headers = MutableHeaders(scope=start)
            whole = not message.get("more_body", False)
            if whole and len(body) >= self.min_bytes and "content-encoding" not in headers:
                body = gzip.compress(body, compresslevel=5, mtime=0)
                headers["Content-Encoding"] = "gzip"
                headers["Content-Length"] = str(len(body))
                headers.add_vary_header("Accept-Encoding")
                message = {**message, "body": body}
            await send(start)
            await send(message)

        await self.app(scope, receive, send_maybe_gzipped)


def accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and _q_value(q[2:]) == 0.0)
    return False


def _q_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


class RequestBodyMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_decompressed_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_decompressed = max_decompressed_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check_length(headers.get("content-length"))
            encoding = headers.get("content-encoding", "identity").strip().lower()
            reader = _BodyReader(receive, self.max_body, _inflater(encoding, self.max_decompressed))
        except AutoGLMError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if reader.inflater is not None:
            # Downstream sees the decoded body: drop the headers that describe the encoded one.
            scope = dict(scope)
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")
            ]
        await self.app(scope, reader.receive, send)

    def _check_length(self, value: str | None) -> None:
        if value is None:
            return
        if not value.strip().isdigit():
            raise InvalidRequestError(f"Content-Length must be a non-negative integer, got {value!r}")
        if int(value) > self.max_body:
            raise PayloadTooLargeError(
                f"request body is {int(value)} bytes; the limit is {self.max_body} bytes (server.max_body_bytes)"
            )


class _Inflater:
    """Streaming gzip/deflate decoder that stops at ``limit`` output bytes, whatever the compression ratio."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.total = 0
        # 32 + MAX_WBITS: accept a gzip or zlib header; raw deflate (what some clients send as "deflate") too.
        wbits = zlib.MAX_WBITS | 32
        self._z = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> bytes:
        if self._z.eof:
            if data:
                raise InvalidRequestError(f"request body has data after the end of its {self.encoding} stream")
            return b""
        try:
            out = self._z.decompress(data, self.limit - self.total + 1)
        except zlib.error as exc:
            raise InvalidRequestError(f"request body is not valid {self.encoding} data: {exc}") from None
        self._count(out)  # decompress stops at limit + 1 bytes, so a bomb never inflates past the limit
        if self._z.unused_data:
            raise InvalidRequestError(f"request body has data after the end of its {self.encoding} stream")
        return out

    def finish(self) -> bytes:
        if not self._z.eof:
            raise InvalidRequestError(f"request body is a truncated {self.encoding} stream")
        return b""

    def _count(self, out: bytes) -> None:
        self.total += len(out)
        if self.total > self.limit:
            raise PayloadTooLargeError(
                f"request body decompresses to more than {self.limit} bytes (server.max_decompressed_bytes)"
            )


def _inflater(encoding: str, limit: int) -> _Inflater | None:
    if encoding in ("identity", ""):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Inflater(encoding, limit)
    raise UnsupportedMediaTypeError(
        f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body",
        code="unsupported_content_encoding",
    )


class _BodyReader:
    """Wraps ``receive``: counts wire bytes against the body limit and decodes compressed bodies."""

    def __init__(self, receive: Receive, max_body: int, inflater: _Inflater | None) -> None:
        self._receive = receive
        self.max_body = max_body
        self.inflater = inflater
        self.read = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        body = message.get("body", b"")
        self.read += len(body)
        if self.read > self.max_body:
            raise PayloadTooLargeError(
                f"request body is over the limit of {self.max_body} bytes (server.max_body_bytes)"
            )
        if self.inflater is None:
            return message
        decoded = self.inflater.feed(body)
        if not message.get("more_body", False):
            decoded += self.inflater.finish()
        return {**message, "body": decoded}
