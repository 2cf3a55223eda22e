"""Prometheus plumbing: engine gauges read at scrape time, per-app registries, latency histograms."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from openautoglm.engine.stats import EngineStats
from openautoglm.protocol.outputs import CompletionOutput, RequestOutput, Usage
from openautoglm.server.http.metrics import ServerMetrics
from openautoglm.server.http.state import ServerState


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_engine_stats_are_read_at_scrape_time() -> None:
    current = [EngineStats(num_blocks=10, num_free_blocks=10, step_loop_alive=True)]
    state = ServerState()
    m = ServerMetrics(lambda: current[0], "demo", state)
    model = (("model", "demo"),)
    assert samples(m)[("autoglm_kv_cache_free_blocks", model)] == 10
    current[0] = EngineStats(
        num_running=2, num_waiting=3, num_blocks=10, num_free_blocks=4, kv_cache_usage=0.6,
        prefix_cache_queries=100, prefix_cache_hits=40, prompt_tokens_total=120, generation_tokens_total=33,
        num_preemptions=1, num_steps=9, step_loop_alive=True,
    )  # fmt: skip
    state.begin_drain()
    state.active_requests = 2
    got = samples(m)
    assert got[("autoglm_kv_cache_free_blocks", model)] == 4
    assert got[("autoglm_kv_cache_usage_ratio", model)] == 0.6
    assert got[("autoglm_num_requests_running", model)] == 2
    assert got[("autoglm_num_requests_waiting", model)] == 3
    assert got[("autoglm_prefix_cache_queries_total", model)] == 100
    assert got[("autoglm_prefix_cache_hits_total", model)] == 40
    assert got[("autoglm_prompt_tokens_total", model)] == 120
    assert got[("autoglm_generation_tokens_total", model)] == 33
    assert got[("autoglm_num_preemptions_total", model)] == 1
    assert got[("autoglm_engine_step_loop_alive", model)] == 1
    assert got[("autoglm_server_draining", ())] == 1
    assert got[("autoglm_http_requests_in_flight", ())] == 2
    assert all(name.startswith("autoglm_") for name, _ in got)


def test_registries_are_per_app() -> None:
    a = ServerMetrics(EngineStats, "a", ServerState())
    b = ServerMetrics(EngineStats, "b", ServerState())
    a.requests.labels("/x", "200", "a").inc()
    assert ("autoglm_requests_total", (("model", "a"), ("route", "/x"), ("status", "200"))) in samples(a)
    assert not any(name == "autoglm_requests_total" for name, _ in samples(b))


def test_timer_observes_ttft_tpot_e2e_and_queue() -> None:
    m = ServerMetrics(EngineStats, "demo", ServerState())
    t = m.timer("demo")
    t.saw(RequestOutput("r", [CompletionOutput(0)], queue_time=0.25))  # scheduled, no token yet
    assert t.first_token is None and t.queue_time == 0.25
    t.saw(RequestOutput("r-1", [CompletionOutput(0, "a", [5])], queue_time=0.002))  # a second prompt's request
    assert t.first_token is not None and t.queue_time == 0.002
    t.finish(Usage(prompt_tokens=4, completion_tokens=5))
    model = (("model", "demo"),)
    got = samples(m)
    for name in ("e2e_request_latency", "time_to_first_token", "time_per_output_token", "request_queue_time"):
        assert got[(f"autoglm_{name}_seconds_count", model)] == 1, name
    assert got[("autoglm_request_queue_time_seconds_sum", model)] == 0.002
    ttft = got[("autoglm_time_to_first_token_seconds_sum", model)]
    assert ttft <= got[("autoglm_e2e_request_latency_seconds_sum", model)]
    t2 = m.timer("demo")
    t2.saw(RequestOutput("r2", [CompletionOutput(0, "a", [5])]))  # a token; the engine gave no queue time
    t2.finish(Usage(prompt_tokens=4, completion_tokens=1))  # one token: no time between tokens to measure
    got = samples(m)
    assert got[("autoglm_time_per_output_token_seconds_count", model)] == 1
    assert got[("autoglm_request_queue_time_seconds_count", model)] == 1  # t2 saw no queue time
