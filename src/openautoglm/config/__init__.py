"""The Settings tree: one pydantic object built once (YAML < environment < flags) and passed down."""

from openautoglm.config.settings import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    Settings,
    load_settings,
)

__all__ = ["CacheConfig", "EngineConfig", "ModelConfig", "SchedulerConfig", "Settings", "load_settings"]
