"""``autoglm bench serve``: a load generator for a running OpenAI-compatible server.

Requests arrive as a Poisson process at ``request_rate`` (all at once when it is infinite), at most
``max_concurrency`` in flight. Each sends exactly ``input_len`` random prompt token ids (drawn from ids the
server's own ``/tokenize`` returned, so they are valid for its tokenizer) and streams exactly ``output_len``
tokens back (``ignore_eos``). Metrics follow vLLM's ``bench serve``: TTFT is the time to the first streamed
chunk, ITL the gaps between chunks, TPOT ``(e2e - TTFT) / (output tokens - 1)`` per request.

The streams go through sse_client.StreamClient, which parses each response as its bytes arrive and stamps
every event with their arrival time: the client shares the CPU with the server it measures, and aiohttp (used
here for the few set-up requests) costs a future and a task wake-up per read. vLLM's client uses aiohttp.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from openautoglm.ops.sse_client import ResponseError, StreamClient
from openautoglm.ops.timing import settled_heap
from openautoglm.protocol.errors import ConfigError, ServiceUnavailableError

_MAX_ERRORS_KEPT = 10
_POOL_WORDS = 600  # pseudo-words tokenized to build the pool of valid prompt token ids


@dataclass(slots=True)
class RequestRecord:
    """What one request measured. Times are seconds; ``itl`` holds the gaps between successive chunks."""

    success: bool
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    num_chunks: int = 0  # streamed chunks that carried a choice


@dataclass(slots=True)
class LatencyStats:
    """Milliseconds."""

    mean: float = 0.0
    median: float = 0.0
    p99: float = 0.0

    @classmethod
    def of_seconds(cls, values: list[float]) -> LatencyStats:
        if not values:
            return cls()
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        return cls(mean=float(ms.mean()), median=float(np.median(ms)), p99=float(np.percentile(ms, 99)))


@dataclass(slots=True)
class BenchServeConfig:
    url: str
    model: str
    endpoint: str
    num_prompts: int
    request_rate: float
    max_concurrency: int | None
    input_len: int
    output_len: int
    seed: int


@dataclass(slots=True)
class BenchServeResult:
    config: BenchServeConfig
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests/s
    input_throughput: float  # tokens/s
    output_throughput: float  # tokens/s
    total_token_throughput: float  # tokens/s
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_latency_ms: LatencyStats
    errors: list[str] = field(default_factory=list)  # the first few failures' messages

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        if math.isinf(self.config.request_rate):
            data["config"]["request_rate"] = "inf"  # JSON has no infinity
        return json.dumps(data, indent=2)


def compute_result(config: BenchServeConfig, records: list[RequestRecord], duration_s: float) -> BenchServeResult:
    """Aggregate per-request records over a run that lasted ``duration_s`` seconds."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return BenchServeResult(
        config=config,
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) * per_s,
        input_throughput=total_in * per_s,
        output_throughput=total_out * per_s,
        total_token_throughput=(total_in + total_out) * per_s,
        ttft_ms=LatencyStats.of_seconds([r.ttft for r in ok]),
        tpot_ms=LatencyStats.of_seconds(tpots),
        itl_ms=LatencyStats.of_seconds([gap for r in ok for gap in r.itl]),
        e2e_latency_ms=LatencyStats.of_seconds([r.latency for r in ok]),
        errors=[r.error for r in records if not r.success][:_MAX_ERRORS_KEPT],
    )


def format_result(result: BenchServeResult) -> str:
    """The result as a rich table, rendered to text."""
    c = result.config
    rate = "inf" if math.isinf(c.request_rate) else f"{c.request_rate:g}"
    table = Table(title=f"Open-AutoGLM bench serve — {c.model} at {c.url}{c.endpoint}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        (
            "Prompts / request rate / max concurrency",
            f"{c.num_prompts} / {rate} / {c.max_concurrency or '∞'}",
        ),
        ("Input / output length (tokens)", f"{c.input_len} / {c.output_len}"),
        ("Completed / failed", f"{result.completed} / {result.failed}"),
        ("Duration (s)", f"{result.duration_s:.2f}"),
        ("Total input / output tokens", f"{result.total_input_tokens} / {result.total_output_tokens}"),
        ("Request throughput (req/s)", f"{result.request_throughput:.2f}"),
        ("Input token throughput (tok/s)", f"{result.input_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{result.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{result.total_token_throughput:.2f}"),
    ]
    for label, stats in (
        ("TTFT", result.ttft_ms),
        ("TPOT", result.tpot_ms),
        ("ITL", result.itl_ms),
        ("E2E latency", result.e2e_latency_ms),
    ):
        rows.append((f"{label} mean / median / p99 (ms)", f"{stats.mean:.2f} / {stats.median:.2f} / {stats.p99:.2f}"))
    for label, value in rows:
        table.add_row(label, value)
    for error in result.errors:
        table.add_row("error", error)
    console = Console(file=io.StringIO(), width=110, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _check_args(
    num_prompts: int, request_rate: float, max_concurrency: int | None, input_len: int, output_len: int
) -> None:
    if num_prompts < 1:
        raise ConfigError(f"--num-prompts must be >= 1, got {num_prompts}")
    if not request_rate > 0:
        raise ConfigError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    if input_len < 1 or output_len < 1:
        raise ConfigError(f"--input-len and --output-len must be >= 1, got {input_len} and {output_len}")


async def _get_json(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    try:
        async with session.request(method, url, **kwargs) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise ServiceUnavailableError(f"{method} {url} answered {resp.status}: {body[:300]}")
            return json.loads(body)
    except aiohttp.ClientError as exc:
        raise ServiceUnavailableError(f"cannot reach the server at {url}: {exc}") from exc


async def _served_model(session: aiohttp.ClientSession, base: str) -> str:
    listing = await _get_json(session, "GET", f"{base}/v1/models")
    models = [m["id"] for m in listing.get("data", [])]
    if not models:
        raise ServiceUnavailableError(f"{base}/v1/models lists no model")
    return models[0]


async def token_pool(session: aiohttp.ClientSession, base: str, model: str, seed: int) -> list[int]:
    """Distinct token ids of the server's tokenizer, from ``/tokenize`` on seeded pseudo-words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(_POOL_WORDS)]
    text = " ".join(words) + " 0123456789 .,;:!?"
    payload = {"model": model, "prompt": text, "add_special_tokens": False}
    answer = await _get_json(session, "POST", f"{base}/tokenize", json=payload)
    pool = sorted(set(answer.get("tokens", [])))
    if not pool:
        raise ServiceUnavailableError(f"{base}/tokenize returned no tokens")
    return pool


def _parse_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete ``data:`` payloads in an SSE byte buffer, and the unfinished rest."""
    *lines, rest = buffer.split(b"\n")
    payloads = []
    for line in lines:
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            payloads.append(line[5:].strip())
    return payloads, rest


def _apply_event(record: RequestRecord, data: dict[str, Any], now: float, start: float, last: float) -> float:
    """Update a record with one streamed JSON event; return the time of the latest chunk."""
    if "error" in data:
        error = data["error"]
        record.success = False
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return last
    if data.get("choices"):
        if record.num_chunks == 0:
            record.ttft = now - start
        else:
            record.itl.append(now - last)
        last = now
        record.num_chunks += 1
        if not data.get("usage"):
            record.output_tokens += 1  # replaced by the usage count when the server sends one
    usage = data.get("usage")
    if usage:  # the server's own counts, when it sends them
        record.output_tokens = int(usage.get("completion_tokens", record.output_tokens))
        record.prompt_len = int(usage.get("prompt_tokens", record.prompt_len))
    return last


async def _one_request(client: StreamClient, path: str, payload: dict[str, Any]) -> RequestRecord:
    record = RequestRecord(success=True, prompt_len=len(payload["prompt"]))
    start = last = time.perf_counter()

    def on_event(data: bytes, now: float) -> None:
        nonlocal last
        if data != b"[DONE]":
            last = _apply_event(record, orjson.loads(data), now, start, last)

    try:
        status, body = await client.post(path, orjson.dumps(payload), on_event)
    except ResponseError as exc:
        return RequestRecord(success=False, error=str(exc))
    if status != 200:
        return RequestRecord(success=False, error=f"HTTP {status}: {body[:300].decode(errors='replace')}")
    record.latency = time.perf_counter() - start
    if record.success and record.num_chunks == 0:
        return RequestRecord(success=False, error="the stream ended without a token")
    return record


async def _run(
    prompts: list[list[int]],
    send: Callable[[list[int]], Awaitable[RequestRecord]],
    request_rate: float,
    rng: random.Random,
) -> tuple[list[RequestRecord], float]:
    """Send every prompt (all at once, or as a Poisson process at ``request_rate``); the records and seconds."""
    start = time.perf_counter()
    tasks = []
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(send(prompt)))
        if i + 1 < len(prompts) and not math.isinf(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - start


async def run_bench_serve(
    url: str,
    model: str | None = None,
    num_prompts: int = 100,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    input_len: int = 128,
    output_len: int = 128,
    endpoint: str = "/v1/completions",
    seed: int = 0,
) -> BenchServeResult:
    """Run the benchmark against the server at ``url`` (e.g. ``http://127.0.0.1:8000``) and aggregate it.

    ``model`` defaults to the first model of ``/v1/models``. A single test request runs first (and warms the
    server up); it failing raises ServiceUnavailableError. The same seed gives the same prompts: a second run
    against the same server finds them in its prefix cache, so change the seed for cold-cache numbers.
    """
    _check_args(num_prompts, request_rate, max_concurrency, input_len, output_len)
    base = url.rstrip("/")
    client = StreamClient(base)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:  # the set-up requests only
        model = model or await _served_model(session, base)
        pool = await token_pool(session, base, model, seed)
    try:
        rng = random.Random(seed)
        # One extra prompt for the test request, so that no measured prompt is already in the prefix cache.
        test_prompt, *prompts = [rng.choices(pool, k=input_len) for _ in range(num_prompts + 1)]

        def payload(prompt: list[int]) -> dict[str, Any]:
            return {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_len,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        test = await _one_request(client, endpoint, payload(test_prompt))
        if not test.success:
            raise ServiceUnavailableError(f"the test request to {base}{endpoint} failed: {test.error}")

        limit = asyncio.Semaphore(max_concurrency or num_prompts)

        async def limited(prompt: list[int]) -> RequestRecord:
            async with limit:
                return await _one_request(client, endpoint, payload(prompt))

        with settled_heap():  # the load generator must not pause for full GC passes over its imports
            records, duration = await _run(prompts, limited, request_rate, rng)
    finally:
        client.close()
    config = BenchServeConfig(
        url=base,
        model=model,
        endpoint=endpoint,
        num_prompts=num_prompts,
        request_rate=request_rate,
        max_concurrency=max_concurrency,
        input_len=input_len,
        output_len=output_len,
        seed=seed,
    )
    return compute_result(config, records, duration)
