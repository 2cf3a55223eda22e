"""Every configuration in examples/ is valid: no error and no warning from `autoglm config validate`."""

from __future__ import annotations

from pathlib import Path

import pytest

from openautoglm.config.settings import load_settings
from openautoglm.ops.config_check import check_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_documented_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"cpu-demo.yaml", "single-gpu.yaml", "multi-replica.yaml", "gateway-remote-backends.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    report = check_file(path)
    assert report.issues == [], "\n".join(i.format(str(path)) for i in report.issues)
    load_settings(path, None, {})  # what serve itself loads


def test_remote_backends_example_routes_to_vllm_and_sglang() -> None:
    settings = load_settings(ROOT / "examples" / "gateway-remote-backends.yaml", None, {})
    deployment = settings.router.deployments[0]
    assert settings.router.enabled and {b.kind for b in deployment.backends} == {"openai"}
    assert deployment.canary is not None and deployment.canary.version == "canary"
    assert settings.router.retry.backoff_base_s == 0.05 and settings.router.retry.default_deadline_s == 300
