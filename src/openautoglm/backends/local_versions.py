"""Local backends that name their own checkpoint: one AsyncEngine per (deployment, backend, checkpoint).

The router owns these engines: it loads a new version in a worker thread, beside the old one when the memory
estimate allows, and shuts a version down once no configuration names it and its requests have finished.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openautoglm.backends.local import LocalBackend
from openautoglm.config.router import BackendConfig, DeploymentConfig, RouterConfig
from openautoglm.config.settings import DEMO_MODEL, EngineConfig
from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.ops.estimate import arch_for, estimate, kv_bytes_per_token
from openautoglm.protocol.errors import ConfigError

logger = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (deployment model, backend name, checkpoint)
DRAIN_POLL_S = 0.01


def version_key(dcfg: DeploymentConfig, bcfg: BackendConfig) -> Key | None:
    """The engine key of a local backend naming its own checkpoint; None for any other backend."""
    if bcfg.kind != "local" or bcfg.model is None:
        return None
    return (dcfg.model, bcfg.name, bcfg.model)


def on_gpu(ecfg: EngineConfig) -> bool:
    device = ecfg.model.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def estimate_bytes(ecfg: EngineConfig) -> int:
    """Memory an engine for ``ecfg`` takes: weights, its KV pool and one step's activations."""
    m, s, c = ecfg.model, ecfg.scheduler, ecfg.cache
    arch = arch_for(m.model, revision=m.revision)
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if on_gpu(ecfg) else "float32")
    est = estimate(
        arch,
        dtype=dtype,
        quantization=m.quantization,
        max_model_len=m.max_model_len,
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        block_size=c.block_size,
        overhead_bytes=0,
    )
    if c.num_blocks is not None:
        kv = c.num_blocks * c.block_size * kv_bytes_per_token(arch, dtype)
    else:
        kv = c.kv_cache_memory_bytes or est.kv_bytes
    return est.weight_bytes + est.activation_bytes + kv


@dataclass(eq=False)
class LocalVersion:
    key: Key
    engine: AsyncEngine
    bytes: int
    backends: list[LocalBackend] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends)


class LocalVersions:
    """The loaded local versions. ``template``: engine settings of every version (its model is replaced)."""

    def __init__(self, template: EngineConfig | None = None, memory_budget_bytes: int | None = None) -> None:
        self.template = template or EngineConfig()
        self.budget = memory_budget_bytes
        self.loaded: dict[Key, LocalVersion] = {}

    def engine_config(self, checkpoint: str) -> EngineConfig:
        model = self.template.model.model_copy(update={"model": checkpoint, "served_model_name": None})
        return self.template.model_copy(update={"model": model})

    def wanted(self, cfg: RouterConfig) -> dict[Key, BackendConfig]:
        out = {}
        for dcfg in cfg.deployments:
            for bcfg in dcfg.backends:
                key = version_key(dcfg, bcfg)
                if key is not None:
                    out[key] = bcfg
        return out

    def check(self, cfg: RouterConfig) -> None:
        """Refuse, before anything is loaded, a checkpoint that is neither 'demo' nor a readable directory."""
        for (model, name, checkpoint), _ in self.wanted(cfg).items():
            if checkpoint != DEMO_MODEL and not (Path(checkpoint) / "config.json").is_file():
                raise ConfigError(
                    f"deployment {model!r} backend {name!r}: model {checkpoint!r} must be 'demo' or a "
                    "checkpoint directory holding config.json"
                )

    def missing(self, cfg: RouterConfig) -> list[Key]:
        return [key for key in self.wanted(cfg) if key not in self.loaded]

    def unused(self, cfg: RouterConfig) -> list[LocalVersion]:
        wanted = self.wanted(cfg)
        return [v for key, v in self.loaded.items() if key not in wanted]

    def backend(self, key: Key, bcfg: BackendConfig) -> LocalBackend:
        version = self.loaded[key]
        backend = LocalBackend(version.engine, bcfg.name, bcfg.version, bcfg.weight, bcfg.max_priority)
        version.backends.append(backend)
        return backend

    def fits(self, need: int, ecfg: EngineConfig) -> bool:
        """Whether ``need`` more bytes fit beside what is loaded: the device's free memory on a GPU, and the
        configured budget (if any) over every loaded version's estimate."""
        if self.budget is not None and sum(v.bytes for v in self.loaded.values()) + need > self.budget:
            return False
        if on_gpu(ecfg):
            device = torch.device(ecfg.model.device if ecfg.model.device != "auto" else "cuda")
            free, _ = torch.cuda.mem_get_info(device)
            return need <= free
        return True

    def load_sync(self, key: Key) -> LocalVersion:
        ecfg = self.engine_config(key[2])
        need = estimate_bytes(ecfg)
        version = LocalVersion(key, AsyncEngine.from_config(ecfg), need)
        self.loaded[key] = version
        logger.info("router: loaded local version %s of %s (%s), ~%d MiB", key[1], key[0], key[2], need >> 20)
        return version

    async def load(self, key: Key) -> LocalVersion:
        return await asyncio.to_thread(self.load_sync, key)

    async def retire(self, version: LocalVersion) -> None:
        """Wait for the version's requests to finish, then shut its engine down."""
        while version.in_flight:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.loaded.get(version.key) is version:
            del self.loaded[version.key]
        await version.engine.shutdown()
        logger.info("router: retired local version %s of %s (%s)", version.key[1], version.key[0], version.key[2])

    async def aclose(self) -> None:
        for version in list(self.loaded.values()):
            await version.engine.shutdown()
        self.loaded.clear()
