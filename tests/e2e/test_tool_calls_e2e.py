"""A full tool round trip with the official openai client against a real ``autoglm serve --no-auth`` running the
demo model: a forced call (tool_choice="required"), the tool's result fed back, the final answer; plus a
structured output through ``response_format``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema_rs
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}}
]


@pytest.fixture(scope="module")
def client(serve_process: Callable[..., Any]) -> Iterator[openai.OpenAI]:
    srv = serve_process()
    try:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        assert srv.stop() == 0


def test_tool_round_trip_under_required(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model="demo", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=100, seed=1
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(WEATHER).is_valid(args)
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})})
    final = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=8)
    assert final.choices[0].message.content is not None
    assert final.usage is not None and final.usage.prompt_tokens > first.usage.prompt_tokens

    # Streamed, the SDK's deltas add up to one call with valid arguments.
    stream = client.chat.completions.create(
        model="demo", messages=messages[:1], tools=TOOLS, tool_choice="required", max_tokens=100, seed=2, stream=True
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name += tc.function.name or "" if tc.function else ""
                arguments += tc.function.arguments or "" if tc.function else ""
            finish = ch.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert jsonschema_rs.validator_for(WEATHER).is_valid(json.loads(arguments))


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Weather?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}},
            max_tokens=100,
            seed=seed,
            temperature=1.0,
        )
        assert jsonschema_rs.validator_for(WEATHER).is_valid(json.loads(out.choices[0].message.content or ""))
