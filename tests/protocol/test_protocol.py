"""Protocol types: SamplingParams validation names the parameter; errors carry their transport mappings."""

from __future__ import annotations

import math

import pytest

from openautoglm.protocol import errors
from openautoglm.protocol.outputs import CompletedRequest, CompletionOutput, FinishReason, RequestOutput, Usage
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams

BAD = [
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"seed": 2**64}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
    ({"max_tokens": True}, "max_tokens"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_sampling_params_name_the_bad_parameter(fields: dict, param: str) -> None:
    with pytest.raises(errors.InvalidRequestError) as info:
        SamplingParams(**fields).validate()
    assert info.value.param == param and param in info.value.message


def test_good_sampling_params_pass() -> None:
    p = SamplingParams(n=2, max_tokens=None, temperature=0, top_k=-1, seed=-5, stop=["\n"]).validate()
    assert p.greedy


def test_error_mappings_are_consistent() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.AutoGLMError)]
    assert len(classes) > 10
    for cls in classes:
        assert 400 <= cls.http_status < 600
        assert cls.grpc_code.isupper()
    err = errors.ContextLengthExceededError("too long")
    assert err.to_openai() == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert errors.RateLimitError("slow down", retry_after=3).retry_after == 3


def test_prompt_fields_exactly_one() -> None:
    with pytest.raises(errors.InvalidRequestError):
        GenerationRequest("r").validate_prompt()
    GenerationRequest("r", prompt="x").validate_prompt()


def test_completed_request_folds_chunks() -> None:
    done = CompletedRequest("r")
    done.add(RequestOutput("r", [CompletionOutput(1, "b", [2])], prompt_token_ids=[9]))
    done.add(
        RequestOutput(
            "r", [CompletionOutput(0, "a", [1]), CompletionOutput(1, "c", [3], finish_reason=FinishReason.STOP)]
        )
    )
    done.add(
        RequestOutput(
            "r", [CompletionOutput(0, "!", [4], finish_reason=FinishReason.LENGTH)], finished=True, usage=Usage(1, 4)
        )
    )
    assert [s.text for s in done.sequences] == ["a!", "bc"]
    assert done.sequences[1].token_ids == [2, 3] and done.prompt_token_ids == [9]
    assert done.finished and done.usage == Usage(1, 4) and done.usage.total_tokens == 5


def test_request_output_merge_concatenates_deltas() -> None:
    first = RequestOutput("r", [CompletionOutput(0, "a", [1], num_tokens=1)], prompt_token_ids=[9], queue_time=0.5)
    first.merge(RequestOutput("r", [CompletionOutput(1, "x", [7], num_tokens=1)]))
    first.merge(
        RequestOutput(
            "r",
            [CompletionOutput(0, "b", [2], finish_reason=FinishReason.STOP, stop_reason="\n", num_tokens=2)],
            finished=True,
            usage=Usage(1, 3),
        )
    )
    assert [(o.index, o.text_delta, o.token_ids_delta) for o in first.outputs] == [(0, "ab", [1, 2]), (1, "x", [7])]
    assert first.outputs[0].finish_reason is FinishReason.STOP and first.outputs[0].stop_reason == "\n"
    assert first.finished and first.usage == Usage(1, 3)
    assert first.prompt_token_ids == [9] and first.queue_time == 0.5
