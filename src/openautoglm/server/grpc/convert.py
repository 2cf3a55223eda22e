"""ModelInferRequest → GenerationRequest, and engine output → ModelInferResponse.

The prompt is the one element of the BYTES input ``text_input``; the completion is the BYTES output
``text_output``. Sampling settings are request parameters named as in Open-AutoGLM's OpenAI API (max_tokens,
temperature, top_p, top_k, seed, stop, ignore_eos, ...). So that Triton clients work unchanged, the names of
Triton's TensorRT-LLM and vLLM backends are accepted too: aliases (``random_seed``, ``stop_words``,
``max_new_tokens``, ``min_length``), settings as scalar input tensors, and a JSON object in
``sampling_parameters``.
Later sources override earlier ones: ``sampling_parameters`` < input tensors < request parameters.
Unknown parameters are ignored, as the OpenAI API ignores unknown fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openautoglm.protocol.errors import AutoGLMError, InvalidRequestError, ModelNotFoundError
from openautoglm.protocol.outputs import FinishReason, Usage
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.grpc.errors import status_code, stream_error_message
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2 as pb
from openautoglm.server.grpc.tensors import (
    ParamValue,
    encode_bytes_elements,
    input_elements,
    parameters_dict,
    set_parameter,
)

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
MODEL_VERSION = "1"
FINAL_RESPONSE = "triton_final_response"  # set on every streamed response; true on the last one
SAMPLING_PARAMETERS = "sampling_parameters"

Coercer = Callable[[str, Any], Any]


def _bad(name: str, kind: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"parameter '{name}' must be {kind}, got {value!r}", param=name)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _bad(name, "an integer", value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _bad(name, "an integer", value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _bad(name, "a number", value)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise _bad(name, "a boolean", value)


def _json_list(name: str, value: str) -> list[Any] | None:
    """A string holding a JSON array, parsed; None when the string is not one."""
    if not value.lstrip().startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _bad(name, "a JSON array", value) from exc
    if not isinstance(parsed, list):
        raise _bad(name, "a JSON array", value)
    return parsed


def _as_str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        parsed = _json_list(name, value)
        value = [value] if parsed is None else parsed
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _bad(name, "a string or a list of strings", value)


def _as_int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, str):
        parsed = _json_list(name, value)
        value = [value] if parsed is None else parsed
    if isinstance(value, list):
        return [_as_int(name, v) for v in value]
    return [_as_int(name, value)]


# parameter name → (SamplingParams field, coercer)
_SAMPLING: dict[str, tuple[str, Coercer]] = {
    "max_tokens": ("max_tokens", _as_int),
    "max_new_tokens": ("max_tokens", _as_int),
    "min_tokens": ("min_tokens", _as_int),
    "min_length": ("min_tokens", _as_int),
    "temperature": ("temperature", _as_float),
    "top_p": ("top_p", _as_float),
    "top_k": ("top_k", _as_int),
    "min_p": ("min_p", _as_float),
    "repetition_penalty": ("repetition_penalty", _as_float),
    "presence_penalty": ("presence_penalty", _as_float),
    "frequency_penalty": ("frequency_penalty", _as_float),
    "seed": ("seed", _as_int),
    "random_seed": ("seed", _as_int),
    "stop": ("stop", _as_str_list),
    "stop_words": ("stop", _as_str_list),
    "stop_token_ids": ("stop_token_ids", _as_int_list),
    "ignore_eos": ("ignore_eos", _as_bool),
    "skip_special_tokens": ("skip_special_tokens", _as_bool),
    "include_stop_str_in_output": ("include_stop_str_in_output", _as_bool),
}
# Settings of the call rather than of sampling.
_CONTROL: dict[str, Coercer] = {
    "stream": _as_bool,  # ModelStreamInfer: false sends the whole completion in one response
    "exclude_input_in_output": _as_bool,  # false: the completion starts with the prompt
    "apply_chat_template": _as_bool,  # true: the prompt is one user message, rendered by the chat template
}
ACCEPTED_INPUTS = (TEXT_INPUT, SAMPLING_PARAMETERS, *_SAMPLING, *_CONTROL)


@dataclass(frozen=True, slots=True)
class InferCall:
    """A parsed ModelInferRequest."""

    request: GenerationRequest
    client_id: str  # the request's ``id``, echoed in every response
    stream: bool = True
    echo: str = ""  # prepended to the completion when exclude_input_in_output is false


def sampling_params(settings: dict[str, Any]) -> SamplingParams:
    """SamplingParams from named settings (unknown names ignored), validated."""
    fields: dict[str, Any] = {}
    for name, value in settings.items():
        if name in _SAMPLING:
            field, coerce = _SAMPLING[name]
            fields[field] = coerce(name, value)
    return SamplingParams(**fields).validate()


def check_model(name: str, version: str, served: str) -> None:
    """Raise ModelNotFoundError unless ``name`` (and ``version``, when given) is what this server serves."""
    if name != served:
        raise ModelNotFoundError(f"model '{name}' is not served here; this server serves '{served}'")
    if version not in ("", MODEL_VERSION):
        raise ModelNotFoundError(
            f"model '{name}' has no version '{version}'; versions: {MODEL_VERSION}", param="model_version"
        )


def _scalar_or_list(name: str, elements: list[Any]) -> Any:
    values = [_text(name, e) if isinstance(e, bytes) else e for e in elements]
    if not values:
        raise InvalidRequestError(f"input '{name}' holds no element", param=name)
    return values[0] if len(values) == 1 else values


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"input '{name}' is not valid UTF-8: {exc.reason}", param=name) from exc


def _sampling_json(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _bad(SAMPLING_PARAMETERS, "a JSON object", value) from exc
    if not isinstance(value, dict):
        raise _bad(SAMPLING_PARAMETERS, "a JSON object", value)
    return value


def _prompt(inputs: dict[str, tuple[str, list[Any]]]) -> str:
    if TEXT_INPUT not in inputs:
        raise InvalidRequestError(f"input '{TEXT_INPUT}' (BYTES, one element) is required", param=TEXT_INPUT)
    datatype, elements = inputs[TEXT_INPUT]
    if datatype != "BYTES" or len(elements) != 1:
        raise InvalidRequestError(
            f"input '{TEXT_INPUT}' must be BYTES with exactly one element, "
            f"got {datatype} with {len(elements)}; "
            "send one request per prompt",
            param=TEXT_INPUT,
        )
    return _text(TEXT_INPUT, elements[0])


def _settings(msg: pb.ModelInferRequest, inputs: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    tensor_settings: dict[str, Any] = {}
    for name, (_, elements) in inputs.items():
        if name == TEXT_INPUT:
            continue
        if name not in ACCEPTED_INPUTS:
            raise InvalidRequestError(
                f"unknown input '{name}'; inputs accepted: {', '.join(ACCEPTED_INPUTS)}", param=name
            )
        tensor_settings[name] = _scalar_or_list(name, elements)
    params: dict[str, ParamValue] = parameters_dict(msg.parameters)
    settings: dict[str, Any] = {}
    for source in (tensor_settings, params):
        if SAMPLING_PARAMETERS in source:
            settings.update(_sampling_json(source[SAMPLING_PARAMETERS]))
    settings.update(tensor_settings)
    settings.update(params)
    return settings


def _check_outputs(msg: pb.ModelInferRequest) -> None:
    for out in msg.outputs:
        if out.name != TEXT_OUTPUT:
            raise InvalidRequestError(f"unknown output '{out.name}'; outputs available: {TEXT_OUTPUT}", param="outputs")


def parse_infer_request(msg: pb.ModelInferRequest, *, served_model: str, request_id: str) -> InferCall:
    """Check and convert a ModelInferRequest; errors are InvalidRequestError / ModelNotFoundError."""
    check_model(msg.model_name, msg.model_version, served_model)
    _check_outputs(msg)
    inputs = input_elements(msg)
    prompt = _prompt(inputs)
    settings = _settings(msg, inputs)
    control = {name: coerce(name, settings[name]) for name, coerce in _CONTROL.items() if name in settings}
    request = GenerationRequest(
        request_id=request_id,
        sampling=sampling_params(settings),
        model=served_model,
        metadata={"client_request_id": msg.id} if msg.id else {},
    )
    if control.get("apply_chat_template", False):
        request.messages = [{"role": "user", "content": prompt}]
    else:
        request.prompt = prompt
    request.validate_prompt()
    echo = prompt if control.get("exclude_input_in_output") is False else ""
    return InferCall(request=request, client_id=msg.id, stream=control.get("stream", True), echo=echo)


def infer_response(
    *,
    model_name: str,
    client_id: str,
    text: str,
    finish_reason: FinishReason | None = None,
    stop_reason: str | int | None = None,
    usage: Usage | None = None,
    final: bool | None = None,
) -> pb.ModelInferResponse:
    """A response with ``text`` in ``text_output``; finish reason, usage and final flag as parameters."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=client_id)
    response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
    response.raw_output_contents.append(encode_bytes_elements([text.encode("utf-8")]))
    params: dict[str, ParamValue] = {}
    if finish_reason is not None:
        params["finish_reason"] = finish_reason.value
    if stop_reason is not None:
        params["stop_reason"] = stop_reason
    if usage is not None:
        params.update(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
        )
    if final is not None:
        params[FINAL_RESPONSE] = final
    for key, value in params.items():
        set_parameter(response.parameters[key], value)
    return response


def stream_error(*, model_name: str, client_id: str, exc: AutoGLMError) -> pb.ModelStreamInferResponse:
    """A stream response reporting a failed request; it is that request's final response."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=client_id)
    set_parameter(response.parameters["error_code"], status_code(exc).name)
    set_parameter(response.parameters[FINAL_RESPONSE], True)
    return pb.ModelStreamInferResponse(error_message=stream_error_message(exc), infer_response=response)
