"""``autoglm bench serve``: metric arithmetic on synthetic timestamps, SSE parsing, and a small real run."""

from __future__ import annotations

import json
import math

import pytest

from openautoglm.ops.bench_serve import (
    BenchServeConfig,
    LatencyStats,
    RequestRecord,
    _apply_event,
    _parse_events,
    compute_result,
    format_result,
)
from openautoglm.protocol.errors import ConfigError

CONFIG = BenchServeConfig(
    url="http://127.0.0.1:1",
    model="demo",
    endpoint="/v1/completions",
    num_prompts=3,
    request_rate=math.inf,
    max_concurrency=None,
    input_len=4,
    output_len=4,
    seed=0,
)


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def _stream(arrivals: list[float], start: float, prompt_len: int, usage_tokens: int | None) -> RequestRecord:
    """Replay one request's stream: a chunk per arrival time, then (optionally) a usage-only chunk."""
    record = RequestRecord(success=True, prompt_len=prompt_len)
    last = start
    for t in arrivals:
        last = _apply_event(record, _chunk("x"), t, start, last)
    if usage_tokens is not None:
        _apply_event(record, {"choices": [], "usage": {"completion_tokens": usage_tokens}}, arrivals[-1], start, last)
    record.latency = arrivals[-1] + 0.01 - start
    return record


def test_per_request_ttft_itl_and_token_count_from_timestamps() -> None:
    record = _stream([10.5, 10.75, 11.0, 11.5], start=10.0, prompt_len=4, usage_tokens=None)
    assert record.ttft == pytest.approx(0.5)
    assert record.itl == pytest.approx([0.25, 0.25, 0.5])
    assert record.output_tokens == 4  # counted chunks: no usage chunk came
    with_usage = _stream([1.0, 2.0], start=0.0, prompt_len=4, usage_tokens=7)
    assert with_usage.output_tokens == 7  # the server's usage wins over the chunk count
    _apply_event(with_usage, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7}}, 2.0, 0.0, 2.0)
    assert with_usage.prompt_len == 9 and with_usage.itl == pytest.approx([1.0])  # usage-only: not a chunk


def test_aggregate_metrics_exact_values() -> None:
    # Request A: start 0, chunks at 0.1 0.2 0.4 0.7, e2e 0.71 -> TPOT (0.71-0.1)/3
    # Request B: start 0, chunks at 0.3 0.5, e2e 0.51, usage 2 tokens -> TPOT (0.51-0.3)/1
    # Request C: failed.
    a = _stream([0.1, 0.2, 0.4, 0.7], start=0.0, prompt_len=4, usage_tokens=4)
    b = _stream([0.3, 0.5], start=0.0, prompt_len=6, usage_tokens=2)
    c = RequestRecord(success=False, error="HTTP 503: draining")
    result = compute_result(CONFIG, [a, b, c], duration_s=2.0)

    assert (result.completed, result.failed) == (2, 1)
    assert result.errors == ["HTTP 503: draining"]
    assert result.total_input_tokens == 10 and result.total_output_tokens == 6
    assert result.request_throughput == pytest.approx(1.0)
    assert result.input_throughput == pytest.approx(5.0)
    assert result.output_throughput == pytest.approx(3.0)
    assert result.total_token_throughput == pytest.approx(8.0)

    assert result.ttft_ms.mean == pytest.approx(200.0)
    assert result.ttft_ms.median == pytest.approx(200.0)
    assert result.ttft_ms.p99 == pytest.approx(100.0 + 0.99 * 200.0)  # linear interpolation between 100 and 300

    tpots = [(0.71 - 0.1) / 3 * 1000, (0.51 - 0.3) / 1 * 1000]
    assert result.tpot_ms.mean == pytest.approx(sum(tpots) / 2)
    assert result.tpot_ms.median == pytest.approx(sum(tpots) / 2)

    itls = sorted([100.0, 200.0, 300.0, 200.0])  # A: .1 .2 .3, B: .2
    assert result.itl_ms.mean == pytest.approx(200.0)
    assert result.itl_ms.median == pytest.approx(200.0)
    assert result.itl_ms.p99 == pytest.approx(itls[2] + 0.97 * (itls[3] - itls[2]))  # rank 0.99*3 = 2.97

    assert result.e2e_latency_ms.mean == pytest.approx((710.0 + 510.0) / 2)
    assert result.e2e_latency_ms.p99 == pytest.approx(510.0 + 0.99 * 200.0)


def test_single_token_requests_have_no_tpot_and_empty_runs_are_zero() -> None:
    one = _stream([0.2], start=0.0, prompt_len=3, usage_tokens=1)
    result = compute_result(CONFIG, [one], duration_s=1.0)
    assert result.tpot_ms == LatencyStats()  # TPOT needs two tokens
    assert result.itl_ms == LatencyStats()
    nothing = compute_result(CONFIG, [RequestRecord(success=False, error="x")], duration_s=0.0)
    assert nothing.completed == 0 and nothing.request_throughput == 0.0 and nothing.ttft_ms == LatencyStats()


def test_error_event_fails_the_request() -> None:
    record = RequestRecord(success=True)
    _apply_event(record, {"error": {"message": "context too long", "type": "invalid_request_error"}}, 1.0, 0.0, 0.0)
    assert not record.success and record.error == "context too long"


def test_sse_parsing_handles_split_events_crlf_and_comments() -> None:
    stream = b'data: {"a": 1}\r\n\r\n: keep-alive\n\ndata: {"b"' + b": 2}\n\ndata: [DONE]\n\n"
    events, rest = [], b""
    for i in range(0, len(stream), 7):  # arbitrary network chunking
        got, rest = _parse_events(rest + stream[i : i + 7])
        events += got
    assert events == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
    assert rest == b""


def test_result_json_and_table() -> None:
    a = _stream([0.1, 0.2], start=0.0, prompt_len=4, usage_tokens=2)
    result = compute_result(CONFIG, [a], duration_s=1.0)
    data = json.loads(result.to_json())
    assert data["config"]["request_rate"] == "inf"
    assert data["completed"] == 1 and data["ttft_ms"]["mean"] == pytest.approx(100.0)
    table = format_result(result)
    assert "Output token throughput" in table and "100.00" in table


async def test_bad_arguments_are_config_errors() -> None:
    from openautoglm.ops.bench_serve import run_bench_serve

    with pytest.raises(ConfigError, match="--num-prompts"):
        await run_bench_serve("http://127.0.0.1:1", num_prompts=0)
    with pytest.raises(ConfigError, match="--request-rate"):
        await run_bench_serve("http://127.0.0.1:1", request_rate=0.0)


# --- a small real run against `autoglm serve` -------------------------------------------------------------


@pytest.mark.slow
async def test_small_run_against_a_live_server(serve_process) -> None:
    from openautoglm.ops.bench_serve import run_bench_serve

    with serve_process() as server:
        result = await run_bench_serve(
            server.url, num_prompts=8, request_rate=50.0, max_concurrency=4, input_len=16, output_len=8, seed=3
        )
    assert (result.completed, result.failed) == (8, 0), result.errors
    # Totals come from the server's usage: prompts of exactly input_len, completions of exactly output_len.
    assert result.total_input_tokens == 8 * 16
    assert result.total_output_tokens == 8 * 8
    assert result.config.model and result.duration_s > 0
    assert 0 < result.ttft_ms.median <= result.e2e_latency_ms.median
    assert result.tpot_ms.mean > 0 and result.itl_ms.mean > 0
    assert result.output_throughput == pytest.approx(64 / result.duration_s)
    assert json.loads(result.to_json())["completed"] == 8
