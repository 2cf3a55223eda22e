"""Settings: YAML file < ``AUTOGLM_…`` environment (nested with ``__``) < explicit overrides (CLI flags).

Each component takes only its part of the tree (``EngineConfig``, later ``ServerConfig``, ``GatewayConfig``…).
Nothing below the CLI reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from openautoglm.config.gateway import GatewayConfig
from openautoglm.config.observability import ObservabilityConfig
from openautoglm.config.router import RouterConfig
from openautoglm.config.server import ServerConfig
from openautoglm.config.store import StoreConfig
from openautoglm.protocol.errors import ConfigError

DEMO_MODEL = "demo"
MiB = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    model: str = Field(DEMO_MODEL, description="A local checkpoint directory, a hub id, or 'demo'")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; default: the model's")
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    quantization: Literal["none", "int8", "fp8"] = Field(
        "none", description="Quantize at load time: int8 weight-only, or fp8 W8A8 (Hopper GPUs and newer)"
    )
    max_model_len: int | None = Field(None, ge=1, description="Default: the checkpoint's max_position_embeddings")
    seed: int = 0
    download_dir: str | None = None


class CacheConfig(_Strict):
    block_size: int = Field(16, ge=1, le=256)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache budget in bytes; default 1 GiB on CPU, gpu_memory_utilization on GPU"
    )
    num_blocks: int | None = Field(None, ge=1, description="Exact block-pool size; overrides the memory budget")
    enable_prefix_caching: bool = True


class SchedulerConfig(_Strict):
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    max_n: int = Field(16, ge=1, description="Largest n (sequences per request) accepted")
    max_logprobs: int = Field(20, ge=0, description="Largest logprobs / top_logprobs accepted")


class EngineConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    attention_backend: Literal["auto", "reference", "triton"] = "auto"
    enforce_eager: bool = Field(False, description="Never capture CUDA graphs (decode runs eagerly)")
    cuda_graph_max_batch: int = Field(
        256, ge=1, description="Largest decode batch captured as a CUDA graph (capped at scheduler.max_num_seqs)"
    )
    async_scheduling: bool | None = Field(
        None,
        description="Launch each decode step before the previous step's tokens are read back (greedy steps; "
        "the tokens stay on the device). Default: on for CUDA devices. On the CPU it serves tests",
    )
    programmatic_launch: bool | None = Field(
        None,
        description="Launch the decode path's Triton kernels with programmatic dependent launch: each kernel's "
        "programs start while the previous kernel ends. Default: on for GPUs of compute capability 9.0 and newer "
        "(a GPU without it ignores the setting). Applies to every engine of the process",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs of this host the model is split over (cuda:N.. of model.device); it must divide the "
        "model's attention heads. On the CPU, processes joined by gloo (for tests)",
    )
    disable_custom_all_reduce: bool = Field(
        False, description="With tensor parallelism on GPUs, all-reduce through NCCL only (not the one-shot kernel)"
    )

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        s, m = self.scheduler, self.model
        if self.tensor_parallel_size > 1 and m.quantization != "none":
            raise ValueError(
                f"model.quantization {m.quantization!r} cannot be combined with tensor_parallel_size "
                f"{self.tensor_parallel_size}: quantized models run on one GPU (set tensor_parallel_size to 1)"
            )
        if not s.enable_chunked_prefill and m.max_model_len and s.max_num_batched_tokens < m.max_model_len:
            raise ValueError(
                f"scheduler.max_num_batched_tokens ({s.max_num_batched_tokens}) must be >= model.max_model_len "
                f"({m.max_model_len}) when chunked prefill is off, or no long prompt could ever run"
            )
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOGLM_", env_nested_delimiter="__", extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges YAML and overrides itself and hands the merged dict in as init values, so the
        # environment must sit between them: it is applied there too, not here.
        return (init_settings,)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_tree(environ: dict[str, str]) -> dict[str, Any]:
    """``AUTOGLM_ENGINE__CACHE__BLOCK_SIZE=32`` → ``{"engine": {"cache": {"block_size": "32"}}}``."""
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("AUTOGLM_") or "__" not in key:
            continue
        parts = key[len("AUTOGLM_") :].lower().split("__")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {key} conflicts with another AUTOGLM_ variable")
        node[parts[-1]] = value
    return tree


def load_settings(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the Settings tree: YAML file < environment < overrides. Errors name the offending key."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    data = _deep_merge(data, _env_tree(dict(os.environ) if environ is None else environ))
    data = _deep_merge(data, overrides or {})
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)
