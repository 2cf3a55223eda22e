"""Backends from their configuration: the one place that picks a class for a ``kind``."""

from __future__ import annotations

from collections.abc import Mapping

from openautoglm.backends.autoglm import AutoGLMBackend
from openautoglm.backends.base import Backend
from openautoglm.backends.http_client import HttpPool
from openautoglm.backends.local import Engine, LocalBackend
from openautoglm.backends.openai_compat import OpenAIBackend, resolve_api_key
from openautoglm.config.router import BackendConfig
from openautoglm.protocol.errors import ConfigError


def build_backend(
    cfg: BackendConfig,
    *,
    model: str,
    pool: HttpPool,
    environ: Mapping[str, str],
    engine: Engine | None = None,
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504}),
) -> Backend:
    """``model`` is the deployment's model name (remote backends may map it); ``environ`` holds API keys."""
    if cfg.kind == "local":
        if engine is None:
            raise ConfigError(f"backend {cfg.name!r}: kind 'local' needs the local engine, and none is loaded")
        return LocalBackend(engine, cfg.name, cfg.version, cfg.weight, cfg.max_priority)
    key = resolve_api_key(cfg, environ)
    cls = AutoGLMBackend if cfg.kind == "autoglm" else OpenAIBackend
    return cls(cfg, pool, model=model, api_key=key, retry_statuses=retry_statuses)
