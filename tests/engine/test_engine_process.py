"""EngineProcess: the step loop in a child process behaves as AsyncEngine does (same tokens, same errors, blocks
returned on abort), survives nothing silently (a dead child fails its requests), and its wire format keeps
every field of a chunk."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from openautoglm.engine.async_engine import Add, ChunkInbox
from openautoglm.engine.engine_process import EngineProcess, decode_outputs, encode_outputs
from openautoglm.engine.llm import LLM
from openautoglm.protocol.errors import (
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    ServiceUnavailableError,
)
from openautoglm.protocol.guided import GuidedDecoding
from openautoglm.protocol.outputs import (
    CompletedRequest,
    CompletionOutput,
    FinishReason,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams


def test_wire_format_round_trips_every_field() -> None:
    chunks = [
        RequestOutput(
            "a",
            [
                CompletionOutput(
                    1,
                    "tëxt",
                    [5, 6],
                    [TokenLogprob(5, "të", -0.25, [(5, "të", -0.25), (9, "x", -2.0)])],
                    FinishReason.STOP,
                    "</s>",
                    7,
                )
            ],
            prompt_token_ids=[1, 2, 3],
            finished=True,
            usage=Usage(3, 7, 2),
            error="boom",
            queue_time=0.125,
        ),
        RequestOutput("b", [CompletionOutput(0), CompletionOutput(1, "x", [4], None, None, 42, 1)]),
    ]
    assert decode_outputs(encode_outputs(chunks)) == chunks


@pytest.fixture(scope="module")
def engine(tiny_glm4: Path, make_engine_config) -> AsyncIterator[EngineProcess]:
    eng = EngineProcess.start(make_engine_config(tiny_glm4, cache={"num_blocks": 64, "block_size": 4}), num_threads=1)
    yield eng
    asyncio.run(eng.shutdown())


async def _collect(engine: EngineProcess, req: GenerationRequest) -> CompletedRequest:
    done = CompletedRequest(req.request_id)
    async for chunk in engine.generate(req):
        done.add(chunk)
    return done


@pytest.mark.slow
async def test_concurrent_greedy_requests_match_the_offline_engine(
    engine: EngineProcess, tiny_glm4: Path, make_engine_config
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [[(7 * i + j) % 300 + 1 for j in range(3 + 5 * i)] for i in range(8)]
    reqs = [GenerationRequest(f"p{i}", prompt_token_ids=p, sampling=params) for i, p in enumerate(prompts)]
    served = await asyncio.gather(*(_collect(engine, r) for r in reqs))
    offline = LLM(make_engine_config(tiny_glm4, cache={"num_blocks": 64, "block_size": 4})).run(reqs)
    for got, want in zip(served, offline, strict=True):
        assert got.finished and got.usage == want.usage
        assert got.sequences[0].token_ids == want.sequences[0].token_ids
        assert got.sequences[0].text == want.sequences[0].text
        assert [lp.token for lp in got.sequences[0].logprobs or []] == [
            lp.token for lp in want.sequences[0].logprobs or []
        ]
    assert engine.model_name == str(tiny_glm4) and engine.max_model_len == 512


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "error", "param"),
    [
        ({"prompt": ""}, InvalidRequestError, "prompt"),
        ({"prompt_token_ids": [1] * 600}, ContextLengthExceededError, "prompt"),
        ({"prompt": "hi", "sampling": SamplingParams(top_p=1.5)}, InvalidRequestError, "top_p"),
    ],
)
async def test_bad_input_is_refused_in_this_process(engine: EngineProcess, fields, error, param) -> None:
    before = engine.stats()
    with pytest.raises(error) as info:
        await _collect(engine, GenerationRequest(request_id="bad", **fields))
    assert info.value.param == param
    after = engine.stats()
    assert (after.num_waiting, after.num_running, after.num_free_blocks) == (0, 0, before.num_free_blocks)


@pytest.mark.slow
async def test_closing_streams_early_returns_every_block(engine: EngineProcess) -> None:
    initial = engine.stats().num_free_blocks
    params = SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True)
    streams = [
        engine.generate(GenerationRequest(f"long{i}", prompt_token_ids=[i + 1] * 20, sampling=params)) for i in range(6)
    ]
    for s in streams:
        await s.__anext__()
    assert engine.stats().num_free_blocks < initial
    # A duplicate id is refused while the first one runs.
    with pytest.raises(InvalidRequestError, match="already in flight"):
        await engine.generate(GenerationRequest("long0", prompt="x", sampling=params)).__anext__()
    for s in streams:
        await s.aclose()
    for _ in range(200):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == initial:
            break
        await asyncio.sleep(0.02)
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, initial)


@pytest.mark.slow
def test_load_errors_are_raised_by_start(tmp_path: Path, make_engine_config) -> None:
    with pytest.raises(ModelLoadError, match="no-such-checkpoint"):
        EngineProcess.start(make_engine_config(tmp_path / "no-such-checkpoint"))


@pytest.mark.slow
async def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones(tiny_glm4: Path, make_engine_config):
    eng = EngineProcess.start(make_engine_config(tiny_glm4), num_threads=1)
    try:
        params = SamplingParams(max_tokens=400, temperature=1.0, ignore_eos=True)
        stream = eng.generate(GenerationRequest("victim", prompt="hello", sampling=params))
        await stream.__anext__()
        os.kill(eng.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="exited unexpectedly"):
            async for _ in stream:
                pass
        assert not eng.is_healthy() and not eng.stats().step_loop_alive
        with pytest.raises(ServiceUnavailableError):
            await eng.generate(GenerationRequest("late", prompt="hello", sampling=params)).__anext__()
    finally:
        await eng.shutdown()


@pytest.mark.slow
async def test_shutdown_stops_the_process_and_ends_open_streams(tiny_glm4: Path, make_engine_config) -> None:
    eng = EngineProcess.start(make_engine_config(tiny_glm4), num_threads=1)
    params = SamplingParams(max_tokens=400, temperature=1.0, ignore_eos=True)
    stream = eng.generate(GenerationRequest("open", prompt="hello", sampling=params))
    await stream.__anext__()
    await eng.shutdown()
    with pytest.raises(ServiceUnavailableError):
        async for _ in stream:
            pass
    assert not eng.is_healthy()
    with pytest.raises(ProcessLookupError):
        os.kill(eng.pid, 0)


@pytest.mark.slow
async def test_guided_choice_crosses_to_the_engine_process(engine: EngineProcess) -> None:
    choices = ("yes please", "no thanks")
    req = GenerationRequest(
        "guided",
        prompt="Answer:",
        sampling=SamplingParams(max_tokens=16, temperature=1.0, seed=1),
        guided=GuidedDecoding(choice=choices),
    )
    done = await _collect(engine, req)
    assert done.finished and done.sequences[0].text in choices


@pytest.mark.slow
async def test_a_request_that_cannot_cross_is_refused_alone(engine: EngineProcess) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    processed = engine._input_processor.process(GenerationRequest("odd", prompt="hi", sampling=params))
    inbox = ChunkInbox()
    unpicklable = replace(processed, logits_processor_factory=lambda: None)
    engine._inbox.put(Add(unpicklable, (asyncio.get_running_loop(), inbox)))
    (item,) = await asyncio.wait_for(inbox.take_all(), 30)
    assert isinstance(item, EngineError) and "cannot be sent to the engine process" in str(item)
    after = await _collect(engine, GenerationRequest("normal", prompt="hi", sampling=params))
    assert after.finished and len(after.sequences[0].token_ids) == 4
