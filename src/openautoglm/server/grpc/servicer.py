"""The KServe v2 ``inference.GRPCInferenceService`` over Open-AutoGLM's AsyncEngine (grpc.aio)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc

import openautoglm
from openautoglm.gateway.access import require_model
from openautoglm.protocol.errors import AutoGLMError, ConfigError, EngineError, ServiceUnavailableError
from openautoglm.protocol.outputs import FinishReason, RequestOutput, Usage
from openautoglm.server.grpc.auth import CALL_CONTEXT, CALLER, AuthInterceptor
from openautoglm.server.grpc.convert import (
    FINAL_RESPONSE,
    MODEL_VERSION,
    TEXT_INPUT,
    TEXT_OUTPUT,
    InferCall,
    check_model,
    infer_response,
    parse_infer_request,
    stream_error,
)
from openautoglm.server.grpc.errors import abort, as_autoglm_error
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2 as pb
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from openautoglm.engine.async_engine import AsyncEngine
    from openautoglm.gateway.service import Gateway
    from openautoglm.gateway.traffic import Traffic

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "openautoglm"
EXTENSIONS = ("model_stream_infer", "parameters")
PLATFORM = "openautoglm"


class _Marker:
    """Bookkeeping items on a stream's response queue."""


_STARTED, _FINISHED = _Marker(), _Marker()
_Item = pb.ModelStreamInferResponse | _Marker


def _tensor(name: str) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype="BYTES", shape=[1])


def _output_text(chunk: RequestOutput) -> tuple[str, FinishReason | None, str | int | None]:
    """The text delta, finish reason and stop reason of a chunk's (only) sequence."""
    if not chunk.outputs:
        return "", None, None
    out = chunk.outputs[0]
    return out.text_delta, out.finish_reason, out.stop_reason


def _check_chunk(chunk: RequestOutput) -> None:
    """A chunk that reports a failure inside the engine becomes an EngineError."""
    if chunk.error is not None or any(o.finish_reason is FinishReason.ERROR for o in chunk.outputs):
        raise EngineError(f"the engine failed on this request: {chunk.error or 'no detail given'}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, engine: AsyncEngine, is_ready: Callable[[], bool] | None = None, traffic: Traffic | None = None
    ) -> None:
        self._engine = engine
        self._traffic = traffic  # the gateway's cache, token limits and admission queue around the engine
        self._is_ready = is_ready or engine.is_healthy

    # Health and metadata.

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        # An unknown model is "not ready" rather than an error, as in Triton.
        served = request.name == self._engine.model_name and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=served and self._is_ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=openautoglm.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            check_model(request.name, request.version, self._engine.model_name)
        except AutoGLMError as exc:
            await abort(context, exc)
        return pb.ModelMetadataResponse(
            name=self._engine.model_name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[_tensor(TEXT_INPUT)],
            outputs=[_tensor(TEXT_OUTPUT)],
        )

    # Inference.

    def _parse(self, request: pb.ModelInferRequest) -> InferCall:
        if not self._is_ready():
            raise ServiceUnavailableError("the server is not ready (loading or draining); retry later", retry_after=1)
        call = parse_infer_request(request, served_model=self._engine.model_name, request_id=f"grpc-{uuid.uuid4().hex}")
        require_model(CALLER.get(), call.request.model or self._engine.model_name)
        return call

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            call = self._parse(request)
            return await self._infer_whole(call)
        except Exception as exc:  # every failure becomes a status; bugs are logged as INTERNAL
            await abort(context, as_autoglm_error(exc))
            raise  # unreachable: abort raises

    def _generator(self) -> Any:
        if self._traffic is None:
            return self._engine
        return self._traffic.wrap(self._engine, CALL_CONTEXT.get())

    async def _infer_whole(self, call: InferCall) -> pb.ModelInferResponse:
        parts = [call.echo]
        finish: FinishReason | None = None
        stop: str | int | None = None
        usage: Usage | None = None
        # aclosing: a cancelled call (client gone, deadline) closes the generator, which aborts the request.
        async with aclosing(self._generator().generate(call.request)) as chunks:
            async for chunk in chunks:
                _check_chunk(chunk)
                text, reason, stop_reason = _output_text(chunk)
                parts.append(text)
                finish, stop = reason or finish, stop_reason if reason else stop
                usage = chunk.usage or usage
        return infer_response(
            model_name=self._engine.model_name,
            client_id=call.client_id,
            text="".join(parts),
            finish_reason=finish,
            stop_reason=stop,
            usage=usage,
        )

    async def _infer_stream(self, call: InferCall) -> AsyncIterator[pb.ModelInferResponse]:
        """One response per engine chunk (a token delta), the last flagged final."""
        if not call.stream:
            response = await self._infer_whole(call)
            response.parameters[FINAL_RESPONSE].bool_param = True
            yield response
            return
        echo = call.echo
        async with aclosing(self._generator().generate(call.request)) as chunks:
            async for chunk in chunks:
                _check_chunk(chunk)
                text, reason, stop_reason = _output_text(chunk)
                if not chunk.outputs and not chunk.finished:
                    continue  # nothing generated yet (e.g. a prompt-only first chunk)
                yield infer_response(
                    model_name=self._engine.model_name,
                    client_id=call.client_id,
                    text=echo + text,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    usage=chunk.usage,
                    final=chunk.finished,
                )
                echo = ""

    async def _serve_stream_request(self, request: pb.ModelInferRequest, out: asyncio.Queue[_Item]) -> None:
        try:
            call = self._parse(request)
            async with aclosing(self._infer_stream(call)) as responses:
                async for response in responses:
                    out.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        except Exception as exc:  # noqa: BLE001 — reported in the stream; bugs are logged as INTERNAL
            error = as_autoglm_error(exc)
            out.put_nowait(stream_error(model_name=request.model_name, client_id=request.id, exc=error))
        finally:
            out.put_nowait(_FINISHED)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently; their responses interleave, each with its request's id.

        When the client cancels the stream, this generator is cancelled and the ``finally`` cancels every
        request's task, which closes its engine generator and so aborts the engine request at once.
        """
        out: asyncio.Queue[_Item] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    out.put_nowait(_STARTED)  # queued before the task's _FINISHED can be
                    task = asyncio.create_task(self._serve_stream_request(request, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                out.put_nowait(_FINISHED)

        reader = asyncio.create_task(read())
        try:
            live = 1  # the reader, plus every request still running
            while live:
                item = await out.get()
                if item is _STARTED:
                    live += 1
                elif item is _FINISHED:
                    live -= 1
                else:
                    yield item
            reader.result()  # re-raise a failure to read the client's stream
        finally:
            for task in (reader, *tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)


async def start_grpc_server(
    engine: AsyncEngine,
    host: str,
    port: int,
    *,
    is_ready: Callable[[], bool] | None = None,
    gateway: Gateway | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """Start the KServe v2 gRPC service for ``engine`` on host:port and return the listening server.

    ``is_ready`` (default: ``engine.is_healthy``) drives ServerReady and ModelReady; while it is false,
    inference calls fail with UNAVAILABLE. ``gateway`` runs its policies (auth, scopes) before every method;
    without one the service is unprotected (``autoglm serve`` always passes one). ``credentials`` (see
    server/tls.py) serve TLS instead of plaintext. Stop the server with ``await server.stop(grace)``.
    """
    interceptors = [] if gateway is None else [AuthInterceptor(gateway)]
    # so_reuseport off: a second server on a port already taken must fail, not silently share it.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    servicer = InferenceServicer(engine, is_ready, gateway.traffic if gateway is not None else None)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen for gRPC on {address}: {exc}") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen for gRPC on {address}: the address is taken or invalid")
    await server.start()
    log.info("KServe v2 gRPC service %s listening on %s", SERVICE_NAME, address)
    return server
