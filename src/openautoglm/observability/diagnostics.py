"""The detector loop and ``GET /admin/diagnostics``.

Every ``detectors.interval_s`` the loop samples the server's own metrics (request counters and latency
histograms, engine stats, telemetry), feeds the anomaly and forecast detectors, and runs the actions of the
detections that appear. ``install`` wires it into an app: telemetry and detection metrics join the app's
registry, ``app.state.observability`` holds it and ``app.state.load_shed`` is the flag other layers read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from openautoglm.config.observability import ObservabilityConfig
from openautoglm.config.settings import Settings
from openautoglm.engine.stats import EngineStats
from openautoglm.observability.actions import ActionDispatcher, LoadShedFlag
from openautoglm.observability.detectors import AnomalyDetector, Detection, ForecastDetector
from openautoglm.observability.telemetry import GpuSample, LoopLagMonitor, NvmlReader, Telemetry
from openautoglm.server.http.metrics import ServerMetrics
from openautoglm.server.http.responses import OrjsonResponse
from openautoglm.server.http.state import PROBE_PATHS

logger = logging.getLogger("openautoglm.observability")


@dataclass(slots=True)
class Signals:
    """One tick's view of the server; None where there was nothing to measure (no traffic, no GPU)."""

    t: float  # monotonic seconds
    latency: float | None = None  # mean generation latency of the requests finished this tick
    error_rate: float | None = None  # 5xx share of the API requests finished this tick
    throughput: float | None = None  # generated tokens per second
    kv_cache: float | None = None
    queue: float | None = None
    memory: float | None = None  # resident memory / host memory
    disk: dict[str, float] = field(default_factory=dict)  # path → used fraction
    gpu_memory: dict[str, float] = field(default_factory=dict)  # gpu index → used fraction
    gpu_errors: dict[str, int] = field(default_factory=dict)  # gpu index → uncorrected ECC + Xid count


class MetricsSampler:
    """Per-tick deltas of the server's own counters: the detectors see rates, not totals since start."""

    def __init__(self, metrics: ServerMetrics, stats: Callable[[], EngineStats]) -> None:
        self.metrics = metrics
        self.stats = stats
        self.prev: dict[str, float] | None = None

    def totals(self) -> dict[str, float]:
        out = {"requests": 0.0, "errors": 0.0, "lat_sum": 0.0, "lat_count": 0.0}
        for metric in self.metrics.requests.collect():
            for s in metric.samples:
                route = s.labels.get("route", "")
                if s.name.endswith("_total") and route not in PROBE_PATHS and not route.startswith("/admin"):
                    out["requests"] += s.value
                    out["errors"] += s.value if s.labels.get("status", "").startswith("5") else 0.0
        for metric in self.metrics.e2e.collect():
            for s in metric.samples:
                if s.name.endswith("_sum"):
                    out["lat_sum"] += s.value
                elif s.name.endswith("_count"):
                    out["lat_count"] += s.value
        out["tokens"] = float(self.stats().generation_tokens_total)
        out["t"] = time.monotonic()
        return out

    def sample(self, into: Signals) -> None:
        now, prev = self.totals(), self.prev
        self.prev = now
        stats = self.stats()
        into.kv_cache, into.queue = stats.kv_cache_usage, float(stats.num_waiting)
        if prev is None:
            return
        requests, finished = now["requests"] - prev["requests"], now["lat_count"] - prev["lat_count"]
        into.error_rate = (now["errors"] - prev["errors"]) / requests if requests > 0 else None
        into.latency = (now["lat_sum"] - prev["lat_sum"]) / finished if finished > 0 else None
        dt = now["t"] - prev["t"]
        into.throughput = (now["tokens"] - prev["tokens"]) / dt if dt > 0 and requests > 0 else None


class Detectors:
    """Every rule over every series; ``observe`` returns what is active after this tick."""

    def __init__(self, cfg: ObservabilityConfig) -> None:
        self.cfg = cfg.detectors
        self.anomalies = [AnomalyDetector(rule) for rule in self.cfg.anomalies]
        self.forecasts: dict[tuple[int, str | None], ForecastDetector] = {}
        self.gpu_error_start: dict[str, int] = {}

    def observe(self, s: Signals) -> dict[str, Detection]:
        active: dict[str, Detection] = {}
        for det in self.anomalies:
            if (d := det.observe(getattr(s, det.rule.signal))) is not None:
                active[det.kind] = d
        for i, rule in enumerate(self.cfg.forecasts):
            value = getattr(s, rule.signal)
            series: dict[str | None, float | None] = value if isinstance(value, dict) else {None: value}
            for name, v in series.items():
                det = self.forecasts.setdefault((i, name), ForecastDetector(rule, name))
                if (d := det.observe(s.t, v)) is not None:
                    active[det.kind + (f":{name}" if name else "")] = d
        for gpu, count in s.gpu_errors.items():
            start = self.gpu_error_start.setdefault(gpu, count)
            if count > start:
                active[f"gpu_errors:{gpu}"] = Detection(
                    "gpu_errors", self.cfg.gpu_errors_severity,
                    f"GPU {gpu}: {count - start} uncorrected ECC / critical Xid errors since the server started",
                    list(self.cfg.gpu_errors_actions), {"gpu": gpu, "count": count, "at_start": start},
                )  # fmt: skip
        return active

    def state(self) -> dict[str, Any]:
        return {
            "anomalies": {d.kind: d.last for d in self.anomalies},
            "forecasts": {d.kind + (f":{d.series}" if d.series else ""): d.last for d in self.forecasts.values()},
        }


class Observability:
    def __init__(
        self,
        cfg: ObservabilityConfig,
        telemetry: Telemetry,
        sampler: MetricsSampler,
        dispatcher: ActionDispatcher,
    ) -> None:
        self.cfg = cfg
        self.telemetry = telemetry
        self.sampler = sampler
        self.dispatcher = dispatcher
        self.detectors = Detectors(cfg)
        self.active: dict[str, Detection] = {}
        self.last_signals: Signals | None = None
        self.last_tick: float | None = None  # wall clock
        self._task: asyncio.Task[None] | None = None

    def signals(self, gpus: list[GpuSample]) -> Signals:
        s = Signals(time.monotonic())
        self.sampler.sample(s)
        host = self.telemetry.host()
        if host.rss_bytes is not None and host.memory_total:
            s.memory = host.rss_bytes / host.memory_total
        s.disk = {d.path: d.used_fraction for d in host.disks}
        for g in gpus:
            if g.memory_used is not None and g.memory_total:
                s.gpu_memory[str(g.index)] = g.memory_used / g.memory_total
            s.gpu_errors[str(g.index)] = (g.ecc_uncorrected or 0) + g.xid_errors
        return s

    async def tick(self, signals: Signals | None = None) -> dict[str, Detection]:
        """One round: sample (unless given), detect, act on what changed; the active detections."""
        if signals is None:
            gpus = await asyncio.to_thread(self.telemetry.gpus)
            signals = self.signals(gpus)
        return await self.apply(self.detectors.observe(signals), signals)

    async def apply(self, found: dict[str, Detection], signals: Signals) -> dict[str, Detection]:
        wall = time.time()
        previous = self.active
        for key, d in found.items():
            old = previous.get(key)
            if old is not None and old.severity == d.severity:
                d.since = old.since
                continue
            d.since = wall
            await self.dispatcher.raised_now(d)
        for key, d in previous.items():
            if key not in found:
                self.dispatcher.cleared(d)
        self.dispatcher.set_active(found.values(), previous.values())
        self.active, self.last_signals, self.last_tick = found, signals, wall
        return found

    async def start(self) -> None:
        self.telemetry.loop_lag.start()
        if self.cfg.detectors.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.detectors.interval_s)
            try:
                await self.tick()
            except OSError as exc:  # a disk path vanished, /proc unreadable: try again next round
                logger.warning("detectors: tick skipped: %s", exc)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.telemetry.loop_lag.aclose()
        await self.dispatcher.aclose(wait_s=1.0)
        self.telemetry.close()

    def snapshot(self) -> dict[str, Any]:
        shed = self.dispatcher.shed
        return {
            "time": time.time(),
            "last_tick": self.last_tick,
            "interval_s": self.cfg.detectors.interval_s,
            "telemetry": {"gpus": [asdict(g) for g in self.telemetry.gpus()], "host": asdict(self.telemetry.host())},
            "signals": asdict(self.last_signals) if self.last_signals is not None else None,
            "warnings": [d.to_dict() for d in sorted(self.active.values(), key=lambda d: d.since)],
            "detectors": self.detectors.state(),
            "load_shed": {"active": shed.active, "reason": shed.reason if shed.active else None},
        }


def default_disk_paths(settings: Settings) -> list[str]:
    if settings.observability.telemetry.disk_paths:
        return list(settings.observability.telemetry.disk_paths)
    from huggingface_hub import constants

    cache = settings.engine.model.download_dir or constants.HF_HUB_CACHE
    return [cache, settings.store.data_dir]


def install(app: Any, settings: Settings) -> Observability:
    """Build the observability of ``app`` (after ``app.state.metrics`` exists) and register its metrics."""
    cfg = settings.observability
    metrics: ServerMetrics = app.state.metrics
    nvml = NvmlReader.open() if cfg.telemetry.gpu else None
    telemetry = Telemetry(default_disk_paths(settings), nvml, LoopLagMonitor(cfg.telemetry.loop_lag_interval_s))
    metrics.registry.register(telemetry.collector())
    shed = LoadShedFlag(cfg.detectors.shed_clear_after_s)
    dispatcher = ActionDispatcher(cfg.detectors, metrics.registry, shed, lambda: getattr(app.state, "router", None))
    obs = Observability(cfg, telemetry, MetricsSampler(metrics, app.state.engine.stats), dispatcher)
    app.state.observability = obs
    app.state.load_shed = shed
    return obs


router = APIRouter(tags=["Admin"])


@router.get("/admin/diagnostics")
async def diagnostics(request: Request) -> Response:
    """The current telemetry and signals, the active warnings with their evidence, and each detector's state."""
    obs: Observability = request.app.state.observability
    return OrjsonResponse(await asyncio.to_thread(obs.snapshot))
