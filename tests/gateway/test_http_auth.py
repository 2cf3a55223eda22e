"""Authentication and authorisation on HTTP, in-process over the real demo engine and a real store (SQLite and
PostgreSQL): the scope matrix over every registered route, every kind of bad key, rotation, brute force, the
admin API and its audit trail, and no secret in any log line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from openautoglm.config.gateway import DEFAULT_OPEN_PATHS
from openautoglm.config.router import RouterConfig
from openautoglm.engine.async_engine import AsyncEngine
from openautoglm.gateway.keys import Actor, format_key, parse_key
from openautoglm.gateway.scopes import ALL_SCOPES, HTTP_SCOPES
from openautoglm.router.router import Router
from openautoglm.server.http.app import create_app
from openautoglm.server.http.auth import http_routes

from .conftest import gateway_settings  # type: ignore[import-not-found]

ROOT = Actor("test")
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
VICTIM = "{victim}"  # replaced by a fresh key id per request (revoke/rotate/disable change it)
# One valid request per route: the matrix expects 2xx with the route's scope and 403 without it.
SAMPLES: dict[tuple[str, str], tuple[str, dict[str, Any] | None]] = {
    ("GET", "/healthz"): ("/healthz", None),
    ("GET", "/ready"): ("/ready", None),
    ("GET", "/v2/health/live"): ("/v2/health/live", None),
    ("GET", "/v2/health/ready"): ("/v2/health/ready", None),
    ("GET", "/metrics"): ("/metrics", None),
    ("GET", "/docs"): ("/docs", None),
    ("GET", "/docs/oauth2-redirect"): ("/docs/oauth2-redirect", None),
    ("GET", "/openapi.json"): ("/openapi.json", None),
    ("GET", "/v1/models"): ("/v1/models", None),
    ("GET", "/v1/models/{model_id:path}"): ("/v1/models/demo", None),
    ("POST", "/v1/chat/completions"): ("/v1/chat/completions", CHAT),
    ("POST", "/v1/completions"): ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/infer"): (
        "/v1/infer",
        {"inputs": [{"modality": "text", "data": "hi"}], "parameters": {"max_tokens": 2}},
    ),
    ("POST", "/tokenize"): ("/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize"): ("/detokenize", {"tokens": [1, 2]}),
    ("POST", "/v1/tasks/classify"): ("/v1/tasks/classify", {"text": "hi", "labels": ["a", "b"]}),
    ("POST", "/v1/tasks/extract"): (
        "/v1/tasks/extract",
        {"text": "hi", "schema": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}},
    ),
    ("POST", "/v1/tasks/summarize"): ("/v1/tasks/summarize", {"text": "hi", "max_words": 2}),
    ("POST", "/v1/tasks/translate"): ("/v1/tasks/translate", {"text": "hi", "target_language": "German"}),
    ("POST", "/admin/templates"): ("/admin/templates", {"name": "greet", "template": "Hi {{ who }}"}),
    ("GET", "/admin/templates"): ("/admin/templates", None),
    ("GET", "/admin/templates/{name}"): ("/admin/templates/greet", None),
    ("POST", "/admin/templates/{name}/render"): ("/admin/templates/greet/render", {"variables": {"who": "x"}}),
    ("GET", "/admin/keys"): ("/admin/keys", None),
    ("POST", "/admin/keys"): ("/admin/keys", {"name": "new", "scopes": ["inference"]}),
    ("GET", "/admin/keys/{key_id}"): (f"/admin/keys/{VICTIM}", None),
    ("DELETE", "/admin/keys/{key_id}"): (f"/admin/keys/{VICTIM}", None),
    ("POST", "/admin/keys/{key_id}/rotate"): (f"/admin/keys/{VICTIM}/rotate", {"grace_s": 5}),
    ("POST", "/admin/keys/{key_id}/disable"): (f"/admin/keys/{VICTIM}/disable", None),
    ("POST", "/admin/keys/{key_id}/enable"): (f"/admin/keys/{VICTIM}/enable", None),
    ("GET", "/admin/audit"): ("/admin/audit?action=key.create&limit=5", None),
    ("GET", "/admin/audit/verify"): ("/admin/audit/verify", None),
    ("POST", "/admin/audit/prune"): ("/admin/audit/prune", {"before": "2000-01-01T00:00:00Z"}),
    ("POST", "/admin/reload"): ("/admin/reload", None),
    ("GET", "/admin/router"): ("/admin/router", None),
    ("GET", "/admin/diagnostics"): ("/admin/diagnostics", None),
    ("GET", "/admin/rollouts/{model:path}"): ("/admin/rollouts/routed", None),
    ("POST", "/admin/rollouts/{model:path}/{action}"): ("/admin/rollouts/routed/start", {"version": "v2"}),
}
# The scope matrix's router: one deployment with a stable and a canary backend (never called).
ROUTER = {"enabled": True, "deployments": [{"model": "routed", "backends": [
    {"name": "s", "url": "http://127.0.0.1:9/v1"}, {"name": "c", "url": "http://127.0.0.1:9/v1", "version": "v2"},
]}]}  # fmt: skip


def make_app(engine: AsyncEngine, tmp_path: Path, db_url: str, **gateway: Any) -> FastAPI:
    return create_app(gateway_settings(tmp_path, db_url, **gateway), engine)


@pytest.fixture
async def app(engine: AsyncEngine, tmp_path: Path, db_url: str) -> AsyncIterator[FastAPI]:
    application = make_app(engine, tmp_path, db_url, brute_force={"max_failures": 1000})
    yield application
    await application.state.gateway.close()


def client_for(app: FastAPI, ip: str = "10.0.0.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60)


def new_key(app: FastAPI, *scopes: str, **extra: Any) -> str:
    _, key = app.state.gateway.keys.create(ROOT, name="t", owner="tester", scopes=list(scopes), **extra)
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_registered_route_is_in_the_table_and_sampled(app: FastAPI) -> None:
    registered = {(m, r.path) for r in http_routes(app.routes) for m in r.methods - {"HEAD"}}  # type: ignore[attr-defined]
    assert registered == set(HTTP_SCOPES) == set(SAMPLES)


async def test_scope_matrix(engine: AsyncEngine, tmp_path: Path, db_url: str) -> None:
    """Every route (open ones closed by configuration) x every scope: 2xx with its scope, 403 without."""
    app = make_app(engine, tmp_path, db_url, auth={"open_paths": []}, brute_force={"enabled": False})
    app.state.config_file = tmp_path / "autoglm.yaml"
    app.state.config_file.write_text(yaml.safe_dump({"router": ROUTER}))
    app.state.router = Router(RouterConfig.model_validate(ROUTER), engine=engine)
    keys = {scope: new_key(app, scope) for scope in ALL_SCOPES}
    async with client_for(app) as c:
        for (method, template), (path, body) in SAMPLES.items():
            needed = HTTP_SCOPES[(method, template)].value
            for scope, key in keys.items():
                victim = parse_key(new_key(app, "inference"))
                assert victim is not None
                url = path.replace(VICTIM, victim[0])
                r = await c.request(method, url, json=body, headers=bearer(key))
                if scope == needed:
                    assert 200 <= r.status_code < 300, (method, url, scope, r.status_code, r.text[:300])
                else:
                    assert r.status_code == 403, (method, url, scope, r.status_code)
                    assert r.json()["error"]["code"] == "insufficient_scope"
            r = await c.request(method, path.replace(VICTIM, "x"), json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, template)
    await app.state.gateway.close()


async def test_open_paths_need_no_credentials(app: FastAPI) -> None:
    async with client_for(app) as c:
        for (method, template), (path, _) in SAMPLES.items():
            r = await c.request(method, path.replace(VICTIM, "x"))
            if template in DEFAULT_OPEN_PATHS:
                assert r.status_code == 200, template
            else:
                assert r.status_code == 401, template


async def test_bad_keys(app: FastAPI) -> None:
    repo = app.state.gateway.keys.repo
    good = new_key(app, "models:read")
    key_id, secret = parse_key(good) or ("", "")
    wrong_secret = format_key(key_id, ("A" if secret[0] != "A" else "B") + secret[1:])
    unknown = format_key("zzzzzzzzzzzz", secret)
    async with client_for(app) as c:

        async def status(headers: dict[str, str]) -> tuple[int, str | None]:
            r = await c.get("/v1/models", headers=headers)
            return r.status_code, r.json().get("error", {}).get("code") if r.status_code != 200 else None

        assert await status(bearer(good)) == (200, None)
        assert await status({}) == (401, "missing_credentials")
        assert (await status({"Authorization": "Basic dXNlcjpwYXNz"}))[0] == 401
        assert await status(bearer("sk-agl-short")) == (401, "invalid_api_key")
        assert await status(bearer(wrong_secret)) == (401, "invalid_api_key")
        assert await status(bearer(unknown)) == (401, "invalid_api_key")
        repo.update(key_id, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
        await app.state.gateway.invalidate(key_id)
        assert await status(bearer(good)) == (401, "key_expired")
        repo.update(key_id, expires_at=None)
        app.state.gateway.keys.set_disabled(ROOT, key_id, True)
        await app.state.gateway.invalidate(key_id)
        assert await status(bearer(good)) == (401, "key_disabled")
        app.state.gateway.keys.set_disabled(ROOT, key_id, False)
        await app.state.gateway.invalidate(key_id)
        assert await status(bearer(good)) == (200, None)
        app.state.gateway.keys.revoke(ROOT, key_id)
        await app.state.gateway.invalidate(key_id)
        assert await status(bearer(good)) == (401, "key_revoked")
    assert repo.require(key_id).last_used_at is not None


async def test_changes_through_the_store_alone_are_seen_within_the_cache_ttl(app: FastAPI) -> None:
    """No pub/sub message (the CLI without Redis): the short cache TTL bounds how long a revoked key works."""
    key = new_key(app, "models:read")
    key_id = (parse_key(key) or ("",))[0]
    async with client_for(app) as c:
        assert (await c.get("/v1/models", headers=bearer(key))).status_code == 200
        app.state.gateway.keys.revoke(ROOT, key_id)
        await asyncio.sleep(app.state.gateway.settings.gateway.auth.key_cache_ttl_s + 0.05)
        assert (await c.get("/v1/models", headers=bearer(key))).status_code == 401


async def test_rotation_keeps_the_old_secret_for_the_grace_period(app: FastAPI) -> None:
    old = new_key(app, "models:read", "keys:manage")
    key_id = (parse_key(old) or ("",))[0]
    async with client_for(app) as c:
        r = await c.post(f"/admin/keys/{key_id}/rotate", json={"grace_s": 0.6}, headers=bearer(old))
        assert r.status_code == 200
        new = r.json()["key"]
        assert parse_key(new) is not None and new != old and (parse_key(new) or ("",))[0] == key_id
        assert (await c.get("/v1/models", headers=bearer(old))).status_code == 200  # inside the grace period
        assert (await c.get("/v1/models", headers=bearer(new))).status_code == 200
        await asyncio.sleep(0.7)
        assert (await c.get("/v1/models", headers=bearer(old))).status_code == 401  # after it
        assert (await c.get("/v1/models", headers=bearer(new))).status_code == 200


async def test_admin_api_and_its_audit_trail(app: FastAPI) -> None:
    admin = new_key(app, "keys:manage", "audit:read")
    async with client_for(app) as c:
        r = await c.post("/admin/keys", json={"name": "ci", "scopes": ["inference"], "rpm": 60}, headers=bearer(admin))
        assert r.status_code == 201
        created = r.json()
        assert created["owner"] == "tester" and created["rpm"] == 60 and "secret_hash" not in created
        key_id = created["id"]
        listed = (await c.get("/admin/keys", headers=bearer(admin))).json()["data"]
        assert key_id in {k["id"] for k in listed} and all("key" not in k for k in listed)
        assert (
            await c.post("/admin/keys", json={"name": "x", "scopes": ["root"]}, headers=bearer(admin))
        ).status_code == 400
        assert (await c.get("/admin/keys/nope", headers=bearer(admin))).status_code == 404
        await c.delete(f"/admin/keys/{key_id}", headers=bearer(admin))
        assert (await c.get("/v1/models", headers=bearer(created["key"]))).status_code == 401
        admin_id = (parse_key(admin) or ("",))[0]
        records = (await c.get(f"/admin/audit?actor=key:{admin_id}", headers=bearer(admin))).json()["data"]
        assert [(rec["action"], rec["target"]) for rec in records] == [("key.create", key_id), ("key.revoke", key_id)]
        assert all(rec["request_id"] and rec["client"] == "10.0.0.7" for rec in records)
        failures = (await c.get("/admin/audit?action=auth.failure", headers=bearer(admin))).json()["data"]
        assert failures[-1]["actor"] == f"key:{key_id}" and failures[-1]["detail"]["reason"] == "key_revoked"
        report = (await c.get("/admin/audit/verify", headers=bearer(admin))).json()
        assert report["ok"] is True and report["checked"] >= 4


async def test_brute_force_block_and_unblock(engine: AsyncEngine, tmp_path: Path, db_url: str) -> None:
    app = make_app(
        engine, tmp_path, db_url,
        brute_force={"max_failures": 3, "window_s": 60, "block_s": 1.0, "trusted_proxies": ["10.0.0.0/8"]},
    )  # fmt: skip
    good = new_key(app, "models:read", "audit:read")
    bad = bearer("sk-agl-000000000000-" + "x" * 32)
    async with client_for(app, ip="192.0.2.1") as direct, client_for(app, ip="10.1.1.1") as proxy:
        for _ in range(3):
            assert (await direct.get("/v1/models", headers=bad)).status_code == 401
        blocked = await direct.get("/v1/models", headers=bearer(good))  # even a good key: the address is blocked
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 1
        # X-Forwarded-For from an untrusted peer is ignored: the blocked peer stays blocked.
        r = await direct.get("/v1/models", headers={**bearer(good), "X-Forwarded-For": "198.51.100.9"})
        assert r.status_code == 429
        # Through a trusted proxy the forwarded address counts: others behind the proxy are not blocked.
        r = await proxy.get("/v1/models", headers={**bearer(good), "X-Forwarded-For": "192.0.2.1, 198.51.100.9"})
        assert r.status_code == 200
        r = await proxy.get("/v1/models", headers={**bearer(good), "X-Forwarded-For": "198.51.100.9, 192.0.2.1"})
        assert r.status_code == 429
        await asyncio.sleep(1.1)
        assert (await direct.get("/v1/models", headers=bearer(good))).status_code == 200
        blocks = app.state.gateway.audit.query(action="auth.block")
        assert [b.target for b in blocks] == ["192.0.2.1"]
    await app.state.gateway.close()


async def test_no_secret_in_logs(app: FastAPI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = new_key(app, "models:read", "keys:manage")
    secrets_seen = [key, (parse_key(key) or ("", ""))[1]]
    async with client_for(app) as c:
        r = await c.post("/admin/keys", json={"name": "n", "scopes": ["inference"]}, headers=bearer(key))
        secrets_seen += [r.json()["key"], (parse_key(r.json()["key"]) or ("", ""))[1]]
        await c.get("/v1/models", headers=bearer(key[:-1] + "Q"))
        await c.get("/v1/models", headers=bearer("not-a-key"))
    text = "\n".join(f"{rec.getMessage()} {rec.args}" for rec in caplog.records)
    assert all(secret not in text for secret in secrets_seen)
    assert all(secret not in str(rec.detail) for rec in app.state.gateway.audit.iter_all() for secret in secrets_seen)
