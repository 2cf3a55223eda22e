"""GPU telemetry against a fake NVML module with pynvml's function names; host readings against the operating
system's own answers; the Prometheus export of both."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tests.observability.fake_nvml import FakeNvml

from openautoglm.observability.telemetry import LoopLagMonitor, NvmlReader, Telemetry, read_host

GiB = 1 << 30


def two_gpus() -> FakeNvml:
    return FakeNvml([
        {"name": "NVIDIA H100", "uuid": "GPU-0", "util": 87, "memory": (60 * GiB, 80 * GiB), "temp": 71,
         "power_mw": 412_500, "ecc": {0: 3, 1: 0}},
        # A consumer card: no ECC, no power reading.
        {"name": "NVIDIA RTX", "uuid": "GPU-1", "util": 5, "memory": (1 * GiB, 24 * GiB), "temp": 40},
    ])  # fmt: skip


def scrape(telemetry: Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(telemetry.collector())
    out = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_nvml_readings_per_device_and_unsupported_fields_stay_empty() -> None:
    nvml = two_gpus()
    reader = NvmlReader(nvml)
    gpu0, gpu1 = reader.read()
    assert (gpu0.name, gpu0.uuid, gpu0.utilization, gpu0.temperature_c) == ("NVIDIA H100", "GPU-0", 87.0, 71.0)
    assert (gpu0.memory_used, gpu0.memory_total, gpu0.power_w) == (60 * GiB, 80 * GiB, 412.5)
    assert (gpu0.ecc_corrected, gpu0.ecc_uncorrected) == (3, 0)
    assert (gpu1.power_w, gpu1.ecc_corrected, gpu1.ecc_uncorrected) == (None, None, None)
    assert nvml.registered == [0, 1]
    reader.close()
    assert nvml.initialised == 0


def test_xid_events_are_counted_per_device_without_blocking() -> None:
    nvml = two_gpus()
    reader = NvmlReader(nvml)
    assert [g.xid_errors for g in reader.read()] == [0, 0]
    nvml.inject_xid(1, 79)  # "GPU has fallen off the bus"
    nvml.inject_xid(1, 48)
    gpus = reader.read()
    assert [g.xid_errors for g in gpus] == [0, 2]
    assert gpus[1].last_xid == 48
    assert [g.xid_errors for g in reader.read()] == [0, 2]  # counts only grow


def test_devices_without_event_support_still_report() -> None:
    reader = NvmlReader(FakeNvml(two_gpus().devices, events_supported=False))
    assert [g.xid_errors for g in reader.read()] == [0, 0]


def test_real_nvml_without_a_gpu_turns_gpu_telemetry_off() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert NvmlReader.open() is None
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here; the GPU run covers it")


def test_gpu_and_host_metrics_exported(tmp_path: Path) -> None:
    nvml = two_gpus()
    nvml.inject_xid(0, 31)
    t = Telemetry([str(tmp_path), str(tmp_path / "not-yet-created")], NvmlReader(nvml), LoopLagMonitor(0.1))
    got = scrape(t)
    h100 = (("gpu", "0"), ("name", "NVIDIA H100"), ("uuid", "GPU-0"))
    rtx = (("gpu", "1"), ("name", "NVIDIA RTX"), ("uuid", "GPU-1"))
    assert got[("autoglm_gpu_utilization_percent", h100)] == 87
    assert got[("autoglm_gpu_memory_used_bytes", h100)] == 60 * GiB
    assert got[("autoglm_gpu_memory_total_bytes", rtx)] == 24 * GiB
    assert got[("autoglm_gpu_temperature_celsius", rtx)] == 40
    assert got[("autoglm_gpu_power_watts", h100)] == 412.5
    assert ("autoglm_gpu_power_watts", rtx) not in got
    assert got[("autoglm_gpu_ecc_errors_corrected_total", h100)] == 3
    assert got[("autoglm_gpu_xid_errors_total", h100)] == 1
    assert got[("autoglm_gpu_xid_errors_total", rtx)] == 0
    free = shutil.disk_usage(tmp_path).free
    assert abs(got[("autoglm_disk_free_bytes", (("path", str(tmp_path)),))] - free) < 64 * 1 << 20
    assert ("autoglm_disk_free_bytes", (("path", str(tmp_path / "not-yet-created")),)) in got
    assert got[("autoglm_process_resident_memory_bytes", ())] > 0
    assert all(name.startswith("autoglm_") for name, _ in got)


def test_no_gpu_exports_no_gpu_series(tmp_path: Path) -> None:
    got = scrape(Telemetry([str(tmp_path)], None, LoopLagMonitor(0.1)))
    assert not any(name.startswith("autoglm_gpu_") for name, _ in got)


def test_host_readings_match_the_operating_system(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    host = read_host([str(tmp_path)])
    assert host.rss_bytes is not None and abs(host.rss_bytes - proc.memory_info().rss) < 16 << 20
    assert host.memory_total == psutil.virtual_memory().total
    with open(os.devnull) as f1, open(os.devnull) as f2:  # two more descriptors must show
        assert f1 and f2
        assert read_host([]).open_fds == host.open_fds + 2  # type: ignore[operator]


async def test_loop_lag_monitor_sees_a_blocked_loop() -> None:
    mon = LoopLagMonitor(0.02)
    mon.start()
    await asyncio.sleep(0.1)
    mon.take_max()
    time.sleep(0.3)  # block the loop, as a CPU-bound handler would
    await asyncio.sleep(0.05)
    worst = mon.take_max()
    await mon.aclose()
    assert worst is not None and worst >= 0.2
