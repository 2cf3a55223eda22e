"""Router series for /metrics, read from the router's backend states at scrape time: circuit breakers, health,
ejections and in-flight requests per backend. The families are always exported (empty without a router) so that
dashboards and alerts can name them on every server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LABELS = ["model", "backend", "version"]


class RouterCollector(Collector):
    def __init__(self, app_state: Any) -> None:
        self._state = app_state  # the router is attached by serve.py after the app is built (or never)

    def collect(self) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(
            "autoglm_backend_circuit_open", "1 while the backend's circuit breaker is open or half-open", labels=_LABELS
        )
        healthy = GaugeMetricFamily("autoglm_backend_healthy", "1 while the backend passes its probes", labels=_LABELS)
        ejected = GaugeMetricFamily("autoglm_backend_ejected", "1 while outlier detection ejects it", labels=_LABELS)
        in_flight = GaugeMetricFamily("autoglm_backend_in_flight", "Requests in flight to the backend", labels=_LABELS)
        failures = CounterMetricFamily("autoglm_backend_failures", "Requests the backend failed", labels=_LABELS)
        router = getattr(self._state, "router", None)
        for model, dep in router.status()["deployments"].items() if router is not None else ():
            for b in dep["backends"]:
                labels = [model, str(b["name"]), str(b["version"])]
                breaker.add_metric(labels, 0.0 if b["breaker"] == "closed" else 1.0)
                healthy.add_metric(labels, 1.0 if b["healthy"] else 0.0)
                ejected.add_metric(labels, 1.0 if b["ejected"] else 0.0)
                in_flight.add_metric(labels, float(b["in_flight"]))
                failures.add_metric(labels, float(b["failures"]))
        yield from (breaker, healthy, ejected, in_flight, failures)
