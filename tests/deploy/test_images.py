"""deploy/docker and deploy/compose.yaml: the properties operators rely on, and valid mounted settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from openautoglm.ops.config_check import check_file

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["builder", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER autoglm$", runtime, re.M) and "useradd --uid 10001" in runtime
    assert re.search(r"HEALTHCHECK .*\n\s+CMD curl -fsS http://127.0.0.1:8000/healthz", runtime)
    assert "-c /tmp/constraints-no-torch.txt" in text and "constraints.txt" in text and "pip check" in text
    if name == "Dockerfile":
        assert text.count("FROM nvidia/cuda:") == 2 and "runtime-ubuntu" in text


def test_compose_topology_and_configs() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"engine", "gateway-1", "gateway-2", "redis", "postgres"} <= set(services)
    for name in ("gateway-1", "gateway-2"):
        env = services[name]["environment"]
        assert env["AUTOGLM_STORE__REDIS_URL"].startswith("redis://")
        assert env["AUTOGLM_STORE__URL"].startswith("postgresql://")
        assert services[name]["depends_on"]["engine"]["condition"] == "service_healthy"
    assert services["engine"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.endswith(".yaml"):
                report = check_file(DEPLOY / source)
                assert report.issues == [], [i.format() for i in report.issues]
