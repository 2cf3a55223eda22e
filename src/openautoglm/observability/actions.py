"""What a detection does: log and metric, webhook, shed low-priority load, mark a canary unhealthy.

Actions run when a detection is raised (not on every tick it stays active); the metric follows the active
set on every tick. The webhook retries with exponential backoff in its own task, so a slow receiver never
holds up the detectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from openautoglm.config.observability import DetectorsConfig, WebhookConfig
from openautoglm.observability.detectors import Detection

logger = logging.getLogger("openautoglm.observability")
_LOG_LEVEL = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class LoadShedFlag:
    """Read by the layers that admit requests: while ``active``, requests with ``priority`` above
    ``max_priority`` (larger numbers are less urgent, as in the scheduler) should be refused with 503."""

    def __init__(self, clear_after_s: float, max_priority: int = 0) -> None:
        self.clear_after_s = clear_after_s
        self.max_priority = max_priority
        self.until = 0.0
        self.reason: str | None = None

    @property
    def active(self) -> bool:
        return time.monotonic() < self.until

    def should_shed(self, priority: int) -> bool:
        return priority > self.max_priority and self.active

    def trigger(self, reason: str) -> None:
        self.until = time.monotonic() + self.clear_after_s
        self.reason = reason


async def post_webhook(session: aiohttp.ClientSession, cfg: WebhookConfig, payload: dict[str, Any]) -> bool:
    """POST ``payload`` as JSON; retry on connection errors and 5xx/429 with exponential backoff and jitter.
    True once the receiver answered 2xx."""
    assert cfg.url is not None  # DetectorsConfig refuses a webhook action without a URL
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            async with session.post(cfg.url, json=payload, headers=cfg.headers, timeout=timeout) as resp:
                if 200 <= resp.status < 300:
                    return True
                retryable = resp.status >= 500 or resp.status == 429
                logger.warning("webhook %s answered %d (attempt %d)", cfg.url, resp.status, attempt)
        except (aiohttp.ClientError, TimeoutError) as exc:
            retryable = True
            logger.warning("webhook %s failed: %s (attempt %d)", cfg.url, type(exc).__name__, attempt)
        if not retryable or attempt == cfg.max_attempts:
            return False
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
    return False


class ActionDispatcher:
    def __init__(
        self,
        cfg: DetectorsConfig,
        registry: CollectorRegistry,
        shed: LoadShedFlag,
        router_of: Callable[[], Any] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.shed = shed
        self.router_of = router_of  # the current Router (reloads may replace it), None without one
        self.active_gauge = Gauge(
            "autoglm_anomaly", "1 while a detection of this kind is active", ["kind", "severity"], registry=registry
        )
        self.raised = Counter(
            "autoglm_anomalies", "Detections raised, by kind and severity", ["kind", "severity"], registry=registry
        )
        self.webhooks_failed = Counter(
            "autoglm_webhook_failures", "Webhook deliveries given up after every retry", registry=registry
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None

    def set_active(self, active: Iterable[Detection], previous: Iterable[Detection]) -> None:
        for d in previous:
            self.active_gauge.labels(d.kind, d.severity).set(0)
        for d in active:
            self.active_gauge.labels(d.kind, d.severity).set(1)

    async def raised_now(self, detection: Detection) -> None:
        """Run the detection's actions once, when it is first raised."""
        self.raised.labels(detection.kind, detection.severity).inc()
        for action in detection.actions:
            if action == "log":
                logger.log(_LOG_LEVEL[detection.severity], "%s: %s", detection.kind, detection.message)
            elif action == "webhook":
                self._spawn(self._webhook(detection))
            elif action == "shed":
                self.shed.trigger(f"{detection.kind}: {detection.message}")
                logger.warning("shedding low-priority load: %s", detection.message)
            elif action == "canary":
                await self.mark_canaries_unhealthy(detection)

    def cleared(self, detection: Detection) -> None:
        logger.info("%s cleared: %s", detection.kind, detection.message)

    async def mark_canaries_unhealthy(self, detection: Detection) -> list[str]:
        """Roll back every running canary (the router's rollout API); the names of the deployments touched."""
        deployments = getattr(self.router_of(), "deployments", None) or {}
        touched = []
        for name, dep in deployments.items():
            rollout = getattr(dep, "rollout", None)
            if rollout is None or rollout.canary_version is None:
                continue
            await rollout.rollback(actor="detector", reason=f"{detection.kind}: {detection.message}")
            touched.append(name)
        if not touched:
            logger.info("%s: no canary running to mark unhealthy", detection.kind)
        return touched

    async def _webhook(self, detection: Detection) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        payload = {"source": "open-autoglm", "event": "detection", **detection.to_dict()}
        if not await post_webhook(self._session, self.cfg.webhook, payload):
            self.webhooks_failed.inc()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, wait_s: float = 0.0) -> None:
        """Let deliveries in flight finish for up to ``wait_s``, then cancel the rest."""
        if self._tasks and wait_s > 0:
            await asyncio.wait(set(self._tasks), timeout=wait_s)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
