"""Which models a caller may use: an API key whose record lists models may use only those (an identity without a
list, or no identity at all when authentication is off, may use every model). Transports call these where they
resolve the requested model, so the rule lives here once."""

from __future__ import annotations

from collections.abc import Iterable

from openautoglm.gateway.pipeline import Identity
from openautoglm.protocol.errors import PermissionDeniedError


def may_use(identity: Identity | None, model: str) -> bool:
    return identity is None or identity.models is None or model in identity.models


def require_model(identity: Identity | None, model: str) -> None:
    """Raise PermissionDeniedError (403) naming the model and those the caller may use, unless it may use it."""
    if identity is None or identity.models is None or model in identity.models:
        return
    allowed = ", ".join(identity.models) or "none"
    message = f"{identity.subject} may not use model {model!r}; it may use: {allowed}"
    raise PermissionDeniedError(message, param="model", code="model_not_allowed")


def visible_models(identity: Identity | None, models: Iterable[str]) -> list[str]:
    """``models`` without those the caller may not use, in order."""
    return [m for m in models if may_use(identity, m)]
