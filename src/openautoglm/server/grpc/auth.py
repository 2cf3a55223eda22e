"""The gateway on gRPC: an interceptor running the policy pipeline before every KServe v2 method, with scopes
from the same table as HTTP (gateway/scopes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from openautoglm.gateway.bruteforce import client_address
from openautoglm.gateway.pipeline import GatewayContext, Identity, Outcome
from openautoglm.gateway.scopes import GRPC_SCOPES
from openautoglm.gateway.service import Gateway
from openautoglm.observability import tracing
from openautoglm.protocol.errors import AutoGLMError, PermissionDeniedError
from openautoglm.server.grpc.errors import abort

# The caller of the RPC being served, set by the interceptor for the servicer (which has no gateway context).
CALLER: ContextVar[Identity | None] = ContextVar("autoglm_grpc_caller", default=None)
# Its whole gateway context: the servicer's traffic control (cache, token limits, queue) reads and notes on it.
CALL_CONTEXT: ContextVar[GatewayContext | None] = ContextVar("autoglm_grpc_context", default=None)


def _peer_address(peer: str) -> str | None:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` → the address."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return None


def _peer_common_name(context: grpc.aio.ServicerContext) -> str | None:
    names = (context.auth_context() or {}).get("x509_common_name") or []
    return names[0].decode() if names else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.open = set(gateway.settings.gateway.auth.open_grpc_methods)

    async def _check(self, method: str, context: grpc.aio.ServicerContext) -> GatewayContext:
        name = method.rsplit("/", 1)[-1]
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        scope = GRPC_SCOPES.get(name)
        ctx = GatewayContext(
            transport="grpc",
            operation=name,
            required_scope=None if name in self.open else (scope.value if scope else "?"),
            client=client_address(
                _peer_address(context.peer()), metadata.get("x-forwarded-for"), self.gateway.trusted_proxies
            ),
            headers=metadata,
            request_id=metadata.get("x-request-id"),
            peer_subject=_peer_common_name(context),
        )
        await self.gateway.ensure_started()
        try:
            if scope is None and name not in self.open:
                raise PermissionDeniedError(f"gRPC method {name} has no entry in the scope table")
            await self.gateway.pipeline.before(ctx)
        except AutoGLMError as exc:
            await self.gateway.pipeline.after(ctx, Outcome(exc.http_status, exc.code))
            await abort(context, exc)
        CALLER.set(ctx.identity)  # the handler runs in this context (streams' tasks copy it)
        CALL_CONTEXT.set(ctx)
        return ctx

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        check, after = self._check, self.gateway.pipeline.after
        kwargs: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with tracing.grpc_server_span(method, context.invocation_metadata()):
                    ctx = await check(method, context)
                    try:
                        return await inner_uu(request, context)
                    finally:
                        await after(ctx, Outcome(200))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                # grpc drives this generator from the call's own task, so the span stays current across yields.
                with tracing.grpc_server_span(method, context.invocation_metadata()):
                    ctx = await check(method, context)
                    try:
                        async for response in inner_ss(requests, context):
                            yield response
                    finally:
                        await after(ctx, Outcome(200))

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
        # KServe v2 has no unary-stream or stream-unary methods; refuse rather than serve one unchecked.
        denied = PermissionDeniedError(f"gRPC method {method} has an unsupported shape for the gateway")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await abort(context, denied)

        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
