"""KServe v2 gRPC: stubs, conversions and error codes (unit); the service through tritonclient (end to end).

Triton's own client library is the oracle for the wire format: its stubs, its request builder and its result
decoder must read what we write and write what we read.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from tests.conftest import free_port
from tritonclient.grpc import InferenceServerClient as SyncClient
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request  # what tritonclient puts on the wire
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

import openautoglm
from openautoglm.protocol import errors as E
from openautoglm.protocol.outputs import FinishReason, Usage
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.server.grpc import SERVICE_NAME, start_grpc_server
from openautoglm.server.grpc.convert import (
    FINAL_RESPONSE,
    TEXT_OUTPUT,
    infer_response,
    parse_infer_request,
    sampling_params,
    stream_error,
)
from openautoglm.server.grpc.errors import status_code, trailing_metadata
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2 as pb
from openautoglm.server.grpc.tensors import (
    decode_bytes_elements,
    encode_bytes_elements,
    input_elements,
    parameter_value,
)

MODEL = "demo"


def _triton_request(
    prompt: str | None = "Hello", *, parameters: dict | None = None, extra=(), **kw
) -> pb.ModelInferRequest:
    """Build a request exactly as tritonclient does, and read it back with our stubs."""
    inputs = []
    if prompt is not None:
        text = InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        inputs.append(text)
    inputs.extend(extra)
    args = dict(
        model_name=MODEL, inputs=inputs, model_version="", request_id="req-1", outputs=None, sequence_id=0,
        sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=parameters,
    )  # fmt: skip
    args.update(kw)
    wire = _get_inference_request(**args).SerializeToString()
    return pb.ModelInferRequest.FromString(wire)


def _parse(msg: pb.ModelInferRequest):
    return parse_infer_request(msg, served_model=MODEL, request_id="grpc-test")


# --- stubs -----------------------------------------------------------------------------------------------


def test_checked_in_stubs_match_a_fresh_generation() -> None:
    pytest.importorskip("grpc_tools")
    from openautoglm.server.grpc.codegen import stale_files

    assert stale_files() == [], "run: python -m openautoglm.server.grpc.codegen"


def test_messages_and_service_are_wire_compatible_with_triton() -> None:
    ours, theirs = pb.DESCRIPTOR, triton_pb.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    assert SERVICE_NAME == "inference.GRPCInferenceService"

    def fields(desc):  # recursively, nested messages included
        own = {(f.name, f.number, f.type, f.is_repeated) for f in desc.fields}
        return own, {n.name: fields(n) for n in desc.nested_types}

    for name, desc in ours.message_types_by_name.items():
        assert fields(desc) == fields(theirs.message_types_by_name[name]), name
    their_methods = {m.name: m for m in theirs.services_by_name["GRPCInferenceService"].methods}
    for method in ours.services_by_name["GRPCInferenceService"].methods:
        other = their_methods[method.name]
        assert (method.input_type.name, method.output_type.name) == (
            other.input_type.name,
            other.output_type.name,
        )
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )


# --- tensors and parameters ------------------------------------------------------------------------------


def test_bytes_elements_round_trip_with_tritons_serializer() -> None:
    items = [b"", "Grüße".encode(), b"\x00\xff" * 300]
    raw = encode_bytes_elements(items)
    assert raw == serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert decode_bytes_elements(raw, "t") == items
    with pytest.raises(E.InvalidRequestError, match="'t'"):
        decode_bytes_elements(raw[:-1], "t")
    with pytest.raises(E.InvalidRequestError, match="length prefix"):
        decode_bytes_elements(b"\x01\x00", "t")


def test_numeric_inputs_from_raw_and_typed_contents() -> None:
    cases = [("INT32", np.int32, [[7]]), ("FP32", np.float32, [[0.5]]), ("BOOL", np.bool_, [[True]])]
    extra = []
    for i, (dtype, np_type, value) in enumerate(cases):
        tensor = InferInput(f"t{i}", [1, 1], dtype)
        tensor.set_data_from_numpy(np.array(value, dtype=np_type))
        extra.append(tensor)
    got = input_elements(_triton_request(extra=extra))
    assert got["t0"] == ("INT32", [7]) and got["t1"] == ("FP32", [0.5]) and got["t2"] == ("BOOL", [True])

    typed = pb.ModelInferRequest(model_name=MODEL)
    t = typed.inputs.add(name="top_k", datatype="INT64", shape=[1])
    t.contents.int64_contents.append(5)
    assert input_elements(typed) == {"top_k": ("INT64", [5])}
    t.shape[:] = [2]
    with pytest.raises(E.InvalidRequestError, match="needs 2"):
        input_elements(typed)


def test_sampling_parameters_from_request_parameters() -> None:
    params = {"max_tokens": 7, "temperature": "0.25", "top_p": "0.9", "top_k": 3, "seed": 11}
    params |= {"stop": '["\\n", "END"]', "ignore_eos": True}
    call = _parse(_triton_request(parameters=params))
    s = call.request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (7, 0.25, 0.9, 3, 11)
    assert s.stop == ["\n", "END"] and s.ignore_eos is True
    assert call.request.prompt == "Hello" and call.request.request_id == "grpc-test"
    assert call.client_id == "req-1" and call.stream is True and call.echo == ""


def test_double_and_uint64_parameters() -> None:
    msg = _triton_request()
    msg.parameters["temperature"].double_param = 0.5
    msg.parameters["max_tokens"].uint64_param = 9
    s = _parse(msg).request.sampling
    assert (s.temperature, s.max_tokens) == (0.5, 9)
    assert parameter_value(msg.parameters["temperature"]) == 0.5


def test_triton_style_names_tensors_and_sampling_parameters_json() -> None:
    def scalar(name: str, dtype: str, value) -> InferInput:
        t = InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np.object_ if dtype == "BYTES" else None))
        return t

    extra = [
        scalar("max_tokens", "INT32", np.int32(5)),
        scalar("random_seed", "UINT64", np.uint64(42)),
        scalar("stop_words", "BYTES", b"###"),
        scalar("sampling_parameters", "BYTES", b'{"temperature": "0.7", "top_k": 2, "max_tokens": 99}'),
        scalar("exclude_input_in_output", "BOOL", np.bool_(False)),
    ]
    call = _parse(_triton_request(extra=extra, parameters={"top_k": 4}))
    s = call.request.sampling
    # sampling_parameters < input tensors < request parameters
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, s.stop) == (5, 0.7, 4, 42, ["###"])
    assert call.echo == "Hello"


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": "1.5"}, "top_p"),
        ({"stream": "maybe"}, "stream"),
        ({"stop": "[1, 2]"}, "stop"),
        ({"sampling_parameters": "[1]"}, "sampling_parameters"),
    ],
)
def test_bad_parameters_name_the_parameter(parameters: dict, param: str) -> None:
    with pytest.raises(E.InvalidRequestError) as info:
        _parse(_triton_request(parameters=parameters))
    assert info.value.param == param and param in info.value.message
    assert status_code(info.value) is grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_parameters_are_ignored() -> None:
    assert _parse(_triton_request(parameters={"no_such_setting": 1})).request.sampling.max_tokens == 16


def test_bad_requests() -> None:
    with pytest.raises(E.ModelNotFoundError, match=r"'other'.*'demo'"):
        _parse(_triton_request(model_name="other"))
    with pytest.raises(E.ModelNotFoundError, match="version '7'"):
        _parse(_triton_request(model_version="7"))
    with pytest.raises(E.InvalidRequestError, match=r"'text_input'.*required"):
        _parse(_triton_request(prompt=None))
    with pytest.raises(E.InvalidRequestError, match="prompt must not be empty"):
        _parse(_triton_request(prompt=""))
    with pytest.raises(E.InvalidRequestError, match="unknown output 'logits'"):
        _parse(_triton_request(outputs=[InferRequestedOutput("logits")]))
    odd = InferInput("beam_width", [1], "INT32")
    odd.set_data_from_numpy(np.array([2], dtype=np.int32))
    with pytest.raises(E.InvalidRequestError, match="unknown input 'beam_width'"):
        _parse(_triton_request(extra=[odd]))
    bad_utf8 = _triton_request()
    bad_utf8.raw_input_contents[0] = encode_bytes_elements([b"\xff\xfe"])
    with pytest.raises(E.InvalidRequestError, match="UTF-8"):
        _parse(bad_utf8)
    two = _triton_request()
    two.inputs[0].shape[:] = [2]
    two.raw_input_contents[0] = encode_bytes_elements([b"a", b"b"])
    with pytest.raises(E.InvalidRequestError, match="exactly one element"):
        _parse(two)


def test_chat_template_parameter_makes_a_user_message() -> None:
    call = _parse(_triton_request(parameters={"apply_chat_template": True}))
    assert call.request.prompt is None and call.request.messages == [{"role": "user", "content": "Hello"}]


def test_sampling_params_defaults_are_the_engines() -> None:
    assert sampling_params({}) == sampling_params({"unknown": 1})
    assert sampling_params({"min_length": "2", "max_new_tokens": 3}).min_tokens == 2


# --- responses -------------------------------------------------------------------------------------------


def test_response_is_read_by_tritons_result_decoder() -> None:
    ours = infer_response(
        model_name=MODEL, client_id="r", text="Grüße ✓", finish_reason=FinishReason.LENGTH,
        usage=Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=1), final=True,
    )  # fmt: skip
    result = InferResult(triton_pb.ModelInferResponse.FromString(ours.SerializeToString()))
    assert result.as_numpy(TEXT_OUTPUT).tolist() == ["Grüße ✓".encode()]
    params = result.get_response().parameters
    assert params["finish_reason"].string_param == "length"
    assert params["completion_tokens"].int64_param == 4 and params["cached_tokens"].int64_param == 1
    assert params[FINAL_RESPONSE].bool_param is True
    assert result.get_response().id == "r" and result.get_response().model_version == "1"


def test_stream_error_response() -> None:
    msg = stream_error(model_name=MODEL, client_id="r", exc=E.InvalidRequestError("top_p must be in (0, 1]"))
    assert msg.error_message == "[INVALID_ARGUMENT] top_p must be in (0, 1]"
    assert msg.infer_response.parameters[FINAL_RESPONSE].bool_param is True
    assert msg.infer_response.parameters["error_code"].string_param == "INVALID_ARGUMENT"


# --- error codes -----------------------------------------------------------------------------------------


def _all_error_classes(cls=E.AutoGLMError):
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_error_classes(sub)


def test_every_error_class_maps_to_its_declared_status_code() -> None:
    for cls in _all_error_classes():
        code = status_code(cls.__new__(cls))
        assert code.name == cls.grpc_code, f"{cls.__name__}.grpc_code {cls.grpc_code!r} is not a grpc.StatusCode"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (E.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (E.ContextLengthExceededError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (E.ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (E.AuthenticationError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (E.PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
        (E.RateLimitError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (E.ServiceUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (E.EngineError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_codes(exc: E.AutoGLMError, code: grpc.StatusCode) -> None:
    assert status_code(exc) is code


def test_retry_after_travels_as_trailing_metadata() -> None:
    assert trailing_metadata(E.ServiceUnavailableError("draining", retry_after=2.4)) == (("retry-after", "2"),)
    assert trailing_metadata(E.InvalidRequestError("x")) == ()


def test_a_misspelt_grpc_code_is_internal() -> None:
    class Odd(E.AutoGLMError):
        grpc_code = "NO_SUCH_CODE"

    assert status_code(Odd("x")) is grpc.StatusCode.INTERNAL


# --- the service over a real AsyncEngine, through tritonclient's asyncio client ---------------------------


@pytest.fixture(scope="module")
def engine(demo_dir, make_engine_config):
    from openautoglm.engine.async_engine import AsyncEngine

    eng = AsyncEngine.from_config(make_engine_config(demo_dir, cache={"num_blocks": 128}))
    yield eng
    asyncio.run(eng.shutdown())


@pytest.fixture
async def served(engine):
    """(client, model name) of a gRPC service started in this test's event loop."""
    port = free_port()
    server = await start_grpc_server(engine, "127.0.0.1", port)
    client = InferenceServerClient(f"127.0.0.1:{port}")
    yield client, engine.model_name
    await client.close()
    await server.stop(None)


def _text_input(prompt: str) -> list[InferInput]:
    tensor = InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return [tensor]


def _text(result: InferResult) -> str:
    return result.as_numpy(TEXT_OUTPUT)[0].decode()


async def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_health_and_metadata(served) -> None:
    client, model = served
    assert await client.is_server_live() and await client.is_server_ready()
    assert await client.is_model_ready(model)
    assert not await client.is_model_ready("no-such-model")
    meta = await client.get_server_metadata()
    assert meta.name == "openautoglm" and meta.version == openautoglm.__version__
    model_meta = await client.get_model_metadata(model)
    assert model_meta.versions == ["1"]
    assert [(t.name, t.datatype) for t in model_meta.inputs] == [("text_input", "BYTES")]
    assert [(t.name, t.datatype) for t in model_meta.outputs] == [("text_output", "BYTES")]
    with pytest.raises(InferenceServerException) as info:
        await client.get_model_metadata("no-such-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


async def test_model_infer_passes_sampling_settings_to_the_engine(served, engine) -> None:
    client, model = served
    prompt, params = "Open-AutoGLM serves", {"max_tokens": 10, "temperature": "0.8", "top_k": 20, "seed": 7}
    result = await client.infer(model, _text_input(prompt), parameters=params)
    # The oracle: the engine itself, asked directly with the same settings.
    request = GenerationRequest(
        request_id="oracle",
        prompt=prompt,
        sampling=SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=7),
    )
    expected = "".join([o.text_delta async for c in engine.generate(request) for o in c.outputs])
    assert _text(result) == expected and expected
    response = result.get_response()
    assert response.parameters["completion_tokens"].int64_param == 10
    assert response.parameters["finish_reason"].string_param == "length"


async def test_stream_deltas_concatenate_to_the_greedy_text(served) -> None:
    client, model = served
    params = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = _text(await client.infer(model, _text_input("Hello"), parameters=params))

    async def requests():
        yield {"model_name": model, "inputs": _text_input("Hello"), "parameters": params, "request_id": "s1"}

    responses = [(r, e) async for r, e in client.stream_infer(requests())]
    assert all(e is None for _, e in responses)
    results = [r for r, _ in responses]
    # One response per delta: a token each while the client keeps up; the engine merges what piles up behind a
    # slow consumer into one delta, so there may be fewer responses than tokens, never more.
    assert 2 <= len(results) <= 12
    assert "".join(_text(r) for r in results) == whole
    finals = [r.get_response().parameters[FINAL_RESPONSE].bool_param for r in results]
    assert finals == [False] * (len(results) - 1) + [True]
    assert {r.get_response().id for r in results} == {"s1"}
    assert results[-1].get_response().parameters["completion_tokens"].int64_param == 12


async def test_one_stream_serves_concurrent_requests_and_reports_errors_in_band(served) -> None:
    client, model = served
    params = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = {p: _text(await client.infer(model, _text_input(p), parameters=params)) for p in ("Hi", "GLM")}

    async def requests():
        yield {"model_name": model, "inputs": _text_input("Hi"), "parameters": params, "request_id": "Hi"}
        yield {
            "model_name": model,
            "inputs": _text_input("x"),
            "parameters": {"top_p": 5},
            "request_id": "bad",
        }
        yield {"model_name": model, "inputs": _text_input("GLM"), "parameters": params, "request_id": "GLM"}

    texts: dict[str, str] = {"Hi": "", "GLM": ""}
    errors = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            errors.append(str(error))
        else:
            texts[result.get_response().id] += _text(result)
    assert texts == expected
    assert len(errors) == 1 and "[INVALID_ARGUMENT]" in errors[0] and "top_p" in errors[0]


async def test_stream_false_and_echo_in_a_stream(served) -> None:
    client, model = served
    params = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = _text(await client.infer(model, _text_input("Hello"), parameters=params))

    async def requests(extra: dict):
        yield {"model_name": model, "inputs": _text_input("Hello"), "parameters": params | extra}

    single = [r async for r, _ in client.stream_infer(requests({"stream": False}))]
    assert len(single) == 1 and _text(single[0]) == whole
    assert single[0].get_response().parameters[FINAL_RESPONSE].bool_param is True
    echoed = [r async for r, _ in client.stream_infer(requests({"exclude_input_in_output": False}))]
    # A response per token while the client keeps up; deltas that pile up behind it are merged (see
    # test_stream_deltas_concatenate_to_the_greedy_text), so at most 5, never more; the prompt leads the first.
    assert 1 <= len(echoed) <= 5 and _text(echoed[0]).startswith("Hello")
    assert "".join(_text(r) for r in echoed) == "Hello" + whole
    finals = [r.get_response().parameters[FINAL_RESPONSE].bool_param for r in echoed]
    assert finals == [False] * (len(echoed) - 1) + [True]


@pytest.mark.parametrize(
    ("model", "parameters", "status"),
    [
        (None, {"temperature": -1}, "StatusCode.INVALID_ARGUMENT"),
        (None, {"max_tokens": "many"}, "StatusCode.INVALID_ARGUMENT"),
        ("no-such-model", {}, "StatusCode.NOT_FOUND"),
    ],
)
async def test_errors_are_status_codes(served, model, parameters, status) -> None:
    client, served_model = served
    with pytest.raises(InferenceServerException) as info:
        await client.infer(model or served_model, _text_input("Hello"), parameters=parameters)
    assert info.value.status() == status


async def test_context_overflow_is_invalid_argument(served, engine) -> None:
    client, model = served
    with pytest.raises(InferenceServerException) as info:
        await client.infer(model, _text_input("Hello"), parameters={"max_tokens": engine.max_model_len + 1})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


async def test_an_engine_fault_is_internal_and_the_service_goes_on(served, engine, monkeypatch) -> None:
    client, model = served

    def faulty(*args, **kwargs):
        raise RuntimeError("injected model fault")

    monkeypatch.setattr(engine.core.runner.model, "forward", faulty)
    with pytest.raises(InferenceServerException) as info:
        await client.infer(model, _text_input("Hello"), parameters={"max_tokens": 3})
    assert info.value.status() == "StatusCode.INTERNAL" and "injected model fault" in info.value.message()

    async def requests():
        yield {"model_name": model, "inputs": _text_input("Hello"), "parameters": {"max_tokens": 3}}

    [(result, error)] = [item async for item in client.stream_infer(requests())]
    assert result is None and str(error).startswith("[INTERNAL]") and "injected model fault" in str(error)
    monkeypatch.undo()
    after = await client.infer(model, _text_input("Hello"), parameters={"max_tokens": 3, "ignore_eos": True})
    assert after.get_response().parameters["completion_tokens"].int64_param == 3


async def test_cancelled_stream_aborts_at_once_and_frees_kv_blocks(served, engine) -> None:
    client, model = served
    assert await _until(lambda: engine.stats().num_running == 0)
    initial = engine.stats().num_free_blocks
    max_tokens = 1500
    hold = asyncio.Event()

    async def requests():
        params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        yield {"model_name": model, "inputs": _text_input("Hello"), "parameters": params}
        await hold.wait()  # keep our side of the stream open

    stream = client.stream_infer(requests())
    seen = 0
    async for _result, error in stream:
        assert error is None, str(error)
        seen += 1
        if seen == 3:
            break
    assert engine.stats().num_free_blocks < initial  # the request holds blocks while it runs
    generated_before = engine.stats().generation_tokens_total
    stream.cancel()
    hold.set()
    assert await _until(lambda: engine.stats().num_free_blocks == initial), "KV blocks were not freed"
    assert engine.stats().num_running == 0
    assert engine.stats().generation_tokens_total - generated_before < max_tokens - seen  # stopped early


async def test_model_infer_deadline_aborts_and_frees_kv_blocks(served, engine) -> None:
    client, model = served
    assert await _until(lambda: engine.stats().num_running == 0)
    initial = engine.stats().num_free_blocks
    params = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(InferenceServerException) as info:
        await client.infer(model, _text_input("Hello"), parameters=params, client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert await _until(lambda: engine.stats().num_free_blocks == initial), "KV blocks were not freed"


async def test_not_ready_means_unavailable(engine) -> None:
    ready = True
    port = free_port()
    server = await start_grpc_server(engine, "127.0.0.1", port, is_ready=lambda: ready)
    async with InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert await client.is_server_ready()
        ready = False
        assert not await client.is_server_ready()
        assert not await client.is_model_ready(engine.model_name)
        assert await client.is_server_live()
        with pytest.raises(InferenceServerException) as info:
            await client.infer(engine.model_name, _text_input("Hello"))
        assert info.value.status() == "StatusCode.UNAVAILABLE"
    await server.stop(None)


async def test_a_taken_port_is_a_config_error(engine) -> None:
    port = free_port()
    server = await start_grpc_server(engine, "127.0.0.1", port)
    try:
        with pytest.raises(E.ConfigError, match=str(port)):
            await start_grpc_server(engine, "127.0.0.1", port)
    finally:
        await server.stop(None)


# --- against a real `autoglm serve` process, with tritonclient's default (threaded) client ------------------


@pytest.fixture(scope="module")
def live_server(serve_process) -> Iterator[tuple[str, str, str]]:
    """(HTTP base URL, gRPC address, model name) of an `autoglm serve` process with the demo model."""
    with serve_process(grpc=True) as server:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        yield server.url, server.grpc_address, model


def _free_blocks(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("autoglm_kv_cache_free_blocks"):
            return float(line.split()[-1])
    raise AssertionError("/metrics has no autoglm_kv_cache_free_blocks")


def _stream_until_final(client: SyncClient, model: str, prompt: str, params: dict) -> list:
    """Send one request on a stream and collect (result, error) until its final response."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, _text_input(prompt), parameters=params, enable_empty_final_response=True)
    responses = []
    while True:
        result, error = got.get(timeout=60)
        responses.append((result, error))
        if error is not None or result.get_response().parameters[FINAL_RESPONSE].bool_param:
            break
    client.stop_stream()
    return responses


@pytest.mark.slow
def test_process_health_metadata_and_errors(live_server) -> None:
    _, address, model = live_server
    client = SyncClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    assert client.get_server_metadata().name == "openautoglm"
    assert [t.name for t in client.get_model_metadata(model).inputs] == ["text_input"]
    for name, params, status in [
        (model, {"temperature": -1}, "StatusCode.INVALID_ARGUMENT"),
        ("no-such-model", {}, "StatusCode.NOT_FOUND"),
    ]:
        with pytest.raises(InferenceServerException) as info:
            client.infer(name, _text_input("Hello"), parameters=params)
        assert info.value.status() == status
    client.close()


@pytest.mark.slow
def test_process_infer_and_stream_agree(live_server) -> None:
    _, address, model = live_server
    client = SyncClient(address)
    params = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = _text(client.infer(model, _text_input("Open-AutoGLM"), parameters=params))
    responses = _stream_until_final(client, model, "Open-AutoGLM", params)
    assert all(error is None for _, error in responses)
    # One response per delta: a token each, unless the stream fell behind the engine and got some merged.
    assert 1 < len(responses) <= 10
    assert "".join(_text(r) for r, _ in responses) == whole
    finals = [r.get_response().parameters[FINAL_RESPONSE].bool_param for r, _ in responses]
    assert finals == [False] * (len(responses) - 1) + [True]
    errors = _stream_until_final(client, model, "x", {"top_k": -5})
    assert errors[0][0] is None and "[INVALID_ARGUMENT]" in str(errors[0][1])
    client.close()


@pytest.mark.slow
def test_process_stream_cancellation_frees_kv_blocks(live_server) -> None:
    base, address, model = live_server
    initial = _free_blocks(base)
    client = SyncClient(address)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    params = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    client.async_stream_infer(model, _text_input("Hello"), parameters=params)
    for _ in range(3):
        _result, error = got.get(timeout=60)
        assert error is None, str(error)
    assert _free_blocks(base) < initial
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 10
    while _free_blocks(base) != initial:
        assert time.monotonic() < deadline, "KV blocks were not freed after the stream was cancelled"
        time.sleep(0.05)
    client.close()
