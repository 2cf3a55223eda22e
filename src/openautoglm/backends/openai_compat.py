"""Any OpenAI-compatible HTTP endpoint as a backend (vLLM, SGLang, Zhipu's GLM API, Ollama, OpenAI itself).

What may be retried elsewhere is marked on the error (``UpstreamError.retryable``): connect failures, timeouts
before the response starts, the configured statuses (429/502/503/504 by default) and 401/403/404 (this backend is
misconfigured, another may do). Client errors the backend found (400, 413, 422) are the client's and come back
as ``InvalidRequestError`` with the backend's message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from openautoglm.backends.base import DEADLINE_KEY, Backend, Capabilities, Health, UpstreamError, UpstreamTimeoutError
from openautoglm.backends.http_client import HttpPool, sse_data
from openautoglm.backends.openai_request import CHAT_PATH, openai_request
from openautoglm.backends.openai_response import StreamDecoder, UpstreamProtocolError, decode_response
from openautoglm.config.router import BackendConfig
from openautoglm.observability.tracing import TRACEPARENT_KEY
from openautoglm.protocol.errors import ConfigError, InvalidRequestError, PayloadTooLargeError
from openautoglm.protocol.outputs import RequestOutput
from openautoglm.protocol.request import GenerationRequest

DEADLINE_HEADER = "X-AutoGLM-Deadline-Ms"  # milliseconds left, for backends that honour it
_MISCONFIGURED = frozenset({401, 403, 404})


def resolve_api_key(cfg: BackendConfig, environ: Mapping[str, str]) -> str | None:
    """The backend's API key from the environment variable or secret file its config names."""
    if cfg.api_key_env:
        key = environ.get(cfg.api_key_env)
        if not key:
            raise ConfigError(f"backend {cfg.name!r}: environment variable {cfg.api_key_env} (api_key_env) is unset")
        return key.strip()
    if cfg.api_key_file:
        try:
            key = Path(cfg.api_key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"backend {cfg.name!r}: cannot read api_key_file {cfg.api_key_file}: {exc}") from exc
        if not key:
            raise ConfigError(f"backend {cfg.name!r}: api_key_file {cfg.api_key_file} is empty")
        return key
    return None


class OpenAIBackend(Backend):
    def __init__(
        self,
        cfg: BackendConfig,
        pool: HttpPool,
        *,
        model: str,
        api_key: str | None = None,
        retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504}),
    ) -> None:
        super().__init__(cfg.name, cfg.version, cfg.weight, cfg.max_priority)
        self.retry_statuses = retry_statuses
        assert cfg.url is not None  # BackendConfig requires it for remote kinds
        self.cfg = cfg
        self.base_url = cfg.url.rstrip("/")
        self.model = cfg.model or model
        self.pool = pool
        self._headers = {**cfg.headers, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._max_context = cfg.max_context

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            modalities=frozenset(self.cfg.modalities), max_context=self._max_context, streaming=self.cfg.streaming
        )

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        path, body = openai_request(request, model=self.model, stream=self.cfg.streaming)
        chat = path == CHAT_PATH
        timeout, headers = self._timeout_and_headers(request)
        resp = await self._post(path, body, timeout, headers)
        complete = False
        try:
            if resp.status != 200:
                await self._raise_status(resp)
            n = request.sampling.n
            if self.cfg.streaming:
                async for chunk in self._stream(resp, request.request_id, n, chat):
                    yield chunk
            else:
                for chunk in decode_response(await self._json(resp), request.request_id, n, chat=chat):
                    yield chunk
            complete = True
        finally:
            # A stream left early is cut (the backend then stops generating); a finished one goes back to the pool.
            if complete:
                resp.release()
            else:
                resp.close()

    def _timeout_and_headers(self, request: GenerationRequest) -> tuple[aiohttp.ClientTimeout, dict[str, str]]:
        headers = {**self._headers, "X-Request-Id": request.request_id}
        if traceparent := request.metadata.get(TRACEPARENT_KEY):  # W3C trace context of the backend call
            headers["traceparent"] = traceparent
        total = None
        deadline = request.metadata.get(DEADLINE_KEY)
        if isinstance(deadline, (int, float)):
            total = deadline - time.time()
            if total <= 0:
                raise UpstreamTimeoutError(
                    f"the request's deadline passed before backend {self.name!r} was tried",
                    backend=self.name,
                    retryable=False,
                    code="deadline_exceeded",
                )
            headers[DEADLINE_HEADER] = str(int(total * 1000))
        timeout = aiohttp.ClientTimeout(
            total=total, sock_connect=self.cfg.connect_timeout_s, sock_read=self.cfg.read_timeout_s
        )
        return timeout, headers

    async def _post(
        self, path: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        url = self.base_url + path
        try:
            async with asyncio.timeout(self.cfg.first_byte_timeout_s):
                headers = {**headers, "Content-Type": "application/json"}
                return await self.pool.session().post(url, data=orjson.dumps(body), headers=headers, timeout=timeout)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"backend {self.name!r} did not answer {url} in time", backend=self.name, retryable=True
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"backend {self.name!r} unreachable at {url}: {type(exc).__name__}: {exc}",
                backend=self.name,
                retryable=True,
                code="upstream_connect_error",
            ) from exc

    async def _raise_status(self, resp: aiohttp.ClientResponse) -> None:
        text = (await resp.text(errors="replace"))[:1000]
        message = _error_message(text)
        status = resp.status
        if status in (400, 422):
            raise InvalidRequestError(f"backend {self.name!r} refused the request: {message}", code="upstream_400")
        if status == 413:
            raise PayloadTooLargeError(f"backend {self.name!r} refused the request as too large: {message}")
        retryable = status in self.retry_statuses or status in _MISCONFIGURED
        retry_after = _retry_after(resp.headers.get("Retry-After"))
        raise UpstreamError(
            f"backend {self.name!r} answered HTTP {status}: {message}",
            backend=self.name,
            retryable=retryable,
            status=status,
            retry_after=retry_after,
        )

    async def _stream(
        self, resp: aiohttp.ClientResponse, request_id: str, n: int, chat: bool
    ) -> AsyncIterator[RequestOutput]:
        decoder = StreamDecoder(request_id, n, chat=chat)
        try:
            async for data in sse_data(resp.content):
                if data == b"[DONE]":
                    break
                for chunk in decoder.feed(_loads(data)):
                    yield chunk
            yield decoder.end()
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"backend {self.name!r} went silent for {self.cfg.read_timeout_s}s mid-stream",
                backend=self.name,
                retryable=True,
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"backend {self.name!r} broke the stream: {type(exc).__name__}: {exc}",
                backend=self.name,
                retryable=True,
                code="upstream_stream_broken",
            ) from exc

    async def _json(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            return _loads(await resp.read())
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"backend {self.name!r} broke the response: {exc}", backend=self.name, retryable=True
            ) from exc

    async def health(self) -> Health:
        """GET {base}/models: any 2xx means up (OpenAI-compatible servers all have it)."""
        return await self._probe(self.base_url + "/models")

    async def _probe(self, url: str) -> Health:
        start = time.monotonic()
        try:
            async with self.pool.session().get(url, headers=self._headers) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                return Health(ok, "" if ok else f"HTTP {resp.status}", time.monotonic() - start)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Health(False, f"{type(exc).__name__}: {exc}", time.monotonic() - start)


def _loads(data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(f"backend sent invalid JSON: {data[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(f"backend sent a JSON {type(obj).__name__}, expected an object")
    return obj


def _error_message(text: str) -> str:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text or "(empty body)"
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    return text


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
