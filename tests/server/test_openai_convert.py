"""OpenAI requests → GenerationRequests: every field's mapping, and every refusal naming its parameter."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from openautoglm.config.media import MediaConfig
from openautoglm.protocol.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from openautoglm.protocol.openai import ChatCompletionRequest, CompletionRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.http.media import validate_image_data_uri
from openautoglm.server.http.openai_convert import chat_request, completion_requests, has_media

TEXT = frozenset({"text"})
VISION = frozenset({"text", "image"})


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def to_gen(req: ChatCompletionRequest, modalities: frozenset[str] = TEXT, cfg: MediaConfig | None = None):
    media = cfg or MediaConfig()
    return chat_request(
        req,
        "r1",
        model="m",
        modalities=modalities,
        image_check=lambda url, param: validate_image_data_uri(url, media, param=param),
    )


def png_uri(size: int = 8) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_defaults_are_the_sampling_defaults_except_chat_max_tokens() -> None:
    gen = to_gen(chat())
    expected = SamplingParams(max_tokens=None)
    assert gen.sampling == expected
    assert gen.messages == [{"role": "user", "content": "hi"}]
    assert gen.request_id == "r1" and gen.model == "m" and gen.priority == 0


def test_every_sampling_field_maps_to_its_sampling_param() -> None:
    gen = to_gen(
        chat(
            n=3,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            seed=7,
            min_tokens=2,
            max_tokens=20,
            ignore_eos=True,
            stop_token_ids=[5, 6],
            skip_special_tokens=False,
            include_stop_str_in_output=True,
            stop="END",
            user="u-1",
            priority=3,
        )
    )
    s = gen.sampling
    assert (s.n, s.temperature, s.top_p, s.top_k, s.min_p) == (3, 0.5, 0.9, 40, 0.05)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.1, 0.5, -0.5)
    assert (s.seed, s.min_tokens, s.max_tokens, s.ignore_eos) == (7, 2, 20, True)
    assert s.stop_token_ids == [5, 6] and not s.skip_special_tokens and s.include_stop_str_in_output
    assert s.stop == ["END"]
    assert gen.metadata == {"user": "u-1"} and gen.priority == 3


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert to_gen(chat(max_tokens=5, max_completion_tokens=9)).sampling.max_tokens == 9
    assert to_gen(chat(max_tokens=5)).sampling.max_tokens == 5


def test_bad_max_completion_tokens_is_named_as_such() -> None:
    with pytest.raises(InvalidRequestError) as exc:
        to_gen(chat(max_completion_tokens=0))
    assert exc.value.param == "max_completion_tokens" and "max_completion_tokens" in exc.value.message


def test_stop_list_and_logprobs() -> None:
    gen = to_gen(chat(stop=["a", "b"], logprobs=True, top_logprobs=3))
    assert gen.sampling.stop == ["a", "b"] and gen.sampling.logprobs == 3
    assert to_gen(chat(logprobs=True)).sampling.logprobs == 0
    assert to_gen(chat()).sampling.logprobs is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3000.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 0}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logit_bias": {"1": 5.0}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ],
)
def test_refusals_name_the_parameter(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        to_gen(chat(**fields))
    assert exc.value.param == param
    assert exc.value.http_status == 400


def test_empty_logit_bias_and_text_response_format_are_accepted() -> None:
    to_gen(chat(logit_bias={}, response_format={"type": "text"}, tools=[]))


def test_developer_role_becomes_system_and_tool_fields_pass_through() -> None:
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "calc"},
    ]
    gen = to_gen(chat(messages=msgs))
    assert gen.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "calc"},
    ]


def test_text_parts_join_into_one_string() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = chat(messages=[{"role": "user", "content": content}])
    assert not has_media(req.messages)
    assert to_gen(req).messages == [{"role": "user", "content": "a\nb"}]


def test_valid_image_on_text_model_is_415_naming_accepted_modalities() -> None:
    content = [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": png_uri()}}]
    req = chat(messages=[{"role": "user", "content": content}])
    assert has_media(req.messages)
    with pytest.raises(UnsupportedMediaTypeError) as exc:
        to_gen(req)
    assert exc.value.http_status == 415 and exc.value.param == "messages.0.content.1"
    assert "accepts only text" in exc.value.message


def test_image_kept_as_part_for_a_vision_model() -> None:
    uri = png_uri()
    content = [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": uri}}]
    gen = to_gen(chat(messages=[{"role": "user", "content": content}]), modalities=VISION)
    assert gen.messages[0]["content"] == [
        {"type": "text", "text": "what"},
        {"type": "image_url", "image_url": {"url": uri}},
    ]


@pytest.mark.parametrize(
    ("url", "error", "status"),
    [
        ("data:image/png;base64,@@@@", InvalidRequestError, 400),
        ("data:image/jpeg;base64," + png_uri().split(",")[1], UnsupportedMediaTypeError, 415),
        (png_uri(size=64), PayloadTooLargeError, 413),
    ],
)
def test_image_data_is_validated_before_the_modality_check(url: str, error: type, status: int) -> None:
    cfg = MediaConfig(max_image_pixels=32 * 32)
    req = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    with pytest.raises(error) as exc:
        to_gen(req, cfg=cfg)
    assert exc.value.http_status == status


def test_audio_part_on_text_model_is_415() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(UnsupportedMediaTypeError):
        to_gen(chat(messages=[{"role": "user", "content": [part]}]))


# --- completions -------------------------------------------------------------------------------------------


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def test_completion_defaults_to_16_tokens_and_one_request() -> None:
    (gen,) = completion_requests(completion(), "c1", model="m")
    assert gen.prompt == "hi" and gen.request_id == "c1" and gen.sampling.max_tokens == 16
    assert gen.prompt_token_ids is None and gen.messages is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("x", [("x", None)]),
        (["a", "b"], [("a", None), ("b", None)]),
        ([1, 2, 3], [(None, [1, 2, 3])]),
        ([[1], [2, 3]], [(None, [1]), (None, [2, 3])]),
    ],
)
def test_completion_prompt_shapes(prompt: object, expected: list[tuple[object, object]]) -> None:
    gens = completion_requests(completion(prompt=prompt, max_tokens=None), "c1", model="m")
    assert [(g.prompt, g.prompt_token_ids) for g in gens] == expected
    ids = [g.request_id for g in gens]
    assert ids == (["c1"] if len(gens) == 1 else [f"c1-{k}" for k in range(len(gens))])
    assert all(g.sampling.max_tokens is None for g in gens)
    assert len({id(g.sampling) for g in gens}) == len(gens)  # each request owns its parameters


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3, "n": 2}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ],
)
def test_completion_refusals(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        completion_requests(completion(**fields), "c1", model="m")
    assert exc.value.param == param


def test_best_of_equal_to_n_is_accepted() -> None:
    (gen,) = completion_requests(completion(best_of=2, n=2, logprobs=2), "c1", model="m")
    assert gen.sampling.n == 2 and gen.sampling.logprobs == 2
