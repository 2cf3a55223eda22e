"""Redis made unreachable during the test (a proxy we cut, never the shared server) and restored: fail-open
limits with this process's counters, fail-closed answers 503; both record a metric and an audit event, and
shared limits come back on their own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlparse

import pytest

from openautoglm.config.settings import Settings
from openautoglm.gateway.audit import Auditor
from openautoglm.gateway.limits import LimitsPolicy
from openautoglm.gateway.pipeline import GatewayContext, Identity
from openautoglm.gateway.traffic import LIMITER_DOWN, LIMITER_UP, Traffic
from openautoglm.protocol.errors import ConfigError, RateLimitError, ServiceUnavailableError
from openautoglm.store.audit import AuditLog
from openautoglm.store.db import Database

from .traffic_fakes import TcpProxy  # type: ignore[import-not-found]

KEY = Identity(subject="key:k1", kind="api_key", scopes=frozenset({"inference"}), tenant="t", key_id="k1", rpm=6)


def ctx() -> GatewayContext:
    return GatewayContext("http", "POST /v1/chat/completions", "inference", "10.0.0.1", {}, identity=KEY)


def traffic(tmp_path: Path, redis_port: int, prefix: str, mode: str) -> tuple[Traffic, AuditLog, Database]:
    settings = Settings.model_validate({
        "store": {"data_dir": str(tmp_path), "redis_url": f"redis://127.0.0.1:{redis_port}/0", "redis_prefix": prefix},
        "gateway": {"limits": {"on_redis_error": mode, "redis_retry_s": 0.2, "burst_fraction": 1.0}},
    })  # fmt: skip
    db = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    db.upgrade()
    log = AuditLog(db)
    return Traffic(settings, Auditor(log)), log, db


async def admit(policy: LimitsPolicy) -> str:
    c = ctx()
    try:
        await policy.before(c)
    except RateLimitError:
        return "429"
    except ServiceUnavailableError:
        return "503"
    await policy.after(c, None)  # type: ignore[arg-type]
    return c.notes["headers"]["x-ratelimit-remaining-requests"]


async def wait_for(log: AuditLog, action: str) -> None:
    for _ in range(100):
        if log.query(action=action):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"no audit event {action}")


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_outage_and_recovery(tmp_path: Path, redis_url: str, redis_prefix: str, mode: str) -> None:
    target = urlparse(redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    t, log, db = traffic(tmp_path, proxy.port, redis_prefix, mode)
    try:
        assert await admit(t.policy) == "5"  # 6 per minute (one back every 10 s), shared in Redis
        assert await admit(t.policy) == "4"
        await proxy.stop()
        during = [await admit(t.policy) for _ in range(3)]
        if mode == "open":
            assert during == ["5", "4", "3"]  # this process's own counters take over
        else:
            assert during == ["503", "503", "503"]
        await wait_for(log, LIMITER_DOWN)
        assert t.metrics.limiter_up._value.get() == 0 and t.metrics.limiter_errors._value.get() == 1
        await proxy.start()  # same port: Redis is back
        await asyncio.sleep(0.25)  # past redis_retry_s
        assert await admit(t.policy) == "3"  # the shared bucket again, as Redis kept it
        await wait_for(log, LIMITER_UP)
        assert t.metrics.limiter_up._value.get() == 1
        [down] = log.query(action=LIMITER_DOWN)
        assert down.actor == "system" and down.detail["fail"] == mode
    finally:
        await t.close()
        await proxy.stop()
        db.dispose()


def test_shared_features_without_redis_are_refused_at_start_up(tmp_path: Path) -> None:
    for gateway, setting in (
        ({"limits": {"backend": "redis"}}, "gateway.limits.backend=redis"),
        ({"cache": {"enabled": True, "l2": "redis"}}, "gateway.cache.l2=redis"),
    ):
        settings = Settings.model_validate({"store": {"data_dir": str(tmp_path)}, "gateway": gateway})
        with pytest.raises(ConfigError, match=f"{setting}.*needs store.redis_url"):
            Traffic(settings, Auditor(None))
