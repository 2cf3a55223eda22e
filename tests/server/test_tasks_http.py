"""Task endpoints in-process over the real demo engine: whatever the random weights say, the result has the
task's shape (labels among the given ones, extracted data valid against the schema), with usage; explain
returns the built prompt."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from tests.server.test_http_app import engine, unauthenticated  # noqa: F401 — the module-scoped demo engine

from openautoglm.server.http.app import create_app
from openautoglm.tasks import prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20, "description": "Full name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture
async def client(engine: Any, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    app = create_app(unauthenticated(tmp_path), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
        yield c


async def post(client: httpx.AsyncClient, task: str, **body: Any) -> dict[str, Any]:
    r = await client.post(f"/v1/tasks/{task}", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["task"] == task and out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0
    return out


async def test_classify_single_and_multi(client: httpx.AsyncClient) -> None:
    labels = ["billing", "bug report", "praise"]
    for seed in range(3):
        out = await post(client, "classify", text="The app crashes", labels=labels, temperature=1.0, seed=seed)
        assert out["result"]["label"] in labels
        multi = await post(client, "classify", text="x", labels=labels, multi_label=True, temperature=1.0, seed=seed)
        got = multi["result"]["labels"]
        assert got and set(got) <= set(labels) and len(got) == len(set(got))


async def test_extract_is_valid_against_the_schema(client: httpx.AsyncClient) -> None:
    for seed in range(4):
        out = await post(client, "extract", text="Ann is 31.", schema=SCHEMA, temperature=1.0, seed=seed)
        assert jsonschema_rs.validator_for(SCHEMA).is_valid(out["result"]["data"])
    unbounded = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    out = await post(client, "extract", text="x", schema=unbounded)  # greedy, strings unbounded in the schema
    assert isinstance(out["result"]["data"]["note"], str) and out["finish_reason"] == "stop"


async def test_summarize_translate_and_explain(client: httpx.AsyncClient) -> None:
    out = await post(client, "summarize", text="Open-AutoGLM serves GLM models.", max_words=10, explain=True)
    assert isinstance(out["result"]["summary"], str) and out["result"]["summary"]
    expected = prompts.summarize("Open-AutoGLM serves GLM models.", max_words=10)
    assert out["prompt"]["messages"] == expected.messages
    assert out["usage"]["completion_tokens"] <= expected.max_tokens
    out = await post(client, "translate", text="Bonjour", target_language="English", temperature=1.0, seed=1)
    assert out["result"]["target_language"] == "English" and out["result"]["translation"]
    assert "prompt" not in out


@pytest.mark.parametrize(
    ("task", "body", "param"),
    [
        ("classify", {"text": "x", "labels": []}, "labels"),
        ("extract", {"text": "x", "schema": {"type": "objekt"}}, "schema"),
        ("summarize", {"text": "x", "style": "haiku"}, "style"),
        ("translate", {"text": "x"}, "target_language"),
    ],
)
async def test_bad_task_requests_are_400s(
    client: httpx.AsyncClient, task: str, body: dict[str, Any], param: str
) -> None:
    r = await client.post(f"/v1/tasks/{task}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
