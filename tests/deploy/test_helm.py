"""The Helm chart: every template renders (tests/deploy/gotemplate.py) and every manifest validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.deploy.gotemplate import render

from openautoglm.ops.config_check import check_text

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "open-autoglm"
K8S_VERSION = "1.33.0"
RELEASE = {"Name": "glm", "Namespace": "serving", "Service": "Helm"}


def _values(**changes: Any) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted, value in changes.items():
        node = values
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return values


def render_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        text = render(template.read_text(), copy.deepcopy(values), RELEASE, chart)
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


VARIANTS = {
    "defaults": {},
    "no-autoscaling": {"autoscaling__enabled": False, "podDisruptionBudget__enabled": False},
    "existing-secret": {"secrets__create": False, "secrets__existingSecret": "glm-secrets"},
    "open-namespaces": {"networkPolicy__allowedNamespaces": ["ingress-nginx", "apps"], "nodeSelector": {"gpu": "h100"}},
    "minimal": {"serviceMonitor__enabled": False, "networkPolicy__enabled": False, "tolerations": []},
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_every_manifest_validates_against_kubernetes_schemas(variant: str) -> None:
    docs = render_chart(_values(**VARIANTS[variant]))
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "ServiceMonitor" and doc["spec"]["endpoints"][0]["path"] == "/metrics"
            continue  # a CRD: not in the Kubernetes schemas
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_deployment_probes_drain_and_gpu() -> None:
    values = _values()
    kinds = _by_kind(render_chart(values))
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > values["drainTimeoutSeconds"] + values["preStopSleepSeconds"]
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    env = {e["name"]: e for e in container["env"]}
    assert env["AUTOGLM_STORE__URL"]["valueFrom"]["secretKeyRef"]["name"] == "glm-open-autoglm"
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Secret", "ConfigMap"} <= set(kinds)
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    assert services["glm-open-autoglm-headless"]["spec"]["clusterIP"] == "None"
    hpa_metric = kinds["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric == "autoglm_num_requests_waiting"


def test_existing_secret_is_referenced_and_none_created() -> None:
    kinds = _by_kind(render_chart(_values(**VARIANTS["existing-secret"])))
    assert "Secret" not in kinds
    env = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e} == {"glm-secrets"}


def test_mounted_settings_are_valid() -> None:
    config = _by_kind(render_chart(_values()))["ConfigMap"][0]["data"]["config.yaml"]
    report = check_text(config, "config.yaml")
    assert report.ok, [i.format() for i in report.issues]
    assert report.settings is not None and report.settings.server.drain_timeout == _values()["drainTimeoutSeconds"]


def test_the_validator_catches_a_wrong_field() -> None:
    deployment = copy.deepcopy(_by_kind(render_chart(_values()))["Deployment"][0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
