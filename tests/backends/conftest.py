"""Fake OpenAI-compatible backends (real HTTP servers on loopback) for the backend tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def load_fake_openai() -> ModuleType:
    if "fake_openai" in sys.modules:
        return sys.modules["fake_openai"]
    spec = importlib.util.spec_from_file_location("fake_openai", Path(__file__).parent / "fake_openai.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_openai"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fake_openai = load_fake_openai()


@pytest.fixture
async def fake_backend() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await fake_backend(name, **fields)``: a started FakeOpenAI, stopped after the test."""
    started = []

    async def start(name: str, **fields: Any) -> Any:
        fake = await fake_openai.FakeOpenAI(name, **fields).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()
