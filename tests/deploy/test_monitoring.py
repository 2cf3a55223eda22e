"""The Grafana dashboard and the Prometheus alerts query only metrics that a real `autoglm serve` exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_METRIC = re.compile(r"\bautoglm_[a-z0-9_]+")
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "open-autoglm.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and r["labels"]["severity"]
        assert r["expr"].count("(") == r["expr"].count(")") and _METRIC.search(r["expr"])
    assert {"AutoGLMHighErrorRate", "AutoGLMHighP99Latency", "AutoGLMLongQueueWait", "AutoGLMKVCacheFull",
            "AutoGLMHighRateLimitedShare"} <= set(names)  # fmt: skip


def test_dashboard_is_well_formed() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15 and all(e.count("(") == e.count(")") for e in exprs)


@pytest.mark.slow
def test_every_queried_metric_exists(serve_process: Any) -> None:
    server = serve_process({})
    httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 2}, timeout=60)
    families = {f.name for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    queried = {
        _family(m) for e in [*dashboard_exprs(), *(r["expr"] for r in alert_rules())] for m in _METRIC.findall(e)
    }
    missing = sorted(queried - families)
    assert not missing, f"queried but not served by /metrics: {missing}"
