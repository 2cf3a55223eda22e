"""Redis clients (asyncio for the server, blocking for the CLI), built from ``store.redis_url``."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from openautoglm.protocol.errors import ConfigError


def _options() -> dict[str, object]:
    return {"decode_responses": True, "socket_connect_timeout": 2.0, "health_check_interval": 15}


def async_client(url: str) -> aioredis.Redis:
    try:
        return aioredis.Redis.from_url(url, **_options())
    except ValueError as exc:
        raise ConfigError(f"store.redis_url: not a Redis URL ({exc})") from exc


def sync_client(url: str) -> redis.Redis:
    try:
        return redis.Redis.from_url(url, **_options())
    except ValueError as exc:
        raise ConfigError(f"store.redis_url: not a Redis URL ({exc})") from exc


async def check_reachable(client: aioredis.Redis, where: str = "store.redis_url") -> None:
    """Fail at start-up, naming the setting, when Redis does not answer."""
    try:
        await client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ConfigError(f"{where}: Redis does not answer ({exc})") from exc
