"""Prometheus metrics, one registry per app (two apps in one process never share counters).

Request-level series are recorded as requests finish; engine-level ones (running/waiting, KV cache, prefix
cache, token totals) are read from ``engine.stats()`` at scrape time, so they are never stale and cost nothing
between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from openautoglm.engine.stats import EngineStats
from openautoglm.protocol.outputs import RequestOutput, Usage
from openautoglm.server.http.state import ServerState

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2.5)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model: str, state: ServerState) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        reg = self.registry
        self.requests = Counter(
            "autoglm_requests",
            "HTTP requests by route, status and model",
            ["route", "status", "model"],
            registry=reg,
        )
        self.http_latency = Histogram(
            "autoglm_http_request_duration_seconds", "HTTP request latency, first byte in to last byte out",
            ["route"], buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            "autoglm_e2e_request_latency_seconds", "Generation latency from arrival to the last token",
            ["model"], buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "autoglm_time_to_first_token_seconds", "Time from arrival to the first generated token",
            ["model"], buckets=_TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.tpot = Histogram(
            "autoglm_time_per_output_token_seconds", "Mean time between output tokens after the first",
            ["model"], buckets=_TPOT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue = Histogram(
            "autoglm_request_queue_time_seconds", "Time from arrival until the engine first schedules it",
            ["model"], buckets=_TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.aborted = Counter(
            "autoglm_requests_aborted", "Generation requests ended early, by reason", ["model", "reason"],
            registry=reg,
        )  # fmt: skip
        reg.register(_EngineCollector(stats, model, state))

    def timer(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one generation request (several engine requests count as one)."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._m = metrics
        self._model = model
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.queue_time: float | None = None  # the engine's, for the first of its requests to be scheduled

    def saw(self, chunk: RequestOutput) -> None:
        """Note a chunk: the first one with tokens marks the first token; the engine's queue time rides on it."""
        if chunk.queue_time is not None and (self.queue_time is None or chunk.queue_time < self.queue_time):
            self.queue_time = chunk.queue_time
        if self.first_token is None and any(o.token_ids_delta for o in chunk.outputs):
            self.first_token = time.perf_counter()

    def finish(self, usage: Usage) -> None:
        end = time.perf_counter()
        self._m.e2e.labels(self._model).observe(end - self.start)
        if self.queue_time is not None:
            self._m.queue.labels(self._model).observe(self.queue_time)
        if self.first_token is not None:
            self._m.ttft.labels(self._model).observe(self.first_token - self.start)
            if usage.completion_tokens > 1:
                tpot = (end - self.first_token) / (usage.completion_tokens - 1)
                self._m.tpot.labels(self._model).observe(tpot)

    def aborted(self, reason: str) -> None:
        self._m.aborted.labels(self._model, reason).inc()


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model: str, state: ServerState) -> None:
        self._stats = stats
        self._model = model
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric(labels, value)
            return c

        yield gauge("autoglm_num_requests_running", "Sequences the engine is running", s.num_running)
        yield gauge("autoglm_num_requests_waiting", "Sequences waiting to be scheduled", s.num_waiting)
        yield gauge("autoglm_kv_cache_usage_ratio", "Fraction of KV blocks held by live sequences", s.kv_cache_usage)
        yield gauge("autoglm_kv_cache_blocks", "KV cache blocks in the pool", s.num_blocks)
        yield gauge("autoglm_kv_cache_free_blocks", "KV cache blocks free (or only prefix-cached)", s.num_free_blocks)
        yield gauge("autoglm_engine_step_loop_alive", "1 while the engine step loop runs", float(s.step_loop_alive))
        yield counter(
            "autoglm_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            s.prefix_cache_queries,
        )
        yield counter("autoglm_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits)
        yield counter("autoglm_prompt_tokens", "Prompt tokens processed", s.prompt_tokens_total)
        yield counter("autoglm_generation_tokens", "Tokens generated", s.generation_tokens_total)
        yield counter("autoglm_num_preemptions", "Sequences preempted to free KV blocks", s.num_preemptions)
        yield counter("autoglm_engine_steps", "Engine steps run", s.num_steps)
        yield GaugeMetricFamily(
            "autoglm_server_draining", "1 while the server drains", value=float(self._state.draining)
        )
        yield GaugeMetricFamily(
            "autoglm_http_requests_in_flight", "HTTP requests being handled (probes excluded)",
            value=self._state.active_requests,
        )  # fmt: skip


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
