"""Prometheus series of traffic control (limits, admission queue, response cache), on a registry of their own
that the HTTP app's /metrics includes (``TrafficMetrics`` is a Collector)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class TrafficMetrics(Collector):
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        self.limited = Counter(
            "autoglm_ratelimit_refused", "Requests refused by a rate limit, by limit", ["limit"], registry=reg
        )
        self.limiter_errors = Counter(
            "autoglm_ratelimit_backend_errors", "Times the shared limiter (Redis) stopped answering", registry=reg
        )
        self.limiter_up = Gauge(
            "autoglm_ratelimit_backend_up", "1 while the configured limiter backend answers", registry=reg
        )
        self.limiter_up.set(1)
        self.queue_wait = Histogram(
            "autoglm_admission_queue_wait_seconds", "Time requests waited in the admission queue",
            ["model"], buckets=_WAIT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue_length = Histogram(
            "autoglm_admission_queue_length", "Queue length each request found on arrival",
            ["model"], buckets=_LEN_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue_refused = Counter(
            "autoglm_admission_refused", "Requests refused by the admission queue, by reason",
            ["model", "reason"], registry=reg,
        )  # fmt: skip
        self.cache_hits = Counter("autoglm_cache_hits", "Response cache hits, by tier", ["tier"], registry=reg)
        self.cache_misses = Counter("autoglm_cache_misses", "Response cache misses", registry=reg)
        self.cache_evictions = Counter(
            "autoglm_cache_evictions", "Entries evicted from the in-process tier (size or age)", registry=reg
        )
        self.cache_write_errors = Counter(
            "autoglm_cache_write_errors", "Cache writes that failed (the requests succeeded)", ["tier"], registry=reg
        )
        self._gauges: list[tuple[str, str, Callable[[], dict[str, float]]]] = []

    def gauge(self, name: str, doc: str, read: Callable[[], dict[str, float]]) -> None:
        """A gauge read at scrape time: ``read()`` maps a model (or '') to its value."""
        self._gauges.append((name, doc, read))

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        for name, doc, read in self._gauges:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for label, value in read().items():
                family.add_metric([label], value)
            yield family
