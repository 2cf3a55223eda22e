"""The gateway on HTTP: an ASGI middleware that matches each request to its route, looks the route's scope up in
the one scope table (gateway/scopes.py) and runs the policy pipeline before the route runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openautoglm.gateway.bruteforce import client_address
from openautoglm.gateway.limits import HEADERS_NOTE
from openautoglm.gateway.pipeline import GatewayContext, Identity, Outcome
from openautoglm.gateway.scopes import http_scope
from openautoglm.gateway.service import Gateway
from openautoglm.protocol.errors import AuthenticationError, AutoGLMError, ConfigError
from openautoglm.server.http.errors import error_response

GATEWAY_CONTEXT = "gateway_context"


def http_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, routers included with ``include_router`` flattened (newer FastAPI keeps them as branches).
    Included routers must not carry a prefix: route templates here are the routes' own paths."""
    for route in routes:
        branch = getattr(route, "original_router", None)
        if branch is None:
            yield route
            continue
        prefix = getattr(getattr(route, "include_context", None), "prefix", "")
        if prefix:
            raise ConfigError(f"router included with prefix {prefix!r}: the gateway needs prefix-free routers")
        yield from http_routes(branch.routes)


def check_scope_table(app: FastAPI) -> None:
    """Refuse to serve an app with a route the scope table does not list (it would be unprotected)."""
    for route in http_routes(app.routes):
        methods = getattr(route, "methods", None)
        path = getattr(route, "path", repr(route))
        if not methods:
            raise ConfigError(f"route {path} is not an HTTP route the gateway can protect")
        for method in methods - {"HEAD"}:
            if http_scope(method, path) is None:
                raise ConfigError(f"route {method} {path} has no entry in the scope table (gateway/scopes.py)")


def route_template(routes: Iterable[BaseRoute], scope: Scope) -> str | None:
    """The template of the route that will serve this request (``/v1/models/{model_id:path}``), or None
    when no route matches fully (the router answers 404/405 itself)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", ""))
    return None


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def gateway_context(scope: Scope) -> GatewayContext | None:
    return scope.get("state", {}).get(GATEWAY_CONTEXT)


def identity_of(scope: Scope) -> Identity | None:
    return scope.get("state", {}).get("identity")


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, gateway: Gateway) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.gateway = gateway
        self.open_paths = frozenset(gateway.settings.gateway.auth.open_paths)
        self._routes: list[BaseRoute] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._routes is None:  # every route is registered before the first request
            self._routes = list(http_routes(self.fastapi_app.routes))
        route = route_template(self._routes, scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        ctx = self._context(scope, route)
        await self.gateway.ensure_started()
        try:
            await self.gateway.pipeline.before(ctx)
        except AutoGLMError as exc:
            headers = dict(ctx.notes.get(HEADERS_NOTE, {}))
            if isinstance(exc, AuthenticationError):
                headers["WWW-Authenticate"] = "Bearer"
            await error_response(exc, headers=headers)(scope, receive, send)
            await self.gateway.pipeline.after(ctx, Outcome(exc.http_status, exc.code))
            return
        scope.setdefault("state", {})["identity"] = ctx.identity
        scope["state"][GATEWAY_CONTEXT] = ctx  # the serving code adds its own notes (cache, token limits)
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = ctx.notes.get(HEADERS_NOTE)
                if extra:  # rate-limit and cache headers of the policies and the serving code
                    message["headers"] = [*message.get("headers", ()), *_encode(extra)]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            await self.gateway.pipeline.after(ctx, Outcome(status["code"]))

    def _context(self, scope: Scope, route: str) -> GatewayContext:
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        method = scope["method"]
        needed = http_scope(method, route)
        peer = scope["client"][0] if scope.get("client") else None
        tls: dict[str, Any] = scope.get("extensions", {}).get("tls", {})
        return GatewayContext(
            transport="http",
            operation=f"{method} {route}",
            required_scope=None if route in self.open_paths else (needed.value if needed else "?"),
            client=client_address(peer, headers.get("x-forwarded-for"), self.gateway.trusted_proxies),
            headers=headers,
            request_id=scope.get("state", {}).get("request_id"),
            peer_subject=tls.get("client_cert_cn"),
        )
