"""ObservabilityConfig: telemetry (GPU through NVML, host), the detectors and their actions, and tracing."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openautoglm.config.duration import Duration

Severity = Literal["info", "warning", "critical"]
ActionName = Literal["log", "webhook", "shed", "canary"]
AnomalySignal = Literal["latency", "error_rate", "throughput"]
ForecastSignal = Literal["kv_cache", "queue", "memory", "disk", "gpu_memory"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TelemetryConfig(_Strict):
    gpu: bool = Field(True, description="Read GPU metrics through NVML when nvidia-ml-py and a GPU are present")
    disk_paths: list[str] = Field(
        default_factory=list,
        description="Directories whose free space is watched; empty: the model cache and store.data_dir",
    )
    loop_lag_interval_s: Duration = Field(0.5, gt=0.0, le=60.0, description="How often the event-loop lag is probed")


class AnomalyRule(_Strict):
    """A robust baseline over one signal: a sample is out of line when it lies more than ``z`` robust standard
    deviations (and ``min_delta`` in absolute terms) from the baseline; ``consecutive`` such samples raise it."""

    signal: AnomalySignal
    method: Literal["mad", "ewma"] = "mad"
    direction: Literal["up", "down", "both"] = "up"
    z: float = Field(6.0, gt=0.0, le=100.0)
    min_delta: float = Field(0.0, ge=0.0, description="Smallest absolute departure that counts (seconds, ratio, tok/s)")
    min_rel_delta: float = Field(0.2, ge=0.0, description="Smallest departure relative to the baseline")
    consecutive: int = Field(3, ge=1, le=100)
    window: int = Field(60, ge=8, le=10_000, description="Samples in the median/MAD window")
    warmup: int = Field(12, ge=4, le=10_000, description="Samples before the rule may raise anything")
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="EWMA smoothing (method ewma)")
    severity: Severity = "warning"
    actions: list[ActionName] = Field(default_factory=lambda: ["log"])


class ForecastRule(_Strict):
    """Holt's linear trend fitted online; warns when the projection crosses ``limit`` within ``horizon_s``."""

    signal: ForecastSignal
    limit: float = Field(gt=0.0, description="Fractions for kv_cache/memory/disk/gpu_memory (0..1], count for queue")
    horizon_s: Duration = Field(1800.0, gt=0.0, le=7 * 86400.0)
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="Level smoothing")
    beta: float = Field(0.3, gt=0.0, le=1.0, description="Trend smoothing")
    min_samples: int = Field(6, ge=2, le=10_000)
    severity: Severity = "warning"
    actions: list[ActionName] = Field(default_factory=lambda: ["log"])

    @model_validator(mode="after")
    def _check(self) -> ForecastRule:
        if self.signal != "queue" and self.limit > 1.0:
            raise ValueError(f"limit of {self.signal} is a fraction in (0, 1], got {self.limit}")
        return self


class WebhookConfig(_Strict):
    url: str | None = Field(None, pattern=r"^https?://", description="JSON POST target of the webhook action")
    timeout_s: Duration = Field(5.0, gt=0.0, le=120.0)
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_base_s: Duration = Field(0.5, ge=0.0, le=60.0)
    backoff_max_s: Duration = Field(30.0, ge=0.0, le=600.0)
    headers: dict[str, str] = Field(default_factory=dict)


def _default_anomalies() -> list[AnomalyRule]:
    return [
        AnomalyRule(signal="latency", min_delta=0.05),
        AnomalyRule(signal="error_rate", method="ewma", min_delta=0.05, min_rel_delta=0.0, severity="critical"),
        AnomalyRule(signal="throughput", direction="down", min_rel_delta=0.5),
    ]


def _default_forecasts() -> list[ForecastRule]:
    return [
        ForecastRule(signal="kv_cache", limit=0.98, horizon_s=120.0),
        ForecastRule(signal="queue", limit=1000, horizon_s=120.0),
        ForecastRule(signal="memory", limit=0.95),
        ForecastRule(signal="disk", limit=0.98),
        ForecastRule(signal="gpu_memory", limit=0.99, horizon_s=300.0),
    ]


class DetectorsConfig(_Strict):
    enabled: bool = True
    interval_s: Duration = Field(5.0, gt=0.0, le=3600.0, description="How often the server's metrics are sampled")
    anomalies: list[AnomalyRule] = Field(default_factory=_default_anomalies)
    forecasts: list[ForecastRule] = Field(default_factory=_default_forecasts)
    gpu_errors_severity: Severity = "critical"
    gpu_errors_actions: list[ActionName] = Field(default_factory=lambda: ["log"])
    webhook: WebhookConfig = Field(default_factory=WebhookConfig)
    shed_clear_after_s: Duration = Field(60.0, ge=0.0, description="Shedding ends this long after its last trigger")

    @model_validator(mode="after")
    def _check(self) -> DetectorsConfig:
        used = {a for r in (*self.anomalies, *self.forecasts) for a in r.actions} | set(self.gpu_errors_actions)
        if "webhook" in used and self.webhook.url is None:
            raise ValueError("the webhook action is configured but detectors.webhook.url is not set")
        return self


class TracingConfig(_Strict):
    enabled: bool = Field(False, description="OpenTelemetry traces (needs the 'tracing' extra)")
    service_name: str = "open-autoglm"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Share of new traces sampled (parent decides)")
    exporter: Literal["otlp", "console", "none"] = "otlp"
    otlp_endpoint: str | None = Field(None, description="Default: OTEL_EXPORTER_OTLP_* variables, else localhost")


class ObservabilityConfig(_Strict):
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    detectors: DetectorsConfig = Field(default_factory=DetectorsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
