"""RouterConfig: model deployments (backends, weights, versions), balancing, health, retries, discovery, rollout.

API keys of remote backends are named here (an environment variable or a secret file), never written inline:
the config file is not a secret store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openautoglm.config.duration import Duration

BackendKind = Literal["local", "openai", "autoglm"]
Strategy = Literal["weighted_round_robin", "least_outstanding", "p2c_ewma", "affinity"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackendConfig(_Strict):
    """One model service behind a deployment."""

    name: str = Field(..., min_length=1, description="Unique within the deployment; names it in logs and metrics")
    kind: BackendKind = "openai"
    url: str | None = Field(None, description="Base URL of a remote backend, e.g. http://10.0.0.5:8000/v1")
    model: str | None = Field(
        None,
        description="Model name the backend knows; default: the deployment's. For kind 'local': a checkpoint "
        "directory or 'demo' the router loads an engine of its own for (unset: the server's engine)",
    )
    weight: float = Field(1.0, gt=0, le=1000)
    version: str = Field("stable", min_length=1, description="Model version label (stable/canary rollout)")
    api_key_env: str | None = Field(None, description="Environment variable holding the backend's API key")
    api_key_file: str | None = Field(None, description="File holding the backend's API key (a mounted secret)")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent with every request")
    connect_timeout_s: Duration = Field(5.0, gt=0, le=300)
    first_byte_timeout_s: Duration = Field(60.0, gt=0, le=3600, description="Longest wait for the response headers")
    read_timeout_s: Duration = Field(60.0, gt=0, le=3600, description="Longest silence between two streamed events")
    max_context: int | None = Field(None, ge=1, description="Context length; default: asked from the backend")
    modalities: list[Literal["text", "image", "audio"]] = Field(default_factory=lambda: ["text"])
    streaming: bool = True
    max_priority: int | None = Field(
        None, description="Take only requests whose priority is <= this (lower runs first); None: all"
    )

    @model_validator(mode="after")
    def _check(self) -> BackendConfig:
        if self.kind != "local" and not self.url:
            raise ValueError(f"backend {self.name!r}: url is required for kind {self.kind!r}")
        if self.api_key_env and self.api_key_file:
            raise ValueError(f"backend {self.name!r}: give api_key_env or api_key_file, not both")
        return self


class DnsDiscoveryConfig(_Strict):
    """Backends from a DNS name re-resolved periodically (e.g. a Kubernetes headless Service)."""

    host: str = Field(..., min_length=1)
    port: int = Field(..., ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    path: str = Field("/v1", description="Base path appended to each address")
    interval_s: Duration = Field(10.0, gt=0, le=3600)


class RedisDiscoveryConfig(_Strict):
    """Backends that announce themselves in Redis under ``key_prefix`` with a heartbeat TTL."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("autoglm:registry:", min_length=1)
    poll_interval_s: Duration = Field(2.0, gt=0, le=600)


class DiscoveryConfig(_Strict):
    """Where a deployment's dynamic backends come from; ``template`` supplies their other settings."""

    dns: DnsDiscoveryConfig | None = None
    redis: RedisDiscoveryConfig | None = None
    template: BackendConfig = Field(
        default_factory=lambda: BackendConfig(name="discovered", kind="autoglm", url="http://template"),
        description="Settings of discovered backends (name and url are replaced per backend)",
    )


class CanaryConfig(_Strict):
    """A canary version of a deployment and how it is rolled out."""

    version: str = Field(..., min_length=1, description="The backends' version label of the canary")
    steps: list[float] = Field(default_factory=lambda: [5.0, 50.0, 100.0], min_length=1)
    weight: float = Field(0.0, ge=0, le=100, description="Current canary share in percent")
    auto: bool = Field(True, description="Promote and roll back by itself on the analysis")

    @model_validator(mode="after")
    def _check(self) -> CanaryConfig:
        if any(not 0 < s <= 100 for s in self.steps) or self.steps != sorted(self.steps):
            raise ValueError(f"canary.steps must rise within (0, 100], got {self.steps}")
        return self


class DeploymentConfig(_Strict):
    model: str = Field(..., min_length=1, description="The model name clients ask for")
    strategy: Strategy = "p2c_ewma"
    affinity_key: Literal["user", "prefix"] = "prefix"
    affinity_prefix_chars: int = Field(256, ge=1, description="Leading prompt characters hashed for affinity")
    stable_version: str = "stable"
    backends: list[BackendConfig] = Field(default_factory=list)
    discovery: DiscoveryConfig | None = None
    canary: CanaryConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        names = [b.name for b in self.backends]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"deployment {self.model!r}: backend names must be unique, repeated: {dup}")
        if not self.backends and self.discovery is None:
            raise ValueError(f"deployment {self.model!r}: needs backends or discovery")
        return self


class HealthCheckConfig(_Strict):
    """Active probes, with the usual defaults (every 5 s, 3 s timeout, 3 failures down, 2 successes up)."""

    interval_s: Duration = Field(5.0, gt=0, le=3600)
    timeout_s: Duration = Field(3.0, gt=0, le=600)
    unhealthy_threshold: int = Field(3, ge=1, le=100)
    healthy_threshold: int = Field(2, ge=1, le=100)


class BreakerConfig(_Strict):
    """Per-backend circuit breaker: opens after consecutive failures, half-opens after the cooldown."""

    failure_threshold: int = Field(5, ge=1, le=1000)
    cooldown_s: Duration = Field(30.0, gt=0, le=3600)


class OutlierConfig(_Strict):
    """Passive outlier detection over each backend's recent requests."""

    window: int = Field(50, ge=5, le=10000, description="Recent requests considered")
    min_requests: int = Field(10, ge=1)
    max_error_rate: float = Field(0.5, gt=0, le=1)
    ejection_s: Duration = Field(30.0, gt=0, le=3600)
    max_ejected_percent: float = Field(50.0, ge=0, le=100)


class RetryConfig(_Strict):
    """Retries before the first byte only; exponential backoff with full jitter; a budget against storms."""

    max_attempts: int = Field(3, ge=1, le=10)
    backoff_base_s: Duration = Field(0.05, ge=0, le=10)
    backoff_max_s: Duration = Field(1.0, ge=0, le=60)
    budget_ratio: float = Field(0.2, ge=0, le=10, description="Retries allowed per request, on average")
    budget_min_per_s: float = Field(5.0, ge=0, description="Retries always allowed per second")
    retry_statuses: list[int] = Field(default_factory=lambda: [429, 502, 503, 504])
    default_deadline_s: Duration = Field(300.0, gt=0, le=86400, description="Per-request deadline when none is set")


class AnalysisConfig(_Strict):
    """Canary analysis over a sliding window, canary against stable."""

    window_s: Duration = Field(60.0, gt=0, le=86400)
    min_requests: int = Field(50, ge=1, description="Canary requests needed before any decision")
    max_error_rate_increase: float = Field(0.05, ge=0, le=1, description="Canary minus stable error rate")
    max_p95_ratio: float = Field(1.5, ge=1, description="Canary p95 latency over stable's")
    min_p95_increase_s: Duration = Field(
        0.05, ge=0, description="A p95 regression counts only above this many seconds (millisecond noise does not)"
    )
    step_interval_s: Duration = Field(60.0, ge=0, description="Least time at one step before promoting")
    interval_s: Duration = Field(5.0, gt=0, le=3600, description="How often the analysis runs")


class RouterConfig(_Strict):
    enabled: bool = Field(False, description="Serve through the router instead of the local engine alone")
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    health: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    ewma_decay_s: Duration = Field(10.0, gt=0, le=3600, description="Time constant of the latency EWMA")
    memory_budget_bytes: int | None = Field(
        None,
        ge=1,
        description="Bytes the local backends' own engines may take together (estimated); a new version that "
        "would exceed it replaces the old one after a drain instead of loading beside it. None: no limit (on "
        "a GPU, the device's free memory still decides)",
    )

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        models = [d.model for d in self.deployments]
        dup = sorted({m for m in models if models.count(m) > 1})
        if dup:
            raise ValueError(f"router.deployments: model names must be unique, repeated: {dup}")
        return self
