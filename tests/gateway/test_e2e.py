"""Real ``autoglm serve`` processes sharing PostgreSQL and Redis: revocation reaches the other replica within
1 s, a brute-force block holds on both, authentication is on by default, and no secret reaches a log."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openautoglm.config.settings import Settings
from openautoglm.gateway.keys import Actor, KeyManager, parse_key
from openautoglm.gateway.service import cli_key_manager
from openautoglm.store.audit import AuditLog
from openautoglm.store.db import Database
from openautoglm.store.keys import ApiKeyRepository

from .conftest import SERVER_SECRET, postgres_schema, redis_namespace  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow
ROOT = Actor("e2e")


class Cluster:
    def __init__(self, a: Any, b: Any, db: Database, env: dict[str, str]) -> None:
        self.a, self.b, self.db, self.env = a, b, db, env
        self.keys = KeyManager(ApiKeyRepository(db), AuditLog(db), SERVER_SECRET.encode())
        self.secrets: list[str] = []

    def key(self, *scopes: str) -> str:
        _, key = self.keys.create(ROOT, name="e2e", owner="e2e", scopes=list(scopes))
        self.secrets += [key, (parse_key(key) or ("", ""))[1]]
        return key


@pytest.fixture(scope="module")
def cluster(serve_process: Any, postgres_url: str, redis_url: str) -> Iterator[Cluster]:
    with postgres_schema(postgres_url) as pg, redis_namespace(redis_url) as prefix:
        yield from _cluster(serve_process, pg, redis_url, prefix)


def _cluster(serve_process: Any, pg: str, redis_url: str, prefix: str) -> Iterator[Cluster]:
    env = {
        "AUTOGLM_STORE__URL": pg,
        "AUTOGLM_STORE__REDIS_URL": redis_url,
        "AUTOGLM_STORE__REDIS_PREFIX": prefix,
        "AUTOGLM_GATEWAY__AUTH__SECRET": SERVER_SECRET,
        "AUTOGLM_GATEWAY__AUTH__KEY_CACHE_TTL_S": "1.0",
        "AUTOGLM_GATEWAY__BRUTE_FORCE__MAX_FAILURES": "3",
        "AUTOGLM_GATEWAY__BRUTE_FORCE__BLOCK_S": "2",
    }
    # Each test speaks for its own client address through X-Forwarded-For, believed from loopback only.
    config = Path(tempfile.mkdtemp()) / "gateway.yaml"
    config.write_text("gateway:\n  brute_force:\n    trusted_proxies: ['127.0.0.1/32']\n")
    db = Database(pg)
    db.upgrade()
    a = serve_process(env, ["--config", str(config)], auth=True)
    b = serve_process(env, ["--config", str(config)], auth=True)
    yield Cluster(a, b, db, env)
    a.stop()
    b.stop()
    db.dispose()


def get(server: Any, key: str | None, client: str, path: str = "/v1/models") -> httpx.Response:
    headers = {"X-Forwarded-For": client}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.get(server.url + path, headers=headers, timeout=10)


def wait_for_401(server: Any, key: str, client: str, limit_s: float = 3.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if get(server, key, client).status_code == 401:
            return time.monotonic() - started
        time.sleep(0.02)
    return float("inf")


def test_authentication_is_required_by_default(cluster: Cluster) -> None:
    assert get(cluster.a, None, "198.51.100.10").status_code == 401
    assert get(cluster.a, None, "198.51.100.10", "/healthz").status_code == 200  # probes stay open


def test_revocation_reaches_the_other_replica_within_a_second(cluster: Cluster) -> None:
    admin, user = cluster.key("keys:manage"), cluster.key("models:read")
    user_id = (parse_key(user) or ("",))[0]
    assert get(cluster.b, user, "198.51.100.1").status_code == 200  # B has the key cached now
    r = httpx.delete(f"{cluster.a.url}/admin/keys/{user_id}", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    assert wait_for_401(cluster.b, user, "198.51.100.1") < 1.0


def test_cli_changes_reach_running_servers_within_a_second(cluster: Cluster) -> None:
    user = cluster.key("models:read")
    user_id = (parse_key(user) or ("",))[0]
    assert get(cluster.b, user, "198.51.100.3").status_code == 200
    settings = Settings.model_validate(
        {
            "store": {"url": cluster.env["AUTOGLM_STORE__URL"], "redis_url": cluster.env["AUTOGLM_STORE__REDIS_URL"],
                      "redis_prefix": cluster.env["AUTOGLM_STORE__REDIS_PREFIX"]},
            "gateway": {"auth": {"secret": SERVER_SECRET}},
        }
    )  # fmt: skip
    cli_key_manager(settings, cluster.db).set_disabled(ROOT, user_id, True)
    assert wait_for_401(cluster.b, user, "198.51.100.3") < 1.0


def test_brute_force_block_is_shared_through_redis(cluster: Cluster) -> None:
    good = cluster.key("models:read")
    bad = "sk-agl-000000000000-" + "y" * 32
    for _ in range(3):
        assert get(cluster.a, bad, "198.51.100.2").status_code == 401
    blocked = get(cluster.b, good, "198.51.100.2")
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) in (1, 2)
    assert get(cluster.b, good, "198.51.100.4").status_code == 200  # other addresses are not blocked
    time.sleep(2.1)
    assert get(cluster.b, good, "198.51.100.2").status_code == 200
    blocks = AuditLog(cluster.db).query(action="auth.block")
    assert [rec.target for rec in blocks] == ["198.51.100.2"]


def test_no_secret_in_server_logs(cluster: Cluster) -> None:
    for server in (cluster.a, cluster.b):
        text = Path(server.log).read_text()
        assert "auth" in text or "access" in text  # the log did capture requests
        assert not any(secret in text for secret in cluster.secrets)
        assert SERVER_SECRET not in text and "Bearer" not in text


def test_no_auth_is_refused_off_loopback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "openautoglm.cli.main", "serve", "--host", "0.0.0.0", "--no-auth"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={"AUTOGLM_STORE__DATA_DIR": str(tmp_path), "PATH": ""}
    )
    assert done.returncode == 2 and "loopback" in " ".join(done.stderr.split())
