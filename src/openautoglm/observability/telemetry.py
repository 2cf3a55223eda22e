"""GPU telemetry through NVML (nvidia-ml-py, optional) and the host metrics that matter to serving, exported
to Prometheus and handed to the detectors.

NVML is read at scrape time and at each detector tick: a read of every device costs well under a millisecond
per GPU, and a reading is never older than the scrape that shows it. Xid errors arrive as NVML events; each
read drains the event set without waiting, so a count only grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

_NVML_TEMPERATURE_GPU = 0
_NVML_MEMORY_ERROR_CORRECTED = 0
_NVML_MEMORY_ERROR_UNCORRECTED = 1
_NVML_VOLATILE_ECC = 0
_NVML_EVENT_XID_CRITICAL = 0x0000000000000008
_MAX_EVENTS_PER_READ = 1000  # a storm of Xid events must not hold up a scrape


@dataclass(slots=True)
class GpuSample:
    index: int
    name: str
    uuid: str
    utilization: float | None = None  # percent
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    ecc_corrected: int | None = None  # volatile counts (since the driver loaded)
    ecc_uncorrected: int | None = None
    xid_errors: int = 0  # critical Xid events seen by this process
    last_xid: int | None = None


@dataclass(slots=True)
class DiskSample:
    path: str
    total: int
    free: int

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.free / self.total if self.total else 0.0


@dataclass(slots=True)
class HostSample:
    rss_bytes: int | None
    memory_total: int | None
    open_fds: int | None
    loop_lag_s: float | None
    disks: list[DiskSample] = field(default_factory=list)


class NvmlReader:
    """Per-device readings through an NVML module object (``pynvml`` from nvidia-ml-py, or a test double with
    the same function names). Each field that a device does not support stays None."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in self.handles]
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self.handles]
        self.xid_counts = [0] * len(self.handles)
        self.last_xid: list[int | None] = [None] * len(self.handles)
        self.events = self._register_xid_events()

    @classmethod
    def open(cls) -> NvmlReader | None:
        """A reader over the real NVML, or None when nvidia-ml-py, the driver or a GPU is missing."""
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return None
        try:
            reader = cls(nvml)
        except nvml.NVMLError as exc:  # no driver, no GPU: serve without GPU metrics
            logger.info("GPU telemetry off: NVML unavailable (%s)", exc)
            return None
        return reader if reader.handles else None

    def _register_xid_events(self) -> Any:
        try:
            events = self.nvml.nvmlEventSetCreate()
        except self.nvml.NVMLError:
            return None
        for handle in self.handles:
            with contextlib.suppress(self.nvml.NVMLError):  # not every GPU reports Xid events
                self.nvml.nvmlDeviceRegisterEvents(handle, _NVML_EVENT_XID_CRITICAL, events)
        return events

    def _drain_xid_events(self) -> None:
        if self.events is None:
            return
        for _ in range(_MAX_EVENTS_PER_READ):
            try:
                event = self.nvml.nvmlEventSetWait_v2(self.events, 0)
            except self.nvml.NVMLError:  # timeout: nothing (more) pending
                return
            if event.eventType & _NVML_EVENT_XID_CRITICAL:
                index = self.nvml.nvmlDeviceGetIndex(event.device)
                if 0 <= index < len(self.xid_counts):
                    self.xid_counts[index] += 1
                    self.last_xid[index] = int(event.eventData)

    def read(self) -> list[GpuSample]:
        self._drain_xid_events()
        return [self._read_device(i, h) for i, h in enumerate(self.handles)]

    def _read_device(self, index: int, handle: Any) -> GpuSample:
        nvml = self.nvml
        s = GpuSample(index, self.names[index], self.uuids[index], xid_errors=self.xid_counts[index])
        s.last_xid = self.last_xid[index]
        if (util := self._try(nvml.nvmlDeviceGetUtilizationRates, handle)) is not None:
            s.utilization = float(util.gpu)
        if (mem := self._try(nvml.nvmlDeviceGetMemoryInfo, handle)) is not None:
            s.memory_used, s.memory_total = int(mem.used), int(mem.total)
        s.temperature_c = _float(self._try(nvml.nvmlDeviceGetTemperature, handle, _NVML_TEMPERATURE_GPU))
        power_mw = self._try(nvml.nvmlDeviceGetPowerUsage, handle)
        s.power_w = power_mw / 1000.0 if power_mw is not None else None
        get_ecc = nvml.nvmlDeviceGetTotalEccErrors
        s.ecc_corrected = self._try(get_ecc, handle, _NVML_MEMORY_ERROR_CORRECTED, _NVML_VOLATILE_ECC)
        s.ecc_uncorrected = self._try(get_ecc, handle, _NVML_MEMORY_ERROR_UNCORRECTED, _NVML_VOLATILE_ECC)
        return s

    def _try(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.nvml.NVMLError:  # NotSupported on this device (ECC on consumer GPUs, power on some)
            return None

    def close(self) -> None:
        if self.events is not None:
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlEventSetFree(self.events)
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


class LoopLagMonitor:
    """How late the event loop wakes a sleeper: a busy loop delays every request by about this much."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last_s: float | None = None
        self.max_s = 0.0  # the worst since the last ``take_max``
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(time.perf_counter() - before - self.interval_s, 0.0)
            self.last_s, self.max_s = lag, max(self.max_s, lag)

    def take_max(self) -> float | None:
        worst, self.max_s = self.max_s, 0.0
        return worst if self.last_s is not None else None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def read_host(disk_paths: list[str], loop_lag_s: float | None = None) -> HostSample:
    return HostSample(_rss_bytes(), _memory_total(), _open_fds(), loop_lag_s, [_disk(p) for p in disk_paths])


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best the standard library offers
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _memory_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _open_fds() -> int | None:
    for path in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(path))
    return None


def _disk(path: str) -> DiskSample:
    # Watch the nearest existing ancestor: the model cache may not exist until the first download.
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    usage = shutil.disk_usage(probe)
    return DiskSample(path, usage.total, usage.free)


class Telemetry:
    """GPU (when present) and host readings; ``collector()`` exports them to a Prometheus registry."""

    def __init__(self, disk_paths: list[str], nvml: NvmlReader | None, loop_lag: LoopLagMonitor) -> None:
        self.disk_paths = disk_paths
        self.nvml = nvml
        self.loop_lag = loop_lag

    def gpus(self) -> list[GpuSample]:
        return self.nvml.read() if self.nvml is not None else []

    def host(self) -> HostSample:
        return read_host(self.disk_paths, self.loop_lag.last_s)

    def collector(self) -> Collector:
        return _TelemetryCollector(self)

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.close()
            self.nvml = None


class _TelemetryCollector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def collect(self) -> Iterator[Metric]:
        yield from _gpu_metrics(self.t.gpus())
        yield from _host_metrics(self.t.host())


_GPU_GAUGES = (
    ("autoglm_gpu_utilization_percent", "GPU utilisation over NVML's last sample period", "utilization"),
    ("autoglm_gpu_memory_used_bytes", "GPU memory in use (all processes)", "memory_used"),
    ("autoglm_gpu_memory_total_bytes", "GPU memory in total", "memory_total"),
    ("autoglm_gpu_temperature_celsius", "GPU core temperature", "temperature_c"),
    ("autoglm_gpu_power_watts", "GPU power draw", "power_w"),
)
_GPU_COUNTERS = (
    ("autoglm_gpu_ecc_errors_corrected", "Corrected ECC memory errors since the driver loaded", "ecc_corrected"),
    ("autoglm_gpu_ecc_errors_uncorrected", "Uncorrected ECC memory errors since the driver loaded", "ecc_uncorrected"),
    ("autoglm_gpu_xid_errors", "Critical Xid errors reported by NVML while this server ran", "xid_errors"),
)


def _gpu_metrics(gpus: list[GpuSample]) -> Iterator[Metric]:
    if not gpus:
        return
    labels = ["gpu", "name", "uuid"]
    for name, doc, attr in _GPU_GAUGES:
        g = GaugeMetricFamily(name, doc, labels=labels)
        for s in gpus:
            if (value := getattr(s, attr)) is not None:
                g.add_metric([str(s.index), s.name, s.uuid], value)
        yield g
    for name, doc, attr in _GPU_COUNTERS:
        c = CounterMetricFamily(name, doc, labels=labels)
        for s in gpus:
            if (value := getattr(s, attr)) is not None:
                c.add_metric([str(s.index), s.name, s.uuid], value)
        yield c


def _host_metrics(h: HostSample) -> Iterator[Metric]:
    if h.rss_bytes is not None:
        yield GaugeMetricFamily("autoglm_process_resident_memory_bytes", "Resident memory of the server", h.rss_bytes)
    if h.memory_total is not None:
        yield GaugeMetricFamily("autoglm_host_memory_total_bytes", "Physical memory of the host", h.memory_total)
    if h.open_fds is not None:
        yield GaugeMetricFamily("autoglm_process_open_fds", "Open file descriptors of the server", h.open_fds)
    if h.loop_lag_s is not None:
        yield GaugeMetricFamily(
            "autoglm_event_loop_lag_seconds", "How late the event loop woke a sleeper", h.loop_lag_s
        )
    free = GaugeMetricFamily("autoglm_disk_free_bytes", "Free space where the server keeps data", labels=["path"])
    total = GaugeMetricFamily("autoglm_disk_total_bytes", "Size of the file system holding the path", labels=["path"])
    for d in h.disks:
        free.add_metric([d.path], d.free)
        total.add_metric([d.path], d.total)
    yield free
    yield total
