"""Three real ``autoglm serve`` processes sharing PostgreSQL and Redis behave as one deployment: the global
requests/s limit holds across them within 10% under many concurrent clients, a per-key limit too, an answer
cached by one replica is a hit on another, and a key revoked on one is refused by the others."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openautoglm.gateway.keys import Actor, KeyManager, parse_key
from openautoglm.store.audit import AuditLog
from openautoglm.store.db import Database
from openautoglm.store.keys import ApiKeyRepository

from .conftest import SERVER_SECRET, postgres_schema, redis_namespace  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow
GLOBAL_RPS = 30
CONFIG = f"""
gateway:
  limits:
    global_rps: {GLOBAL_RPS}
    burst_fraction: 0.5  # half a second of slack: a replica stalling briefly on a loaded 2-core machine
  cache:
    enabled: true
  brute_force:
    enabled: false
"""


class Deployment:
    def __init__(self, servers: list[Any], db: Database) -> None:
        self.servers, self.db = servers, db
        self.keys = KeyManager(ApiKeyRepository(db), AuditLog(db), SERVER_SECRET.encode())

    def key(self, *scopes: str, **extra: Any) -> str:
        return self.keys.create(Actor("e2e"), name="e2e", owner="e2e", scopes=list(scopes), **extra)[1]


@pytest.fixture(scope="module")
def deployment(serve_process: Any, postgres_url: str, redis_url: str) -> Iterator[Deployment]:
    with postgres_schema(postgres_url) as pg, redis_namespace(redis_url) as prefix:
        env = {
            "AUTOGLM_STORE__URL": pg,
            "AUTOGLM_STORE__REDIS_URL": redis_url,
            "AUTOGLM_STORE__REDIS_PREFIX": prefix,
            "AUTOGLM_GATEWAY__AUTH__SECRET": SERVER_SECRET,
        }
        config = Path(tempfile.mkdtemp()) / "traffic.yaml"
        config.write_text(CONFIG)
        db = Database(pg)
        db.upgrade()
        servers = [serve_process(env, ["--config", str(config)], auth=True) for _ in range(3)]
        yield Deployment(servers, db)
        for server in servers:
            server.stop()
        db.dispose()


def hammer(urls: list[str], key: str, seconds: float, clients: int) -> tuple[list[float], int]:
    """``clients`` threads sending GET /v1/models round-robin over the replicas; the times of the 200s."""
    ok: list[float] = []
    refused = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as c:
            n = i
            while time.monotonic() < stop_at:
                r = c.get(urls[n % len(urls)] + "/v1/models")
                n += 1
                with lock:
                    if r.status_code == 200:
                        ok.append(time.monotonic())
                    else:
                        assert r.status_code == 429, r.text
                        assert "deployment" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
                        refused[0] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(ok), refused[0]


def test_global_limit_holds_across_replicas(deployment: Deployment) -> None:
    key = deployment.key("models:read")
    seconds = 4.0
    ok, refused = hammer([s.url for s in deployment.servers], key, seconds, clients=12)
    assert refused > len(ok)  # the clients asked for far more than the limit
    capacity = 15  # 30 * 0.5 back to back, then 30 per second
    span = ok[-1] - ok[0]  # from the first admission to the last
    expected = GLOBAL_RPS * span + capacity
    assert abs(len(ok) - expected) <= 0.1 * expected, (len(ok), expected, span, refused)
    served_by = [s for s in deployment.servers if any(e["status"] == 200 for e in s.access_log()[-200:])]
    assert len(served_by) == 3  # every replica served part of it


def test_cached_answers_cross_replicas(deployment: Deployment) -> None:
    key = deployment.key("inference")
    body = {"messages": [{"role": "user", "content": "cache me"}], "max_tokens": 4, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    a, b, c = (s.url + "/v1/chat/completions" for s in deployment.servers)
    first = httpx.post(a, json=body, headers=headers, timeout=30)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    second = httpx.post(b, json=body, headers=headers, timeout=30)
    assert second.headers["x-cache"] == "hit-l2"
    assert second.json()["choices"] == first.json()["choices"]
    with httpx.stream("POST", c, json={**body, "stream": True}, headers=headers, timeout=30) as r:
        assert r.headers["x-cache"] == "hit-l2"
        assert r.read().endswith(b"data: [DONE]\n\n")


def test_per_key_limit_and_revocation_cross_replicas(deployment: Deployment) -> None:
    key = deployment.key("models:read", rpm=4)  # capacity 2, then one every 15 s
    headers = {"Authorization": f"Bearer {key}"}
    codes = [httpx.get(s.url + "/v1/models", headers=headers).status_code for s in deployment.servers]
    assert codes == [200, 200, 429]
    admin, other = deployment.key("keys:manage"), deployment.key("models:read")
    a, b = deployment.servers[0], deployment.servers[1]
    bearer = {"Authorization": f"Bearer {other}"}
    assert httpx.get(b.url + "/v1/models", headers=bearer).status_code == 200  # B has the key cached now
    other_id = (parse_key(other) or ("",))[0]
    r = httpx.delete(f"{a.url}/admin/keys/{other_id}", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    deadline = time.monotonic() + 2.0
    while httpx.get(b.url + "/v1/models", headers=bearer).status_code != 401:
        assert time.monotonic() < deadline, "a key revoked on one replica still works on another after 2 s"
        time.sleep(0.05)
