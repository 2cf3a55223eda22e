"""Scopes and the one table saying which scope every HTTP route and gRPC method needs.

Scopes do not imply one another (``admin`` does not grant ``inference``): each key gets exactly what it needs;
``autoglm keys create --admin`` creates a key holding every scope. Routes and methods that are open (health,
metrics, API docs by default) are chosen by configuration (``gateway.auth.open_paths`` / ``open_grpc_methods``);
the scope listed here is what they need when configuration closes them. A route missing from this table makes
the server refuse to start (server/http/auth.py), so nothing is unprotected by accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from openautoglm.protocol.errors import InvalidRequestError


class Scope(str, Enum):
    MODELS_READ = "models:read"
    INFERENCE = "inference"
    KEYS_MANAGE = "keys:manage"
    AUDIT_READ = "audit:read"
    ADMIN = "admin"


ALL_SCOPES: tuple[str, ...] = tuple(s.value for s in Scope)

# (method, route template) → scope. HEAD is looked up as GET.
HTTP_SCOPES: dict[tuple[str, str], Scope] = {
    ("GET", "/healthz"): Scope.MODELS_READ,
    ("GET", "/ready"): Scope.MODELS_READ,
    ("GET", "/v2/health/live"): Scope.MODELS_READ,
    ("GET", "/v2/health/ready"): Scope.MODELS_READ,
    ("GET", "/metrics"): Scope.ADMIN,
    ("GET", "/docs"): Scope.MODELS_READ,
    ("GET", "/docs/oauth2-redirect"): Scope.MODELS_READ,
    ("GET", "/openapi.json"): Scope.MODELS_READ,
    ("GET", "/v1/models"): Scope.MODELS_READ,
    ("GET", "/v1/models/{model_id:path}"): Scope.MODELS_READ,
    ("POST", "/v1/chat/completions"): Scope.INFERENCE,
    ("POST", "/v1/completions"): Scope.INFERENCE,
    ("POST", "/v1/infer"): Scope.INFERENCE,
    ("POST", "/tokenize"): Scope.INFERENCE,
    ("POST", "/detokenize"): Scope.INFERENCE,
    ("POST", "/v1/tasks/classify"): Scope.INFERENCE,
    ("POST", "/v1/tasks/extract"): Scope.INFERENCE,
    ("POST", "/v1/tasks/summarize"): Scope.INFERENCE,
    ("POST", "/v1/tasks/translate"): Scope.INFERENCE,
    ("GET", "/admin/templates"): Scope.ADMIN,
    ("POST", "/admin/templates"): Scope.ADMIN,
    ("GET", "/admin/templates/{name}"): Scope.ADMIN,
    ("POST", "/admin/templates/{name}/render"): Scope.ADMIN,
    ("GET", "/admin/keys"): Scope.KEYS_MANAGE,
    ("POST", "/admin/keys"): Scope.KEYS_MANAGE,
    ("GET", "/admin/keys/{key_id}"): Scope.KEYS_MANAGE,
    ("DELETE", "/admin/keys/{key_id}"): Scope.KEYS_MANAGE,
    ("POST", "/admin/keys/{key_id}/rotate"): Scope.KEYS_MANAGE,
    ("POST", "/admin/keys/{key_id}/disable"): Scope.KEYS_MANAGE,
    ("POST", "/admin/keys/{key_id}/enable"): Scope.KEYS_MANAGE,
    ("GET", "/admin/audit"): Scope.AUDIT_READ,
    ("GET", "/admin/audit/verify"): Scope.AUDIT_READ,
    ("POST", "/admin/audit/prune"): Scope.ADMIN,
    ("GET", "/admin/diagnostics"): Scope.ADMIN,
    ("POST", "/admin/reload"): Scope.ADMIN,
    ("GET", "/admin/router"): Scope.ADMIN,
    ("GET", "/admin/rollouts/{model:path}"): Scope.ADMIN,
    ("POST", "/admin/rollouts/{model:path}/{action}"): Scope.ADMIN,
}

# KServe v2 method name (the last part of /inference.GRPCInferenceService/<name>) → scope.
GRPC_SCOPES: dict[str, Scope] = {
    "ServerLive": Scope.MODELS_READ,
    "ServerReady": Scope.MODELS_READ,
    "ModelReady": Scope.MODELS_READ,
    "ServerMetadata": Scope.MODELS_READ,
    "ModelMetadata": Scope.MODELS_READ,
    "ModelInfer": Scope.INFERENCE,
    "ModelStreamInfer": Scope.INFERENCE,
}


def http_scope(method: str, route: str) -> Scope | None:
    """The scope of a route template, or None when the table has no entry (a bug: refuse the request)."""
    return HTTP_SCOPES.get(("GET" if method == "HEAD" else method, route))


def parse_scopes(values: Iterable[str], param: str = "scopes") -> tuple[str, ...]:
    """Validated, de-duplicated scope names in table order."""
    wanted = {v.strip() for v in values if v.strip()}
    unknown = sorted(wanted - set(ALL_SCOPES))
    if unknown:
        raise InvalidRequestError(f"{param}: unknown scope(s) {unknown}; allowed: {list(ALL_SCOPES)}", param=param)
    return tuple(s for s in ALL_SCOPES if s in wanted)
