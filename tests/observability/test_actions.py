"""Actions: the webhook retried against a real local HTTP receiver that fails first, load shedding, and the
router's canary rolled back through its rollout API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from openautoglm.config.observability import DetectorsConfig, WebhookConfig
from openautoglm.config.router import RouterConfig
from openautoglm.observability.actions import ActionDispatcher, LoadShedFlag, post_webhook
from openautoglm.observability.detectors import Detection
from openautoglm.router.rollout import RolloutEvent
from openautoglm.router.router import Router


class Receiver:
    """A real HTTP server on loopback answering 503 to the first ``fail`` POSTs."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.attempts = 0
        self.received: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail:
            return web.Response(status=503)
        self.received.append(await request.json())
        assert request.headers["X-Token"] == "t0ken"
        return web.Response(status=204)


@pytest.fixture
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver(fail=request.param)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield rec, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


def hook(url: str, attempts: int = 4) -> WebhookConfig:
    return WebhookConfig(url=url, max_attempts=attempts, backoff_base_s=0.01, backoff_max_s=0.05,
                         headers={"X-Token": "t0ken"})  # fmt: skip


def detection(actions: list[str]) -> Detection:
    return Detection("disk_forecast", "warning", "disk /data full in ~14 min", actions, {"time_to_limit_s": 840.0})  # type: ignore[arg-type]


@pytest.mark.parametrize("receiver", [2], indirect=True)
async def test_webhook_is_retried_until_the_receiver_accepts(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    cfg = DetectorsConfig(webhook=hook(url), forecasts=[], anomalies=[])
    dispatcher = ActionDispatcher(cfg, CollectorRegistry(), LoadShedFlag(10))
    await dispatcher.raised_now(detection(["webhook"]))
    await dispatcher.aclose(wait_s=5.0)
    assert rec.attempts == 3
    assert len(rec.received) == 1
    body = rec.received[0]
    assert body["kind"] == "disk_forecast" and body["message"] == "disk /data full in ~14 min"
    assert body["evidence"] == {"time_to_limit_s": 840.0} and body["source"] == "open-autoglm"


@pytest.mark.parametrize("receiver", [100], indirect=True)
async def test_webhook_gives_up_after_max_attempts(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    registry = CollectorRegistry()
    dispatcher = ActionDispatcher(DetectorsConfig(webhook=hook(url, attempts=3)), registry, LoadShedFlag(10))
    await dispatcher.raised_now(detection(["webhook"]))
    await dispatcher.aclose(wait_s=5.0)
    assert rec.attempts == 3
    assert registry.get_sample_value("autoglm_webhook_failures_total") == 1


async def test_webhook_to_a_closed_port_fails_without_raising() -> None:
    async with aiohttp.ClientSession() as session:
        assert not await post_webhook(session, hook("http://127.0.0.1:9/none", attempts=2), {"x": 1})


async def test_log_and_metric_and_shed() -> None:
    registry = CollectorRegistry()
    shed = LoadShedFlag(clear_after_s=60)
    dispatcher = ActionDispatcher(DetectorsConfig(), registry, shed)
    assert not shed.active and not shed.should_shed(5)
    d = detection(["log", "shed"])
    await dispatcher.raised_now(d)
    dispatcher.set_active([d], [])
    assert shed.active and shed.should_shed(5) and not shed.should_shed(0)
    assert "disk /data" in (shed.reason or "")
    labels = {"kind": "disk_forecast", "severity": "warning"}
    assert registry.get_sample_value("autoglm_anomaly", labels) == 1
    assert registry.get_sample_value("autoglm_anomalies_total", labels) == 1
    dispatcher.set_active([], [d])
    assert registry.get_sample_value("autoglm_anomaly", labels) == 0


def canary_router(audit: Any) -> Router:
    # Backends are never contacted: the action only talks to the rollouts.
    data = {
        "deployments": [
            {
                "model": "glm-4",
                "backends": [
                    {"name": "s", "url": "http://127.0.0.1:9/v1", "version": "v1"},
                    {"name": "c", "url": "http://127.0.0.1:9/v1", "version": "v2"},
                ],
                "stable_version": "v1",
                "canary": {"version": "v2", "steps": [10, 50], "weight": 10},
            },
            {"model": "glm-z", "backends": [{"name": "z", "url": "http://127.0.0.1:9/v1", "version": "v1"}],
             "stable_version": "v1"},
        ],
    }  # fmt: skip
    return Router(RouterConfig.model_validate(data), audit=audit)


async def test_canary_action_rolls_back_running_canaries_through_the_rollout_api() -> None:
    events: list[RolloutEvent] = []
    router = canary_router(events.append)
    running, idle = router.deployments["glm-4"].rollout, router.deployments["glm-z"].rollout
    assert running.canary_version == "v2"
    dispatcher = ActionDispatcher(DetectorsConfig(), CollectorRegistry(), LoadShedFlag(1), lambda: router)
    await dispatcher.raised_now(Detection("latency_anomaly", "critical", "latency 4x", ["canary"]))
    assert running.status == "rolled_back" and running.canary_version is None
    assert events[-1].action == "rollback" and events[-1].actor == "detector"
    assert "latency_anomaly" in events[-1].reason
    assert idle.canary_version is None and idle.status == "idle"
    assert router.deployments["glm-4"].rollout.version_for("anyone") == "v1"
    await router.aclose()
