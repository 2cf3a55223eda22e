"""Prompt templates over HTTP, in-process over the demo engine and a SQLite store: versions, rendering, use from
chat and completions (the engine sees exactly the rendered prompt), a missing variable is a 400 naming it, and
changes are audited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.server.test_http_app import engine, engine_text, unauthenticated  # noqa: F401 — the demo engine

from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.http.app import create_app

GREEDY = SamplingParams(max_tokens=5, temperature=0)


@pytest.fixture
async def client(engine: Any, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    app = create_app(unauthenticated(tmp_path), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
        yield c


async def test_versions_render_and_use(client: httpx.AsyncClient, engine: Any) -> None:  # noqa: F811
    r = await client.post("/admin/templates", json={"name": "greet", "template": "Hello {{ who }}."})
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["variables"] == ["who"]
    r = await client.post("/admin/templates", json={"name": "greet", "template": "Hi {{ who }}, {{ mood }}?"})
    assert r.json()["version"] == 2
    listed = (await client.get("/admin/templates")).json()["data"]
    assert [(t["name"], t["version"]) for t in listed] == [("greet", 2)]
    versions = (await client.get("/admin/templates/greet")).json()["data"]
    assert [v["template"] for v in versions] == ["Hello {{ who }}.", "Hi {{ who }}, {{ mood }}?"]
    r = await client.post("/admin/templates/greet/render", json={"version": 1, "variables": {"who": "Ann"}})
    assert r.json()["text"] == "Hello Ann."

    ref = {"name": "greet", "version": 1, "variables": {"who": "Ann"}}
    body = {"prompt_template": ref, "prompt": " Go on:", "max_tokens": 5, "temperature": 0}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    expected = await engine_text(engine, prompt="Hello Ann. Go on:", sampling=GREEDY)
    assert r.json()["choices"][0]["text"] == expected[0]
    user = {"role": "user", "content": "Hi"}
    body = {"prompt_template": ref, "messages": [user], "max_tokens": 5, "temperature": 0}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    system = {"role": "system", "content": "Hello Ann."}
    expected = await engine_text(engine, messages=[system, user], sampling=GREEDY)
    assert r.json()["choices"][0]["message"]["content"] == expected[0]

    latest = {"name": "greet", "variables": {"who": "Ann"}}  # version 2 needs mood too
    r = await client.post("/v1/chat/completions", json={"prompt_template": latest, "messages": [user], "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_template.variables.mood"

    audit = (await client.get("/admin/audit", params={"action": "template.create"})).json()["data"]
    assert [a["target"] for a in audit] == ["template:greet@1", "template:greet@2"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/templates", {"name": "bad", "template": "{% for %}"}, 400),
        ("/admin/templates", {"name": "../x", "template": "x"}, 400),
        ("/admin/templates/nope/render", {"variables": {}}, 404),
        ("/v1/completions", {"prompt_template": {"name": "nope"}, "prompt": "x"}, 404),
        ("/v1/completions", {"prompt_template": {"name": "nope"}, "prompt": [1, 2]}, 404),
    ],
)
async def test_refusals(client: httpx.AsyncClient, path: str, body: dict[str, Any], status: int) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
