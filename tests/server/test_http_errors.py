"""Schema violations → one 400 naming the parameter; the OpenAI schemas are strict on types, lax on extras."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.openai import ChatCompletionRequest, CompletionRequest
from openautoglm.server.http.errors import from_validation_error

MSG = '"messages": [{"role": "user", "content": "x"}]'


def error_of(model: type, body: str) -> InvalidRequestError:
    with pytest.raises(ValidationError) as exc:
        model.model_validate_json(body)
    return from_validation_error(exc.value)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (f'{{{MSG}, "temperature": "0.5"}}', "temperature", "valid number, got '0.5'"),
        (f'{{{MSG}, "stream": "true"}}', "stream", "valid boolean"),
        (f'{{{MSG}, "max_tokens": 2.5}}', "max_tokens", "valid integer"),
        (f'{{{MSG}, "n": true}}', "n", "valid integer"),
        (f'{{{MSG}, "stop": 5}}', "stop", "valid string or Input should be a valid array, got 5"),
        (f'{{{MSG}, "stop": ["a", 1]}}', "stop.1", "valid string, got 1"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role", "got 'wizard'"),
        ('{"messages": [{"role": "user", "content": [{"type": "foo"}]}]}', "messages.0.content.0.type", "'text'"),
        ('{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "messages.0.content.0.text", "required"),
        ("{}", "messages", "Field required"),
        ("[]", None, "should be an object"),
        ("{", None, "not valid JSON"),
    ],
)
def test_chat_schema_errors(body: str, param: str | None, says: str) -> None:
    err = error_of(ChatCompletionRequest, body)
    assert err.param == param and says in err.message and err.http_status == 400
    if param:
        assert err.message.startswith(f"{param}: ")


def test_completion_prompt_union_reports_the_closest_member() -> None:
    err = error_of(CompletionRequest, '{"prompt": [[1, -1.5]]}')
    assert err.param == "prompt.0.1" and "integer" in err.message


def test_other_fields_errors_are_counted() -> None:
    err = error_of(ChatCompletionRequest, '{"temperature": "x", "top_p": "y"}')
    assert err.param == "temperature" and "(and 2 more errors)" in err.message  # top_p, messages


def test_unknown_fields_are_ignored_as_openai_does() -> None:
    req = ChatCompletionRequest.model_validate_json(f'{{{MSG}, "frobnicate": 1, "metadata": {{"a": "b"}}}}')
    assert not hasattr(req, "frobnicate")
    assert CompletionRequest.model_validate_json('{"prompt": "x", "whatever": [1]}').prompt == "x"


def test_ints_are_accepted_where_floats_are_expected() -> None:
    req = ChatCompletionRequest.model_validate_json(f'{{{MSG}, "temperature": 1, "top_p": 1}}')
    assert req.temperature == 1.0 and isinstance(req.temperature, float)
