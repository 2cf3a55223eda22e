"""Router tests: fake OpenAI-compatible backends (tests/backends/fake_openai.py) and router builders."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _fake_openai() -> ModuleType:
    if "fake_openai" in sys.modules:
        return sys.modules["fake_openai"]
    path = Path(__file__).parents[1] / "backends" / "fake_openai.py"
    spec = importlib.util.spec_from_file_location("fake_openai", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_openai"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fake_openai = _fake_openai()


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await fakes("a", "b", …)``: started FakeOpenAI servers, stopped after the test."""
    started: list[Any] = []

    async def start(*names: str, **fields: Any) -> list[Any]:
        out = [await fake_openai.FakeOpenAI(name, **fields).start() for name in names]
        started.extend(out)
        return out

    yield start
    for fake in started:
        await fake.stop()
