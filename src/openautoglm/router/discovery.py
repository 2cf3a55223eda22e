"""Dynamic backends: DNS names re-resolved periodically, and a Redis registry with heartbeat TTLs.

Each source calls ``on_change({name: base_url})`` with the full current set whenever it changes; the router
turns names it has not seen into backends (from the deployment's template) and drops names that went away.
A server joins the Redis registry by ``RegistryAnnouncer``: a key ``<prefix><name>`` holding its URL, set
again every ``ttl/3`` seconds with a TTL, so a server that dies drops out when the TTL lapses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from contextlib import suppress

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from openautoglm.config.router import DnsDiscoveryConfig, RedisDiscoveryConfig

logger = logging.getLogger(__name__)

Endpoints = dict[str, str]  # backend name → base URL
OnChange = Callable[[Endpoints], None]


async def resolve_dns(cfg: DnsDiscoveryConfig) -> Endpoints:
    infos = await asyncio.get_running_loop().getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    out: Endpoints = {}
    for family, _, _, _, addr in infos:
        host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
        out[f"{cfg.host}/{addr[0]}"] = f"{cfg.scheme}://{host}:{cfg.port}{cfg.path}"
    return out


async def dns_loop(cfg: DnsDiscoveryConfig, on_change: OnChange) -> None:
    """Re-resolve forever; a failed lookup keeps the last answer (a DNS hiccup must not empty a deployment)."""
    last: Endpoints | None = None
    while True:
        try:
            found = await resolve_dns(cfg)
        except OSError as exc:
            logger.warning("discovery: resolving %s failed: %s", cfg.host, exc)
        else:
            if found != last:
                on_change(found)
                last = found
        await asyncio.sleep(cfg.interval_s)


async def read_registry(redis: Redis, prefix: str) -> Endpoints:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=500)]
    if not keys:
        return {}
    values = await redis.mget(keys)
    out: Endpoints = {}
    for key, value in zip(keys, values, strict=True):
        if value is None:
            continue  # expired between SCAN and MGET
        name = (key.decode() if isinstance(key, bytes) else key)[len(prefix) :]
        try:
            out[name] = orjson.loads(value)["url"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            logger.warning('discovery: registry entry %s is not {"url": …}; ignored', key)
    return out


async def registry_loop(cfg: RedisDiscoveryConfig, on_change: OnChange, redis: Redis | None = None) -> None:
    client = redis or Redis.from_url(cfg.url)
    last: Endpoints | None = None
    try:
        while True:
            try:
                found = await read_registry(client, cfg.key_prefix)
            except RedisError as exc:
                logger.warning("discovery: reading the Redis registry failed: %s", exc)
            else:
                if found != last:
                    on_change(found)
                    last = found
            await asyncio.sleep(cfg.poll_interval_s)
    finally:
        if redis is None:
            await client.aclose()


class RegistryAnnouncer:
    """Keeps ``name → url`` in the registry while running; ``stop`` removes it at once."""

    def __init__(self, redis: Redis, prefix: str, name: str, url: str, ttl_s: float = 10.0) -> None:
        self.redis = redis
        self.key = f"{prefix}{name}"
        self.value = orjson.dumps({"url": url})
        self.ttl_ms = int(ttl_s * 1000)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._loop(), name=f"autoglm-registry-{self.key}")

    async def stop(self, *, remove: bool = True) -> None:
        """Stop the heartbeat; ``remove=False`` leaves the key to expire (as when a server dies)."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if remove:
            await self.redis.delete(self.key)

    async def _beat(self) -> None:
        await self.redis.set(self.key, self.value, px=self.ttl_ms)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self._beat()
            except RedisError as exc:
                logger.warning("registry heartbeat for %s failed: %s", self.key, exc)
