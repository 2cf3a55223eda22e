"""A stand-in for the ``pynvml`` module (nvidia-ml-py) with the same function names and error behaviour, so
the NVML reader runs without a GPU. Each device is a dict of readings; a missing key raises NotSupported."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
nvmlEventTypeXidCriticalError = 0x8


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class FakeNvml:
    NVMLError = NVMLError

    def __init__(self, devices: list[dict[str, Any]], *, events_supported: bool = True) -> None:
        self.devices = devices
        self.events_supported = events_supported
        self.pending: deque[SimpleNamespace] = deque()
        self.registered: list[int] = []
        self.initialised = 0

    # --- library ------------------------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i  # real handles are opaque pointers; the reader only passes them back

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def _get(self, handle: int, key: str) -> Any:
        if key not in self.devices[handle]:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return self.devices[handle][key]

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self._get(h, "name").encode()  # older nvidia-ml-py versions return bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._get(h, "uuid")

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._get(h, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        used, total = self._get(h, "memory")
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return self._get(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._get(h, "power_mw")

    def nvmlDeviceGetTotalEccErrors(self, h: int, error_type: int, counter_type: int) -> int:
        assert counter_type == 0  # NVML_VOLATILE_ECC
        return self._get(h, "ecc")[error_type]

    # --- events -------------------------------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> str:
        if not self.events_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h: int, types: int, event_set: str) -> None:
        assert types & nvmlEventTypeXidCriticalError and event_set == "event-set"
        self.registered.append(h)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        assert timeout_ms == 0  # the reader must never block a scrape
        if not self.pending:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        return self.pending.popleft()

    def nvmlEventSetFree(self, event_set: str) -> None:
        pass

    def inject_xid(self, h: int, xid: int) -> None:
        self.pending.append(SimpleNamespace(device=h, eventType=nvmlEventTypeXidCriticalError, eventData=xid))
